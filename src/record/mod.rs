//! `record`: raw trades to Parquet archives. The source here is a file of
//! recorded frames: `<receive time ns> <frame>` lines as in shared/data, or
//! bare combined-stream frames, or bare trade events, one per line, plain or
//! gzip. Lines that are not valid trades are counted, reported and written
//! beside the archive as `<name>.rejects.jsonl`; none is dropped silently.
//! The live sources (Binance's streams, the Kafka topic) are in [`live`].

pub mod binance_csv;
pub mod live;

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use tracing::{info, warn};

use crate::archive::{ArchiveSummary, ArchiveWriter};
use crate::binance::{self, Frame};
use crate::error::{Error, Result};
use crate::rejection::Rejection;
use crate::trade::TradeBatchBuilder;

/// Rows per Arrow batch while recording.
pub const BATCH_ROWS: usize = 8192;

/// What recording one input produced.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub input: PathBuf,
    pub output: PathBuf,
    pub summary: ArchiveSummary,
    /// Lines that were frames but not trades (subscription replies).
    pub other_frames: u64,
    pub rejected: u64,
}

/// Records each input file into `<out>/<input stem>.parquet`.
pub fn record_frames(inputs: &[PathBuf], out: &Path) -> Result<Vec<Recorded>> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    inputs.iter().map(|input| record_file(input, out)).collect()
}

fn record_file(input: &Path, out: &Path) -> Result<Recorded> {
    let output = out.join(format!("{}.parquet", stem(input)));
    let rejects_path = out.join(format!("{}.rejects.jsonl", stem(input)));
    let mut writer = ArchiveWriter::create(&output)?;
    let mut rejects = Rejects { lines: JsonLines::new(rejects_path, false), count: 0 };
    let mut builder = TradeBatchBuilder::with_capacity(BATCH_ROWS);
    let mut other_frames = 0;
    for (index, line) in open_lines(input)?.lines().enumerate() {
        let line = line.map_err(|e| Error::io(input, e))?;
        if line.trim().is_empty() {
            continue;
        }
        match parse_line(&line) {
            Ok(Some(trade_bytes)) => match binance::decode(trade_bytes) {
                Ok(trade) => builder.push(&trade),
                Err(rejection) => rejects.add(index + 1, &line, &rejection)?,
            },
            Ok(None) => other_frames += 1,
            Err(rejection) => rejects.add(index + 1, &line, &rejection)?,
        }
        if builder.len() >= BATCH_ROWS {
            writer.write(&builder.finish()?)?;
        }
    }
    if !builder.is_empty() {
        writer.write(&builder.finish()?)?;
    }
    let summary = writer.finish()?;
    rejects.lines.flush()?;
    info!(input = %input.display(), output = %output.display(), trades = summary.rows, rejected = rejects.count, "recorded");
    Ok(Recorded { input: input.to_owned(), output, summary, other_frames, rejected: rejects.count })
}

/// The trade event bytes of a line, `None` for frames that are not trades.
fn parse_line(line: &str) -> Result<Option<&[u8]>, Rejection> {
    match binance::unwrap_frame(binance::strip_receive_time(line))? {
        Frame::Trade(bytes) => Ok(Some(bytes)),
        Frame::Other(_) | Frame::Error { .. } => Ok(None),
    }
}

struct Rejects {
    lines: JsonLines,
    count: u64,
}

impl Rejects {
    fn add(&mut self, line_number: usize, line: &str, rejection: &Rejection) -> Result<()> {
        self.count += 1;
        if self.count <= 10 {
            warn!(path = %self.lines.path.display(), line = line_number, reason = %rejection.reason, detail = %rejection.detail, "line is not a valid trade");
        }
        self.lines
            .write(&serde_json::json!({"line": line_number, "reason": rejection.reason.as_str(), "detail": rejection.detail, "raw": line}))
    }
}

/// A JSON-lines file beside the archives, created on the first line.
pub(crate) struct JsonLines {
    path: PathBuf,
    /// Add to an existing file rather than replace it.
    append: bool,
    file: Option<BufWriter<File>>,
}

impl JsonLines {
    pub(crate) fn new(path: PathBuf, append: bool) -> Self {
        JsonLines { path, append, file: None }
    }

    pub(crate) fn write(&mut self, record: &serde_json::Value) -> Result<()> {
        if self.file.is_none() {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .append(self.append)
                .truncate(!self.append)
                .open(&self.path)
                .map_err(|e| Error::io(&self.path, e))?;
            self.file = Some(BufWriter::new(file));
        }
        if let Some(file) = &mut self.file {
            writeln!(file, "{record}").map_err(|e| Error::io(&self.path, e))?;
        }
        Ok(())
    }

    pub(crate) fn flush(&mut self) -> Result<()> {
        match &mut self.file {
            Some(file) => file.flush().map_err(|e| Error::io(&self.path, e)),
            None => Ok(()),
        }
    }
}

fn open_lines(path: &Path) -> Result<BufReader<Box<dyn Read>>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let reader: Box<dyn Read> =
        if path.extension().is_some_and(|ext| ext == "gz") { Box::new(flate2::read::MultiGzDecoder::new(file)) } else { Box::new(file) };
    Ok(BufReader::with_capacity(1 << 20, reader))
}

/// `trades-2024.txt.gz` -> `trades-2024`.
fn stem(path: &Path) -> String {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let name = name.strip_suffix(".gz").unwrap_or(&name);
    let name = name.rsplit_once('.').map_or(name, |(base, _)| base);
    name.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_outputs_after_inputs() {
        assert_eq!(stem(Path::new("/x/binance-spot-trades-2024-08-08.txt.gz")), "binance-spot-trades-2024-08-08");
        assert_eq!(stem(Path::new("frames.jsonl")), "frames");
        assert_eq!(stem(Path::new("frames")), "frames");
    }

    #[test]
    fn reads_all_three_line_shapes() {
        let event = r#"{"e":"trade","E":1,"s":"BTCUSDT","t":1,"p":"1.0","q":"1.0","T":1,"m":true,"M":true}"#;
        let frame = format!(r#"{{"stream":"btcusdt@trade","data":{event}}}"#);
        for line in [format!("1723161254087896568 {frame}"), frame.clone(), event.to_string()] {
            assert_eq!(parse_line(&line).unwrap(), Some(event.as_bytes()), "{line}");
        }
        assert_eq!(parse_line(r#"{"result":null,"id":1}"#).unwrap(), None);
        assert!(parse_line("1723161254087896568 {\"stream\":").is_err());
    }
}
