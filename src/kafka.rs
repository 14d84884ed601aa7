//! Kafka plumbing: client configuration from the shared flags, topic
//! creation, the dead-letter producer, and the consumer's source thread that
//! polls records and decodes them into one Arrow batch per partition.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{BinaryArray, BinaryBuilder, RecordBatch};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::binance::{self, Reject};
use crate::cli::{read_properties, KafkaArgs};
use crate::error::{Error, Result};
use crate::fetch::{FetchQueue, Record};
use crate::trade::TradeBatchBuilder;

/// How long metadata and admin requests may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

impl KafkaArgs {
    /// librdkafka settings: brokers, then the properties file, then `-X`.
    pub fn client_config(&self) -> Result<ClientConfig> {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        if let Some(path) = &self.kafka_config_file {
            let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
            for (key, value) in read_properties(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))? {
                config.set(key, value);
            }
        }
        for (key, value) in &self.properties {
            config.set(key, value);
        }
        Ok(config)
    }

    /// Settings of an idempotent producer that keeps each partition in order.
    /// murmur2 is the Java client's partitioner: any client keyed by symbol
    /// sends a symbol to the same partition.
    pub fn producer_config(&self) -> Result<ClientConfig> {
        self.config_with(&[
            ("enable.idempotence", "true"),
            ("acks", "all"),
            ("compression.type", "lz4"),
            ("linger.ms", "5"),
            ("batch.size", "1000000"),
            ("partitioner", "murmur2_random"),
        ])
    }

    /// `defaults`, overridden by the user's settings.
    pub fn config_with(&self, defaults: &[(&str, &str)]) -> Result<ClientConfig> {
        let mut config = ClientConfig::new();
        for (key, value) in defaults {
            config.set(*key, *value);
        }
        for (key, value) in self.client_config()?.config_map() {
            config.set(key, value);
        }
        Ok(config)
    }

    /// Creates the raw topic (`--partitions`) and the dead-letter topic (one
    /// partition) unless they exist, with the broker's replication factor.
    pub async fn ensure_topics(&self) -> Result<()> {
        self.ensure(&[(&self.topic, self.partitions), (&self.dlq_topic, 1)]).await
    }

    /// Creates `topics` (name, partitions) unless they exist, with the same
    /// settings as the raw topic.
    pub async fn ensure(&self, topics: &[(&str, i32)]) -> Result<()> {
        let admin: AdminClient<DefaultClientContext> = self.client_config()?.create().map_err(|e| Error::kafka("admin client", e))?;
        let bytes = self.topic_retention_bytes.to_string();
        let topics: Vec<NewTopic<'_>> = topics
            .iter()
            .map(|&(name, partitions)| {
                NewTopic::new(name, partitions, TopicReplication::Fixed(-1)).set("retention.ms", "-1").set("retention.bytes", &bytes)
            })
            .collect();
        let options = AdminOptions::new().operation_timeout(Some(REQUEST_TIMEOUT));
        let results = admin.create_topics(&topics, &options).await.map_err(|e| Error::kafka("create topics", e))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => return Err(Error::kafka(format!("create topic {topic}"), KafkaError::AdminOp(code))),
            }
        }
        Ok(())
    }
}

/// Client context of the consumer: routes librdkafka's errors to tracing,
/// leaving out the end-of-partition events the source asks for, and turns
/// its statistics (when `statistics.interval.ms` is set) into the lag gauge.
pub struct SourceContext {
    /// The raw topic, whose partitions' lag is reported.
    pub topic: String,
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
                crate::metrics::set_lag(*partition, lag);
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

impl rdkafka::consumer::ConsumerContext for SourceContext {}

/// The consumer the source polls.
pub type SourceConsumer = BaseConsumer<SourceContext>;

/// The partition ids of `topic`; an error if the topic does not exist.
pub fn partitions_of<X: rdkafka::consumer::ConsumerContext, C: Consumer<X>>(consumer: &C, topic: &str) -> Result<Vec<i32>> {
    let metadata = consumer.fetch_metadata(Some(topic), REQUEST_TIMEOUT).map_err(|e| Error::kafka("fetch metadata", e))?;
    let found = metadata.topics().iter().find(|t| t.name() == topic);
    match found {
        Some(t) if t.error().is_none() && !t.partitions().is_empty() => Ok(t.partitions().iter().map(|p| p.id()).collect()),
        _ => Err(Error::Config(format!("topic {topic:?} does not exist on the broker; create it (scripts/services up, or replay)"))),
    }
}

/// A record that is not a usable trade, on its way to the dead-letter topic.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub reason: Reject,
    pub detail: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
}

