//! The consumer loop: Kafka batches in, window state updated, bars to Redis,
//! then a checkpoint of state and offsets (SPEC §7). Side effect first, then
//! mark done: a checkpoint is written only after Redis acknowledged every bar
//! and the broker every dead letter it covers. The Redis writes and the
//! checkpoints run in order on the [`writer`] task, beside the loop.

mod writer;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tracing::{error, info};

use crate::binance::Reject;
use crate::checkpoint::{CheckpointStore, PartitionCheckpoint};
use crate::cli::{KafkaArgs, RedisArgs};
use crate::error::{Error, Result};
use crate::faults;
use crate::fetch::FetchQueue;
use crate::kafka::{
    self, DeadLetter, DeadLetters, PartitionBatch, SourceConsumer, SourceContext, SourceEvent, SourceOptions, REQUEST_TIMEOUT,
};
use crate::metrics::{self as health, ConsumerMetrics};
use crate::sink::RedisSink;
use crate::trade::TradeColumns;
use crate::window::{Counts, WindowConfig};
use writer::{Work, Writer};

/// Everything the consumer needs to run.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    pub kafka: KafkaArgs,
    pub redis: RedisArgs,
    pub state_dir: PathBuf,
    pub window: WindowConfig,
    /// Consumer group the offsets are committed to, for lag monitoring only.
    pub group_id: String,
    /// Stop once every partition is read to where it ended at start.
    pub exit_at_end: bool,
    pub checkpoint_interval: Duration,
    pub checkpoint_records: u64,
    pub max_batch_rows: usize,
    pub linger: Duration,
    /// Live mode: a bar is also final this long after its end without trades.
    pub idle_finalize: Option<Duration>,
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Totals over all partitions, including earlier runs (from the checkpoint).
    pub counts: Counts,
    /// Records read in this run.
    pub records: u64,
    pub dead_letters: u64,
    pub checkpoints: u64,
    pub elapsed: Duration,
    /// Times the state was rewound because Redis lost the data.
    pub rebuilds: u32,
}

/// How often librdkafka reports statistics (and so the lag) with metrics on.
const STATS_INTERVAL_MS: &str = "1000";

/// How often Redis may lose its data in one run before the consumer gives up.
const MAX_REBUILDS: u32 = 3;

/// Runs the consumer until `shutdown` resolves or, with `exit_at_end`, the
/// partitions are read to their end; always ends with a checkpoint. When
/// Redis lost the data (restarted empty, flushed), the state is rewound to
/// the start of the topic and everything is written again.
pub async fn run(config: ConsumerConfig, shutdown: impl Future<Output = ()>) -> Result<Summary> {
    config.window.validate()?;
    let started = Instant::now();
    tokio::pin!(shutdown);
    let mut rebuilds = 0;
    loop {
        match run_once(config.clone(), shutdown.as_mut()).await {
            Err(Error::RedisDataLost { prefix }) if rebuilds < MAX_REBUILDS => {
                error!(%prefix, "redis lost the consumer's data (restarted empty or flushed): rewinding to the start of the topic to write it again");
                rewind(&config).await?;
                rebuilds += 1;
            }
            Ok(mut summary) => {
                summary.elapsed = started.elapsed();
                summary.rebuilds = rebuilds;
                return Ok(summary);
            }
            Err(e) => return Err(e),
        }
    }
}

