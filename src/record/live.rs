//! `record` from live sources into Parquet archives that rotate by size and
//! age: Binance's streams, through the producer's sequencer (so the same
//! gap filling from REST applies), or the raw Kafka topic, read with a
//! consumer group whose offsets are committed once an archive is complete.
//!
//! Archives are `trades-<opened ms>-<n>.parquet` in the output directory;
//! frames that are not trades go to `rejects.jsonl`, id ranges that could
//! not be had to `gaps.jsonl`. A restarted recorder reads the last id of
//! each symbol from the archives already there and goes on from it.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use tracing::{info, warn};

use super::{JsonLines, BATCH_ROWS};
use crate::archive::{ArchiveSummary, ArchiveWriter};
use crate::binance;
use crate::error::{Error, Result};
use crate::kafka::KafkaArgs;
use crate::kafka::{partitions_of, REQUEST_TIMEOUT};
use crate::producer::{self, Sink, StreamConfig, StreamCounts};
use crate::trade::{Trade, TradeBatchBuilder};

/// When an archive is closed and the next one started.
#[derive(Debug, Clone, Copy)]
pub struct Rotation {
    /// Once the archive holds this many bytes.
    pub max_bytes: u64,
    /// Once the archive has been open this long (checked as trades arrive,
    /// and every second on a quiet live stream).
    pub max_age: Duration,
}

/// What a live recording produced.
#[derive(Debug, Clone, Default)]
pub struct LiveRecorded {
    /// Archives completed, in order.
    pub archives: Vec<(PathBuf, ArchiveSummary)>,
    pub rejected: u64,
    /// Trades seen again and left out.
    pub duplicates: u64,
    /// Trade ids recorded in `gaps.jsonl`.
    pub unfilled: u64,
    /// The streams' counts (live source only).
    pub stream: StreamCounts,
}

/// Archives in `dir` that rotate; the sink of both live sources.
pub struct RotatingArchive {
    dir: PathBuf,
    rotation: Rotation,
    current: Option<(ArchiveWriter, Instant)>,
    builder: TradeBatchBuilder,
    rejects: JsonLines,
    gaps: JsonLines,
    opened: u64,
    /// Last id per symbol written (or found in earlier archives).
    last: HashMap<String, i64>,
    recorded: LiveRecorded,
}