/// Publishes dead letters with their reason and source in headers, and
/// waits for the broker to acknowledge them before a checkpoint. The
/// producer is created with the first dead letter: a run without any pays
/// neither its threads nor its shutdown.
pub struct DeadLetters {
    config: ClientConfig,
    producer: Option<FutureProducer>,
    topic: String,
    source_topic: String,
    pending: Vec<DeliveryFuture>,
    sent: u64,
}

impl DeadLetters {
    /// Checks the producer settings; connects on the first dead letter.
    pub fn new(args: &KafkaArgs) -> Result<Self> {
        let config = args.producer_config()?;
        Ok(DeadLetters {
            config,
            producer: None,
            topic: args.dlq_topic.clone(),
            source_topic: args.topic.clone(),
            pending: Vec::new(),
            sent: 0,
        })
    }

    /// Queues one dead letter; waits for earlier ones when the queue is full.
    pub async fn send(&mut self, letter: &DeadLetter) -> Result<()> {
        let (partition, offset) = (letter.partition.to_string(), letter.offset.to_string());
        let headers = OwnedHeaders::new()
            .insert(Header { key: "reason", value: Some(letter.reason.as_str()) })
            .insert(Header { key: "detail", value: Some(&letter.detail) })
            .insert(Header { key: "source.topic", value: Some(&self.source_topic) })
            .insert(Header { key: "source.partition", value: Some(&partition) })
            .insert(Header { key: "source.offset", value: Some(&offset) });
        loop {
            let producer = match &mut self.producer {
                Some(producer) => producer,
                slot @ None => slot.insert(self.config.create().map_err(|e| Error::kafka("dead-letter producer", e))?),
            };
            let mut record = FutureRecord::to(&self.topic).payload(&letter.payload).headers(headers.clone());
            if let Some(key) = &letter.key {
                record = record.key(key);
            }
            match producer.send_result(record) {
                Ok(delivery) => {
                    self.pending.push(delivery);
                    self.sent += 1;
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => self.flush().await?,
                Err((e, _)) => return Err(Error::kafka("queue dead letter", e)),
            }
        }
    }

    /// Waits until the broker acknowledged every dead letter sent so far.
    pub async fn flush(&mut self) -> Result<()> {
        for delivery in self.pending.drain(..) {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => return Err(Error::kafka("deliver dead letter", e)),
                Err(_) => return Err(Error::Config("dead-letter producer shut down before delivery".into())),
            }
        }
        Ok(())
    }

    pub fn sent(&self) -> u64 {
        self.sent
    }
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
}

/// How the source thread batches.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    pub max_rows: usize,
    pub linger: Duration,
    /// Per partition, the offset at which it is read to the end (`--exit-at-end`).
    pub end_offsets: Option<HashMap<i32, i64>>,
}

#[derive(Default)]
struct Pending {
    builder: TradeBatchBuilder,
    offsets: Vec<i64>,
    payloads: BinaryBuilder,
    next_offset: i64,
}

