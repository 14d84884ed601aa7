//! The consumer's writer: bars to Redis, then checkpoints, on a task of its
//! own, so the loop decodes and computes the next batch while Redis and
//! RocksDB work on this one.
//!
//! One request at a time, in the order the loop sent the work: a Redis
//! write that fails is retried before anything after it starts, so each
//! symbol's bars reach Redis in order, and a checkpoint is written only
//! after Redis acknowledged every bar sent before it (SPEC §7, side effect
//! first).
//!
//! What queued up while a write was out goes in one round: all its bars in
//! one write, then one checkpoint of each partition's newest state among
//! the round's checkpoints. A round's bars may include bars sent after one
//! of its checkpoints, and the state of that checkpoint is then never
//! written alone: it is the order of a crash between a Redis write and the
//! next checkpoint, and the recovery writes those bars again, byte for
//! byte the same. At a live trickle a round is one batch; when Redis is
//! behind, rounds grow, and a script call carries more bars per symbol.
//! The channel holds [`QUEUED`] items: the loop's state runs at most that
//! many batches ahead of Redis, plus the round being written.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::warn;

use super::changelog::{Changelog, Published};
use super::source::SourceConsumer;
use crate::checkpoint::{CheckpointStore, Encoded};
use crate::crash_point::CrashPoint;
use crate::error::{Error, Result};
use crate::sink::RedisSink;
use crate::telemetry::ConsumerMetrics;
use crate::window::FinalBar;

/// Items the loop may queue for the writer before it waits.
pub const QUEUED: usize = 16;

/// One unit of work for the writer. `read`: records the consumer had read
/// in this run when it sent the work, how far the work reaches.
pub enum Work {
    /// Final bars, and when the first record of the batch that closed them
    /// was polled (bar latency is measured from there to Redis's reply).
    Bars { bars: Vec<FinalBar>, polled_at: Instant, read: u64 },
    /// State and next offsets of the partitions changed since the last
    /// checkpoint, as they were after the bars sent before it; with a
    /// handover, partitions given up once it is written.
    Checkpoint { partitions: Vec<Encoded>, last: bool, read: u64, handover: Option<Handover> },
    /// Symbols of newly assigned partitions and the end of each one's
    /// newest bar: Redis must still hold them (else the run ends with
    /// [`Error::RedisDataLost`] and the consumer rewinds them).
    Check { written: Vec<(String, i64)> },
    /// Partitions lost to another member: no more offsets of them are committed.
    Release(Handover),
}

/// Partitions this consumer gives up.
pub struct Handover {
    pub partitions: Vec<i32>,
    /// Another member owns them already: their offsets are not committed.
    pub lost: bool,
    /// Told once their checkpoint and offsets are written.
    pub done: Option<oneshot::Sender<()>>,
}

/// The loop's end of the writer.
pub struct Writer {
    tx: mpsc::Sender<Work>,
    /// Taken when the writer is waited for: a task is joined once.
    task: Option<JoinHandle<Result<u64>>>,
}

/// The work of one round: every bar in the order sent, and where each
/// item's bars end with when their batch was polled; of the checkpoints,
/// each partition's newest state, written once after all the bars.
#[derive(Default)]
struct Round {
    bars: Vec<FinalBar>,
    polled: Vec<(usize, Instant)>,
    checkpoint: BTreeMap<i32, Encoded>,
    /// How far the round's work reaches, in records read.
    read: u64,
    /// A checkpoint came in the round.
    checkpointed: bool,
    /// The last one came: the consumer is stopping.
    last: bool,
    /// Symbols to check before the bars are written.
    checks: Vec<(String, i64)>,
    /// Partitions given up, after the checkpoint.
    handovers: Vec<Handover>,
}

impl Round {
    fn add(&mut self, work: Work) {
        match work {
            Work::Bars { bars, polled_at, read } => {
                self.read = self.read.max(read);
                if bars.is_empty() {
                    return;
                }
                if self.bars.is_empty() {
                    self.bars = bars;
                } else {
                    self.bars.extend(bars);
                }
                self.polled.push((self.bars.len(), polled_at));
            }
            Work::Checkpoint { partitions, last, read, handover } => {
                self.read = self.read.max(read);
                self.checkpoint.extend(partitions.into_iter().map(|e| (e.partition, e)));
                self.checkpointed = true;
                self.last |= last;
                self.handovers.extend(handover);
            }
            Work::Check { written } => self.checks.extend(written),
            Work::Release(handover) => self.handovers.push(handover),
        }
    }
}

