//! Property tests (proptest) of the decoder and of the bar computation, on
//! inputs no fixture holds: arbitrary bytes, arbitrary JSON in every field
//! of a trade, arbitrary trade sequences with values at the edges of every
//! range. No panic, no NaN or infinity, low ≤ VWAP ≤ high, RSI in [0, 100],
//! and the same bars for any cut into batches and any split across
//! restarts. Cases per property: `PROPTEST_CASES` (scripts/test: 10,000).

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{json, Value};

use cryptopulse::binance;
use cryptopulse::decimal;
use cryptopulse::trade::{Trade, TradeBatchBuilder};
use cryptopulse::window::{FinalBar, PartitionState, WindowConfig};

/// The number of cases of every property: `PROPTEST_CASES`, or proptest's 256.
fn runner() -> TestRunner {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(256);
    TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() })
}

/// Runs `test` on `strategy`'s cases and says how many passed.
fn check<S: Strategy>(name: &str, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>) {
    let mut runner = runner();
    let cases = runner.config().cases;
    if let Err(e) = runner.run(&strategy, test) {
        panic!("property {name:?}: {e}");
    }
    println!("property {name:?}: {cases} cases passed");
}

/// What every decoded trade must be, whatever the input.
fn valid(trade: &Trade<'_>) -> Result<(), TestCaseError> {
    prop_assert!(binance::valid_symbol(&trade.symbol), "symbol {:?}", trade.symbol);
    prop_assert!((0..binance::MAX_ID).contains(&trade.id), "id {}", trade.id);
    prop_assert!(trade.price > 0 && trade.qty > 0 && trade.time_ms > 0, "{trade:?}");
    let mut encoded = Vec::new();
    binance::encode(trade, &mut encoded);
    let again = binance::decode(&encoded).map_err(|r| TestCaseError::fail(format!("re-encoded trade refused: {r:?}")))?;
    prop_assert_eq!(
        (&again.symbol, again.id, again.price, again.qty, again.time_ms),
        (&trade.symbol, trade.id, trade.price, trade.qty, trade.time_ms)
    );
    Ok(())
}

#[test]
fn the_decoder_takes_any_bytes_without_panic() {
    check("decoder: arbitrary bytes", proptest::collection::vec(any::<u8>(), 0..512), |bytes| {
        if let Ok(trade) = binance::decode(&bytes) {
            valid(&trade)?;
        }
        Ok(())
    });
}

