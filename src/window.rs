//! Event-time windows (SPEC §3-5): 1-second bars, the VWAP of a bar and of
//! the last five seconds, and Wilder's RSI over bar closes, computed over
//! the columns of whole Arrow record batches.
//!
//! State is kept per Kafka partition ([`PartitionState`]) so it can be
//! checkpointed with that partition's offset and move with it. The result
//! depends only on the sequence of trades, never on where batches begin or
//! end: sums are exact integers and bars merge associatively.

use std::collections::{BTreeMap, HashMap, VecDeque};

use arrow::array::{Array, RecordBatch};
use clap::Args;
use serde::{Deserialize, Serialize};

use crate::decimal;
use crate::error::{Error, Result};
use crate::rejection::Reject;
use crate::trade::TradeColumns;

/// Window widths and the RSI period (SPEC §4).
#[derive(Args, Debug, Clone)]
pub struct WindowArgs {
    /// Bar width in ms.
    #[arg(long, env = "CRYPTOPULSE_BAR_MS", default_value_t = DEFAULT_BAR_MS, value_parser = clap::value_parser!(i64).range(1..=86_400_000))]
    pub bar_ms: i64,
    /// Width of the longer VWAP window in ms, a multiple of the bar.
    #[arg(long, env = "CRYPTOPULSE_VWAP_MS", default_value_t = DEFAULT_VWAP_MS, value_parser = clap::value_parser!(i64).range(1..=7 * 86_400_000))]
    pub vwap_ms: i64,
    /// RSI period, in bars.
    #[arg(long, env = "CRYPTOPULSE_RSI_PERIOD", default_value_t = DEFAULT_RSI_PERIOD, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub rsi_period: u32,
}

impl WindowArgs {
    pub fn config(&self) -> WindowConfig {
        WindowConfig { bar_ms: self.bar_ms, vwap_ms: self.vwap_ms, rsi_period: self.rsi_period }
    }
}

/// Default bar width.
pub const DEFAULT_BAR_MS: i64 = 1_000;
/// Default width of the longer VWAP window.
pub const DEFAULT_VWAP_MS: i64 = 5_000;
/// Default RSI period, in bars.
pub const DEFAULT_RSI_PERIOD: u32 = 14;
/// Symbols one partition's state may hold unless told otherwise (SPEC §9).
pub const DEFAULT_MAX_SYMBOLS: usize = 10_000;

/// Which symbols a partition's state takes (SPEC §9): only those of an
/// optional allow-list, and at most `max` of them, so memory, checkpoints
/// and Redis keys stay bounded however many symbols a topic carries. A
/// symbol is admitted in the order of its first trade in the partition,
/// the same on every run whatever the cut into batches, so a restart
/// admits the same symbols.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SymbolLimits {
    pub allow: Option<std::collections::BTreeSet<String>>,
    pub max: usize,
}

impl SymbolLimits {
    /// Every symbol.
    pub const NONE: SymbolLimits = SymbolLimits { allow: None, max: usize::MAX };

    /// Why trades of `symbol` are refused by a state of `held` symbols that
    /// does (`known`) or does not hold it yet.
    fn refuses(&self, symbol: &str, known: bool, held: usize) -> Option<Reject> {
        if self.allow.as_ref().is_some_and(|allow| !allow.contains(symbol)) {
            return Some(Reject::UnknownSymbol);
        }
        (!known && held >= self.max).then_some(Reject::TooManySymbols)
    }
}
/// Below this the RSI averages are rescaled together: their ratio is all
/// that matters, and a long silence must not underflow both to zero.
const RSI_FLOOR: f64 = 1e-200;

/// Window widths and the RSI period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowConfig {
    pub bar_ms: i64,
    pub vwap_ms: i64,
    pub rsi_period: u32,
}

impl Default for WindowConfig {
    fn default() -> Self {
        WindowConfig { bar_ms: DEFAULT_BAR_MS, vwap_ms: DEFAULT_VWAP_MS, rsi_period: DEFAULT_RSI_PERIOD }
    }
}