/// What the writer task owns.
struct Task {
    sink: RedisSink,
    store: Arc<CheckpointStore>,
    consumer: Arc<SourceConsumer>,
    topic: String,
    /// Every partition's checkpointed next offset, committed for lag monitoring.
    committed: BTreeMap<i32, i64>,
    last_commit: Option<Instant>,
    checkpoints: u64,
    metrics: ConsumerMetrics,
    /// A group member's changelog: each checkpoint is published there, and
    /// the offsets committed, in one transaction.
    changelog: Option<Arc<Changelog>>,
}

impl Writer {
    /// Starts the writer task on the current runtime. `committed`: every
    /// partition's next offset as loaded from the checkpoint.
    pub fn spawn(
        sink: RedisSink,
        store: Arc<CheckpointStore>,
        consumer: Arc<SourceConsumer>,
        topic: String,
        committed: BTreeMap<i32, i64>,
        changelog: Option<Arc<Changelog>>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(QUEUED);
        let metrics = ConsumerMetrics::new();
        let task = Task { sink, store, consumer, topic, committed, last_commit: None, checkpoints: 0, metrics, changelog };
        Writer { tx, task: Some(tokio::spawn(task.run(rx))) }
    }

    /// Hands over work, waiting while the writer is busy with the previous
    /// item. If the writer stopped on an error, that error.
    pub async fn send(&mut self, work: Work) -> Result<()> {
        if self.tx.send(work).await.is_ok() {
            metrics::gauge!(crate::telemetry::WRITER_QUEUE).set((self.tx.max_capacity() - self.tx.capacity()) as f64);
            return Ok(());
        }
        // The receiver is gone only when the task ended, and it ends early
        // only on an error.
        match join(self.task.take()).await {
            Err(e) => Err(e),
            Ok(_) => Err(Error::task_failed("the consumer's writer", "stopped before its work was done")),
        }
    }

    /// Resolves when the writer task has ended before [`finish`](Self::finish),
    /// which it does only on an error: that error.
    pub async fn stopped(&mut self) -> Error {
        let Some(task) = self.task.as_mut() else { return std::future::pending().await };
        let ended = task.await;
        self.task = None;
        match ended {
            Ok(Err(e)) => e,
            Ok(Ok(_)) => Error::task_failed("the consumer's writer", "stopped before its work was done"),
            Err(e) => Error::join("the consumer's writer", e),
        }
    }

    /// Waits until everything sent is done; returns the checkpoints written.
    pub async fn finish(self) -> Result<u64> {
        let Writer { tx, task } = self;
        drop(tx);
        join(task).await
    }
}

async fn join(task: Option<JoinHandle<Result<u64>>>) -> Result<u64> {
    let task = task.ok_or_else(|| Error::Invariant("the consumer's writer joined twice".into()))?;
    task.await.map_err(|e| Error::join("the consumer's writer", e))?
}

impl Task {
    async fn run(mut self, mut rx: mpsc::Receiver<Work>) -> Result<u64> {
        while let Some(first) = rx.recv().await {
            let mut round = Round::default();
            round.add(first);
            while let Ok(work) = rx.try_recv() {
                round.add(work);
            }
            if !round.checks.is_empty() {
                let written: Vec<(&str, i64)> = round.checks.iter().map(|(s, end)| (s.as_str(), *end)).collect();
                self.sink.check(&written).await?;
            }
            self.write_bars(&round).await?;
            // Lost partitions are another member's: neither their state nor
            // their offsets are published from here on, even when their
            // checkpoint was queued before they were lost.
            for handover in round.handovers.iter().filter(|h| h.lost) {
                self.committed.retain(|p, _| !handover.partitions.contains(p));
                round.checkpoint.retain(|p, _| !handover.partitions.contains(p));
            }
            if round.checkpointed {
                self.checkpoint(round.checkpoint.into_values().collect(), round.last, round.read).await?;
            }
            self.hand_over(round.handovers);
        }
        Ok(self.checkpoints)
    }

    async fn write_bars(&mut self, round: &Round) -> Result<()> {
        self.sink.write(&round.bars).await?;
        let mut from = 0;
        for &(to, polled_at) in &round.polled {
            self.metrics.bars_written(&round.bars[from..to], polled_at);
            from = to;
        }
        CrashPoint::AfterRedisWrite.pass(round.read);
        Ok(())
    }

