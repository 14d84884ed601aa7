//! Binance's public trade dumps (data.binance.vision, `spot/daily/trades`)
//! into the project's Parquet archives, so a real day can be backfilled and
//! replayed. A dump is `<SYMBOL>-trades-<date>.zip` holding one CSV of the
//! same name, or that CSV itself: `id,price,qty,quote_qty,time,
//! is_buyer_maker,is_best_match` a row, with or without a header line. The
//! spot dumps give `time` in milliseconds until the end of 2024 and in
//! microseconds from 2025 on; both are read, the unit told by the size.
//!
//! Each row goes through the same decoder and checks as a WebSocket trade
//! (SPEC §1), so a bad row is a reject with its reason in
//! `<name>.rejects.jsonl`, never a wrong bar. The dumps carry no event
//! time `E`: the archives leave it empty.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use tracing::info;

use super::{stem, JsonLines, Recorded, Rejects, BATCH_ROWS};
use crate::archive::ArchiveWriter;
use crate::binance;
use crate::error::{Error, Result};
use crate::rejection::{Reject, Rejection};
use crate::trade::TradeBatchBuilder;

/// Times at or above this are microseconds (in milliseconds it would be
/// the year 5138).
const MICROS_FROM: i64 = 100_000_000_000_000;

/// One archive per dump, in `out`. `symbol`: the symbol of every dump, when
/// their names do not start with it (`BTCUSDT-trades-...`).
pub fn import(inputs: &[PathBuf], out: &Path, symbol: Option<&str>) -> Result<Vec<Recorded>> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    inputs.iter().map(|input| import_file(input, out, symbol)).collect()
}

fn import_file(input: &Path, out: &Path, symbol: Option<&str>) -> Result<Recorded> {
    let name = stem(input);
    let symbol = match symbol {
        Some(symbol) => symbol.to_owned(),
        None => name.split_once("-trades-").map(|(symbol, _)| symbol.to_owned()).ok_or_else(|| {
            Error::Config(format!("{}: the name does not start with SYMBOL-trades-; give the symbol with --symbol", input.display()))
        })?,
    };
    let output = out.join(format!("{name}.parquet"));
    let mut writer = ArchiveWriter::create(&output)?;
    let mut rejects = Rejects { lines: JsonLines::new(out.join(format!("{name}.rejects.jsonl")), false), count: 0 };
    let mut builder = TradeBatchBuilder::with_capacity(BATCH_ROWS);
    let mut event = String::with_capacity(256);
    with_csv(input, |reader| {
        for (index, line) in reader.lines().enumerate() {
            let line = line.map_err(|e| Error::io(input, e))?;
            let line = line.trim();
            // The header some dumps carry, and blank lines.
            if line.is_empty() || (index == 0 && !line.starts_with(|c: char| c.is_ascii_digit())) {
                continue;
            }
            match trade_event(&symbol, line, &mut event).and_then(|()| binance::decode(event.as_bytes())) {
                Ok(mut trade) => {
                    trade.event_time_ms = None;
                    builder.push(&trade);
                }
                Err(rejection) => rejects.add(index + 1, line, &rejection)?,
            }
            if builder.len() >= BATCH_ROWS {
                writer.write(&builder.finish()?)?;
            }
        }
        Ok(())
    })?;
    if !builder.is_empty() {
        writer.write(&builder.finish()?)?;
    }
    let summary = writer.finish()?;
    rejects.lines.flush()?;
    info!(input = %input.display(), output = %output.display(), trades = summary.rows, rejected = rejects.count, "imported");
    Ok(Recorded { input: input.to_owned(), output, summary, other_frames: 0, rejected: rejects.count })
}

/// A CSV row as the trade event the WebSocket would have sent, into `event`.
fn trade_event(symbol: &str, line: &str, event: &mut String) -> Result<(), Rejection> {
    let fields: Vec<&str> = line.split(',').map(str::trim).collect();
    let [id, price, qty, _quote_qty, time, buyer_is_maker, ..] = fields[..] else {
        return Err(Rejection::new(Reject::MalformedJson, format!("expected 7 comma-separated fields, got {}", fields.len())));
    };
    let time: i64 = time.parse().map_err(|_| Rejection::new(Reject::BadTime, format!("time {time:?} is not an integer")))?;
    let time_ms = if time >= MICROS_FROM { time.div_euclid(1000) } else { time };
    let maker = match buyer_is_maker.to_ascii_lowercase().as_str() {
        "true" => true,
        "false" => false,
        other => return Err(Rejection::new(Reject::MalformedJson, format!("is_buyer_maker {other:?} is neither True nor False"))),
    };
    // The id as the number it is; anything else is for the decoder to refuse.
    let id = id.parse::<i64>().map_or_else(|_| serde_json::Value::String(id.to_owned()), serde_json::Value::from);
    event.clear();
    event.push_str(&serde_json::json!({"e": "trade", "s": symbol, "t": id, "p": price, "q": qty, "T": time_ms, "m": maker}).to_string());
    Ok(())
}

/// Calls `read` with the CSV of a dump: the one `.csv` entry of a `.zip`,
/// read as it is inflated, or the file itself.
fn with_csv(path: &Path, read: impl FnOnce(&mut dyn BufRead) -> Result<()>) -> Result<()> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    if !path.extension().is_some_and(|ext| ext.eq_ignore_ascii_case("zip")) {
        return read(&mut BufReader::with_capacity(1 << 20, file));
    }
    let bad = |detail: String| Error::invalid_data(path.display().to_string(), detail);
    let mut archive = zip::ZipArchive::new(file).map_err(|e| bad(e.to_string()))?;
    let names: Vec<String> = archive.file_names().filter(|n| n.to_ascii_lowercase().ends_with(".csv")).map(str::to_owned).collect();
    let [name] = &names[..] else {
        return Err(bad(format!("a dump holds one .csv, this one {}", names.len())));
    };
    let entry = archive.by_name(name).map_err(|e| bad(e.to_string()))?;
    let mut reader = BufReader::with_capacity(1 << 20, entry);
    read(&mut reader)
}