/// Output names that carry the configured widths (`vwap_1s`, `vwap_5s`, `rsi_14`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricNames {
    pub vwap_bar: String,
    pub vwap_long: String,
    pub rsi: String,
}

impl WindowConfig {
    /// Checks that the widths fit together.
    pub fn validate(&self) -> Result<()> {
        if self.bar_ms <= 0 || self.vwap_ms <= 0 || self.vwap_ms % self.bar_ms != 0 || self.rsi_period == 0 {
            return Err(Error::Config(format!(
                "windows: bar {} ms, vwap {} ms, rsi period {}: the vwap window must be a positive multiple of the bar",
                self.bar_ms, self.vwap_ms, self.rsi_period
            )));
        }
        Ok(())
    }

    /// Start of the bar holding a trade at `time_ms`.
    pub fn bar_start(&self, time_ms: i64) -> i64 {
        time_ms.div_euclid(self.bar_ms) * self.bar_ms
    }

    pub fn names(&self) -> MetricNames {
        MetricNames {
            vwap_bar: format!("vwap_{}", duration_name(self.bar_ms)),
            vwap_long: format!("vwap_{}", duration_name(self.vwap_ms)),
            rsi: format!("rsi_{}", self.rsi_period),
        }
    }
}

fn duration_name(ms: i64) -> String {
    if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// One bar's exact sums. Prices and volumes are 1e-8 units, `quote_volume`
/// (Σp·q) is 1e-16 units.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bar {
    pub start: i64,
    pub open: i128,
    pub high: i128,
    pub low: i128,
    pub close: i128,
    pub volume: i128,
    pub quote_volume: i128,
    /// Σq of trades where the taker bought (`buyer_is_maker` false).
    pub buy_volume: i128,
    pub trades: u64,
}

impl Bar {
    /// Folds in the trades of the same bar that came later.
    fn merge(&mut self, later: &Bar) {
        self.high = self.high.max(later.high);
        self.low = self.low.min(later.low);
        self.close = later.close;
        self.volume += later.volume;
        self.quote_volume += later.quote_volume;
        self.buy_volume += later.buy_volume;
        self.trades += later.trades;
    }

    pub fn sell_volume(&self) -> i128 {
        self.volume - self.buy_volume
    }
}

/// A bar that no later trade can change, with the metrics emitted with it.
#[derive(Debug, Clone, PartialEq)]
pub struct FinalBar {
    pub symbol: String,
    /// End of the bar, ms: the bar holds trades with start <= T < end.
    pub end: i64,
    /// End of the symbol's final bar before this one, if the state has one:
    /// that bar was written to Redis before this one was made (SPEC §6, loss
    /// is noticed per symbol).
    pub previous: Option<i64>,
    pub bar: Bar,
    pub vwap_bar: f64,
    pub vwap_long: f64,
    pub rsi: Option<f64>,
}

/// Wilder's RSI over the series of bar closes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Rsi {
    /// Start of the newest final bar.
    last_start: Option<i64>,
    last_close: i128,
    /// Changes seen, up to the period.
    seeded: u32,
    seed_gain: i128,
    seed_loss: i128,
    avg_gain: f64,
    avg_loss: f64,
}

impl Rsi {
    fn on_close(&mut self, start: i64, close: i128, cfg: &WindowConfig) {
        if let Some(last) = self.last_start {
            // A bar width with no trades repeats the previous close.
            self.push_zeros((start - last) / cfg.bar_ms - 1, cfg.rsi_period);
            self.push_change(close - self.last_close, cfg.rsi_period);
        }
        self.last_start = Some(start);
        self.last_close = close;
    }

