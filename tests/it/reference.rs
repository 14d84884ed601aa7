//! Every final bar of the fixtures, computed by the library over Arrow
//! batches, against an independent implementation of SPEC §3-4 in exact
//! decimal arithmetic written here from the raw frames, and against the
//! expected values shipped with the data (shared/data, exact to 50 digits).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::str::FromStr;

use cryptopulse::archive;
use cryptopulse::sink::fields_of;
use cryptopulse::window::{FinalBar, PartitionState, WindowConfig};
use rust_decimal::Decimal;

use crate::common::fixture::{self, ARCHIVE, EXPECTED, FRAMES};

/// One reference bar: every value as an exact decimal.
#[derive(Debug, Clone)]
struct RefBar {
    /// Open, high and low; the shipped expected values do not carry them.
    range: Option<[Decimal; 3]>,
    close: Decimal,
    volume: Decimal,
    trades: u64,
    buy_volume: Decimal,
    sell_volume: Decimal,
    vwap_1s: Decimal,
    vwap_5s: Decimal,
    rsi_14: Option<Decimal>,
}

struct RawTrade {
    symbol: String,
    id: i64,
    price: Decimal,
    qty: Decimal,
    time: i64,
    buyer_is_maker: bool,
}

fn raw_trades() -> Vec<RawTrade> {
    let file = std::fs::File::open(FRAMES).unwrap();
    let reader = BufReader::new(flate2::read::MultiGzDecoder::new(file));
    reader
        .lines()
        .map(|line| {
            let line = line.unwrap();
            let (_, frame) = line.split_once(' ').unwrap();
            let frame: serde_json::Value = serde_json::from_str(frame).unwrap();
            let d = &frame["data"];
            RawTrade {
                symbol: d["s"].as_str().unwrap().to_owned(),
                id: d["t"].as_i64().unwrap(),
                price: Decimal::from_str(d["p"].as_str().unwrap()).unwrap(),
                qty: Decimal::from_str(d["q"].as_str().unwrap()).unwrap(),
                time: d["T"].as_i64().unwrap(),
                buyer_is_maker: d["m"].as_bool().unwrap(),
            }
        })
        .collect()
}

/// SPEC §3-4 the plain way: per symbol, bars by second, then VWAPs and RSI.
fn reference() -> BTreeMap<(String, i64), RefBar> {
    let mut per_symbol: BTreeMap<String, BTreeMap<i64, Vec<RawTrade>>> = BTreeMap::new();
    for t in raw_trades() {
        per_symbol.entry(t.symbol.clone()).or_default().entry(t.time.div_euclid(1000)).or_default().push(t);
    }
    let mut out = BTreeMap::new();
    for (symbol, seconds) in per_symbol {
        let last_second = *seconds.keys().last().unwrap();
        let sums: BTreeMap<i64, (Decimal, Decimal)> = seconds
            .iter()
            .map(|(k, ts)| (*k, ts.iter().fold((Decimal::ZERO, Decimal::ZERO), |(pq, q), t| (pq + t.price * t.qty, q + t.qty))))
            .collect();
        let mut rsi = RsiRef::default();
        let first = *seconds.keys().next().unwrap();
        let mut close = Decimal::ZERO;
        for k in first..last_second {
            if let Some(trades) = seconds.get(&k) {
                close = trades.iter().max_by_key(|t| t.id).unwrap().price;
            }
            rsi.push(close, k == first);
            let Some(trades) = seconds.get(&k) else { continue };
            let volume: Decimal = trades.iter().map(|t| t.qty).sum();
            let buy_volume: Decimal = trades.iter().filter(|t| !t.buyer_is_maker).map(|t| t.qty).sum();
            let (pq5, q5) =
                (k - 4..=k).filter_map(|s| sums.get(&s)).fold((Decimal::ZERO, Decimal::ZERO), |(a, b), (pq, q)| (a + pq, b + q));
            let bar = RefBar {
                range: Some([
                    trades.iter().min_by_key(|t| t.id).unwrap().price,
                    trades.iter().map(|t| t.price).max().unwrap(),
                    trades.iter().map(|t| t.price).min().unwrap(),
                ]),
                close,
                volume,
                trades: trades.len() as u64,
                buy_volume,
                sell_volume: volume - buy_volume,
                vwap_1s: sums[&k].0 / sums[&k].1,
                vwap_5s: pq5 / q5,
                rsi_14: rsi.value(),
            };
            out.insert((symbol.clone(), (k + 1) * 1000), bar);
        }
    }
    out
}

