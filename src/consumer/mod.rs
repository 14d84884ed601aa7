//! The consumer: Kafka batches in, window state updated, bars to Redis,
//! then a checkpoint of state and offsets (SPEC §7). Side effect first, then
//! mark done: a checkpoint is written only after Redis acknowledged every bar
//! and the broker every dead letter it covers.
//!
//! | piece | file |
//! |---|---|
//! | client, assignment, the thread that fetches and decodes | [`source`] |
//! | the loop: batches, ticks, checkpoints, shutdown | [`event_loop`] |
//! | Redis writes and checkpoints, in order, beside the loop | [`writer`] |

mod event_loop;
pub mod source;
mod writer;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::{FusedFuture, FutureExt};
use rdkafka::consumer::Consumer;
use tokio::sync::mpsc;
use tracing::{error, info};

use crate::checkpoint::{CheckpointStore, Identity, PartitionCheckpoint};
use crate::error::{Error, Result};
use crate::kafka::{self, DeadLetters, KafkaArgs, REQUEST_TIMEOUT};
use crate::sink::{RedisArgs, RedisSink};
use crate::telemetry::{ConsumerMetrics, Heartbeat};
use crate::window::{Counts, SymbolLimits, WindowConfig};
use event_loop::Loop;
use source::SourceOptions;
pub use source::{source_client_config, ASSIGNED_LOG};
use writer::Writer;

/// Where the consumer keeps its checkpoints unless told otherwise.
pub const DEFAULT_STATE_DIR: &str = "state";

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
    /// How far ahead of this process's clock a trade time may be (SPEC §1).
    pub future_tolerance: Duration,
    /// Only these symbols, if given; others are dead letters (SPEC §9).
    pub symbols: Option<BTreeSet<String>>,
    /// Most symbols one partition's state holds (SPEC §9).
    pub max_symbols: usize,
    /// How often a live run logs its heartbeat line; never when absent
    /// and with `exit_at_end`.
    pub heartbeat: Option<Duration>,
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

/// How often Redis may lose its data in one run before the consumer gives up.
const MAX_REBUILDS: u32 = 3;

