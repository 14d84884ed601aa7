//! The Binance spot `<symbol>@trade` wire format, and nothing else of
//! Binance's: decoding an event into the crate's [`Trade`], encoding it back,
//! and unwrapping combined-stream frames. No other module sees Binance's
//! one-letter keys.
//!
//! A trade event as Binance sends it (the `data` of a combined-stream frame):
//!
//! ```json
//! {"e":"trade","E":1723161255343,"s":"BTCUSDT","t":3735683259,
//!  "p":"61837.63000000","q":"0.02000000","T":1723161255342,"m":true,"M":true}
//! ```
//!
//! Unknown keys are ignored: Binance removed `b`/`a` in 2024 and adds new ones.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::decimal;
use crate::rejection::{Reject, Rejection};
use crate::trade::Trade;

pub mod rest;
mod scan;

/// The event as it is on the wire; strings borrow from the payload.
#[derive(Debug, PartialEq, Deserialize)]
struct WireTrade<'a> {
    #[serde(rename = "e", borrow)]
    event: Cow<'a, str>,
    #[serde(rename = "E", default)]
    event_time: Option<i64>,
    #[serde(rename = "s", borrow)]
    symbol: Cow<'a, str>,
    #[serde(rename = "t")]
    id: i64,
    #[serde(rename = "p", borrow)]
    price: Cow<'a, str>,
    #[serde(rename = "q", borrow)]
    qty: Cow<'a, str>,
    #[serde(rename = "T")]
    time: i64,
    #[serde(rename = "m")]
    buyer_is_maker: bool,
}

/// Decodes and validates one trade event (SPEC §1). Payloads in the shape
/// Binance sends go through [`scan`], a scanner that allocates nothing;
/// anything it is not sure about goes through serde_json, so every reject
/// keeps the reason and detail the general path gives.
pub fn decode(payload: &[u8]) -> Result<Trade<'_>, Rejection> {
    match scan::scan(payload) {
        Some(wire) => validate(wire),
        None => decode_general(payload),
    }
}

/// The general path: serde_json, then the same checks.
fn decode_general(payload: &[u8]) -> Result<Trade<'_>, Rejection> {
    validate(serde_json::from_slice(payload).map_err(json_rejection)?)
}

fn validate(wire: WireTrade<'_>) -> Result<Trade<'_>, Rejection> {
    if wire.event != "trade" {
        return Err(Rejection::new(Reject::WrongEventType, format!("event type {:?}", wire.event)));
    }
    if !valid_symbol(&wire.symbol) {
        return Err(Rejection::new(Reject::BadSymbol, format!("symbol {:?}", wire.symbol)));
    }
    if !(0..MAX_ID).contains(&wire.id) {
        return Err(Rejection::new(Reject::BadId, format!("trade id {}", wire.id)));
    }
    if wire.time <= 0 {
        return Err(Rejection::new(Reject::BadTime, format!("trade time {}", wire.time)));
    }
    let price = positive(&wire.price).ok_or_else(|| Rejection::new(Reject::BadPrice, format!("price {:?}", wire.price)))?;
    let qty = positive(&wire.qty).ok_or_else(|| Rejection::new(Reject::BadQty, format!("qty {:?}", wire.qty)))?;
    Ok(Trade {
        symbol: wire.symbol,
        id: wire.id,
        price,
        qty,
        time_ms: wire.time,
        buyer_is_maker: wire.buyer_is_maker,
        event_time_ms: wire.event_time,
    })
}

fn json_rejection(err: serde_json::Error) -> Rejection {
    let detail = err.to_string();
    let reason = match err.classify() {
        serde_json::error::Category::Data if detail.starts_with("missing field") => Reject::MissingField,
        serde_json::error::Category::Data => Reject::WrongType,
        _ => Reject::MalformedJson,
    };
    Rejection::new(reason, detail)
}

/// How far ahead of the checking process's clock a trade time may be
/// (SPEC §1): one trade dated in the future would otherwise make every
/// later trade of its symbol late.
pub const DEFAULT_FUTURE_TOLERANCE: std::time::Duration = std::time::Duration::from_secs(3600);

/// Refuses a trade time more than `tolerance` ahead of `now_ms`.
pub fn check_time(time_ms: i64, now_ms: i64, tolerance: std::time::Duration) -> Result<(), Rejection> {
    let horizon = now_ms.saturating_add(i64::try_from(tolerance.as_millis()).unwrap_or(i64::MAX));
    if time_ms > horizon {
        let ahead = time_ms.saturating_sub(now_ms);
        return Err(Rejection::new(
            Reject::BadTime,
            format!("trade time {time_ms} is {ahead} ms ahead of this clock (tolerance {tolerance:?})"),
        ));
    }
    Ok(())
}

/// Milliseconds since the epoch by this process's clock.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Longest symbol, in characters (SPEC §1).
pub const MAX_SYMBOL_CHARS: usize = 32;
/// Trade ids are JSON numbers: below 2^53 every one is exact (SPEC §1).
pub const MAX_ID: i64 = 1 << 53;

/// 1 to [`MAX_SYMBOL_CHARS`] Unicode letters or digits, letters upper case
/// where their script has case: Binance lists symbols outside ASCII, so
/// `[A-Z0-9]+` would turn real trades away (SPEC §1).
pub fn valid_symbol(symbol: &str) -> bool {
    if symbol.is_ascii() {
        return (1..=MAX_SYMBOL_CHARS).contains(&symbol.len()) && symbol.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit());
    }
    let mut chars = 0;
    for c in symbol.chars() {
        chars += 1;
        if chars > MAX_SYMBOL_CHARS || !(c.is_numeric() || (c.is_alphabetic() && !c.is_lowercase())) {
            return false;
        }
    }
    chars > 0
}

