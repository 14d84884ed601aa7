//! The consumer: Kafka batches in, window state updated, bars to Redis,
//! then a checkpoint of state and offsets (SPEC §7). Side effect first, then
//! mark done: a checkpoint is written only after Redis acknowledged every bar
//! and the broker every dead letter it covers.
//!
//! | piece | file |
//! |---|---|
//! | client, assignment, the thread that fetches and decodes | [`source`] |
//! | group membership: partitions restored on assignment, checkpointed on revocation | `group` |
//! | a group's state in Kafka: snapshots and offsets in one transaction, restores | `changelog` |
//! | the loop: batches, ticks, checkpoints, shutdown | [`event_loop`] |
//! | Redis writes and checkpoints, in order, beside the loop | [`writer`] |

mod changelog;
mod event_loop;
mod group;
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
use changelog::Changelog;
use event_loop::Loop;
pub use group::RESTORED_LOG;
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
    /// Consumer group: the members share its partitions, and the
    /// checkpointed offsets are committed to it.
    pub group_id: String,
    /// Which partitions this consumer reads.
    pub assignment: Assignment,
    /// Stop once every partition is read to where it ended at start.
    pub exit_at_end: bool,
    pub checkpoint_interval: Duration,
    pub checkpoint_records: u64,
    pub max_batch_rows: usize,
    pub linger: Duration,
    /// Live mode: a bar is also final once a clock record of the producer
    /// reads this long after its end, without a newer trade before it.
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

/// Which partitions a consumer reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Assignment {
    /// Those Kafka's consumer-group protocol gives it among the members of
    /// its group, changing as members come and go (SPEC §8).
    Group,
    /// These partitions (all of the topic's when `None`), whatever other
    /// consumers do.
    Static(Option<BTreeSet<i32>>),
}

impl Assignment {
    /// `all` or a comma-separated list of partition numbers.
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        if text.trim() == "all" {
            return Ok(Assignment::Static(None));
        }
        let partitions = text
            .split(',')
            .map(|p| p.trim().parse::<i32>().ok().filter(|p| *p >= 0).ok_or_else(|| format!("{p:?} is not a partition number")))
            .collect::<std::result::Result<BTreeSet<i32>, String>>()?;
        Ok(Assignment::Static(Some(partitions)))
    }
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
    let member = match config.assignment {
        Assignment::Group => Some(store.member_id()?),
        Assignment::Static(_) => None,
    };
    let consumer = Arc::new(source::create_consumer(&config, member.as_deref())?);
    let partition_ids = kafka::partitions_of(consumer.as_ref(), &config.kafka.topic)?;
    store.check_identity(&identity(&config, partition_ids.len()))?;
    let (tx, rx) = mpsc::channel(2);
    let mut source_options = SourceOptions {
        max_rows: config.max_batch_rows,
        linger: config.linger,
        end_offsets: None,
        group_end: None,
        future_tolerance: config.future_tolerance,
    };
    let mut changelog = None;
    let (partitions, positions, mut fetch, mut sink) = match &config.assignment {
        Assignment::Static(chosen) => {
            let chosen = chosen_partitions(&config.kafka.topic, &partition_ids, chosen.as_ref())?;
            let mut partitions: BTreeMap<i32, PartitionCheckpoint> =
                store.load()?.into_iter().filter(|(p, _)| chosen.contains(p)).collect();
            let (positions, end_offsets, fetch) = source::assign(&consumer, &config, &partitions, &chosen)?;
            for (partition, start) in &positions {
                partitions.entry(*partition).or_insert_with(|| PartitionCheckpoint { next_offset: *start, ..Default::default() });
            }
            let mut sink = connect_sink(&config).await?;
            sink.check(&written(partitions.values(), &config.window)).await?;
            source_options.end_offsets = config.exit_at_end.then_some(end_offsets);
            (partitions, positions, fetch, sink)
        }
        Assignment::Group => {
            if config.exit_at_end {
                source_options.group_end = Some(source::end_offsets(&consumer, &config.kafka.topic, &partition_ids)?);
            }
            let changelog_topic = changelog::topic_of(&config.group_id);
            config.kafka.ensure_compacted(&changelog_topic, partition_ids.len() as i32).await?;
            let state_identity = identity(&config, partition_ids.len());
            let (kafka, group, member, made_with) =
                (config.kafka.clone(), config.group_id.clone(), member.clone().unwrap_or_default(), state_identity.clone());
            changelog = Some(Arc::new(
                tokio::task::spawn_blocking(move || {
                    group::with_retries("starting the changelog producer", || Changelog::open(&kafka, &group, &member, &made_with))
                })
                .await
                .map_err(|e| Error::join("changelog producer", e))??,
            ));
            let sink = connect_sink(&config).await?;
            let fetch = source::subscribe(&consumer, &config, state_identity, store.clone(), &tx)?;
            (BTreeMap::new(), Default::default(), fetch, sink)
        }
    };
    sink.set_layout().await?;
    group_check.await.map_err(|e| Error::join("kafka group check", e))??;
    let dead_letters = DeadLetters::new(&config.kafka)?;

    let stop = kafka::stop_flag();
    let source = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("kafka-source".into())
            .spawn(move || source::run_source(&mut fetch, &source_options, &positions, &tx, &stop))
            .map_err(|e| Error::io("kafka-source thread", e))?
    };

    let committed = partitions.iter().map(|(p, c)| (*p, c.next_offset)).collect();
    let writer = Writer::spawn(sink, store, consumer.clone(), config.kafka.topic.clone(), committed, changelog);
    let symbol_limits = SymbolLimits { allow: config.symbols.clone(), max: config.max_symbols };
    let (exit_at_end, heartbeat) = (config.exit_at_end, config.heartbeat);
    let grouped = config.assignment == Assignment::Group;
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
    if grouped {
        // A member's close runs its last rebalance callback; one left to
        // finish on its own thread was cut short by the process's exit.
        tokio::task::spawn_blocking(move || drop((consumer, dead_letters))).await.map_err(|e| Error::join("kafka close", e))?;
    } else {
        kafka::close_in_background((consumer, dead_letters));
    }
    summary.counts = partitions.values().fold(Counts::default(), |mut total, p| {
        total.add(&p.state.counts);
        total
    });
    Ok(summary)
}

/// The partitions `chosen` (all when `None`), each checked to exist.
fn chosen_partitions(topic: &str, exist: &[i32], chosen: Option<&BTreeSet<i32>>) -> Result<Vec<i32>> {
    let Some(chosen) = chosen else { return Ok(exist.to_vec()) };
    if let Some(missing) = chosen.iter().find(|p| !exist.contains(p)) {
        return Err(Error::Config(format!(
            "--assign names partition {missing}, but topic {topic:?} has {} (0..{})",
            exist.len(),
            exist.len()
        )));
    }
    Ok(chosen.iter().copied().collect())
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
    let consumer = source::create_consumer(config, None)?;
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