#[derive(Default)]
struct RsiRef {
    previous: Option<Decimal>,
    changes: Vec<Decimal>,
    avg: Option<(Decimal, Decimal)>,
}

impl RsiRef {
    fn push(&mut self, close: Decimal, first: bool) {
        let previous = self.previous.replace(close);
        if first {
            return;
        }
        let change = close - previous.unwrap();
        let (gain, loss) = (change.max(Decimal::ZERO), (-change).max(Decimal::ZERO));
        let n = Decimal::from(14);
        match &mut self.avg {
            Some((g, l)) => {
                *g = (*g * Decimal::from(13) + gain) / n;
                *l = (*l * Decimal::from(13) + loss) / n;
            }
            None => {
                self.changes.push(change);
                if self.changes.len() == 14 {
                    let g: Decimal = self.changes.iter().map(|c| c.max(&Decimal::ZERO)).copied().sum();
                    let l: Decimal = self.changes.iter().map(|c| (-*c).max(Decimal::ZERO)).sum();
                    self.avg = Some((g / n, l / n));
                }
            }
        }
    }

    fn value(&self) -> Option<Decimal> {
        let (g, l) = self.avg?;
        let hundred = Decimal::from(100);
        Some(if l.is_zero() {
            if g > Decimal::ZERO {
                hundred
            } else {
                Decimal::from(50)
            }
        } else {
            hundred - hundred / (Decimal::ONE + g / l)
        })
    }
}

/// The library's bars over the fixture archive, in batches of `batch_rows`.
fn computed(batch_rows: usize) -> Vec<FinalBar> {
    let cfg = WindowConfig::default();
    let mut state = PartitionState::default();
    let mut bars = Vec::new();
    for batch in archive::open(Path::new(ARCHIVE), batch_rows).unwrap() {
        bars.extend(state.apply(&batch.unwrap(), &cfg).unwrap().bars);
    }
    bars
}

fn close_enough(got: f64, want: Decimal, what: &str) {
    let want = f64::try_from(want).unwrap();
    let rel = ((got - want) / want).abs();
    assert!(rel < 1e-9, "{what}: got {got}, want {want}, relative error {rel}");
}

fn assert_bar(bar: &FinalBar, want: &RefBar) {
    let what = format!("{} {}", bar.symbol, bar.end);
    let fields: BTreeMap<String, Option<String>> = fields_of(bar, &WindowConfig::default().names()).into_iter().collect();
    let exact = |name: &str| Decimal::from_str(fields[name].as_deref().unwrap()).unwrap();
    if let Some(range) = want.range {
        assert_eq!([exact("open"), exact("high"), exact("low")], range, "{what} open, high, low");
    }
    assert_eq!(exact("close"), want.close, "{what} close");
    assert_eq!(exact("volume"), want.volume, "{what} volume");
    assert_eq!(exact("buy_volume"), want.buy_volume, "{what} buy_volume");
    assert_eq!(exact("sell_volume"), want.sell_volume, "{what} sell_volume");
    assert_eq!(bar.bar.trades, want.trades, "{what} trades");
    close_enough(bar.vwap_bar, want.vwap_1s, &format!("{what} vwap_1s"));
    close_enough(bar.vwap_long, want.vwap_5s, &format!("{what} vwap_5s"));
    match (bar.rsi, want.rsi_14) {
        (Some(got), Some(want)) => close_enough(got, want, &format!("{what} rsi_14")),
        (None, None) => {}
        (got, want) => panic!("{what} rsi_14: got {got:?}, want {want:?}"),
    }
}

