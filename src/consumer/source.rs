//! The consumer's source: its librdkafka client and settings, the
//! partitions it is assigned at their checkpointed offsets, and the thread
//! that fetches their records and decodes them into one Arrow batch per
//! partition (or into dead letters).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use arrow::array::{BinaryArray, BinaryBuilder, RecordBatch};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::group::{Change, Hooks};
use super::ConsumerConfig;
use crate::binance;
use crate::checkpoint::{CheckpointStore, Identity, PartitionCheckpoint};
use crate::crash_point::CrashPoint;
use crate::error::{Error, Result};
use crate::kafka::fetch::{FetchQueue, Record};
use crate::kafka::{DeadLetter, KafkaArgs, REQUEST_TIMEOUT};
use crate::telemetry;
use crate::trade::TradeBatchBuilder;

/// What the consumer logs once startup (checkpoint store, metadata,
/// watermarks) is over and reading begins: the crash harness times its
/// kills from this line.
pub const ASSIGNED_LOG: &str = "assigned at checkpointed offsets";

/// How often librdkafka reports statistics (and so the lag) with metrics on.
const STATS_INTERVAL_MS: &str = "1000";

/// Client context of the consumer: routes librdkafka's errors to tracing,
/// leaving out the end-of-partition events the source asks for, and turns
/// its statistics (when `statistics.interval.ms` is set) into the lag gauge.
pub struct SourceContext {
    /// The raw topic, whose partitions' lag is reported.
    pub topic: String,
    /// A group member's rebalance callback (none for a static assignment).
    group: OnceLock<Hooks>,
}

impl SourceContext {
    pub fn new(topic: &str) -> Self {
        SourceContext { topic: topic.to_owned(), group: OnceLock::new() }
    }
}

impl rdkafka::ClientContext for SourceContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() != Some(RDKafkaErrorCode::PartitionEOF) && !matches!(error, KafkaError::PartitionEOF(_)) {
            warn!(%error, reason, "kafka client error");
        }
    }

    /// Runs on the polling thread, once per statistics interval.
    fn stats(&self, statistics: rdkafka::Statistics) {
        let Some(topic) = statistics.topics.get(&self.topic) else { return };
        for (partition, stats) in &topic.partitions {
            if let Some(lag) = partition_lag(stats) {
                telemetry::set_lag(*partition, lag);
            }
        }
    }
}

/// High watermark minus the next offset the consumer hands out: librdkafka's
/// `app_offset`, or before the first record the committed offset (the
/// checkpoint's, committed for monitoring) or the log start. `None` for the
/// internal partition -1 and before the watermark is known.
fn partition_lag(stats: &rdkafka::statistics::Partition) -> Option<i64> {
    if stats.partition < 0 || stats.hi_offset < 0 {
        return None;
    }
    let next = [stats.app_offset, stats.committed_offset, stats.lo_offset].into_iter().find(|offset| *offset >= 0)?;
    Some((stats.hi_offset - next).max(0))
}

impl rdkafka::consumer::ConsumerContext for SourceContext {
    fn rebalance(&self, consumer: &SourceConsumer, event: RDKafkaRespErr, list: &mut TopicPartitionList) {
        match self.group.get() {
            Some(hooks) => hooks.rebalance(consumer, event, list),
            // Only a subscribed consumer is rebalanced, and it has hooks.
            None => warn!(?event, "rebalance of a consumer that is not a group member, ignored"),
        }
    }
}

/// The consumer the source polls.
pub type SourceConsumer = BaseConsumer<SourceContext>;

/// The queue the source fetches from.
pub type SourceQueue = FetchQueue<SourceContext>;