/// Reads records from `fetch` on the calling thread until `stop` is set,
/// the receiver goes away or (with end offsets) every partition is read to
/// its end.
pub fn run_source(
    fetch: &mut FetchQueue,
    options: &SourceOptions,
    positions: &HashMap<i32, i64>,
    tx: &mpsc::Sender<SourceEvent>,
    stop: &AtomicBool,
) -> Result<()> {
    // Looked up per record: a handful of partitions, cheaper in a BTreeMap
    // than hashed.
    let mut unfinished: BTreeMap<i32, i64> = options.end_offsets.iter().flatten().map(|(p, end)| (*p, *end)).collect();
    unfinished.retain(|p, end| positions.get(p).is_none_or(|pos| pos < end));
    while !stop.load(Ordering::Relaxed) {
        if options.end_offsets.is_some() && unfinished.is_empty() {
            let _ = tx.blocking_send(SourceEvent::End);
            return Ok(());
        }
        let (pending, rejected, polled_at) = poll_round(fetch, options, &mut unfinished)?;
        let Some(polled_at) = polled_at else { continue };
        crate::faults::crash_point("after_decode");
        let batches = pending
            .into_iter()
            .map(|(partition, mut p)| {
                Ok(PartitionBatch {
                    partition,
                    trades: p.builder.finish()?,
                    offsets: p.offsets,
                    payloads: p.payloads.finish(),
                    next_offset: p.next_offset,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        if tx.blocking_send(SourceEvent::Batch { batches, rejected, polled_at }).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// The batches of a round, its rejects, and when its first record came.
type Round = (BTreeMap<i32, Pending>, Vec<DeadLetter>, Option<Instant>);

/// One batch: what is queued once the first record came, up to `max_rows`;
/// when the queue runs dry, more only until `linger` after the first record.
///
/// A batch never waits for records that are not there yet with the default
/// linger of zero: under load the queue is deep and batches fill up, at a
/// live trickle a batch is the few records that came, written at once.
fn poll_round(fetch: &mut FetchQueue, options: &SourceOptions, unfinished: &mut BTreeMap<i32, i64>) -> Result<Round> {
    let mut pending: BTreeMap<i32, Pending> = BTreeMap::new();
    let mut rejected = Vec::new();
    let mut rows = 0;
    let mut first: Option<Instant> = None;
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
            take(&record, &mut pending, &mut rejected, unfinished);
        }
        if rows >= options.max_rows {
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
fn take(record: &Record<'_>, pending: &mut BTreeMap<i32, Pending>, rejected: &mut Vec<DeadLetter>, unfinished: &mut BTreeMap<i32, i64>) {
    let (partition, offset, payload) = (record.partition, record.offset, record.payload);
    if unfinished.get(&partition).is_some_and(|end| offset + 1 >= *end) {
        unfinished.remove(&partition);
    }
    let slot = pending.entry(partition).or_default();
    slot.next_offset = offset + 1;
    match binance::decode(payload) {
        Ok(trade) => {
            slot.builder.push(&trade);
            slot.offsets.push(offset);
            slot.payloads.append_value(payload);
        }
        Err(rejection) => {
            debug!(partition, offset, reason = %rejection.reason, "record rejected");
            rejected.push(DeadLetter {
                reason: rejection.reason,
                detail: rejection.detail,
                partition,
                offset,
                key: record.key.map(<[u8]>::to_vec),
                payload: payload.to_vec(),
            });
        }
    }
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

/// Drops librdkafka clients on a thread of their own. Dropping a consumer
/// that has a group closes it and waits in steps of 100 ms for that to
/// finish, and a producer stops its polling thread the same way: a tenth of
/// a second or two added to the end of every run, of the consumer and of the
/// benchmark's no-op consumer alike. Nothing is left to them: offsets are in
/// the checkpoint, the last commit for monitoring was synchronous and every
/// dead letter was acknowledged.
pub fn close_in_background<T: Send + 'static>(clients: T) {
    let spawned = std::thread::Builder::new().name("kafka-close".into()).spawn(move || drop(clients));
    if let Err(e) = spawned {
        warn!(error = %e, "no thread to close the kafka clients on; they are closed when the process ends");
    }
}

/// Shares a flag between the consumer loop and the source thread.
pub fn stop_flag() -> Arc<AtomicBool> {
    Arc::new(AtomicBool::new(false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::statistics::Partition;

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