    fn push_change(&mut self, change: i128, period: u32) {
        let (gain, loss) = (change.max(0), (-change).max(0));
        if self.seeded < period {
            self.seed_gain += gain;
            self.seed_loss += loss;
            self.seeded += 1;
            if self.seeded == period {
                self.avg_gain = decimal::ratio(self.seed_gain, i128::from(period), 8);
                self.avg_loss = decimal::ratio(self.seed_loss, i128::from(period), 8);
            }
        } else {
            let p = f64::from(period);
            self.avg_gain = (self.avg_gain * (p - 1.0) + decimal::to_f64(gain)) / p;
            self.avg_loss = (self.avg_loss * (p - 1.0) + decimal::to_f64(loss)) / p;
        }
    }

    /// `n` zero changes: after seeding each one scales both averages by (p-1)/p.
    fn push_zeros(&mut self, n: i64, period: u32) {
        let seeding = n.min(i64::from(period - self.seeded));
        for _ in 0..seeding {
            self.push_change(0, period);
        }
        let rest = n - seeding;
        let largest = self.avg_gain.max(self.avg_loss);
        if rest <= 0 || largest == 0.0 {
            return;
        }
        let p = f64::from(period);
        let factor = ((p - 1.0) / p).powi(rest.min(i64::from(i32::MAX)) as i32);
        let scale = if largest * factor >= RSI_FLOOR { factor } else { RSI_FLOOR / largest };
        self.avg_gain *= scale;
        self.avg_loss *= scale;
    }

    fn value(&self, period: u32) -> Option<f64> {
        if self.seeded < period {
            return None;
        }
        let (gain, loss) = (self.avg_gain, self.avg_loss);
        Some(if loss > 0.0 {
            100.0 - 100.0 / (1.0 + gain / loss)
        } else if gain > 0.0 {
            100.0
        } else {
            50.0
        })
    }
}

/// A final bar's contribution to the longer VWAP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Recent {
    start: i64,
    quote_volume: i128,
    volume: i128,
}

/// Everything kept for one symbol between batches.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SymbolWindow {
    /// Highest trade id applied; anything at or below it is a duplicate.
    pub last_id: Option<i64>,
    /// The newest bar, still open to trades of its second.
    pub open: Option<Bar>,
    /// Final bars inside the longer VWAP window.
    recent: VecDeque<Recent>,
    rsi: Rsi,
}

/// Trades accounted for, kept in the checkpoint so counts are exact too.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub applied: u64,
    pub duplicates: u64,
    pub late: u64,
    pub rejected: u64,
    pub bars: u64,
}

impl Counts {
    pub fn add(&mut self, other: &Counts) {
        self.applied += other.applied;
        self.duplicates += other.duplicates;
        self.late += other.late;
        self.rejected += other.rejected;
        self.bars += other.bars;
    }
}

/// The window state of every symbol of one Kafka partition.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PartitionState {
    pub symbols: BTreeMap<String, SymbolWindow>,
    pub counts: Counts,
}

/// What applying one batch produced.
#[derive(Debug, Default)]
pub struct BatchOutput {
    /// Bars made final by this batch, in order per symbol.
    pub bars: Vec<FinalBar>,
    /// Rows of the batch that were late (SPEC §5), in row order.
    pub late_rows: Vec<usize>,
    /// Rows whose price and quantity would take their bar's sums past what
    /// they can hold exactly (SPEC §1): dead letters, never a wrong bar.
    pub overflow_rows: Vec<usize>,
    /// Rows of symbols the [`SymbolLimits`] refuse, with the reason.
    pub refused_rows: Vec<(usize, Reject)>,
}

impl PartitionState {
    /// Applies a batch of this partition's trades, in row order.
    pub fn apply(&mut self, batch: &RecordBatch, cfg: &WindowConfig) -> Result<BatchOutput> {
        self.apply_within(batch, cfg, &SymbolLimits::NONE)
    }