/// The consumer's client; a group member (`member`: its
/// `group.instance.id`) gets the group's settings under the user's.
pub(super) fn create_consumer(config: &ConsumerConfig, member: Option<&str>) -> Result<SourceConsumer> {
    let mut client = source_client_config(&config.kafka, &config.group_id)?;
    if let Some(member) = member {
        match client.get("group.protocol") {
            // The classic protocol, where a user's broker has no KIP-848:
            // its cooperative assignor, a 10 s session and static
            // membership (the same state dir is the same member).
            Some("classic") => {
                for (key, value) in super::group::CLASSIC_SETTINGS {
                    if client.get(key).is_none() {
                        client.set(key, value);
                    }
                }
                if client.get("group.instance.id").is_none() {
                    client.set("group.instance.id", member);
                }
            }
            _ => {
                client.set("group.protocol", "consumer");
            }
        }
        // No end-of-partition events: a member's end is the group's
        // committed offsets. librdkafka counts such an event as a record
        // handed out, one past the partition's end; a partition restarted
        // after a rebalance then resumed one record too far, and the record
        // that came in the meantime at the old end was skipped (seen: a
        // trade missing from its bar in the kill-and-pause test, and
        // offsets past the end reset as out of range).
        client.set("enable.partition.eof", "false");
        // Should librdkafka still lose a position, it starts the partition
        // over (and logs it); the loop drops what it read already (it
        // knows each partition's next offset), so this costs reading only.
        // A checkpoint behind the log start is refused at assignment.
        client.set("auto.offset.reset", "earliest");
    }
    if telemetry::is_installed() && client.get("statistics.interval.ms").is_none() {
        // The lag gauge comes from librdkafka's statistics (SourceContext::stats).
        client.set("statistics.interval.ms", STATS_INTERVAL_MS);
    }
    client.create_with_context(SourceContext::new(&config.kafka.topic)).map_err(|e| Error::kafka("create consumer", e))
}

/// The consumer's librdkafka settings: its defaults, the user's `-X` and
/// properties file over them, then what it does not let anyone change. The
/// benchmark's no-op consumer uses the same, so the ceiling cannot drift.
///
/// Why each default (numbers in benches/HISTORY.md, items 9 and 15):
/// `fetch.queue.backoff.ms` 20, not librdkafka's 1000, so fetching does not
/// pause for a second whenever the local queue is full; the prefetch is
/// bounded (512 KiB per partition fetch, 16 MiB queued) because a consumer
/// behind the broker otherwise holds much of the topic decompressed, for no
/// gain in speed; `fetch.max.bytes` bounds one response, which may bring a
/// full fetch of every partition at once; `queued.min.messages` asks for the
/// next response before the queue runs dry.
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
type Assigned = (HashMap<i32, i64>, HashMap<i32, i64>, SourceQueue);

/// Assigns `partitions`, every partition of the topic, each at its
/// checkpointed offset (or the beginning). Returns where each starts, where
/// each ended at start, and the queue their records come through.
pub(super) fn assign(
    consumer: &Arc<SourceConsumer>,
    config: &ConsumerConfig,
    checkpoints: &BTreeMap<i32, PartitionCheckpoint>,
    partitions: &[i32],
) -> Result<Assigned> {
    let topic = &config.kafka.topic;
    let mut list = TopicPartitionList::new();
    let (mut positions, mut ends) = (HashMap::new(), HashMap::new());
    for &partition in partitions {
        let (low, high) = consumer.fetch_watermarks(topic, partition, REQUEST_TIMEOUT).map_err(|e| Error::kafka("fetch watermarks", e))?;
        let start = super::group::start_offset(topic, partition, checkpoints.get(&partition), (low, high))?;
        list.add_partition_offset(topic, partition, Offset::Offset(start)).map_err(|e| Error::kafka("assign", e))?;
        positions.insert(partition, start);
        ends.insert(partition, high);
    }
    let fetch = FetchQueue::assign(consumer.clone(), &list)?;
    info!(%topic, partitions = positions.len(), "{ASSIGNED_LOG}");
    Ok((positions, ends, fetch))
}

/// Each partition's end (high watermark) now.
pub(super) fn end_offsets(consumer: &SourceConsumer, topic: &str, partitions: &[i32]) -> Result<BTreeMap<i32, i64>> {
    partitions
        .iter()
        .map(|&partition| {
            let (_, high) =
                consumer.fetch_watermarks(topic, partition, REQUEST_TIMEOUT).map_err(|e| Error::kafka("fetch watermarks", e))?;
            Ok((partition, high))
        })
        .collect()
}