async fn run_once(config: ConsumerConfig, shutdown: impl Future<Output = ()>) -> Result<Summary> {
    let store = Arc::new(open_store(&config).await?);
    let partitions: BTreeMap<i32, PartitionCheckpoint> = store.load()?.into_iter().collect();
    let consumer = Arc::new(create_consumer(&config)?);
    let (positions, end_offsets, mut fetch) = assign(&consumer, &config, &partitions)?;
    let mut sink = RedisSink::connect(
        &config.redis.target.url,
        &config.redis.target.prefix,
        config.window.names(),
        config.redis.retention_ms(),
        config.redis.retry_for(),
    )
    .await?;
    sink.check_marker(partitions.values().any(|p| p.state.counts.bars > 0)).await?;
    let dead_letters = DeadLetters::new(&config.kafka)?;

    let (tx, rx) = mpsc::channel(2);
    let stop = kafka::stop_flag();
    let source_options =
        SourceOptions { max_rows: config.max_batch_rows, linger: config.linger, end_offsets: config.exit_at_end.then_some(end_offsets) };
    let source = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("kafka-source".into())
            .spawn(move || kafka::run_source(&mut fetch, &source_options, &positions, &tx, &stop))
            .map_err(|e| Error::io("kafka-source thread", e))?
    };

    let committed = partitions.iter().map(|(p, c)| (*p, c.next_offset)).collect();
    let writer = Writer::spawn(sink, store, consumer.clone(), config.kafka.topic.clone(), committed);
    let mut consumer_loop = Loop {
        config,
        writer,
        dead_letters,
        partitions,
        dirty: BTreeSet::new(),
        encoded_size: BTreeMap::new(),
        since_checkpoint: 0,
        last_checkpoint: Instant::now(),
        summary: Summary::default(),
        metrics: ConsumerMetrics::new(),
    };
    let result = consumer_loop.run(rx, shutdown).await;
    stop.store(true, Ordering::Relaxed);
    let source_result = source.join().map_err(|_| Error::Config("kafka source thread panicked".into()))?;
    let Loop { writer, dead_letters, partitions, mut summary, .. } = consumer_loop;
    // On an error too the writer finishes what it was given (all of it
    // consistent: a checkpoint only follows its bars) and so lets go of the
    // store before a rewind opens it again.
    let checkpoints = writer.finish().await;
    result?;
    source_result?;
    summary.checkpoints = checkpoints?;
    info!(records = summary.records, checkpoints = summary.checkpoints, dead_letters = summary.dead_letters, "consumer stopped");
    // Every dead letter is acknowledged (the last checkpoint waited for them).
    kafka::close_in_background((consumer, dead_letters));
    summary.counts = partitions.values().fold(Counts::default(), |mut total, p| {
        total.add(&p.state.counts);
        total
    });
    Ok(summary)
}

/// Forgets all window state and sets every partition back to the oldest
/// offset the broker still has. Records already gone from the topic cannot
/// be written again: that is logged as an error.
async fn rewind(config: &ConsumerConfig) -> Result<()> {
    let store = open_store(config).await?;
    let consumer = create_consumer(config)?;
    let topic = &config.kafka.topic;
    let mut fresh = Vec::new();
    for partition in kafka::partitions_of(&consumer, topic)? {
        let (low, _) = consumer.fetch_watermarks(topic, partition, REQUEST_TIMEOUT).map_err(|e| Error::kafka("fetch watermarks", e))?;
        if low > 0 {
            error!(%topic, partition, log_start = low, "records before the log start are gone from Kafka: the bars they made cannot be written again");
        }
        fresh.push((partition, PartitionCheckpoint { next_offset: low, ..Default::default() }));
    }
    tokio::task::spawn_blocking(move || store.save(fresh.iter().map(|(p, c)| (*p, c))))
        .await
        .map_err(|e| Error::Config(format!("checkpoint thread: {e}")))?
}

async fn open_store(config: &ConsumerConfig) -> Result<CheckpointStore> {
    let (dir, topic) = (config.state_dir.clone(), config.kafka.topic.clone());
    tokio::task::spawn_blocking(move || CheckpointStore::open(&dir, &topic))
        .await
        .map_err(|e| Error::Config(format!("checkpoint open: {e}")))?
}

fn create_consumer(config: &ConsumerConfig) -> Result<SourceConsumer> {
    let mut client = source_client_config(&config.kafka, &config.group_id)?;
    if health::is_installed() && client.get("statistics.interval.ms").is_none() {
        // The lag gauge comes from librdkafka's statistics (SourceContext::stats).
        client.set("statistics.interval.ms", STATS_INTERVAL_MS);
    }
    client.create_with_context(SourceContext { topic: config.kafka.topic.clone() }).map_err(|e| Error::kafka("create consumer", e))
}