/// Runs the consumer until `shutdown` resolves or, with `exit_at_end`, the
/// partitions are read to their end; always ends with a checkpoint. When
/// Redis lost a symbol's bars (restarted empty, flushed, evicted), the
/// partitions that hold the symbol are rewound to the start of the topic
/// and their bars written again.
pub async fn run(config: ConsumerConfig, shutdown: impl Future<Output = ()>) -> Result<Summary> {
    config.window.validate()?;
    let started = Instant::now();
    // Fused: a run that ends on an error after the shutdown came must not
    // poll it again, and no rebuild starts once it came.
    let shutdown = shutdown.fuse();
    tokio::pin!(shutdown);
    let mut rebuilds = 0;
    loop {
        match run_once(config.clone(), shutdown.as_mut()).await {
            Err(Error::RedisDataLost { prefix, symbols }) if rebuilds < MAX_REBUILDS && !shutdown.is_terminated() => {
                let shown = crate::error::first_few(&symbols);
                error!(%prefix, lost = symbols.len(), symbols = %shown, "redis lost bars of these symbols (restarted empty, flushed, evicted, or edited): reading their history again to write them again");
                rewind(&config, &symbols).await?;
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
    let kafka = config.kafka.clone();
    tokio::task::spawn_blocking(move || kafka.check_reachable()).await.map_err(|e| Error::join("kafka probe", e))??;
    // The group check waits for the group's coordinator (about 0.1 s of a
    // start): it runs while the state and Redis are opened, and is awaited
    // before any record is read.
    let group_check = {
        let (kafka, group) = (config.kafka.clone(), config.group_id.clone());
        tokio::task::spawn_blocking(move || kafka.check_group(&group))
    };
    let store = Arc::new(open_store(&config).await?);
    let consumer = Arc::new(source::create_consumer(&config)?);
    let partition_ids = kafka::partitions_of(consumer.as_ref(), &config.kafka.topic)?;
    store.check_identity(&identity(&config, partition_ids.len()))?;
    let partitions: BTreeMap<i32, PartitionCheckpoint> = store.load()?.into_iter().collect();
    let (positions, end_offsets, mut fetch) = source::assign(&consumer, &config, &partitions, &partition_ids)?;
    let mut sink = connect_sink(&config).await?;
    sink.check(&written(partitions.values(), &config.window)).await?;
    group_check.await.map_err(|e| Error::join("kafka group check", e))??;
    let dead_letters = DeadLetters::new(&config.kafka)?;

    let (tx, rx) = mpsc::channel(2);
    let stop = kafka::stop_flag();
    let source_options = SourceOptions {
        max_rows: config.max_batch_rows,
        linger: config.linger,
        end_offsets: config.exit_at_end.then_some(end_offsets),
        future_tolerance: config.future_tolerance,
    };
    let source = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("kafka-source".into())
            .spawn(move || source::run_source(&mut fetch, &source_options, &positions, &tx, &stop))
            .map_err(|e| Error::io("kafka-source thread", e))?
    };

    let committed = partitions.iter().map(|(p, c)| (*p, c.next_offset)).collect();
    let writer = Writer::spawn(sink, store, consumer.clone(), config.kafka.topic.clone(), committed);
    let symbol_limits = SymbolLimits { allow: config.symbols.clone(), max: config.max_symbols };
    let (exit_at_end, heartbeat) = (config.exit_at_end, config.heartbeat);
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
        symbol_limits,
        full: BTreeSet::new(),
        heartbeat: Heartbeat::new(if exit_at_end { None } else { heartbeat }),
    };
    let result = consumer_loop.run(rx, shutdown).await;
    stop.store(true, Ordering::Relaxed);
    let source_result = source.join().map_err(|_| Error::Panicked { task: "kafka source thread".into() })?;
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

/// Each symbol with a final bar in `partitions`, and the end of its newest.
fn written<'a>(partitions: impl IntoIterator<Item = &'a PartitionCheckpoint>, window: &WindowConfig) -> Vec<(&'a str, i64)> {
    partitions
        .into_iter()
        .flat_map(|p| &p.state.symbols)
        .filter_map(|(symbol, state)| Some((symbol.as_str(), state.last_final_end(window)?)))
        .collect()
}

/// Forgets the window state of the partitions whose checkpoint holds a
/// symbol whose bars Redis lost, `lost` or any other the checkpoints name
/// (a restarted Redis lost them all at once, and they are rewound
/// together), and sets them back to the oldest offset the broker still
/// has. A lost symbol no checkpoint holds came after every checkpoint: the
/// restart reads all of it again anyway. Records already gone from the
/// topic cannot be written again: that is logged as an error.
async fn rewind(config: &ConsumerConfig, lost: &[String]) -> Result<()> {
    let store = Arc::new(open_store(config).await?);
    let consumer = source::create_consumer(config)?;
    let topic = &config.kafka.topic;
    let loaded = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.load()).await.map_err(|e| Error::join("checkpoint thread", e))??
    };
    let mut sink = connect_sink(config).await?;
    let mut lost: BTreeSet<String> = lost.iter().cloned().collect();
    lost.extend(sink.lost_of(&written(loaded.iter().map(|(_, c)| c), &config.window)).await?);
    let holding: BTreeSet<i32> = loaded.iter().filter(|(_, c)| c.state.symbols.keys().any(|s| lost.contains(s))).map(|(p, _)| *p).collect();
    info!(%topic, partitions = ?holding, "rewinding the partitions whose state holds a lost symbol");
    let mut fresh = Vec::new();
    for partition in kafka::partitions_of(&consumer, topic)?.into_iter().filter(|p| holding.contains(p)) {
        let (low, _) = consumer.fetch_watermarks(topic, partition, REQUEST_TIMEOUT).map_err(|e| Error::kafka("fetch watermarks", e))?;
        if low > 0 {
            error!(%topic, partition, log_start = low, "records before the log start are gone from Kafka: the bars they made cannot be written again");
        }
        fresh.push((partition, PartitionCheckpoint { next_offset: low, ..Default::default() }));
    }
    tokio::task::spawn_blocking(move || store.save(fresh.iter().map(|(p, c)| (*p, c))))
        .await
        .map_err(|e| Error::join("checkpoint thread", e))?
}

/// What the consumer's state depends on (SPEC §7).
fn identity(config: &ConsumerConfig, partitions: usize) -> Identity {
    let window = &config.window;
    Identity {
        topic: config.kafka.topic.clone(),
        partitions,
        bar_ms: window.bar_ms,
        vwap_ms: window.vwap_ms,
        rsi_period: window.rsi_period,
    }
}

async fn connect_sink(config: &ConsumerConfig) -> Result<RedisSink> {
    let (redis, window) = (&config.redis, &config.window);
    RedisSink::connect(&redis.target.url, &redis.target.prefix, window.names(), redis.retention_ms(), redis.retry_for()).await
}

async fn open_store(config: &ConsumerConfig) -> Result<CheckpointStore> {
    let (dir, topic) = (config.state_dir.clone(), config.kafka.topic.clone());
    tokio::task::spawn_blocking(move || CheckpointStore::open(&dir, &topic)).await.map_err(|e| Error::join("checkpoint open", e))?
}
