//! Deterministic larger inputs for benchmarks and crash tests: the real
//! trades of an archive repeated over many symbols and forward in time.
//! Symbol k trades like the source symbol it copies; each repetition shifts
//! ids past the previous one (ids stay consecutive per symbol) and times
//! past its end (time never goes backwards).

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
}

/// Writes the synthetic archive to `out` from the trades in `source`.
pub fn generate(source: &Path, out: &Path, config: &SynthConfig) -> Result<ArchiveSummary> {
    let trades = load(source)?;
    let names: Vec<&String> = trades.keys().collect();
    if names.is_empty() || config.symbols == 0 {
        return Err(Error::Config(format!("{}: no trades to repeat", source.display())));
    }
    let (first, last) = trades.values().flatten().fold((i64::MAX, i64::MIN), |(lo, hi), t| (lo.min(t.time_ms), hi.max(t.time_ms)));
    // Whole seconds, so bars of a repetition line up with the source's.
    let period = (last - first) / 1000 * 1000 + 2000;
    let mut writer = ArchiveWriter::create(out)?;
    let mut builder = TradeBatchBuilder::with_capacity(8192);
    for repeat in 0..config.repeats as i64 {
        for k in 0..config.symbols {
            let source = &trades[names[k % names.len()]];
            let symbol = format!("{}{k:05}", names[k % names.len()].trim_end_matches("USDT"));
            for trade in source {
                builder.push(&Trade {
                    symbol: symbol.as_str().into(),
                    id: trade.id + repeat * source.len() as i64,
                    time_ms: trade.time_ms + repeat * period,
                    event_time_ms: trade.event_time_ms.map(|e| e + repeat * period),
                    ..trade.clone()
                });
                if builder.len() == 8192 {
                    writer.write(&builder.finish()?)?;
                }
            }
        }
    }
    if !builder.is_empty() {
        writer.write(&builder.finish()?)?;
    }
    writer.finish()
}

/// The trades of an archive per symbol, in id order.
fn load(path: &Path) -> Result<BTreeMap<String, Vec<Trade<'static>>>> {
    let mut out: BTreeMap<String, Vec<Trade<'static>>> = BTreeMap::new();
    for batch in archive::open(path, 8192)? {
        let batch: RecordBatch = batch?;
        let cols = TradeColumns::new(&batch)?;
        for row in 0..batch.num_rows() {
            let trade = cols.trade(row);
            let owned = Trade { symbol: trade.symbol.clone().into_owned().into(), ..trade };
            out.entry(owned.symbol.to_string()).or_default().push(owned);
        }
    }
    for trades in out.values_mut() {
        trades.sort_by_key(|t| t.id);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_keep_ids_consecutive_and_time_forward() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("big.parquet");
        let source = Path::new("fixtures/binance-spot-trades-2024-08-08.parquet");
        let summary = generate(source, &out, &SynthConfig { symbols: 3, repeats: 2 }).unwrap();
        assert_eq!(summary.rows, 2 * (9_757 + 6_106 + 9_757));
        let btc = &summary.symbols["BTC00000"];
        assert_eq!((btc.first, btc.last, btc.count, btc.missing.len()), (3_735_683_259, 3_735_683_259 + 2 * 9_757 - 1, 2 * 9_757, 0));
        assert!(summary.symbols.contains_key("ETH00001") && summary.symbols.contains_key("BTC00002"));
        let mut last_time: BTreeMap<String, i64> = BTreeMap::new();
        for batch in archive::open(&out, 4096).unwrap() {
            let batch = batch.unwrap();
            let cols = TradeColumns::new(&batch).unwrap();
            for row in 0..batch.num_rows() {
                let previous = last_time.insert(cols.symbol_at(row).to_owned(), cols.time.value(row));
                assert!(previous.is_none_or(|p| p <= cols.time.value(row)));
            }
        }
    }
}
