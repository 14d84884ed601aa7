//! The decoder's fast path: one pass over a trade event in the shape
//! Binance sends (any key order, unknown keys with plain values, JSON
//! whitespace), borrowing every string and allocating nothing.
//!
//! It answers only when serde_json would read the same [`WireTrade`] from
//! the payload: well-formed JSON, every required key once with the right
//! type. Everything else — escapes, control characters, floats, numbers of
//! 19 digits or more, nested or `null` values, duplicate or missing keys,
//! anything malformed — is `None`, and the general path decides, so a
//! rejected record gets the same reason and detail either way.

use std::borrow::Cow;

use super::WireTrade;

/// The fields of a trade event, or `None` to leave the payload to serde_json.
pub(super) fn scan(payload: &[u8]) -> Option<WireTrade<'_>> {
    // Checked once here, so strings are sliced out without checking each.
    let text = std::str::from_utf8(payload).ok()?;
    let mut cur = Cursor { text, bytes: payload, at: 0 };
    let mut found = Found::default();
    cur.skip_ws();
    cur.expect(b'{')?;
    cur.skip_ws();
    loop {
        cur.expect(b'"')?;
        let key = cur.string()?.as_bytes();
        cur.skip_ws();
        cur.expect(b':')?;
        cur.skip_ws();
        match key {
            b"e" => set(&mut found.event, cur.string_value()?)?,
            b"E" => set(&mut found.event_time, cur.int()?)?,
            b"s" => set(&mut found.symbol, cur.string_value()?)?,
            b"t" => set(&mut found.id, cur.int()?)?,
            b"p" => set(&mut found.price, cur.string_value()?)?,
            b"q" => set(&mut found.qty, cur.string_value()?)?,
            b"T" => set(&mut found.time, cur.int()?)?,
            b"m" => set(&mut found.buyer_is_maker, cur.boolean()?)?,
            _ => cur.skip_plain_value()?,
        }
        cur.skip_ws();
        match cur.next()? {
            b',' => cur.skip_ws(),
            b'}' => break,
            _ => return None,
        }
    }
    cur.skip_ws();
    if cur.at != payload.len() {
        return None;
    }
    Some(WireTrade {
        event: Cow::Borrowed(found.event?),
        event_time: found.event_time,
        symbol: Cow::Borrowed(found.symbol?),
        id: found.id?,
        price: Cow::Borrowed(found.price?),
        qty: Cow::Borrowed(found.qty?),
        time: found.time?,
        buyer_is_maker: found.buyer_is_maker?,
    })
}

#[derive(Default)]
struct Found<'a> {
    event: Option<&'a str>,
    event_time: Option<i64>,
    symbol: Option<&'a str>,
    id: Option<i64>,
    price: Option<&'a str>,
    qty: Option<&'a str>,
    time: Option<i64>,
    buyer_is_maker: Option<bool>,
}

/// A key seen twice is an error to serde_json: leave it to that path.
fn set<T>(slot: &mut Option<T>, value: T) -> Option<()> {
    match slot {
        Some(_) => None,
        None => {
            *slot = Some(value);
            Some(())
        }
    }
}

/// Bytes that end the plain part of a string: the closing quote, an escape,
/// or a control character.
const STRING_STOP: [bool; 256] = {
    let mut stop = [false; 256];
    let mut b = 0;
    while b < 0x20 {
        stop[b] = true;
        b += 1;
    }
    stop[b'"' as usize] = true;
    stop[b'\\' as usize] = true;
    stop
};