/// The consumer's librdkafka settings: its defaults, the user's `-X` and
/// properties file over them, then what it does not let anyone change. The
/// benchmark's no-op consumer uses the same, so the ceiling cannot drift.
///
/// `fetch.queue.backoff.ms` 20 instead of librdkafka's 1000: with the
/// default, fetching pauses for a second whenever the local queue is full,
/// and a million-trade catch-up took 5.6 s instead of 2.3 s. The prefetch
/// is bounded: 512 KiB per partition fetch and 16 MiB queued instead of
/// librdkafka's 1 MiB and 64 MiB (a consumer behind the broker held most of
/// a million-trade topic decompressed in memory, with no gain in speed).
///
/// Those queue limits are checked before a fetch, and one response may
/// bring a full fetch of every partition: at 10,000 symbols the records
/// compress about nine to one, so six partitions' 512 KiB made 200,000
/// records in one go. `fetch.max.bytes` 1 MiB bounds a response (about
/// 65,000 records there), and `queued.min.messages` 50,000 asks for the
/// next one before the queue runs dry: peak RSS 194-203 -> 136-140 MiB over
/// 10 million trades at 10,000 symbols, and a little less CPU (benches/HISTORY.md,
/// items 9 and 15).
pub fn source_client_config(kafka: &KafkaArgs, group_id: &str) -> Result<ClientConfig> {
    let mut client = kafka.config_with(&[
        ("group.id", group_id),
        ("fetch.wait.max.ms", "50"),
        ("fetch.queue.backoff.ms", "20"),
        ("fetch.max.bytes", "1048576"),
        ("max.partition.fetch.bytes", "524288"),
        ("queued.max.messages.kbytes", "16384"),
        ("queued.min.messages", "50000"),
    ])?;
    // Not negotiable: offsets come from the checkpoint, and an offset the
    // broker no longer has is an error, never a silent jump.
    client
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "error");
    Ok(client)
}

/// Per partition, where it starts, where it ended at start, and the queue
/// its records come through.
type Assigned = (HashMap<i32, i64>, HashMap<i32, i64>, FetchQueue);

/// Assigns every partition of the topic at its checkpointed offset (or the
/// beginning). Returns where each starts, where each ended at start, and
/// the queue their records come through.
fn assign(consumer: &Arc<SourceConsumer>, config: &ConsumerConfig, checkpoints: &BTreeMap<i32, PartitionCheckpoint>) -> Result<Assigned> {
    let topic = &config.kafka.topic;
    let mut list = TopicPartitionList::new();
    let (mut positions, mut ends) = (HashMap::new(), HashMap::new());
    for partition in kafka::partitions_of(consumer.as_ref(), topic)? {
        let (low, high) = consumer.fetch_watermarks(topic, partition, REQUEST_TIMEOUT).map_err(|e| Error::kafka("fetch watermarks", e))?;
        let start = match checkpoints.get(&partition) {
            Some(c) if c.next_offset < low || c.next_offset > high => {
                return Err(Error::Config(format!(
                    "checkpointed offset {} of {topic}/{partition} is not on the broker (it holds {low}..{high}); \
                     the records in between are lost to this consumer: restore the topic or start with a fresh --state-dir",
                    c.next_offset
                )));
            }
            Some(c) => c.next_offset,
            None => low,
        };
        list.add_partition_offset(topic, partition, Offset::Offset(start)).map_err(|e| Error::kafka("assign", e))?;
        positions.insert(partition, start);
        ends.insert(partition, high);
    }
    let fetch = FetchQueue::assign(consumer.clone(), &list)?;
    info!(%topic, partitions = positions.len(), "assigned at checkpointed offsets");
    Ok((positions, ends, fetch))
}

struct Loop {
    config: ConsumerConfig,
    writer: Writer,
    dead_letters: DeadLetters,
    partitions: BTreeMap<i32, PartitionCheckpoint>,
    /// Partitions changed since the last checkpoint.
    dirty: BTreeSet<i32>,
    /// Each partition's size in its last checkpoint, to serialize the next
    /// one without regrowing the buffer.
    encoded_size: BTreeMap<i32, usize>,
    since_checkpoint: u64,
    last_checkpoint: Instant,
    summary: Summary,
    metrics: ConsumerMetrics,
}

