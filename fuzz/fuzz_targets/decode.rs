//! The trade decoder on any bytes: it never panics; a payload it takes is
//! a valid trade that encodes to a payload it takes again as the same
//! trade; a payload it refuses has a reason.

#![no_main]

use cryptopulse::binance;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match binance::decode(data) {
        Ok(trade) => {
            assert!(binance::valid_symbol(&trade.symbol), "{trade:?}");
            assert!(trade.price > 0 && trade.qty > 0 && trade.id >= 0 && trade.time_ms > 0, "{trade:?}");
            let mut encoded = Vec::new();
            binance::encode(&trade, &mut encoded);
            let again = binance::decode(&encoded).unwrap_or_else(|e| panic!("{trade:?} encoded is refused: {e:?}"));
            assert_eq!(again, trade);
        }
        Err(rejection) => assert!(!rejection.reason.as_str().is_empty()),
    }
});