fn positive(text: &str) -> Option<i128> {
    decimal::parse(text).filter(|&v| v > 0)
}

/// Encodes a trade as the event Binance would have sent. For events received
/// from Binance this gives back the same bytes: Binance writes prices and
/// quantities with eight places and `M` (documented as "ignore") is always
/// true.
pub fn encode(trade: &Trade<'_>, out: &mut Vec<u8>) {
    use std::io::Write;
    out.extend_from_slice(br#"{"e":"trade","#);
    if let Some(event_time) = trade.event_time_ms {
        let _ = write!(out, r#""E":{event_time},"#);
    }
    let _ = write!(
        out,
        r#""s":"{}","t":{},"p":"{}","q":"{}","T":{},"m":{},"M":true}}"#,
        trade.symbol,
        trade.id,
        decimal::format(trade.price, decimal::SCALE as u32),
        decimal::format(trade.qty, decimal::SCALE as u32),
        trade.time_ms,
        trade.buyer_is_maker,
    );
}

/// What one message from a combined stream carries.
#[derive(Debug)]
pub enum Frame<'a> {
    /// A trade event: the `data` bytes exactly as received.
    Trade(&'a [u8]),
    /// A reply to a request (`{"result":null,"id":1}`) or another event.
    Other(&'a str),
    /// An error reply (`{"code":2,"msg":"Invalid request"}`).
    Error { code: i64, msg: String },
}

#[derive(Deserialize)]
struct WireFrame<'a> {
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(default)]
    code: Option<i64>,
    #[serde(default)]
    msg: Option<String>,
    #[serde(rename = "e", borrow, default)]
    event: Option<Cow<'a, str>>,
}

/// Unwraps a combined-stream frame, or recognises a bare trade event.
pub fn unwrap_frame(text: &str) -> Result<Frame<'_>, Rejection> {
    let frame: WireFrame<'_> = serde_json::from_str(text).map_err(json_rejection)?;
    if let Some(data) = frame.data {
        return Ok(Frame::Trade(data.get().as_bytes()));
    }
    if let (Some(code), msg) = (frame.code, frame.msg) {
        return Ok(Frame::Error { code, msg: msg.unwrap_or_default() });
    }
    match frame.event.as_deref() {
        Some("trade") => Ok(Frame::Trade(text.as_bytes())),
        _ => Ok(Frame::Other(text)),
    }
}

/// Whether a text frame is Binance's `serverShutdown` notice (bare, wrapped
/// in a stream frame, or as an `event`): the server goes away soon.
pub fn is_server_shutdown(text: &str) -> bool {
    if !text.contains("serverShutdown") {
        return false;
    }
    let Ok(value) = serde_json::from_str::<serde_json::Value>(text) else { return false };
    [&value, &value["data"], &value["event"]].iter().any(|v| v["e"] == "serverShutdown")
}