    /// State and offsets in one synced batch; then, in a group, the same
    /// published to the changelog with the group's offsets in one
    /// transaction, or else the offsets committed for lag monitoring.
    async fn checkpoint(&mut self, partitions: Vec<Encoded>, last: bool, read: u64) -> Result<()> {
        if !partitions.is_empty() {
            self.committed.extend(partitions.iter().map(|e| (e.partition, e.next_offset)));
            let (store, changelog, consumer) = (self.store.clone(), self.changelog.clone(), self.consumer.clone());
            let (topic, offsets) = (self.topic.clone(), self.committed.clone());
            let published = tokio::task::spawn_blocking(move || {
                let batch = store.prepare(&partitions)?;
                CrashPoint::InsideCheckpoint.pass(read);
                store.commit(batch)?;
                let Some(changelog) = changelog else { return Ok(None) };
                let group = consumer.group_metadata().ok_or_else(|| Error::Invariant("a group member without group metadata".into()))?;
                changelog.publish(&partitions, &topic, &offsets, &group).map(Some)
            })
            .await
            .map_err(|e| Error::join("checkpoint thread", e))??;
            if published == Some(Published::Fenced) {
                metrics::counter!(crate::telemetry::CHANGELOG_FENCED).increment(1);
            }
            self.checkpoints += 1;
        }
        if self.changelog.is_none() {
            self.commit_for_monitoring(last);
        }
        Ok(())
    }

    /// Partitions given up: a revoked one's offsets are committed first
    /// (synchronously, while this member still owns it), a lost one's never.
    fn hand_over(&mut self, handovers: Vec<Handover>) {
        if handovers.is_empty() {
            return;
        }
        // A group member's offsets went with its last changelog transaction.
        if self.changelog.is_none() && handovers.iter().any(|h| !h.lost) {
            self.commit_for_monitoring(true);
        }
        for handover in handovers {
            self.committed.retain(|p, _| !handover.partitions.contains(p));
            if let Some(done) = handover.done {
                let _ = done.send(());
            }
        }
    }

    /// At most once a second (and at shutdown): each commit is a request
    /// librdkafka finishes before the consumer can close.
    fn commit_for_monitoring(&mut self, last: bool) {
        if self.committed.is_empty() || (!last && self.last_commit.is_some_and(|at| at.elapsed() < Duration::from_secs(1))) {
            return;
        }
        self.last_commit = Some(Instant::now());
        let mut list = TopicPartitionList::new();
        for (partition, offset) in &self.committed {
            let _ = list.add_partition_offset(&self.topic, *partition, Offset::Offset(*offset));
        }
        let mode = if last { CommitMode::Sync } else { CommitMode::Async };
        if let Err(e) = self.consumer.commit(&list, mode) {
            warn!(error = %e, "offset commit for lag monitoring failed; checkpoints are unaffected");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::PartitionCheckpoint;
    use crate::window::Bar;

    fn bar(symbol: &str, end: i64) -> FinalBar {
        let bar = Bar { start: end - 1000, open: 1, high: 1, low: 1, close: 1, volume: 1, quote_volume: 1, buy_volume: 0, trades: 1 };
        FinalBar { symbol: symbol.into(), end, previous: None, bar, vwap_bar: 1.0, vwap_long: 1.0, rsi: None }
    }

    fn checkpoint(partition: i32, next_offset: i64) -> Encoded {
        PartitionCheckpoint { next_offset, ..Default::default() }.encode(partition, 0).unwrap()
    }

    #[test]
    fn a_round_keeps_the_bars_in_order_and_each_partitions_newest_state() {
        let at = Instant::now();
        let mut round = Round::default();
        round.add(Work::Bars { bars: vec![bar("A", 1000), bar("B", 1000)], polled_at: at, read: 40 });
        round.add(Work::Checkpoint { partitions: vec![checkpoint(0, 10), checkpoint(1, 20)], last: false, read: 40, handover: None });
        round.add(Work::Bars { bars: Vec::new(), polled_at: at, read: 50 });
        round.add(Work::Bars { bars: vec![bar("A", 2000)], polled_at: at, read: 70 });
        round.add(Work::Checkpoint { partitions: Vec::new(), last: false, read: 70, handover: None });
        round.add(Work::Checkpoint { partitions: vec![checkpoint(0, 30)], last: true, read: 90, handover: None });

        let order: Vec<(&str, i64)> = round.bars.iter().map(|b| (b.symbol.as_str(), b.end)).collect();
        assert_eq!(order, [("A", 1000), ("B", 1000), ("A", 2000)]);
        assert_eq!(round.polled.iter().map(|(to, _)| *to).collect::<Vec<_>>(), [2, 3]);
        let offsets: Vec<(i32, i64)> = round.checkpoint.values().map(|e| (e.partition, e.next_offset)).collect();
        assert_eq!(offsets, [(0, 30), (1, 20)]);
        // The round reaches as far as its furthest item.
        assert_eq!((round.read, round.checkpointed, round.last), (90, true, true));
    }
}