    /// [`apply`](Self::apply), taking only the symbols `limits` admit: the
    /// check is per symbol of the batch, not per trade.
    pub fn apply_within(&mut self, batch: &RecordBatch, cfg: &WindowConfig, limits: &SymbolLimits) -> Result<BatchOutput> {
        let cols = TradeColumns::new(batch)?;
        let mut out = BatchOutput::default();
        let groups = SymbolGroups::of(&cols);
        // Reused from symbol to symbol: with thousands of symbols a batch
        // holds a row or two of each, and a vector per symbol costs more.
        let (mut accepted, mut bars) = (Vec::new(), Vec::new());
        for (symbol, rows) in groups.iter() {
            let known = self.symbols.contains_key(symbol);
            if let Some(reason) = limits.refuses(symbol, known, self.symbols.len()) {
                self.counts.rejected += rows.len() as u64;
                out.refused_rows.extend(rows.iter().map(|&row| (row as usize, reason)));
                continue;
            }
            if !known {
                self.symbols.insert(symbol.to_owned(), SymbolWindow::default());
            }
            let window = self
                .symbols
                .get_mut(symbol)
                .ok_or_else(|| Error::Invariant(format!("symbol {symbol} vanished from its partition's state")))?;
            window.admit(rows, &cols, cfg, &mut self.counts, (&mut out.late_rows, &mut out.overflow_rows), &mut accepted);
            bars_of(&cols, &accepted, cfg, &mut bars);
            for bar in bars.drain(..) {
                if let Some(done) = window.add_bar(bar) {
                    out.bars.push(window.finalize(symbol, done, cfg));
                }
            }
        }
        self.counts.bars += out.bars.len() as u64;
        out.late_rows.sort_unstable();
        out.overflow_rows.sort_unstable();
        out.refused_rows.sort_unstable_by_key(|&(row, _)| row);
        Ok(out)
    }

    /// Live mode: finalizes open bars that ended `idle_ms` or more before
    /// `now_ms`, the producer's clock record (data contract §3).
    pub fn finalize_idle(&mut self, now_ms: i64, idle_ms: i64, cfg: &WindowConfig) -> Vec<FinalBar> {
        let mut bars = Vec::new();
        for (symbol, window) in &mut self.symbols {
            if window.open.as_ref().is_some_and(|bar| bar.start + cfg.bar_ms + idle_ms <= now_ms) {
                if let Some(done) = window.open.take() {
                    bars.push(window.finalize(symbol, done, cfg));
                }
            }
        }
        self.counts.bars += bars.len() as u64;
        bars
    }
}

/// Row indices per symbol, symbols in order of first appearance, rows in
/// order: one flat vector sorted by group (a counting sort), not a vector
/// per symbol.
struct SymbolGroups<'a> {
    symbols: Vec<&'a str>,
    /// Group `g` is `rows[starts[g]..starts[g + 1]]`.
    starts: Vec<usize>,
    rows: Vec<u32>,
}

impl<'a> SymbolGroups<'a> {
    fn of(cols: &TradeColumns<'a>) -> Self {
        let values = cols.symbol_values;
        let keys = cols.symbol.keys().values();
        // A dictionary may hold a symbol twice (concatenated batches): map
        // each key to one group per distinct symbol.
        let mut group_of_key = vec![u32::MAX; values.len()];
        let mut group_of_symbol: HashMap<&str, u32> = HashMap::new();
        let mut symbols: Vec<&str> = Vec::new();
        let mut counts: Vec<usize> = Vec::new();
        let mut group_of_row = Vec::with_capacity(keys.len());
        for &key in keys.iter() {
            let key = key as usize;
            if group_of_key[key] == u32::MAX {
                let symbol = values.value(key);
                group_of_key[key] = *group_of_symbol.entry(symbol).or_insert_with(|| {
                    symbols.push(symbol);
                    counts.push(0);
                    (symbols.len() - 1) as u32
                });
            }
            let group = group_of_key[key];
            counts[group as usize] += 1;
            group_of_row.push(group);
        }
        let mut starts = Vec::with_capacity(symbols.len() + 1);
        starts.push(0);
        for count in &counts {
            starts.push(starts[starts.len() - 1] + count);
        }
        let mut next = starts.clone();
        let mut rows = vec![0; keys.len()];
        for (row, &group) in group_of_row.iter().enumerate() {
            rows[next[group as usize]] = row as u32;
            next[group as usize] += 1;
        }
        SymbolGroups { symbols, starts, rows }
    }

