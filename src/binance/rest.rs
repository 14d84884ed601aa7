//! Binance's REST answer for old trades (`GET /api/v3/historicalTrades`),
//! turned into the stream events Binance would have sent for them. A
//! trade as the endpoint lists it:
//!
//! ```json
//! {"id":3735683260,"price":"61837.63000000","qty":"0.02000000","quoteQty":"1236.7526",
//!  "time":1723161255342,"isBuyerMaker":true,"isBestMatch":true}
//! ```

use serde::Deserialize;

use crate::decimal;
use crate::error::{Error, Result};
use crate::trade::Trade;

/// One trade as `historicalTrades` lists it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RestTrade {
    id: i64,
    price: String,
    qty: String,
    time: i64,
    is_buyer_maker: bool,
}

/// Decodes a `historicalTrades` answer into `(id, time, event)` in id order.
pub fn historical_trades(symbol: &str, body: &[u8]) -> Result<Vec<(i64, i64, Vec<u8>)>> {
    let trades: Vec<RestTrade> = serde_json::from_slice(body).map_err(|e| Error::binance("historicalTrades answer", e))?;
    let mut out = Vec::with_capacity(trades.len());
    for t in trades {
        let bad =
            |what: &str, value: &str| Error::binance("historicalTrades answer", format!("{symbol} trade {}: bad {what} {value:?}", t.id));
        let price = decimal::parse(&t.price).filter(|&v| v > 0).ok_or_else(|| bad("price", &t.price))?;
        let qty = decimal::parse(&t.qty).filter(|&v| v > 0).ok_or_else(|| bad("qty", &t.qty))?;
        let trade =
            Trade { symbol: symbol.into(), id: t.id, price, qty, time_ms: t.time, buyer_is_maker: t.is_buyer_maker, event_time_ms: None };
        let mut event = Vec::with_capacity(128);
        super::encode(&trade, &mut event);
        out.push((t.id, t.time, event));
    }
    out.sort_by_key(|&(id, _, _)| id);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rest_trade_becomes_the_stream_event_without_event_time() {
        let body = br#"[{"id":3735683260,"price":"61837.63000000","qty":"0.02000000","quoteQty":"1236.7526","time":1723161255342,"isBuyerMaker":true,"isBestMatch":true}]"#;
        let trades = historical_trades("BTCUSDT", body).unwrap();
        assert_eq!(trades.len(), 1);
        assert_eq!((trades[0].0, trades[0].1), (3735683260, 1723161255342));
        assert_eq!(
            std::str::from_utf8(&trades[0].2).unwrap(),
            r#"{"e":"trade","s":"BTCUSDT","t":3735683260,"p":"61837.63000000","q":"0.02000000","T":1723161255342,"m":true,"M":true}"#
        );
        let decoded = super::super::decode(&trades[0].2).unwrap();
        assert_eq!((decoded.id, decoded.event_time_ms), (3735683260, None));
    }

    #[test]
    fn a_bad_number_from_rest_is_an_error_not_a_trade() {
        let body = br#"[{"id":1,"price":"-1","qty":"1","time":1,"isBuyerMaker":false}]"#;
        let err = historical_trades("BTCUSDT", body).unwrap_err().to_string();
        assert!(err.contains("bad price"), "{err}");
    }
}
