//! Deterministic larger inputs for benchmarks and crash tests: the real
//! trades of an archive repeated over many symbols and forward in time.
//! Symbol k trades like the source symbol it copies. Rows come in trade-time
//! order across all symbols, as a live feed would, so a replay paced by
//! trade time is even. Ids are consecutive per symbol (renumbered from the
//! source's first id, so gaps in the source leave none here), and each
//! repetition starts after the previous one ends: time never goes backwards.

use std::collections::BTreeMap;
use std::path::Path;

use arrow::array::RecordBatch;

use crate::archive::{self, ArchiveSummary, ArchiveWriter};
use crate::error::{Error, Result};
use crate::trade::{Trade, TradeBatchBuilder, TradeColumns};

/// What to generate.
#[derive(Debug, Clone)]
pub struct SynthConfig {
    /// Symbols in the output; symbol k copies source symbol k mod the number of sources.
    pub symbols: usize,
    /// Times the source is repeated, each later in time.
    pub repeats: usize,
    /// Exactly this many trades instead: as many repetitions as it takes,
    /// the last one cut short.
    pub trades: Option<u64>,
}

/// One source symbol: its trades in id order and the symbols copying it.
struct Source {
    trades: Vec<Trade<'static>>,
    copies: Vec<String>,
}

/// Writes the synthetic archive to `out` from the trades in `source`.
pub fn generate(source: &Path, out: &Path, config: &SynthConfig) -> Result<ArchiveSummary> {
    generate_showing(source, out, config, false)
}

/// [`generate`], with a progress bar of the trades written when `show`.
pub fn generate_showing(source: &Path, out: &Path, config: &SynthConfig, show: bool) -> Result<ArchiveSummary> {
    let sources = load(source, config.symbols)?;
    let order = time_order(&sources);
    let (first, last) =
        order.iter().map(|&(s, i)| sources[s].trades[i].time_ms).fold((i64::MAX, i64::MIN), |(lo, hi), t| (lo.min(t), hi.max(t)));
    // Whole seconds, so bars of a repetition line up with the source's.
    let period = (last - first) / 1000 * 1000 + 2000;
    let limit = config.trades.unwrap_or(u64::MAX);
    let repeats = if config.trades.is_some() { i64::MAX } else { config.repeats as i64 };
    let per_repeat: u64 = order.iter().map(|&(s, _)| sources[s].copies.len() as u64).sum();
    let progress = crate::cli::progress_bar(config.trades.unwrap_or(per_repeat.saturating_mul(config.repeats as u64)), "trades", show);
    let mut writer = ArchiveWriter::create(out)?;
    let mut builder = TradeBatchBuilder::with_capacity(8192);
    let mut written = 0u64;
    'repeats: for repeat in 0..repeats {
        for &(s, i) in &order {
            let (trades, shift) = (&sources[s].trades, repeat * period);
            let trade = &trades[i];
            let id = trades[0].id + repeat * trades.len() as i64 + i as i64;
            for symbol in &sources[s].copies {
                if written == limit {
                    break 'repeats;
                }
                let event_time_ms = trade.event_time_ms.map(|e| e + shift);
                builder.push(&Trade { symbol: symbol.as_str().into(), id, time_ms: trade.time_ms + shift, event_time_ms, ..trade.clone() });
                written += 1;
                if builder.len() == 8192 {
                    writer.write(&builder.finish()?)?;
                    progress.inc(8192);
                }
            }
        }
    }
    if !builder.is_empty() {
        writer.write(&builder.finish()?)?;
    }
    progress.finish_and_clear();
    writer.finish()
}