    fn iter(&self) -> impl Iterator<Item = (&'a str, &[u32])> + '_ {
        self.symbols.iter().enumerate().map(|(g, &symbol)| (symbol, &self.rows[self.starts[g]..self.starts[g + 1]]))
    }
}

impl SymbolWindow {
    /// Drops duplicates, sets aside late trades and trades that would take
    /// their bar's sums past [`sum_limit`], and puts the rows to apply in
    /// `accepted` (replacing what it held).
    fn admit(
        &mut self,
        rows: &[u32],
        cols: &TradeColumns<'_>,
        cfg: &WindowConfig,
        counts: &mut Counts,
        (late, overflow): (&mut Vec<usize>, &mut Vec<usize>),
        accepted: &mut Vec<u32>,
    ) {
        let (ids, times) = (cols.id.values(), cols.time.values());
        let (prices, qtys, limit) = (cols.price.values(), cols.qty.values(), sum_limit(cfg));
        // The open bar's start, Σq and Σp·q, as the accepted rows leave them.
        let mut sums = self.open.as_ref().map(|bar| (bar.start, bar.volume, bar.quote_volume));
        let mut open_start = self.open.as_ref().map(|bar| bar.start);
        let closed_through = self.rsi.last_start;
        accepted.clear();
        for &row in rows {
            let (id, start) = (ids[row as usize], cfg.bar_start(times[row as usize]));
            if self.last_id.is_some_and(|last| id <= last) {
                counts.duplicates += 1;
            } else if open_start.is_some_and(|open| start < open) || closed_through.is_some_and(|closed| start <= closed) {
                counts.late += 1;
                late.push(row as usize);
            } else {
                let (volume, quote) = match sums {
                    Some((open, volume, quote)) if open == start => (volume, quote),
                    _ => (0, 0),
                };
                let (price, qty) = (prices[row as usize], qtys[row as usize]);
                let added = price.checked_mul(qty).and_then(|pq| Some((volume.checked_add(qty)?, quote.checked_add(pq)?)));
                match added.filter(|&(volume, quote)| volume <= limit && quote <= limit) {
                    Some((volume, quote)) => {
                        sums = Some((start, volume, quote));
                        open_start = Some(start);
                        self.last_id = Some(id);
                        accepted.push(row);
                    }
                    None => {
                        counts.rejected += 1;
                        overflow.push(row as usize);
                    }
                }
            }
        }
        counts.applied += accepted.len() as u64;
    }

    /// Adds the trades of one bar; returns the previous bar if this made it final.
    fn add_bar(&mut self, bar: Bar) -> Option<Bar> {
        match &mut self.open {
            Some(open) if open.start == bar.start => {
                open.merge(&bar);
                None
            }
            _ => self.open.replace(bar),
        }
    }

    /// End of the symbol's newest final bar, if it has one.
    pub fn last_final_end(&self, cfg: &WindowConfig) -> Option<i64> {
        self.rsi.last_start.map(|start| start + cfg.bar_ms)
    }

