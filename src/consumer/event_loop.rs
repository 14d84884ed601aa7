//! The consumer's loop: each batch of the source updates the window state
//! and hands its bars to the writer; ticks close idle bars and trigger
//! timed checkpoints; the last checkpoint comes at shutdown.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use super::group::Change;
use super::source::{PartitionBatch, SourceEvent};
use super::writer::{Handover, Work, Writer};
use super::{ConsumerConfig, Summary};
use crate::checkpoint::PartitionCheckpoint;
use crate::crash_point::CrashPoint;
use crate::error::Result;
use crate::kafka::{DeadLetter, DeadLetters};
use crate::rejection::Reject;
use crate::telemetry::{self, ConsumerMetrics, Heartbeat};
use crate::trade::TradeColumns;
use crate::window::{Counts, SymbolLimits};

pub(super) struct Loop {
    pub(super) config: ConsumerConfig,
    pub(super) writer: Writer,
    pub(super) dead_letters: DeadLetters,
    pub(super) partitions: BTreeMap<i32, PartitionCheckpoint>,
    /// Partitions changed since the last checkpoint.
    pub(super) dirty: BTreeSet<i32>,
    /// Each partition's size in its last checkpoint, to serialize the next
    /// one without regrowing the buffer.
    pub(super) encoded_size: BTreeMap<i32, usize>,
    pub(super) since_checkpoint: u64,
    pub(super) last_checkpoint: Instant,
    pub(super) summary: Summary,
    pub(super) metrics: ConsumerMetrics,
    /// Which symbols the state takes (SPEC §9).
    pub(super) symbol_limits: SymbolLimits,
    /// Partitions whose `--max-symbols` was hit and logged.
    pub(super) full: BTreeSet<i32>,
    pub(super) heartbeat: Heartbeat,
}