impl RotatingArchive {
    /// Starts recording into `dir`, going on from the archives already there.
    pub fn open(dir: &Path, rotation: Rotation) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        Ok(RotatingArchive {
            dir: dir.to_owned(),
            rotation,
            current: None,
            builder: TradeBatchBuilder::with_capacity(BATCH_ROWS),
            rejects: JsonLines::new(dir.join("rejects.jsonl"), true),
            gaps: JsonLines::new(dir.join("gaps.jsonl"), true),
            opened: 0,
            last: last_ids(dir)?,
            recorded: LiveRecorded::default(),
        })
    }

    /// The last trade id of each symbol recorded so far.
    pub fn last_ids(&self) -> &HashMap<String, i64> {
        &self.last
    }

    /// Adds one trade unless its id was recorded already; returns whether
    /// a rotation completed an archive.
    pub fn push(&mut self, trade: &Trade<'_>) -> Result<bool> {
        match self.last.get(trade.symbol.as_ref()) {
            Some(&last) if trade.id <= last => {
                self.recorded.duplicates += 1;
                return Ok(false);
            }
            Some(&last) if trade.id > last + 1 => {
                // Only the Kafka source gets here: the live source's
                // sequencer fills gaps, or reports them, before the trade.
                self.note_gap(&trade.symbol, last + 1, trade.id - 1, "ids missing in the source")?;
            }
            _ => {}
        }
        if self.current.is_none() {
            let opened = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
            self.opened += 1;
            let path = self.dir.join(format!("trades-{opened}-{}.parquet", self.opened));
            self.current = Some((ArchiveWriter::create(&path)?, Instant::now()));
        }
        self.builder.push(trade);
        self.last.insert(trade.symbol.clone().into_owned(), trade.id);
        if self.builder.len() >= BATCH_ROWS {
            self.write_batch()?;
        }
        let due = self.current.as_ref().is_some_and(|(writer, since)| {
            writer.bytes() + self.builder.len() as u64 * 48 >= self.rotation.max_bytes || since.elapsed() >= self.rotation.max_age
        });
        if due {
            self.close()?;
        }
        Ok(due)
    }

    /// Closes an archive that reached its age while no trade came; returns
    /// whether it did.
    pub fn close_if_old(&mut self) -> Result<bool> {
        let old = self.current.as_ref().is_some_and(|(_, since)| since.elapsed() >= self.rotation.max_age);
        if old {
            self.close()?;
        }
        Ok(old)
    }

    fn write_batch(&mut self) -> Result<()> {
        if let (Some((writer, _)), false) = (&mut self.current, self.builder.is_empty()) {
            writer.write(&self.builder.finish()?)?;
        }
        Ok(())
    }

    /// Completes the open archive, if any.
    pub fn close(&mut self) -> Result<()> {
        self.write_batch()?;
        if let Some((writer, _)) = self.current.take() {
            let path = writer.path().to_owned();
            let summary = writer.finish()?;
            info!(path = %path.display(), rows = summary.rows, "archive complete");
            self.recorded.archives.push((path, summary));
        }
        self.rejects.flush()?;
        self.gaps.flush()
    }

    /// Records ids `from..=to` of `symbol` as missing, and moves past them.
    fn note_gap(&mut self, symbol: &str, from: i64, to: i64, why: &str) -> Result<()> {
        warn!(symbol, from, to, why, "trade ids missing; recorded in gaps.jsonl");
        self.last.insert(symbol.to_owned(), to);
        self.recorded.unfilled += (to - from + 1) as u64;
        self.gaps.write(&serde_json::json!({ "symbol": symbol, "from_id": from, "to_id": to, "count": to - from + 1, "reason": why }))
    }

    fn reject(&mut self, reason: &str, detail: &str, raw: &[u8]) -> Result<()> {
        self.recorded.rejected += 1;
        self.rejects.write(&serde_json::json!({ "reason": reason, "detail": detail, "raw": String::from_utf8_lossy(raw) }))
    }

    /// Completes the open archive and returns what was recorded.
    pub fn finish(mut self) -> Result<LiveRecorded> {
        self.close()?;
        Ok(self.recorded)
    }
}

impl Sink for RotatingArchive {
    async fn trade(&mut self, _symbol: &str, event: &[u8], _time_ms: i64, _from_rest: bool) -> Result<()> {
        let trade = binance::decode(event).map_err(|r| Error::Decode { reason: r.reason, detail: r.detail, payload: event.to_vec() })?;
        self.push(&trade).map(drop)
    }

    async fn dead_letter(&mut self, reason: &str, detail: &str, raw: &[u8]) -> Result<()> {
        self.reject(reason, detail, raw)
    }

    async fn gap(&mut self, symbol: &str, from: i64, to: i64, why: &str) -> Result<()> {
        self.note_gap(symbol, from, to, why)
    }

    async fn idle(&mut self) -> Result<()> {
        self.close_if_old().map(drop)
    }
}

/// The highest trade id per symbol in the archives of `dir`.
pub fn last_ids(dir: &Path) -> Result<HashMap<String, i64>> {
    let mut last: HashMap<String, i64> = HashMap::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if !(name.starts_with("trades-") && name.ends_with(".parquet")) {
            continue;
        }
        for (symbol, ids) in ArchiveSummary::read(&path)?.symbols {
            let id = last.entry(symbol).or_insert(ids.last);
            *id = (*id).max(ids.last);
        }
    }
    Ok(last)
}