    fn finalize(&mut self, symbol: &str, bar: Bar, cfg: &WindowConfig) -> FinalBar {
        let end = bar.start + cfg.bar_ms;
        let previous = self.last_final_end(cfg);
        self.rsi.on_close(bar.start, bar.close, cfg);
        self.recent.push_back(Recent { start: bar.start, quote_volume: bar.quote_volume, volume: bar.volume });
        while self.recent.front().is_some_and(|r| r.start < end - cfg.vwap_ms) {
            self.recent.pop_front();
        }
        let (quote, volume) = self.recent.iter().fold((0, 0), |(q, v), r| (q + r.quote_volume, v + r.volume));
        FinalBar {
            symbol: symbol.to_owned(),
            end,
            previous,
            vwap_bar: decimal::ratio(bar.quote_volume, bar.volume, 8),
            vwap_long: decimal::ratio(quote, volume, 8),
            rsi: self.rsi.value(cfg.rsi_period),
            bar,
        }
    }
}

/// The most one bar's Σq or Σp·q may reach: the longer VWAP adds up to
/// `vwap_ms / bar_ms + 1` bars' sums, and that total must not wrap either.
fn sum_limit(cfg: &WindowConfig) -> i128 {
    i128::MAX / (i128::from(cfg.vwap_ms / cfg.bar_ms.max(1)) + 1)
}

/// The bars (one per run of equal bar start) of one symbol's accepted rows,
/// in one pass over the column values. A plain loop rather than Arrow
/// kernels per bar: with thousands of symbols a batch holds a row or two
/// per symbol, and a kernel call per bar and column cost more than the sums.
/// The bars go to `bars`, which is empty on entry.
fn bars_of(cols: &TradeColumns<'_>, accepted: &[u32], cfg: &WindowConfig, bars: &mut Vec<Bar>) {
    let (times, prices, qtys) = (cols.time.values(), cols.price.values(), cols.qty.values());
    for &row in accepted {
        let row = row as usize;
        let (start, price, qty) = (cfg.bar_start(times[row]), prices[row], qtys[row]);
        // `admit` checked that these sums stay within `sum_limit`.
        let (quote, bought) = (price * qty, if cols.buyer_is_maker.value(row) { 0 } else { qty });
        match bars.last_mut() {
            Some(bar) if bar.start == start => {
                bar.high = bar.high.max(price);
                bar.low = bar.low.min(price);
                bar.close = price;
                bar.volume += qty;
                bar.quote_volume += quote;
                bar.buy_volume += bought;
                bar.trades += 1;
            }
            _ => bars.push(Bar {
                start,
                open: price,
                high: price,
                low: price,
                close: price,
                volume: qty,
                quote_volume: quote,
                buy_volume: bought,
                trades: 1,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trade::{Trade, TradeBatchBuilder};

    fn batch(trades: &[(&str, i64, &str, &str, i64, bool)]) -> RecordBatch {
        let mut builder = TradeBatchBuilder::default();
        for &(symbol, id, price, qty, time_ms, buyer_is_maker) in trades {
            builder.push(&Trade {
                symbol: symbol.into(),
                id,
                price: decimal::parse(price).unwrap(),
                qty: decimal::parse(qty).unwrap(),
                time_ms,
                buyer_is_maker,
                event_time_ms: None,
            });
        }
        builder.finish().unwrap()
    }

    #[test]
    fn a_trade_that_would_overflow_its_bar_is_turned_away_and_the_bar_stays_exact() {
        let cfg = WindowConfig::default();
        let max = "9999999999.99999999";
        let (pq, limit) = (decimal::parse(max).unwrap().pow(2), sum_limit(&cfg));
        let fit = (limit / pq) as i64;
        let mut rows: Vec<(&str, i64, &str, &str, i64, bool)> = (1..=fit + 2).map(|id| ("X", id, max, max, 1_000, false)).collect();
        rows.push(("X", fit + 3, "1", "1", 2_000, false));
        let mut state = PartitionState::default();
        let out = state.apply(&batch(&rows), &cfg).unwrap();
        assert_eq!(out.overflow_rows, [fit as usize, fit as usize + 1]);
        assert_eq!(out.bars.len(), 1);
        let bar = &out.bars[0].bar;
        assert_eq!((bar.trades, bar.quote_volume), (fit as u64, pq * i128::from(fit)));
        assert!(bar.quote_volume <= limit && (out.bars[0].vwap_long - out.bars[0].vwap_bar).abs() < 1e-6);
        assert_eq!((state.counts.applied, state.counts.rejected), (fit as u64 + 1, 2));
    }

    #[test]
    fn symbol_limits_admit_the_first_symbols_of_the_partition_whatever_the_cut() {
        let cfg = WindowConfig::default();
        let rows: Vec<(&str, i64, &str, &str, i64, bool)> = ["A", "B", "A", "C", "B", "D", "C"]
            .iter()
            .enumerate()
            .map(|(i, s)| (*s, i as i64 + 1, "1", "1", 1_000 + i as i64, false))
            .collect();
        let limits = SymbolLimits { allow: None, max: 2 };
        for cut in 0..=rows.len() {
            let mut state = PartitionState::default();
            let mut refused = Vec::new();
            for (from, part) in [(0, &rows[..cut]), (cut, &rows[cut..])] {
                if part.is_empty() {
                    continue;
                }
                let out = state.apply_within(&batch(part), &cfg, &limits).unwrap();
                refused.extend(out.refused_rows.iter().map(|&(row, reason)| (row + from, reason)));
            }
            assert_eq!(state.symbols.keys().collect::<Vec<_>>(), ["A", "B"], "cut at {cut}");
            assert_eq!(refused, [(3, Reject::TooManySymbols), (5, Reject::TooManySymbols), (6, Reject::TooManySymbols)], "cut at {cut}");
            assert_eq!((state.counts.applied, state.counts.rejected), (4, 3));
        }
        let allow = SymbolLimits { allow: Some(["B".to_owned()].into()), max: 10 };
        let mut state = PartitionState::default();
        let out = state.apply_within(&batch(&rows), &cfg, &allow).unwrap();
        assert_eq!(out.refused_rows.iter().filter(|(_, r)| *r == Reject::UnknownSymbol).count(), 5);
        assert_eq!(state.symbols.keys().collect::<Vec<_>>(), ["B"]);
    }

    #[test]
    fn a_bar_is_final_when_a_later_second_arrives() {
        let cfg = WindowConfig::default();
        let mut state = PartitionState::default();
        let out = state
            .apply(&batch(&[("X", 1, "10", "1", 1_000, false), ("X", 2, "12", "3", 1_999, true), ("X", 3, "11", "1", 2_000, false)]), &cfg)
            .unwrap();
        assert_eq!(out.bars.len(), 1);
        let bar = &out.bars[0];
        assert_eq!(bar.end, 2_000);
        assert_eq!(
            (bar.bar.open, bar.bar.high, bar.bar.low, bar.bar.close),
            (10 * decimal::ONE, 12 * decimal::ONE, 10 * decimal::ONE, 12 * decimal::ONE)
        );
        assert_eq!((bar.bar.volume, bar.bar.buy_volume, bar.bar.sell_volume()), (4 * decimal::ONE, decimal::ONE, 3 * decimal::ONE));
        assert_eq!(bar.vwap_bar, 11.5);
        assert_eq!(bar.rsi, None);
    }

    #[test]
    fn duplicates_are_dropped_and_late_trades_set_aside() {
        let cfg = WindowConfig::default();
        let mut state = PartitionState::default();
        state.apply(&batch(&[("X", 1, "10", "1", 1_000, false), ("X", 2, "10", "1", 2_500, false)]), &cfg).unwrap();
        let out = state
            .apply(&batch(&[("X", 2, "10", "1", 2_500, false), ("X", 1, "10", "1", 1_000, false), ("X", 5, "10", "1", 1_500, false)]), &cfg)
            .unwrap();
        assert_eq!(out.late_rows, vec![2]);
        assert_eq!((state.counts.duplicates, state.counts.late, state.counts.applied), (2, 1, 2));
        // The late trade was not applied: its id may still come in time order later.
        assert_eq!(state.symbols["X"].last_id, Some(2));
    }

    #[test]
    fn batch_boundaries_do_not_change_the_result() {
        let cfg = WindowConfig { bar_ms: 1_000, vwap_ms: 3_000, rsi_period: 2 };
        let trades: Vec<_> =
            (0..60).map(|i| ("X", i, if i % 3 == 0 { "10.5" } else { "10.25" }, "0.1", 1_000 + i * 337, i % 2 == 0)).collect();
        let mut whole = PartitionState::default();
        let expected = whole.apply(&batch(&trades), &cfg).unwrap().bars;
        for size in [1, 2, 7, 59] {
            let mut state = PartitionState::default();
            let bars: Vec<_> = trades.chunks(size).flat_map(|chunk| state.apply(&batch(chunk), &cfg).unwrap().bars).collect();
            assert_eq!(bars, expected, "batches of {size}");
            assert_eq!(state, whole);
        }
    }

    #[test]
    fn interleaved_symbols_give_each_its_own_bars() {
        let cfg = WindowConfig { bar_ms: 1_000, vwap_ms: 2_000, rsi_period: 2 };
        let row = |symbol, i: i64| (symbol, i, if i % 2 == 0 { "10.5" } else { "9.75" }, "0.3", 1_000 + i * 450, i % 3 == 0);
        // Z trades half as often as X and Y, all three in one batch.
        let mixed: Vec<_> =
            (0..40).flat_map(|i| [Some(row("X", i)), Some(row("Y", i)), (i % 2 == 0).then(|| row("Z", i))]).flatten().collect();
        let mut together = PartitionState::default();
        let bars = together.apply(&batch(&mixed), &cfg).unwrap().bars;
        for symbol in ["X", "Y", "Z"] {
            let alone: Vec<_> = mixed.iter().copied().filter(|t| t.0 == symbol).collect();
            let expected = PartitionState::default().apply(&batch(&alone), &cfg).unwrap().bars;
            assert!(!expected.is_empty());
            assert_eq!(bars.iter().filter(|b| b.symbol == symbol).cloned().collect::<Vec<_>>(), expected, "{symbol}");
        }
    }

    #[test]
    fn rsi_repeats_the_close_through_empty_seconds_and_survives_long_silence() {
        let cfg = WindowConfig { rsi_period: 2, ..WindowConfig::default() };
        let mut state = PartitionState::default();
        // closes 10 (t=1s), 12 (t=2s), nothing at 3s, 11 (t=4s) -> changes +2, 0, -1
        let out = state
            .apply(
                &batch(&[
                    ("X", 1, "10", "1", 1_000, false),
                    ("X", 2, "12", "1", 2_000, false),
                    ("X", 3, "11", "1", 4_000, false),
                    ("X", 4, "11", "1", 5_000, false),
                ]),
                &cfg,
            )
            .unwrap();
        let rsi: Vec<_> = out.bars.iter().map(|b| b.rsi).collect();
        // after +2, 0: avg gain 1, avg loss 0 -> 100; then -1: gain 0.5, loss 0.5 -> 50
        assert_eq!(rsi, vec![None, None, Some(50.0)]);
        // The 5 s window ending at 3 s holds the bars of 1 s and 2 s.
        assert_eq!(out.bars[1].vwap_long, 11.0);
        // A day without trades keeps the ratio of the averages.
        let out = state.apply(&batch(&[("X", 5, "11", "1", 86_400_000, false), ("X", 6, "11", "1", 86_401_000, false)]), &cfg).unwrap();
        assert_eq!(out.bars.last().and_then(|b| b.rsi), Some(50.0));
    }

    #[test]
    fn metric_names_follow_the_configured_widths() {
        assert_eq!(
            WindowConfig::default().names(),
            MetricNames { vwap_bar: "vwap_1s".into(), vwap_long: "vwap_5s".into(), rsi: "rsi_14".into() }
        );
        let cfg = WindowConfig { bar_ms: 500, vwap_ms: 1_500, rsi_period: 7 };
        assert_eq!(cfg.names().vwap_bar, "vwap_500ms");
        assert!(WindowConfig { vwap_ms: 1_200, ..WindowConfig::default() }.validate().is_err());
    }
}