impl Loop {
    pub(super) async fn run(&mut self, mut rx: mpsc::Receiver<SourceEvent>, shutdown: impl Future<Output = ()>) -> Result<()> {
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                // The writer ends early only on an error; waiting for the
                // next send to learn of it would leave an idle consumer
                // stuck with a dead writer.
                error = self.writer.stopped() => return Err(error),
                event = rx.recv() => match event {
                    Some(SourceEvent::Batch { batches, rejected, polled_at }) => self.on_batch(batches, rejected, polled_at).await?,
                    Some(SourceEvent::Group(Change::Assigned(restored))) => self.on_assigned(restored).await?,
                    Some(SourceEvent::Group(Change::Revoked { partitions, done })) => self.on_revoked(&partitions, done).await?,
                    Some(SourceEvent::Group(Change::Lost { partitions, done })) => self.on_lost(&partitions, done).await?,
                    Some(SourceEvent::End) | None => break,
                },
                _ = tick.tick() => self.on_tick().await?,
            }
        }
        self.shutdown().await
    }

    async fn on_batch(&mut self, batches: Vec<PartitionBatch>, rejected: Vec<DeadLetter>, polled_at: Instant) -> Result<()> {
        let mut records = 0;
        for letter in &rejected {
            // A record of a partition given up, or read before it was
            // assigned again, is its owner's to take.
            let Some(partition) = self.partitions.get_mut(&letter.partition).filter(|p| letter.offset >= p.next_offset) else { continue };
            partition.state.counts.rejected += 1;
            records += 1;
            self.dead_letters.send(letter).await?;
            telemetry::dead_letter(letter.reason.as_str());
        }
        let mut bars = Vec::new();
        for batch in batches {
            let Some(partition) = self.partitions.get_mut(&batch.partition).filter(|p| batch.next_offset > p.next_offset) else {
                debug!(
                    partition = batch.partition,
                    "records of a partition this consumer does not own (any more), or read already, skipped"
                );
                continue;
            };
            self.dirty.insert(batch.partition);
            // The trades up to each clock record, then the bars that clock
            // makes final: wherever the source cut its batches, every
            // reader of the partition finalizes at the same trade.
            for (batch, clock) in batch.from_offset(partition.next_offset).split_at_clocks() {
                let before = partition.state.counts.clone();
                let output = partition.state.apply_within(&batch.trades, &self.config.window, &self.symbol_limits)?;
                count_applied(&self.metrics, &before, &partition.state.counts);
                partition.next_offset = batch.next_offset;
                records += batch.offsets.len() as u64;
                if output.refused_rows.iter().any(|&(_, reason)| reason == Reject::TooManySymbols) && self.full.insert(batch.partition) {
                    let (partition, max) = (batch.partition, self.symbol_limits.max);
                    warn!(partition, max, "partition holds --max-symbols symbols: trades of further symbols go to the dead-letter topic");
                }
                if !output.late_rows.is_empty() || !output.overflow_rows.is_empty() || !output.refused_rows.is_empty() {
                    let cols = TradeColumns::new(&batch.trades)?;
                    let late = output.late_rows.into_iter().map(|row| (row, Reject::Late));
                    let overflow = output.overflow_rows.into_iter().map(|row| (row, Reject::Overflow));
                    for (row, reason) in late.chain(overflow).chain(output.refused_rows) {
                        self.dead_letters.send(&row_letter(&batch, &cols, row, reason)).await?;
                        telemetry::dead_letter(reason.as_str());
                    }
                }
                bars.extend(output.bars);
                if let Some(clock) = clock {
                    records += 1;
                    if let Some(idle) = self.config.idle_finalize {
                        bars.extend(partition.state.finalize_idle(clock.ms, idle.as_millis() as i64, &self.config.window));
                    }
                }
            }
        }
        self.summary.records += records;
        self.since_checkpoint += records;
        self.metrics.records.increment(records);
        CrashPoint::AfterStateUpdate.pass(self.summary.records);
        if !bars.is_empty() {
            self.writer.send(Work::Bars { bars, polled_at, read: self.summary.records }).await?;
        }
        if self.since_checkpoint >= self.config.checkpoint_records {
            self.checkpoint(false, None).await?;
        }
        Ok(())
    }

    /// Partitions the group gave this consumer, at their checkpoints: their
    /// symbols' bars are checked in Redis first, and their offsets are
    /// committed with the next checkpoint.
    async fn on_assigned(&mut self, restored: Vec<(i32, PartitionCheckpoint)>) -> Result<()> {
        let written: Vec<(String, i64)> = restored
            .iter()
            .flat_map(|(_, c)| &c.state.symbols)
            .filter_map(|(symbol, state)| Some((symbol.clone(), state.last_final_end(&self.config.window)?)))
            .collect();
        for (partition, checkpoint) in restored {
            self.dirty.insert(partition);
            self.partitions.insert(partition, checkpoint);
        }
        if !written.is_empty() {
            self.writer.send(Work::Check { written }).await?;
        }
        Ok(())
    }

    /// Partitions the group takes away: their bars and checkpoint are
    /// written before `done` lets them go.
    async fn on_revoked(&mut self, partitions: &[i32], done: oneshot::Sender<()>) -> Result<()> {
        self.checkpoint(false, Some(Handover { partitions: partitions.to_vec(), lost: false, done: Some(done) })).await?;
        self.forget(partitions);
        Ok(())
    }

    /// Partitions another member owns already: dropped without a checkpoint.
    async fn on_lost(&mut self, partitions: &[i32], done: oneshot::Sender<()>) -> Result<()> {
        self.forget(partitions);
        self.writer.send(Work::Release(Handover { partitions: partitions.to_vec(), lost: true, done: Some(done) })).await
    }

    fn forget(&mut self, partitions: &[i32]) {
        for partition in partitions {
            self.partitions.remove(partition);
            self.dirty.remove(partition);
            self.encoded_size.remove(partition);
            self.full.remove(partition);
        }
    }

    async fn on_tick(&mut self) -> Result<()> {
        if !self.dirty.is_empty() && self.last_checkpoint.elapsed() >= self.config.checkpoint_interval {
            self.checkpoint(false, None).await?;
        }
        if self.heartbeat.is_due() {
            self.beat();
        }
        Ok(())
    }

    /// The heartbeat line: what the consumer did since the last one.
    fn beat(&mut self) {
        let counts = self.partitions.values().fold(Counts::default(), |mut total, p| {
            total.add(&p.state.counts);
            total
        });
        let [records, trades, bars] = self.heartbeat.beat([self.summary.records, counts.applied, counts.bars]);
        let (dead_letters, lag) = (self.dead_letters.sent(), telemetry::total_lag());
        info!(records_per_s = records, trades_per_s = trades, bars_per_s = bars, dead_letters, lag, "heartbeat");
    }

    /// Dead letters acknowledged, then the changed partitions' state and
    /// offsets handed to the writer, which saves them after the bars before.
    async fn checkpoint(&mut self, last: bool, handover: Option<Handover>) -> Result<()> {
        self.dead_letters.flush().await?;
        if self.dirty.is_empty() && !last && handover.is_none() {
            return Ok(());
        }
        let mut partitions = Vec::with_capacity(self.dirty.len());
        for partition in &self.dirty {
            let Some(checkpoint) = self.partitions.get(partition) else { continue };
            let encoded = checkpoint.encode(*partition, self.encoded_size.get(partition).map_or(0, |size| size + size / 8))?;
            self.encoded_size.insert(*partition, encoded.size());
            partitions.push(encoded);
        }
        self.writer.send(Work::Checkpoint { partitions, last, read: self.summary.records, handover }).await?;
        self.dirty.clear();
        self.since_checkpoint = 0;
        self.last_checkpoint = Instant::now();
        Ok(())
    }

    /// The last checkpoint; `run_once` then waits for the writer.
    async fn shutdown(&mut self) -> Result<()> {
        self.checkpoint(true, None).await?;
        self.summary.dead_letters = self.dead_letters.sent();
        Ok(())
    }
}

/// Per batch, not per trade: what `apply` added to a partition's counts.
fn count_applied(metrics: &ConsumerMetrics, before: &Counts, after: &Counts) {
    metrics.applied.increment(after.applied.saturating_sub(before.applied));
    metrics.duplicates.increment(after.duplicates.saturating_sub(before.duplicates));
    metrics.late.increment(after.late.saturating_sub(before.late));
}

/// A dead letter for a decoded trade the windows turned away.
fn row_letter(batch: &PartitionBatch, cols: &TradeColumns<'_>, row: usize, reason: Reject) -> DeadLetter {
    let trade = cols.trade(row);
    let why = match reason {
        Reject::Late => "is for a bar already final",
        Reject::UnknownSymbol => "is of a symbol not in --symbols",
        Reject::TooManySymbols => "is of a new symbol in a partition holding --max-symbols",
        _ => "would take its bar's sums past what they hold exactly",
    };
    DeadLetter::new(
        reason,
        format!("trade {} of {} at {} {why}", trade.id, trade.symbol, trade.time_ms),
        (batch.partition, batch.offsets[row]),
        Some(trade.symbol.as_bytes()),
        batch.payloads.value(row),
    )
}