struct Cursor<'a> {
    text: &'a str,
    /// `text` as bytes.
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let b = self.peek()?;
        self.at += 1;
        Some(b)
    }

    fn expect(&mut self, want: u8) -> Option<()> {
        (self.next()? == want).then_some(())
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    /// The rest of a string whose opening quote is consumed, when it has
    /// no escapes (and no control characters, which JSON forbids).
    fn string(&mut self) -> Option<&'a str> {
        let (start, rest) = (self.at, self.bytes.get(self.at..)?);
        let len = rest.iter().position(|&b| STRING_STOP[usize::from(b)])?;
        if rest[len] != b'"' {
            return None;
        }
        self.at += len + 1;
        self.text.get(start..start + len)
    }

    fn string_value(&mut self) -> Option<&'a str> {
        self.expect(b'"')?;
        self.string()
    }

    /// `0|-?[1-9][0-9]{0,17}`, not followed by a fraction or exponent:
    /// always an i64 to serde_json too.
    fn int(&mut self) -> Option<i64> {
        let negative = self.peek() == Some(b'-');
        if negative {
            self.at += 1;
        }
        let (start, first) = (self.at, self.peek()?);
        let mut value: i64 = 0;
        while let Some(d) = self.peek().map(|b| b.wrapping_sub(b'0')).filter(|&d| d < 10) {
            // Wraps only past 18 digits, which are refused below.
            value = value.wrapping_mul(10).wrapping_add(i64::from(d));
            self.at += 1;
        }
        let digits = self.at - start;
        // serde_json reads `-0` as a float.
        if digits == 0 || digits > 18 || (digits > 1 || negative) && first == b'0' {
            return None;
        }
        if matches!(self.peek(), Some(b'.' | b'e' | b'E')) {
            return None;
        }
        Some(if negative { -value } else { value })
    }

    fn boolean(&mut self) -> Option<bool> {
        let rest = self.bytes.get(self.at..)?;
        let (value, len) = if rest.starts_with(b"true") {
            (true, 4)
        } else if rest.starts_with(b"false") {
            (false, 5)
        } else {
            return None;
        };
        self.at += len;
        Some(value)
    }

    /// The value of a key the decoder ignores: a plain string, integer or
    /// boolean (Binance's `M`); anything else goes to the general path.
    fn skip_plain_value(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => self.string_value().map(drop),
            b't' | b'f' => self.boolean().map(drop),
            _ => self.int().map(drop),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{decode, decode_general};
    use super::*;

    const ETH: &str = r#"{"e":"trade","E":1723161255612,"s":"ETHUSDT","t":1520538925,"p":"2683.80000000","q":"0.00200000","T":1723161255611,"m":true,"M":true}"#;

    /// The fast path and the general path agree on `payload`.
    fn agree(payload: &str) {
        assert_eq!(decode(payload.as_bytes()), decode_general(payload.as_bytes()), "{payload}");
    }

    #[test]
    fn takes_the_shapes_binance_sends() {
        let cases = [
            ETH.to_string(),
            // reordered keys
            r#"{"s":"ETHUSDT","T":1723161255611,"q":"0.00200000","p":"2683.80000000","t":1520538925,"m":false,"e":"trade"}"#.to_string(),
            // old and unknown keys with plain values, UTF-8 beyond ASCII
            ETH.replace(r#""m":true"#, r#""b":88,"a":-50,"m":true,"X":"MARKET","z":false,"n":"café ₿""#),
            // whitespace everywhere JSON allows it
            format!(" \n{}\t\r\n", ETH.replace(',', " ,\n  ").replace(':', " :\t").replace('{', "{ ").replace('}', " }")),
            ETH.replace(r#""E":1723161255612"#, r#""E":0"#),
        ];
        for payload in &cases {
            let wire = scan(payload.as_bytes()).unwrap_or_else(|| panic!("fast path refused {payload}"));
            assert_eq!(wire, serde_json::from_str::<WireTrade<'_>>(payload).unwrap(), "{payload}");
            agree(payload);
        }
    }

    #[test]
    fn takes_every_trade_of_the_fixtures() {
        let batches = crate::archive::open(std::path::Path::new("fixtures/binance-spot-trades-2024-08-08.parquet"), 8192).unwrap();
        let mut payload = Vec::new();
        let mut n = 0;
        for batch in batches {
            let batch = batch.unwrap();
            let cols = crate::trade::TradeColumns::new(&batch).unwrap();
            for row in 0..batch.num_rows() {
                payload.clear();
                super::super::encode(&cols.trade(row), &mut payload);
                assert!(scan(&payload).is_some(), "{}", String::from_utf8_lossy(&payload));
                assert_eq!(decode(&payload).unwrap(), cols.trade(row));
                n += 1;
            }
        }
        assert_eq!(n, 15_863);
    }

    #[test]
    fn leaves_everything_else_to_the_general_path() {
        let cases = [
            // escapes: serde_json unescapes, so it decides
            ETH.replace(r#""s":"ETHUSDT""#, r#""s":"ETH\u0055SDT""#),
            ETH.replace(r#""e":"trade""#, r#""e":"tr\"ade""#),
            ETH.replace(r#""s":"ETHUSDT""#, "\"s\":\"ETH\tUSDT\""),
            ETH.replace(r#""M":true"#, r#""M":"caf\u00e9""#),
            // numbers: exponent, fraction, 19 digits and more, leading zero, bare minus
            ETH.replace(r#""t":1520538925"#, r#""t":1e3"#),
            ETH.replace(r#""t":1520538925"#, r#""t":1520538925.0"#),
            ETH.replace(r#""t":1520538925"#, r#""t":1234567890123456789"#),
            ETH.replace(r#""t":1520538925"#, r#""t":99999999999999999999"#),
            ETH.replace(r#""t":1520538925"#, r#""t":01"#),
            ETH.replace(r#""t":1520538925"#, r#""t":-"#),
            // serde_json reads -0 as a float
            ETH.replace(r#""E":1723161255612"#, r#""E":-0"#),
            ETH.replace(r#""M":true"#, r#""M":1.5"#),
            // nested, null and duplicate values
            ETH.replace(r#""M":true"#, r#""M":{"x":[1,2]}"#),
            ETH.replace(r#""E":1723161255612"#, r#""E":null"#),
            ETH.replace(r#""t":1520538925"#, r#""t":1520538925,"t":1520538926"#),
            // wrong types, missing keys, trailing bytes
            ETH.replace(r#""m":true"#, r#""m":"true""#),
            ETH.replace(r#""p":"2683.80000000""#, r#""p":2683.8"#),
            ETH.replace(r#""q":"0.00200000","#, ""),
            ETH.replace(r#""m":true,"#, ""),
            format!("{ETH}x"),
            format!("{ETH}{{}}"),
            "{}".to_string(),
            "[]".to_string(),
        ];
        for payload in &cases {
            assert!(scan(payload.as_bytes()).is_none(), "fast path took {payload}");
            agree(payload);
        }
        // Not UTF-8 inside a string.
        let mut bytes = ETH.as_bytes().to_vec();
        bytes[8] = 0xff;
        assert!(scan(&bytes).is_none());
        assert_eq!(decode(&bytes), decode_general(&bytes));
        assert_eq!(decode(&bytes).unwrap_err().reason, crate::rejection::Reject::MalformedJson);
    }

    #[test]
    fn rejects_bad_values_as_the_general_path_does() {
        for (from, to) in [
            (r#""p":"2683.80000000""#, r#""p":"-2683.8""#),
            (r#""p":"2683.80000000""#, r#""p":"1e3""#),
            (r#""p":"2683.80000000""#, r#""p":"2683.800000001""#),
            (r#""p":"2683.80000000""#, r#""p":"2683.8000000000000""#),
            (r#""q":"0.00200000""#, r#""q":"0""#),
            (r#""t":1520538925"#, r#""t":-1"#),
            (r#""T":1723161255611"#, r#""T":0"#),
            (r#""s":"ETHUSDT""#, r#""s":"eth""#),
            (r#""e":"trade""#, r#""e":"aggTrade""#),
        ] {
            let payload = ETH.replace(from, to);
            assert!(scan(payload.as_bytes()).is_some(), "{payload}");
            agree(&payload);
        }
        assert_eq!(decode(ETH.replace("2683.80000000", "2683.800000001").as_bytes()).unwrap_err().detail, r#"price "2683.800000001""#);
    }

    #[test]
    fn agrees_on_every_truncation_and_single_byte_change() {
        for end in 0..ETH.len() {
            agree(&ETH[..end]);
        }
        for at in 0..ETH.len() {
            for b in [" ", "\"", "\\", "0", "9", "-", "x", ",", ":", "}", "{", ".", "e"] {
                let mut payload = ETH.to_string();
                payload.replace_range(at..at + 1, b);
                agree(&payload);
            }
        }
    }
}