/// Subscribes `consumer` to the topic as a member of its group: the
/// rebalance callback ([`Hooks`]) assigns partitions as the group decides,
/// each forwarded to the returned queue, and announces them on `events`.
pub(super) fn subscribe(
    consumer: &Arc<SourceConsumer>,
    config: &ConsumerConfig,
    identity: Identity,
    store: Arc<CheckpointStore>,
    events: &mpsc::Sender<SourceEvent>,
) -> Result<SourceQueue> {
    let fetch = FetchQueue::new(consumer.clone())?;
    let topic = config.kafka.topic.as_str();
    let hooks = Hooks {
        topic: topic.to_owned(),
        kafka: config.kafka.clone(),
        group_id: config.group_id.clone(),
        identity,
        store,
        forwarding: fetch.forwarding(),
        send: {
            let events = events.downgrade();
            Box::new(move |change| events.upgrade().is_some_and(|tx| tx.blocking_send(SourceEvent::Group(change)).is_ok()))
        },
        open: {
            let events = events.downgrade();
            Box::new(move || events.upgrade().is_some_and(|tx| !tx.is_closed()))
        },
        failed: Mutex::new(None),
    };
    if consumer.context().group.set(hooks).is_err() {
        return Err(Error::Invariant("a consumer subscribed twice".into()));
    }
    consumer.subscribe(&[topic]).map_err(|e| Error::kafka("subscribe", e))?;
    info!(%topic, "joining the consumer group; partitions come as it assigns them");
    Ok(fetch)
}

/// The trades of one partition read in one poll round, with where they came from.
pub struct PartitionBatch {
    pub partition: i32,
    /// Decoded trades, in offset order.
    pub trades: RecordBatch,
    /// Source offset of each row of `trades`.
    pub offsets: Vec<i64>,
    /// Raw payload of each row of `trades`, for dead-lettering late trades;
    /// one buffer for the batch, not an allocation per trade.
    pub payloads: BinaryArray,
    /// Next offset to read after this batch (past rejected records too).
    pub next_offset: i64,
    /// The producer's clock records among the rows, in offset order.
    pub clocks: Vec<Clock>,
}

/// A clock record of the producer (data contract §3): what its clock read,
/// and where it came among the trades of its partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clock {
    /// Trades of the batch before it.
    pub row: usize,
    pub offset: i64,
    /// The producer's clock, ms since the epoch.
    pub ms: i64,
}

impl PartitionBatch {
    /// The rows from offset `next` on: those before it were read already
    /// (a group member's partition read again from an older position).
    pub fn from_offset(mut self, next: i64) -> Self {
        let skip = self.offsets.partition_point(|&offset| offset < next);
        self.clocks.retain(|clock| clock.offset >= next);
        if skip > 0 {
            let rows = self.offsets.len() - skip;
            self.trades = self.trades.slice(skip, rows);
            self.payloads = self.payloads.slice(skip, rows);
            self.offsets.drain(..skip);
            for clock in &mut self.clocks {
                clock.row -= skip;
            }
        }
        self
    }

    /// The batch cut at its clock records: the trades before each clock
    /// with that clock, then what follows the last (without one). A batch
    /// without clocks is itself.
    pub fn split_at_clocks(mut self) -> Vec<(PartitionBatch, Option<Clock>)> {
        if self.clocks.is_empty() {
            return vec![(self, None)];
        }
        let clocks = std::mem::take(&mut self.clocks);
        let mut parts = Vec::with_capacity(clocks.len() + 1);
        let mut from = 0;
        for clock in &clocks {
            parts.push((self.rows(from, clock.row, clock.offset + 1), Some(*clock)));
            from = clock.row;
        }
        let rest = self.offsets.len();
        if from < rest || self.next_offset > clocks.last().map_or(0, |c| c.offset + 1) {
            parts.push((self.rows(from, rest, self.next_offset), None));
        }
        parts
    }

    /// Rows `from..to`, read up to `next_offset`.
    fn rows(&self, from: usize, to: usize, next_offset: i64) -> PartitionBatch {
        PartitionBatch {
            partition: self.partition,
            trades: self.trades.slice(from, to - from),
            offsets: self.offsets[from..to].to_vec(),
            payloads: self.payloads.slice(from, to - from),
            next_offset,
            clocks: Vec::new(),
        }
    }
}

/// What the source thread hands to the consumer loop.
pub enum SourceEvent {
    Batch {
        batches: Vec<PartitionBatch>,
        rejected: Vec<DeadLetter>,
        /// When the first record of the round was polled: the bar latency
        /// of the bars these records close is measured from here.
        polled_at: Instant,
    },
    /// Every partition reached the end it had when the consumer started.
    End,
    /// A group member's partitions changed.
    Group(Change),
}

/// How the source thread batches.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    pub max_rows: usize,
    pub linger: Duration,
    /// Per partition, the offset at which it is read to the end (`--exit-at-end`).
    pub end_offsets: Option<HashMap<i32, i64>>,
    /// A group member with `--exit-at-end`: every partition's end at
    /// start, which the group's committed offsets must reach.
    pub group_end: Option<BTreeMap<i32, i64>>,
    /// How far ahead of this process's clock a trade time may be.
    pub future_tolerance: Duration,
}