#[test]
fn every_final_bar_matches_exact_decimal_arithmetic() {
    let reference = reference();
    let bars = computed(4096);
    assert_eq!(bars.len(), reference.len(), "number of final bars");
    assert_eq!(bars.len() as u64, fixture::BARS);
    for bar in &bars {
        let want = reference.get(&(bar.symbol.clone(), bar.end)).unwrap_or_else(|| panic!("unexpected bar {} {}", bar.symbol, bar.end));
        assert_bar(bar, want);
    }
}

/// The expected values carry 50 significant digits; a Decimal holds 28, so
/// keep the first 27 (an error of 1e-22 at most).
fn decimal_prefix(text: &str) -> Decimal {
    let (int, frac) = text.split_once('.').unwrap_or((text, ""));
    let keep = 27usize.saturating_sub(int.len()).min(frac.len());
    Decimal::from_str(&format!("{int}.{}", &frac[..keep])).unwrap()
}

#[test]
fn every_final_bar_matches_the_shipped_expected_values() {
    let expected: Vec<serde_json::Value> =
        std::fs::read_to_string(EXPECTED).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let bars: BTreeMap<(String, i64), FinalBar> = computed(1000).into_iter().map(|b| ((b.symbol.clone(), b.end), b)).collect();
    assert_eq!(bars.len(), expected.len());
    // Values are strings, but a zero is written as the number 0.
    let dec = |v: &serde_json::Value| decimal_prefix(&v.as_str().map_or_else(|| v.to_string(), str::to_owned));
    for row in &expected {
        let key = (row["symbol"].as_str().unwrap().to_owned(), row["window_end"].as_i64().unwrap());
        let bar = &bars[&key];
        let want = RefBar {
            range: None,
            close: dec(&row["close"]),
            volume: dec(&row["volume"]),
            trades: row["trades"].as_u64().unwrap(),
            buy_volume: dec(&row["buy_volume"]),
            sell_volume: dec(&row["sell_volume"]),
            vwap_1s: dec(&row["vwap_1s"]),
            vwap_5s: dec(&row["vwap_5s"]),
            rsi_14: row.get("rsi_14").filter(|v| !v.is_null()).map(dec),
        };
        assert_bar(bar, &want);
    }
}

#[test]
fn the_rows_quoted_in_the_data_readme_are_there() {
    let bars: BTreeMap<(String, i64), FinalBar> = computed(333).into_iter().map(|b| ((b.symbol.clone(), b.end), b)).collect();
    let rows = [
        (1_723_161_256_000, 47, "0.22682", "61834.375683361255", "61834.375683361255"),
        (1_723_161_257_000, 22, "0.13896", "61827.742989349453", "61831.855919678495"),
        (1_723_161_258_000, 6, "0.09191", "61824.000030464585", "61830.278356748017"),
    ];
    for (end, trades, volume, vwap_1s, vwap_5s) in rows {
        let bar = &bars[&("BTCUSDT".to_owned(), end)];
        assert_eq!(bar.bar.trades, trades);
        assert_eq!(Decimal::from_i128_with_scale(bar.bar.volume, 8), Decimal::from_str(volume).unwrap());
        close_enough(bar.vwap_bar, Decimal::from_str(vwap_1s).unwrap(), "vwap_1s");
        close_enough(bar.vwap_long, Decimal::from_str(vwap_5s).unwrap(), "vwap_5s");
    }
    let first_rsi = bars.values().find(|b| b.symbol == "BTCUSDT" && b.rsi.is_some()).unwrap();
    assert_eq!(first_rsi.end, 1_723_161_270_000);
    close_enough(first_rsi.rsi.unwrap(), Decimal::from_str("58.498156218571907").unwrap(), "first rsi_14");
}

/// Bars in order per symbol; how symbols interleave depends on batching.
fn by_symbol(mut bars: Vec<FinalBar>) -> Vec<FinalBar> {
    bars.sort_by(|a, b| (&a.symbol, a.end).cmp(&(&b.symbol, b.end)));
    bars
}

#[test]
fn batch_size_does_not_change_any_bar() {
    let whole = computed(100_000);
    for rows in [1, 17, 999] {
        assert_eq!(by_symbol(computed(rows)), by_symbol(whole.clone()), "batches of {rows}");
    }
}