/// Records Binance's streams into `dir` until `shutdown` resolves.
pub async fn record_stream(
    config: &StreamConfig,
    dir: &Path,
    rotation: Rotation,
    shutdown: impl Future<Output = ()>,
) -> Result<LiveRecorded> {
    let mut archive = RotatingArchive::open(dir, rotation)?;
    let last = archive.last_ids().clone();
    let streamed = producer::sequencer::stream(config, last, &mut archive, shutdown).await;
    // What was recorded is completed even when the stream failed.
    let mut recorded = archive.finish()?;
    recorded.stream = streamed?;
    Ok(recorded)
}

/// Records the raw topic into `dir` with consumer group `group`, from its
/// committed offsets (the start of the topic the first time), until `stop`
/// is set or, with `exit_at_end`, every partition is read to its end as it
/// was at start. Offsets are committed once each archive is complete.
pub fn record_topic(
    kafka: &KafkaArgs,
    group: &str,
    dir: &Path,
    rotation: Rotation,
    exit_at_end: bool,
    stop: &AtomicBool,
) -> Result<LiveRecorded> {
    kafka.check_reachable()?;
    kafka.check_group(group)?;
    let consumer: BaseConsumer = kafka
        .config_with(&[("group.id", group), ("enable.auto.commit", "false"), ("auto.offset.reset", "earliest")])?
        .create()
        .map_err(|e| Error::kafka("record consumer", e))?;
    let topic = &kafka.topic;
    let partitions = partitions_of(&consumer, topic)?;
    let mut wanted = TopicPartitionList::new();
    for &p in &partitions {
        wanted.add_partition(topic, p);
    }
    let committed = consumer.committed_offsets(wanted, REQUEST_TIMEOUT).map_err(|e| Error::kafka("committed offsets", e))?;
    let mut assignment = TopicPartitionList::new();
    let mut next: HashMap<i32, i64> = HashMap::new();
    let mut ends: HashMap<i32, i64> = HashMap::new();
    for &p in &partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, REQUEST_TIMEOUT).map_err(|e| Error::kafka("watermarks", e))?;
        let from = match committed.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(offset)) => offset.max(low),
            _ => low,
        };
        assignment.add_partition_offset(topic, p, Offset::Offset(from)).map_err(|e| Error::kafka("assign", e))?;
        next.insert(p, from);
        ends.insert(p, high);
    }
    consumer.assign(&assignment).map_err(|e| Error::kafka("assign", e))?;
    let mut archive = RotatingArchive::open(dir, rotation)?;
    let commit = |next: &HashMap<i32, i64>| -> Result<()> {
        let mut offsets = TopicPartitionList::new();
        for (&p, &offset) in next {
            offsets.add_partition_offset(topic, p, Offset::Offset(offset)).map_err(|e| Error::kafka("commit", e))?;
        }
        consumer.commit(&offsets, CommitMode::Sync).map_err(|e| Error::kafka("commit offsets", e))
    };
    let at_end = |next: &HashMap<i32, i64>| ends.iter().all(|(p, &end)| next[p] >= end);
    let done = |next: &HashMap<i32, i64>| stop.load(Ordering::Relaxed) || (exit_at_end && at_end(next));
    while !done(&next) {
        let Some(polled) = consumer.poll(Duration::from_millis(200)) else {
            if archive.close_if_old()? {
                commit(&next)?;
            }
            continue;
        };
        let message = polled.map_err(|e| Error::kafka("record poll", e))?;
        next.insert(message.partition(), message.offset() + 1);
        // The producer's clock records carry no trade to record.
        if crate::kafka::is_clock(&message) {
            continue;
        }
        let payload = message.payload().unwrap_or_default();
        let completed = match binance::decode(payload) {
            Ok(trade) => archive.push(&trade)?,
            Err(rejection) => {
                archive.reject(rejection.reason.as_str(), &rejection.detail, payload)?;
                false
            }
        };
        if completed {
            commit(&next)?;
        }
    }
    let recorded = archive.finish()?;
    commit(&next)?;
    Ok(recorded)
}