/// Any JSON value, with numbers and strings at the edges of their ranges.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        prop_oneof![Just(i64::MIN), Just(-1i64), Just(0), Just(1), Just(1 << 53), Just(i64::MAX), any::<i64>()].prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        "\\PC{0,40}".prop_map(Value::from),
        prop_oneof![
            Just("0"),
            Just("0.00000001"),
            Just("0.000000001"),
            Just("99999999999999999999.5"),
            Just("1e3"),
            Just("-1"),
            Just("NaN")
        ]
        .prop_map(Value::from),
        "[0-9]{1,25}(\\.[0-9]{0,12})?".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            proptest::collection::btree_map("[a-zA-Z]{1,3}", inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

#[test]
fn the_decoder_takes_any_json_in_any_field_without_panic() {
    let base = json!({"e":"trade","E":1723161255343i64,"s":"BTCUSDT","t":3735683259i64,"p":"61837.63000000","q":"0.02000000","T":1723161255342i64,"m":true,"M":true});
    let keys = ["e", "E", "s", "t", "p", "q", "T", "m", "M"];
    let strategy = (proptest::collection::vec((0..keys.len(), proptest::option::of(any_json())), 1..4), any::<bool>());
    check("decoder: arbitrary JSON in each field", strategy, |(changes, compact)| {
        let mut event = base.clone();
        for (key, value) in changes {
            match value {
                Some(value) => event[keys[key]] = value,
                None => {
                    event.as_object_mut().map(|o| o.remove(keys[key]));
                }
            }
        }
        let bytes = if compact { serde_json::to_vec(&event) } else { serde_json::to_vec_pretty(&event) }.expect("json");
        if let Ok(trade) = binance::decode(&bytes) {
            valid(&trade)?;
        }
        Ok(())
    });
}

/// One trade of a sequence: symbol index, id step (0 repeats the last id:
/// a duplicate), time step in ms (negative: an earlier time), price and qty
/// in units of 1e-8.
type Step = (usize, i64, i64, i128, i128, bool);

/// Prices and quantities: the smallest, the largest 18-digit value (most
/// often), one near 2^63 / 1000 units, values past 18 digits up to the
/// widest 38-digit one, and anything between.
fn units() -> impl Strategy<Value = i128> {
    let max = 10i128.pow(18) - 1;
    let widest = 10i128.pow(38) - 1;
    prop_oneof![
        4 => Just(max),
        1 => Just(1i128),
        1 => Just(i128::from(i64::MAX) / 1000),
        1 => Just(decimal::ONE),
        1 => 1..=max,
        2 => 1..=1_000 * decimal::ONE,
        // Past 18 digits: tens of billions of units in one trade, and the
        // widest value a price or quantity may take.
        1 => Just(25_000_000_000 * decimal::ONE + decimal::ONE / 2),
        1 => prop_oneof![Just(widest), max..=widest]
    ]
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    // Many trades in one second and many at the largest values: the sums
    // of a bar and of the longer VWAP window reach the edge of an i128.
    let time_step = prop_oneof![8 => Just(0i64), 3 => 0..400i64, 1 => -1500..0i64, 1 => Just(1_000), 1 => Just(5_000)];
    let step = (0..3usize, prop_oneof![3 => Just(1i64), 1 => Just(0), 1 => 2..5i64], time_step, units(), units(), any::<bool>());
    let ordinary = proptest::collection::vec(step, 1..300);
    // One symbol, the largest values, a few bars: sums past what an i128
    // holds unless trades are turned away.
    let max = 10i128.pow(18) - 1;
    let near_max = prop_oneof![Just(max), max - 1_000..=max];
    let edge = (
        Just(0usize),
        Just(1i64),
        prop_oneof![30 => Just(0i64), 1 => Just(1_000), 1 => Just(60_000)],
        near_max.clone(),
        near_max,
        any::<bool>(),
    );
    prop_oneof![3 => ordinary, 1 => proptest::collection::vec(edge, 150..400)]
}

/// The trades of a sequence, as rows of batches.
fn trades(steps: &[Step]) -> Vec<(String, i64, i128, i128, i64, bool)> {
    let symbols = ["BTCUSDT", "币安人生USDT", "ÄUSDT"];
    let (mut ids, mut time) = ([1i64; 3], 1_723_161_255_000i64);
    steps
        .iter()
        .map(|&(s, id_step, time_step, price, qty, maker)| {
            ids[s] += id_step;
            time = (time + time_step).max(1);
            (symbols[s].to_owned(), ids[s], price, qty, time, maker)
        })
        .collect()
}

fn batch(rows: &[(String, i64, i128, i128, i64, bool)]) -> arrow::array::RecordBatch {
    let mut builder = TradeBatchBuilder::default();
    for (symbol, id, price, qty, time_ms, buyer_is_maker) in rows {
        builder.push(&Trade {
            symbol: symbol.as_str().into(),
            id: *id,
            price: *price,
            qty: *qty,
            time_ms: *time_ms,
            buyer_is_maker: *buyer_is_maker,
            event_time_ms: None,
        });
    }
    builder.finish().expect("batch")
}

/// Window settings: one-second bars, or minute bars that gather a whole
/// sequence into a bar or two (their sums then reach the edge of an i128);
/// the longer VWAP 1 to 5 bars; RSI periods from 1.
fn windows() -> impl Strategy<Value = WindowConfig> {
    (prop_oneof![Just(1_000i64), Just(60_000)], 1..=5i64, 1..=20u32).prop_map(|(bar_ms, bars, rsi_period)| WindowConfig {
        bar_ms,
        vwap_ms: bar_ms * bars,
        rsi_period,
    })
}

/// Everything a run makes: the final bars, the rows turned away (as
/// indices of the whole sequence) and the counts.
type Run = (Vec<FinalBar>, Vec<usize>, Vec<usize>, String);

/// Applies the trades cut at `cuts`, restarting from serialized state at
/// each cut in `restarts`.
fn run(rows: &[(String, i64, i128, i128, i64, bool)], cfg: &WindowConfig, cuts: &[usize], restarts: bool) -> Result<Run, TestCaseError> {
    let mut state = PartitionState::default();
    let (mut bars, mut late, mut overflow) = (Vec::new(), Vec::new(), Vec::new());
    let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (rows.len() + 1)).collect();
    bounds.extend([0, rows.len()]);
    bounds.sort_unstable();
    bounds.dedup();
    for pair in bounds.windows(2) {
        let (from, to) = (pair[0], pair[1]);
        let out = state.apply(&batch(&rows[from..to]), cfg).map_err(|e| TestCaseError::fail(e.to_string()))?;
        bars.extend(out.bars);
        late.extend(out.late_rows.iter().map(|r| r + from));
        overflow.extend(out.overflow_rows.iter().map(|r| r + from));
        if restarts {
            let bytes = postcard::to_stdvec(&state).map_err(|e| TestCaseError::fail(e.to_string()))?;
            state = postcard::from_bytes(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        }
    }
    // Bars are in order per symbol; across symbols a cut may change it.
    bars.sort_by(|a, b| (&a.symbol, a.end).cmp(&(&b.symbol, b.end)));
    Ok((bars, late, overflow, format!("{:?}", state.counts)))
}

#[test]
fn bars_are_sound_and_the_same_for_any_cut_and_any_restart() {
    let cuts = || proptest::collection::vec(any::<usize>(), 0..6);
    let strategy = (steps(), windows(), cuts(), cuts());
    check("bars: any sequence, any cut, any restart", strategy, |(steps, cfg, cuts, other_cuts)| {
        let rows = trades(&steps);
        let whole = run(&rows, &cfg, &[], false)?;
        prop_assert_eq!(&run(&rows, &cfg, &cuts, false)?, &whole, "cut at {:?}", cuts);
        prop_assert_eq!(&run(&rows, &cfg, &other_cuts, true)?, &whole, "restarted at {:?}", other_cuts);
        for bar in &whole.0 {
            // The floats nearest to low and high: rounding keeps the order.
            let (low, high) = (decimal::ratio(bar.bar.low, 1, 8), decimal::ratio(bar.bar.high, 1, 8));
            prop_assert!(bar.vwap_bar.is_finite() && bar.vwap_long.is_finite(), "{bar:?}");
            prop_assert!(low <= bar.vwap_bar && bar.vwap_bar <= high, "vwap {} outside [{low}, {high}]", bar.vwap_bar);
            prop_assert!(bar.bar.low <= bar.bar.open.min(bar.bar.close) && bar.bar.open.max(bar.bar.close) <= bar.bar.high, "{bar:?}");
            prop_assert!(bar.rsi.is_none_or(|rsi| (0.0..=100.0).contains(&rsi)), "rsi {:?}", bar.rsi);
            prop_assert!(bar.bar.buy_volume <= bar.bar.volume && bar.bar.volume > 0 && bar.bar.quote_volume > 0, "{bar:?}");
        }
        Ok(())
    });
}