/// Splits a recorded line `<receive time ns> <frame>` into its frame; a line
/// holding only a frame or a bare event is returned whole.
pub fn strip_receive_time(line: &str) -> &str {
    let line = line.trim();
    match line.split_once(' ') {
        Some((head, rest)) if !head.is_empty() && head.bytes().all(|b| b.is_ascii_digit()) => rest.trim_start(),
        _ => line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real frames from the fixtures (shared/data, 2024-08-08).
    const REAL: &str = r#"1723161254087896568 {"stream":"btcusdt@trade","data":{"e":"trade","E":1723161255343,"s":"BTCUSDT","t":3735683259,"p":"61837.63000000","q":"0.02000000","T":1723161255342,"m":true,"M":true}}"#;
    const REAL_ETH: &str = r#"{"e":"trade","E":1723161255612,"s":"ETHUSDT","t":1520538925,"p":"2683.80000000","q":"0.00200000","T":1723161255611,"m":true,"M":true}"#;

    fn data_of(line: &str) -> Vec<u8> {
        match unwrap_frame(strip_receive_time(line)) {
            Ok(Frame::Trade(bytes)) => bytes.to_vec(),
            other => panic!("not a trade frame: {other:?}"),
        }
    }

    #[test]
    fn decodes_real_frames() {
        let btc = data_of(REAL);
        let trade = decode(&btc).unwrap();
        assert_eq!(trade.symbol, "BTCUSDT");
        assert_eq!(trade.id, 3_735_683_259);
        assert_eq!(trade.price, 6_183_763_000_000);
        assert_eq!(trade.qty, 2_000_000);
        assert_eq!(trade.time_ms, 1_723_161_255_342);
        assert_eq!(trade.event_time_ms, Some(1_723_161_255_343));
        assert!(trade.buyer_is_maker);

        let eth = decode(REAL_ETH.as_bytes()).unwrap();
        assert_eq!((eth.symbol.as_ref(), eth.id, eth.qty), ("ETHUSDT", 1_520_538_925, 200_000));
    }

    #[test]
    fn encode_gives_back_the_bytes_received() {
        for payload in [data_of(REAL), REAL_ETH.as_bytes().to_vec()] {
            let mut out = Vec::new();
            encode(&decode(&payload).unwrap(), &mut out);
            assert_eq!(String::from_utf8(out).unwrap(), String::from_utf8(payload).unwrap());
        }
    }

    #[test]
    fn accepts_old_and_unknown_keys() {
        // Before 2024 Binance also sent buyer and seller order ids `b` and `a`.
        let old = r#"{"e":"trade","E":1723161255343,"s":"BTCUSDT","t":3735683259,"p":"61837.63000000","q":"0.02000000","b":88,"a":50,"T":1723161255342,"m":true,"M":true}"#;
        let new = r#"{"e":"trade","E":1,"s":"BTCUSDT","t":1,"p":"1.0","q":"2.0","T":5,"m":false,"X":"MARKET","x":{"nested":[1,2]}}"#;
        assert_eq!(decode(old.as_bytes()).unwrap().id, 3_735_683_259);
        assert_eq!(decode(new.as_bytes()).unwrap().qty, 2 * decimal::ONE);
    }

    #[test]
    fn a_trade_time_beyond_the_tolerance_is_refused() {
        let hour = DEFAULT_FUTURE_TOLERANCE;
        assert!(check_time(1_000 + 3_600_000, 1_000, hour).is_ok());
        let late = check_time(1_001 + 3_600_000, 1_000, hour).unwrap_err();
        assert_eq!(late.reason, Reject::BadTime);
        assert!(late.detail.contains("3600001 ms ahead"), "{}", late.detail);
        assert!(check_time(i64::MAX, i64::MAX - 5, hour).is_ok());
        assert_eq!(check_time(i64::MAX, 0, std::time::Duration::ZERO).unwrap_err().reason, Reject::BadTime);
    }

    #[test]
    fn symbols_outside_ascii_are_trades() {
        // Caseless scripts (Binance listed such symbols in 2025), upper-case
        // letters of other scripts, digits.
        for symbol in ["币安人生USDT", "ÄÖÜUSDT", "ΑΒΓUSDT", "1000PEPEUSDT", "Ⅻ12", &"币".repeat(MAX_SYMBOL_CHARS)] {
            let payload = format!(r#"{{"e":"trade","s":"{symbol}","t":7,"p":"0.00000123","q":"2.5","T":1723161255342,"m":false}}"#);
            let trade = decode(payload.as_bytes()).unwrap_or_else(|r| panic!("{symbol}: {r:?}"));
            assert_eq!((trade.symbol.as_ref(), trade.id), (symbol, 7));
        }
        assert!(!valid_symbol("äöüusdt") && !valid_symbol("BTC/USDT") && !valid_symbol("BTC\u{200b}"));
    }

    #[test]
    fn rejects_bad_trades_with_a_reason() {
        let base = REAL_ETH;
        let cases: &[(String, Reject)] = &[
            (base.replace(r#""p":"2683.80000000""#, r#""p":"0.00000000""#), Reject::BadPrice),
            (base.replace(r#""p":"2683.80000000""#, r#""p":"-2683.8""#), Reject::BadPrice),
            (base.replace(r#""p":"2683.80000000""#, r#""p":"abc""#), Reject::BadPrice),
            (base.replace(r#""p":"2683.80000000""#, r#""p":"NaN""#), Reject::BadPrice),
            (base.replace(r#""p":"2683.80000000""#, r#""p":"1e3""#), Reject::BadPrice),
            (base.replace(r#""p":"2683.80000000""#, r#""p":2683.8"#), Reject::WrongType),
            (base.replace(r#""q":"0.00200000""#, r#""q":"0""#), Reject::BadQty),
            (base.replace(r#""q":"0.00200000""#, r#""q":"inf""#), Reject::BadQty),
            (base.replace(r#""q":"0.00200000","#, ""), Reject::MissingField),
            (base.replace(r#""s":"ETHUSDT","#, ""), Reject::MissingField),
            (base.replace(r#""T":1723161255611,"#, ""), Reject::MissingField),
            (base.replace(r#""e":"trade""#, r#""e":"aggTrade""#), Reject::WrongEventType),
            (base.replace(r#""s":"ETHUSDT""#, r#""s":"ethusdt""#), Reject::BadSymbol),
            (base.replace(r#""s":"ETHUSDT""#, r#""s":"ÄTHUSDt""#), Reject::BadSymbol),
            (base.replace(r#""s":"ETHUSDT""#, r#""s":"ETH USDT""#), Reject::BadSymbol),
            (base.replace(r#""s":"ETHUSDT""#, r#""s":"ETH\u0000""#), Reject::BadSymbol),
            (base.replace(r#""s":"ETHUSDT""#, r#""s":"币安-USDT""#), Reject::BadSymbol),
            (base.replace(r#""s":"ETHUSDT""#, &format!(r#""s":"{}""#, "币".repeat(33))), Reject::BadSymbol),
            (base.replace(r#""s":"ETHUSDT""#, r#""s":"""#), Reject::BadSymbol),
            (base.replace(r#""t":1520538925"#, r#""t":9007199254740992"#), Reject::BadId),
            (base.replace(r#""t":1520538925"#, r#""t":9223372036854775807"#), Reject::BadId),
            (base.replace(r#""t":1520538925"#, r#""t":-1"#), Reject::BadId),
            (base.replace(r#""T":1723161255611"#, r#""T":0"#), Reject::BadTime),
            (base.replace(r#""m":true"#, r#""m":"yes""#), Reject::WrongType),
            (base[..base.len() / 2].to_string(), Reject::MalformedJson),
            ("not json at all".to_string(), Reject::MalformedJson),
            (String::new(), Reject::MalformedJson),
            ("[1,2,3]".to_string(), Reject::WrongType),
        ];
        for (payload, reason) in cases {
            let got = decode(payload.as_bytes()).map(|t| t.id).unwrap_err();
            assert_eq!(got.reason, *reason, "{payload}: {}", got.detail);
        }
    }

    #[test]
    fn unwraps_frames_replies_and_errors() {
        assert!(matches!(unwrap_frame(r#"{"result":null,"id":1}"#), Ok(Frame::Other(_))));
        let err = unwrap_frame(r#"{"code":2,"msg":"Invalid request: unknown variable"}"#).unwrap();
        assert!(matches!(err, Frame::Error { code: 2, .. }));
        assert!(matches!(unwrap_frame(REAL_ETH), Ok(Frame::Trade(_))));
        assert_eq!(unwrap_frame(r#"{"stream":"x","da"#).unwrap_err().reason, Reject::MalformedJson);
        assert_eq!(strip_receive_time("  {\"a\":1} "), "{\"a\":1}");
    }
}