/// The trades of an archive per symbol in id order, with times made
/// non-decreasing, and the names of the `symbols` copies of each.
fn load(path: &Path, symbols: usize) -> Result<Vec<Source>> {
    let mut by_symbol: BTreeMap<String, Vec<Trade<'static>>> = BTreeMap::new();
    for batch in archive::open(path, 8192)? {
        let batch: RecordBatch = batch?;
        let cols = TradeColumns::new(&batch)?;
        for row in 0..batch.num_rows() {
            let trade = cols.trade(row);
            let owned = Trade { symbol: trade.symbol.clone().into_owned().into(), ..trade };
            by_symbol.entry(owned.symbol.to_string()).or_default().push(owned);
        }
    }
    if by_symbol.is_empty() || symbols == 0 {
        return Err(Error::invalid_data(path.display().to_string(), "no trades to repeat"));
    }
    let n = by_symbol.len();
    let mut sources: Vec<Source> = by_symbol
        .into_values()
        .map(|mut trades| {
            trades.sort_by_key(|t| t.id);
            let mut latest = i64::MIN;
            for trade in &mut trades {
                latest = latest.max(trade.time_ms);
                trade.time_ms = latest;
            }
            Source { trades, copies: Vec::new() }
        })
        .collect();
    for k in 0..symbols {
        let source = &mut sources[k % n];
        let base = source.trades[0].symbol.trim_end_matches("USDT").to_owned();
        source.copies.push(format!("{base}{k:05}"));
    }
    Ok(sources)
}

/// (source, index) of every source trade, merged across sources by time;
/// ties keep source order, and each source stays in id order.
fn time_order(sources: &[Source]) -> Vec<(usize, usize)> {
    let mut order: Vec<(usize, usize)> =
        sources.iter().enumerate().flat_map(|(s, src)| (0..src.trades.len()).map(move |i| (s, i))).collect();
    // Stable, and times within a source never decrease: id order survives.
    order.sort_by_key(|&(s, i)| sources[s].trades[i].time_ms);
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOURCE: &str = "fixtures/binance-spot-trades-2024-08-08.parquet";

    /// Every row of an archive as (symbol, id, time), in stored order.
    fn rows(path: &Path) -> Vec<(String, i64, i64)> {
        let mut out = Vec::new();
        for batch in archive::open(path, 4096).unwrap() {
            let batch = batch.unwrap();
            let cols = TradeColumns::new(&batch).unwrap();
            out.extend((0..batch.num_rows()).map(|row| (cols.symbol_at(row).to_owned(), cols.id.value(row), cols.time.value(row))));
        }
        out
    }

    #[test]
    fn repeats_keep_ids_consecutive_and_time_forward() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("big.parquet");
        let summary = generate(Path::new(SOURCE), &out, &SynthConfig { symbols: 3, repeats: 2, trades: None }).unwrap();
        assert_eq!(summary.rows, 2 * (9_757 + 6_106 + 9_757));
        let btc = &summary.symbols["BTC00000"];
        assert_eq!((btc.first, btc.last, btc.count, btc.missing.len()), (3_735_683_259, 3_735_683_259 + 2 * 9_757 - 1, 2 * 9_757, 0));
        assert!(summary.symbols.contains_key("ETH00001") && summary.symbols.contains_key("BTC00002"));
        let rows = rows(&out);
        // Time never goes backwards across the whole file, and within a
        // symbol each id is the previous one plus one.
        assert!(rows.windows(2).all(|w| w[0].2 <= w[1].2));
        let mut last_id: BTreeMap<&str, i64> = BTreeMap::new();
        for (symbol, id, _) in &rows {
            if let Some(previous) = last_id.insert(symbol, *id) {
                assert_eq!(*id, previous + 1, "{symbol}");
            }
        }
    }

    #[test]
    fn an_exact_count_cuts_the_last_repetition() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("n.parquet");
        let summary = generate(Path::new(SOURCE), &out, &SynthConfig { symbols: 100, repeats: 1, trades: Some(50_001) }).unwrap();
        assert_eq!(summary.rows, 50_001);
        assert_eq!(summary.symbols.len(), 100);
        assert!(summary.symbols.values().all(|ids| ids.missing.is_empty()));
        // 100 symbols in time order: the copies of a source trade sit side by side.
        let rows = rows(&out);
        assert_eq!((rows[0].0.as_str(), rows[1].0.as_str()), ("BTC00000", "BTC00002"));
        // The same command gives the same file contents.
        let again = dir.path().join("again.parquet");
        generate(Path::new(SOURCE), &again, &SynthConfig { symbols: 100, repeats: 1, trades: Some(50_001) }).unwrap();
        assert_eq!(super::tests::rows(&again), rows);
    }
}