#[derive(Default)]
struct Pending {
    builder: TradeBatchBuilder,
    offsets: Vec<i64>,
    payloads: BinaryBuilder,
    next_offset: i64,
    clocks: Vec<Clock>,
}

/// Reads records from `fetch` on the calling thread until `stop` is set,
/// the receiver goes away or (with end offsets) every partition is read to
/// its end.
pub fn run_source(
    fetch: &mut SourceQueue,
    options: &SourceOptions,
    positions: &HashMap<i32, i64>,
    tx: &mpsc::Sender<SourceEvent>,
    stop: &AtomicBool,
) -> Result<()> {
    // Looked up per record: a handful of partitions, cheaper in a BTreeMap
    // than hashed.
    let mut unfinished: BTreeMap<i32, i64> = options.end_offsets.iter().flatten().map(|(p, end)| (*p, *end)).collect();
    unfinished.retain(|p, end| positions.get(p).is_none_or(|pos| pos < end));
    let mut read = 0;
    let mut group_checked = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let group_done = options.group_end.as_ref().is_some_and(|ends| {
            group_checked.elapsed() >= GROUP_END_CHECK && {
                group_checked = Instant::now();
                group_at_end(fetch.consumer(), ends)
            }
        });
        if (options.end_offsets.is_some() && unfinished.is_empty()) || group_done {
            let _ = tx.blocking_send(SourceEvent::End);
            return Ok(());
        }
        let (pending, rejected, polled_at) = poll_round(fetch, options, &mut unfinished)?;
        if let Some(e) = fetch.consumer().context().group.get().and_then(Hooks::take_failure) {
            return Err(e);
        }
        let Some(polled_at) = polled_at else { continue };
        read += rejected.len() as u64 + pending.values().map(|p| p.offsets.len() as u64).sum::<u64>();
        CrashPoint::AfterDecode.pass(read);
        let batches = pending
            .into_iter()
            .map(|(partition, mut p)| {
                Ok(PartitionBatch {
                    partition,
                    trades: p.builder.finish()?,
                    offsets: p.offsets,
                    payloads: p.payloads.finish(),
                    next_offset: p.next_offset,
                    clocks: p.clocks,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        if tx.blocking_send(SourceEvent::Batch { batches, rejected, polled_at }).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// How often a group member with `--exit-at-end` asks for the group's
/// committed offsets.
const GROUP_END_CHECK: Duration = Duration::from_millis(500);

/// Whether the group committed every partition up to its end at start: by
/// this member or by others, so the members stop together. An offset not
/// known yet counts as not there.
fn group_at_end(consumer: &SourceConsumer, ends: &BTreeMap<i32, i64>) -> bool {
    let Some(topic) = consumer.context().group.get().map(|hooks| hooks.topic.as_str()) else { return false };
    let mut list = TopicPartitionList::new();
    for partition in ends.keys() {
        list.add_partition(topic, *partition);
    }
    let Ok(committed) = consumer.committed_offsets(list, REQUEST_TIMEOUT) else { return false };
    ends.iter().all(|(partition, end)| {
        *end <= 0 || matches!(committed.find_partition(topic, *partition).map(|e| e.offset()), Some(Offset::Offset(at)) if at >= *end)
    })
}

/// Payload bytes after which a round ends whatever its rows: a round holds
/// the payloads of its trades (for late ones' dead letters), and records
/// padded to the topic's limit would otherwise make `max_rows` of them
/// gigabytes. Measured with `hostile --mutants 20000 --seed 2` (2,220
/// trades padded with 20-200 KB of nesting): peak RSS 332 MiB without it,
/// 145 MiB with it (a clean run: 40 MiB).
const MAX_ROUND_BYTES: usize = 16 << 20;

/// The batches of a round, its rejects, and when its first record came.
type Polled = (BTreeMap<i32, Pending>, Vec<DeadLetter>, Option<Instant>);

/// One batch: what is queued once the first record came, up to `max_rows`
/// (or [`MAX_ROUND_BYTES`] of payload);
/// when the queue runs dry, more only until `linger` after the first record.
///
/// A batch never waits for records that are not there yet with the default
/// linger of zero: under load the queue is deep and batches fill up, at a
/// live trickle a batch is the few records that came, written at once.
fn poll_round(fetch: &mut SourceQueue, options: &SourceOptions, unfinished: &mut BTreeMap<i32, i64>) -> Result<Polled> {
    let mut pending: BTreeMap<i32, Pending> = BTreeMap::new();
    let mut rejected = Vec::new();
    let (mut rows, mut bytes) = (0, 0);
    let mut first: Option<Instant> = None;
    // One clock read per round: the future tolerance is an hour, not a millisecond.
    let now_ms = binance::now_ms();
    loop {
        if let Some(e) = fetch.serve_events() {
            handle_error(e)?;
        }
        let timeout = match first {
            None => Duration::from_millis(100),
            Some(at) => (at + options.linger).saturating_duration_since(Instant::now()),
        };
        let batch = fetch.fetch(timeout, options.max_rows - rows);
        if batch.is_empty() {
            match first {
                None => return Ok((pending, rejected, None)),
                Some(_) => break,
            }
        }
        for record in batch.iter() {
            match record.error {
                None => {}
                Some(KafkaError::PartitionEOF(partition)) => {
                    unfinished.remove(&partition);
                    continue;
                }
                Some(e) => {
                    handle_error(e)?;
                    continue;
                }
            }
            // Bar latency is measured from here: one clock read per batch.
            first.get_or_insert_with(Instant::now);
            rows += 1;
            bytes += record.payload.len();
            take(&record, &mut pending, &mut rejected, unfinished, (now_ms, options.future_tolerance));
        }
        if rows >= options.max_rows || bytes >= MAX_ROUND_BYTES {
            break;
        }
    }
    Ok((pending, rejected, first))
}

/// A fatal error ends the source; others are logged and read past.
fn handle_error(error: KafkaError) -> Result<()> {
    if is_fatal(&error) {
        return Err(Error::kafka("consume", error));
    }
    if !matches!(error, KafkaError::PartitionEOF(_)) {
        warn!(%error, "kafka consumer error, retrying");
    }
    Ok(())
}

/// Decodes one record into its partition's batch, or into a dead letter.
/// A trade time past `now_ms` by more than the tolerance is a dead letter.
fn take(
    record: &Record<'_>,
    pending: &mut BTreeMap<i32, Pending>,
    rejected: &mut Vec<DeadLetter>,
    unfinished: &mut BTreeMap<i32, i64>,
    (now_ms, tolerance): (i64, Duration),
) {
    let (partition, offset, payload) = (record.partition, record.offset, record.payload);
    if unfinished.get(&partition).is_some_and(|end| offset + 1 >= *end) {
        unfinished.remove(&partition);
    }
    let slot = pending.entry(partition).or_default();
    slot.next_offset = offset + 1;
    if let Some(ms) = record.clock.and_then(clock_ms) {
        slot.clocks.push(Clock { row: slot.offsets.len(), offset, ms });
        return;
    }
    match binance::decode(payload).and_then(|trade| binance::check_time(trade.time_ms, now_ms, tolerance).map(|()| trade)) {
        Ok(trade) => {
            slot.builder.push(&trade);
            slot.offsets.push(offset);
            slot.payloads.append_value(payload);
        }
        Err(rejection) => {
            debug!(partition, offset, reason = %rejection.reason, "record rejected");
            rejected.push(DeadLetter::new(rejection.reason, rejection.detail, (partition, offset), record.key, payload));
        }
    }
}

/// The producer's clock of a clock header: ms since the epoch, in decimal.
/// A header that says something else leaves its record to be read as a
/// trade (and so most likely dead-lettered).
fn clock_ms(value: &[u8]) -> Option<i64> {
    std::str::from_utf8(value).ok()?.parse().ok().filter(|ms| *ms >= 0)
}

/// Errors after which reading on would lose or skip data.
fn is_fatal(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::OffsetOutOfRange
                | RDKafkaErrorCode::AutoOffsetReset
                | RDKafkaErrorCode::UnknownTopicOrPartition
                | RDKafkaErrorCode::Fatal
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::statistics::Partition;

    /// A batch of partition 3 with trades at `offsets` (ids = offsets) and
    /// clock records at `clocks` (offset, ms), read up to `next_offset`.
    fn batch(offsets: &[i64], clocks: &[(i64, i64)], next_offset: i64) -> PartitionBatch {
        let (mut builder, mut payloads) = (TradeBatchBuilder::default(), BinaryBuilder::new());
        for &offset in offsets {
            let trade = crate::trade::Trade {
                symbol: "BTCUSDT".into(),
                id: offset,
                price: 1,
                qty: 1,
                time_ms: 1_000 + offset,
                buyer_is_maker: false,
                event_time_ms: None,
            };
            builder.push(&trade);
            payloads.append_value(offset.to_string());
        }
        let clocks = clocks.iter().map(|&(offset, ms)| Clock { row: offsets.partition_point(|&o| o < offset), offset, ms }).collect();
        PartitionBatch {
            partition: 3,
            trades: builder.finish().unwrap(),
            offsets: offsets.to_vec(),
            payloads: payloads.finish(),
            next_offset,
            clocks,
        }
    }

    /// Each part: its trades' offsets, its next offset and its clock's ms.
    fn parts(batch: PartitionBatch) -> Vec<(Vec<i64>, i64, Option<i64>)> {
        batch
            .split_at_clocks()
            .into_iter()
            .map(|(part, clock)| {
                assert_eq!((part.trades.num_rows(), arrow::array::Array::len(&part.payloads)), (part.offsets.len(), part.offsets.len()));
                let ids = part.trades.column(1).as_any().downcast_ref::<arrow::array::Int64Array>().unwrap().values().to_vec();
                assert_eq!(ids, part.offsets, "the trades are the rows of their offsets");
                (part.offsets, part.next_offset, clock.map(|c| c.ms))
            })
            .collect()
    }

    #[test]
    fn a_batch_is_cut_after_each_clock_record_wherever_it_comes() {
        // Trades at 10, 11, 13, 14, 16; clocks at 12 and 15; read to 17.
        let cut = parts(batch(&[10, 11, 13, 14, 16], &[(12, 500), (15, 900)], 17));
        assert_eq!(cut, [(vec![10, 11], 13, Some(500)), (vec![13, 14], 16, Some(900)), (vec![16], 17, None)]);
        // A clock first, two in a row, a clock last.
        let cut = parts(batch(&[11], &[(10, 1), (12, 2), (13, 3)], 14));
        assert_eq!(cut, [(vec![], 11, Some(1)), (vec![11], 13, Some(2)), (vec![], 14, Some(3))]);
        // Records after the last clock that were not trades (dead letters)
        // still move the partition's next offset.
        assert_eq!(parts(batch(&[10], &[(11, 7)], 14)), [(vec![10], 12, Some(7)), (vec![], 14, None)]);
        assert_eq!(parts(batch(&[10, 11], &[], 12)), [(vec![10, 11], 12, None)]);
    }

    #[test]
    fn a_batch_read_again_from_an_offset_keeps_the_clocks_from_there() {
        let again = batch(&[10, 11, 13, 14, 16], &[(12, 500), (15, 900)], 17).from_offset(14);
        assert_eq!(parts(again), [(vec![14], 16, Some(900)), (vec![16], 17, None)]);
        let again = batch(&[10, 11, 13], &[(12, 500)], 14).from_offset(12);
        assert_eq!(parts(again), [(vec![], 13, Some(500)), (vec![13], 14, None)]);
    }

    #[test]
    fn a_clock_header_is_a_non_negative_number_of_ms() {
        assert_eq!(clock_ms(b"1733300000123"), Some(1_733_300_000_123));
        for bad in [&b""[..], b"-5", b"12a", b" 12", b"\xff"] {
            assert_eq!(clock_ms(bad), None, "{bad:?}");
        }
    }

    /// librdkafka's value for an offset it does not know (`RD_KAFKA_OFFSET_INVALID`).
    const INVALID: i64 = -1001;

    #[test]
    fn lag_is_the_high_watermark_minus_the_next_offset_handed_out() {
        let stats = |partition, lo_offset, hi_offset, committed_offset, app_offset| Partition {
            partition,
            lo_offset,
            hi_offset,
            committed_offset,
            app_offset,
            ..Default::default()
        };
        for (stats, lag) in [
            (stats(0, 0, 500, 100, 420), Some(80)),
            (stats(1, 0, 500, 100, INVALID), Some(400)),
            (stats(2, 7, 500, INVALID, INVALID), Some(493)),
            (stats(3, 0, 0, INVALID, INVALID), Some(0)),
            (stats(4, 0, 500, INVALID, 500), Some(0)),
            // A watermark older than the position (a stale statistic) is no negative lag.
            (stats(5, 0, 400, INVALID, 420), Some(0)),
            (stats(-1, 0, 500, INVALID, INVALID), None),
            (stats(0, INVALID, INVALID, INVALID, INVALID), None),
        ] {
            assert_eq!(partition_lag(&stats), lag, "{stats:?}");
        }
    }
}