impl Loop {
    async fn run(&mut self, mut rx: mpsc::Receiver<SourceEvent>, shutdown: impl Future<Output = ()>) -> Result<()> {
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                event = rx.recv() => match event {
                    Some(SourceEvent::Batch { batches, rejected, polled_at }) => self.on_batch(batches, rejected, polled_at).await?,
                    Some(SourceEvent::End) | None => break,
                },
                _ = tick.tick() => self.on_tick().await?,
            }
        }
        self.shutdown().await
    }

    async fn on_batch(&mut self, batches: Vec<PartitionBatch>, rejected: Vec<DeadLetter>, polled_at: Instant) -> Result<()> {
        for letter in &rejected {
            self.partitions.entry(letter.partition).or_default().state.counts.rejected += 1;
            self.dead_letters.send(letter).await?;
            health::dead_letter(letter.reason.as_str());
        }
        let mut bars = Vec::new();
        let mut records = rejected.len() as u64;
        for batch in batches {
            let partition = self.partitions.entry(batch.partition).or_default();
            let before = partition.state.counts.clone();
            let output = partition.state.apply(&batch.trades, &self.config.window)?;
            count_applied(&self.metrics, &before, &partition.state.counts);
            partition.next_offset = batch.next_offset;
            self.dirty.insert(batch.partition);
            records += batch.offsets.len() as u64;
            if !output.late_rows.is_empty() {
                let cols = TradeColumns::new(&batch.trades)?;
                for row in output.late_rows {
                    self.dead_letters.send(&late_letter(&batch, &cols, row)).await?;
                    health::dead_letter(Reject::Late.as_str());
                }
            }
            bars.extend(output.bars);
        }
        self.summary.records += records;
        self.since_checkpoint += records;
        self.metrics.records.increment(records);
        faults::crash_point("after_state_update");
        // Sent even without bars: the writer then passes its crash point
        // `after_redis_write` once per batch, as the crash harness counts.
        self.writer.send(Work::Bars { bars, polled_at }).await?;
        if self.since_checkpoint >= self.config.checkpoint_records {
            self.checkpoint(false).await?;
        }
        Ok(())
    }

    async fn on_tick(&mut self) -> Result<()> {
        if let Some(idle) = self.config.idle_finalize {
            let ticked = Instant::now();
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
            let mut bars = Vec::new();
            for (partition, checkpoint) in &mut self.partitions {
                let closed = checkpoint.state.finalize_idle(now, idle.as_millis() as i64, &self.config.window);
                if !closed.is_empty() {
                    self.dirty.insert(*partition);
                    bars.extend(closed);
                }
            }
            if !bars.is_empty() {
                self.writer.send(Work::Bars { bars, polled_at: ticked }).await?;
            }
        }
        if !self.dirty.is_empty() && self.last_checkpoint.elapsed() >= self.config.checkpoint_interval {
            self.checkpoint(false).await?;
        }
        Ok(())
    }

    /// Dead letters acknowledged, then the changed partitions' state and
    /// offsets handed to the writer, which saves them after the bars before.
    async fn checkpoint(&mut self, last: bool) -> Result<()> {
        self.dead_letters.flush().await?;
        if self.dirty.is_empty() && !last {
            return Ok(());
        }
        let mut partitions = Vec::with_capacity(self.dirty.len());
        for partition in &self.dirty {
            let Some(checkpoint) = self.partitions.get(partition) else { continue };
            let encoded = checkpoint.encode(*partition, self.encoded_size.get(partition).map_or(0, |size| size + size / 8))?;
            self.encoded_size.insert(*partition, encoded.size());
            partitions.push(encoded);
        }
        self.writer.send(Work::Checkpoint { partitions, last }).await?;
        self.dirty.clear();
        self.since_checkpoint = 0;
        self.last_checkpoint = Instant::now();
        Ok(())
    }

    /// The last checkpoint; `run_once` then waits for the writer.
    async fn shutdown(&mut self) -> Result<()> {
        self.checkpoint(true).await?;
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

fn late_letter(batch: &PartitionBatch, cols: &TradeColumns<'_>, row: usize) -> DeadLetter {
    let trade = cols.trade(row);
    DeadLetter {
        reason: Reject::Late,
        detail: format!("trade {} of {} at {} is for a bar already final", trade.id, trade.symbol, trade.time_ms),
        partition: batch.partition,
        offset: batch.offsets[row],
        key: Some(trade.symbol.as_bytes().to_vec()),
        payload: batch.payloads.value(row).to_vec(),
    }
}
