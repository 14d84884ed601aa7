//! State kept in Kafka (SPEC §8): a group member publishes each
//! partition's checkpoint to a compacted changelog topic (changelog
//! partition = raw partition, key = the partition), after Redis
//! acknowledged the bars it covers and the local store has it, in one
//! Kafka transaction with the group's offsets. A member that lost its
//! partitions is fenced by the group's generation: its transaction fails
//! and it cannot publish an older state or commit. A member on another
//! machine restores a partition from the changelog alone.
//!
//! The transactional id is the member's (its state dir's) id, so a
//! restarted member fences its own previous incarnation at once; the
//! transaction timeout is short, so an abandoned transaction does not
//! hold restores (which read committed records only) for long.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, ConsumerGroupMetadata};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use tracing::{info, warn};

use crate::checkpoint::{Encoded, Identity, PartitionCheckpoint, FORMAT_VERSION};
use crate::error::{Error, Result};
use crate::kafka::admin::CHANGELOG_MAX_BYTES;
use crate::kafka::KafkaArgs;

/// Header with the store format of a snapshot.
const FORMAT_HEADER: &str = "cryptopulse.format";
/// Header with the identity (SPEC §7) the snapshot's state was made with.
const IDENTITY_HEADER: &str = "cryptopulse.identity";
/// How long a transaction may stay open before the broker aborts it.
const TRANSACTION_TIMEOUT_MS: &str = "10000";
/// Longest wait for a transaction step.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// The changelog topic of a consumer group.
pub fn topic_of(group_id: &str) -> String {
    format!("{group_id}.changelog")
}

/// What a publish did.
#[derive(Debug, PartialEq, Eq)]
pub enum Published {
    Committed,
    /// The group moved on without this member (a rebalance it has not
    /// served yet, or it was fenced): nothing was published or committed.
    Fenced,
}

/// The transactional producer of a group member.
pub struct Changelog {
    /// Replaced when the broker fenced it (see [`publish`](Self::publish)).
    producer: Mutex<ThreadedProducer<DefaultProducerContext>>,
    settings: ClientConfig,
    topic: String,
    identity: String,
}

impl Changelog {
    /// Starts the member's transactional producer; fences an earlier
    /// producer of the same member.
    pub fn open(kafka: &KafkaArgs, group_id: &str, member: &str, identity: &Identity) -> Result<Self> {
        let max = CHANGELOG_MAX_BYTES.to_string();
        let mut settings = kafka.config_with(&[
            ("compression.type", "zstd"),
            ("linger.ms", "0"),
            ("message.max.bytes", &max),
            ("transaction.timeout.ms", TRANSACTION_TIMEOUT_MS),
        ])?;
        settings.set("transactional.id", member);
        let producer = Mutex::new(start(&settings)?);
        Ok(Changelog { producer, settings, topic: topic_of(group_id), identity: identity.encode() })
    }

    /// Publishes `partitions`' snapshots and commits `offsets` (of
    /// `source_topic`) to the group, in one transaction. Blocking.
    ///
    /// Refused because the group moved on (a rebalance not served yet, or
    /// this member was fenced): aborted, and [`Published::Fenced`]. A
    /// producer the broker fenced for good (its transaction timed out, e.g.
    /// while this process was paused) is replaced by a new one of the same
    /// transactional id, also [`Published::Fenced`].
    pub fn publish(
        &self,
        partitions: &[Encoded],
        source_topic: &str,
        offsets: &BTreeMap<i32, i64>,
        group: &ConsumerGroupMetadata,
    ) -> Result<Published> {
        let mut producer = self.producer.lock().unwrap_or_else(|e| e.into_inner());
        let done = producer.begin_transaction().and_then(|()| self.fill_and_commit(&producer, partitions, source_topic, offsets, group));
        match done {
            Ok(()) => Ok(Published::Committed),
            Err(e) if requires_abort(&e) => {
                warn!(error = %e, "changelog transaction refused: this member is not the partitions' owner in the group's current generation; aborted");
                producer.abort_transaction(STEP_TIMEOUT).map_err(|e| Error::kafka("changelog: abort transaction", e))?;
                Ok(Published::Fenced)
            }
            Err(e) if is_fatal(&e) => {
                warn!(error = %e, "changelog producer fenced by the broker (its transaction timed out: was this process paused?); starting a new one, nothing of this transaction was published");
                *producer = start(&self.settings)?;
                Ok(Published::Fenced)
            }
            Err(e) => Err(Error::kafka("changelog transaction", e)),
        }
    }

    fn fill_and_commit(
        &self,
        producer: &ThreadedProducer<DefaultProducerContext>,
        partitions: &[Encoded],
        source_topic: &str,
        offsets: &BTreeMap<i32, i64>,
        group: &ConsumerGroupMetadata,
    ) -> std::result::Result<(), KafkaError> {
        let format = FORMAT_VERSION.to_string();
        for encoded in partitions {
            if encoded.size() + 4096 > CHANGELOG_MAX_BYTES {
                warn!(
                    partition = encoded.partition,
                    bytes = encoded.size(),
                    "partition state too large for the changelog: not published; a restore elsewhere starts from its previous snapshot"
                );
                continue;
            }
            let key = encoded.partition.to_string();
            let headers = OwnedHeaders::new()
                .insert(Header { key: FORMAT_HEADER, value: Some(&format) })
                .insert(Header { key: IDENTITY_HEADER, value: Some(&self.identity) });
            let record = BaseRecord::to(&self.topic).partition(encoded.partition).key(&key).payload(encoded.bytes()).headers(headers);
            producer.send(record).map_err(|(e, _)| e)?;
        }
        let mut list = TopicPartitionList::new();
        for (partition, offset) in offsets {
            list.add_partition_offset(source_topic, *partition, Offset::Offset(*offset))?;
        }
        producer.send_offsets_to_transaction(&list, group, STEP_TIMEOUT)?;
        producer.commit_transaction(STEP_TIMEOUT)
    }
}

/// A transactional producer of `settings`, its transactions initialised
/// (which fences an earlier producer of its id).
fn start(settings: &ClientConfig) -> Result<ThreadedProducer<DefaultProducerContext>> {
    let producer: ThreadedProducer<DefaultProducerContext> = settings.create().map_err(|e| Error::kafka("changelog producer", e))?;
    producer.init_transactions(STEP_TIMEOUT).map_err(|e| match e.rdkafka_error_code() {
        Some(RDKafkaErrorCode::TransactionalIdAuthorizationFailed) => Error::Config(format!(
            "the brokers refuse this account the transactional id {:?} a group member publishes its state with: \
             grant it WRITE and DESCRIBE on transactional ids prefixed \"cryptopulse-\" (docs/security.md), or run with --assign",
            settings.get("transactional.id").unwrap_or_default()
        )),
        _ => Error::kafka("changelog: init transactions", e),
    })?;
    Ok(producer)
}

/// An error after which the producer is of no more use.
fn is_fatal(error: &KafkaError) -> bool {
    match error {
        KafkaError::Transaction(e) => e.is_fatal(),
        other => other.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::Fatal),
    }
}

/// An error after which the transaction is aborted and the member goes
/// on: the group's generation moved (fenced, rebalancing), not a broken producer.
fn requires_abort(error: &KafkaError) -> bool {
    match error {
        KafkaError::Transaction(e) => e.txn_requires_abort() && !e.is_fatal(),
        _ => false,
    }
}

/// Records read back from a changelog partition's end at first: a
/// committed snapshot and its transaction marker take two offsets, so the
/// newest snapshot is among them unless transactions were aborted since.
const TAIL: i64 = 32;

/// Reads the newest snapshot of each of `partitions` from the changelog
/// (committed records only), from the end of each partition back: each
/// holds one key, so only its newest record counts, and the part not
/// compacted yet may be long. Snapshots of another identity or format are
/// skipped with a warning.
pub fn restore(kafka: &KafkaArgs, group_id: &str, identity: &Identity, partitions: &[i32]) -> Result<BTreeMap<i32, PartitionCheckpoint>> {
    let topic = topic_of(group_id);
    // A short fetch wait: the end of each partition is what is waited for,
    // and the broker holds a fetch that finds nothing new this long.
    let reader: BaseConsumer<ReaderContext> = kafka
        .config_with(&[("group.id", group_id), ("isolation.level", "read_committed"), ("enable.partition.eof", "true")])?
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create_with_context(ReaderContext)
        .map_err(|e| Error::kafka("changelog reader", e))?;
    let expected = Expected { identity: identity.encode(), format: FORMAT_VERSION.to_string() };
    // Per partition still looked for: its log start and where the last
    // step back began (first its end).
    let mut looking = BTreeMap::new();
    for &partition in partitions {
        let (low, high) = reader.fetch_watermarks(&topic, partition, STEP_TIMEOUT).map_err(|e| Error::kafka("changelog watermarks", e))?;
        if high > low {
            looking.insert(partition, (low, high));
        }
    }
    let mut found = BTreeMap::new();
    let mut back = TAIL;
    while !looking.is_empty() {
        for (low, from) in looking.values_mut() {
            *from = (*from - back).max(*low);
        }
        let starts: BTreeMap<i32, i64> = looking.iter().map(|(p, (_, from))| (*p, *from)).collect();
        found.extend(newest_from(&reader, &topic, &starts, &expected)?);
        looking.retain(|partition, (low, from)| !found.contains_key(partition) && from > low);
        back *= 8;
    }
    info!(%topic, partitions = ?found.keys().collect::<Vec<_>>(), "read the newest snapshots from the changelog");
    Ok(found)
}

/// The changelog reader's context: the ends of partitions it asks for are
/// no errors to log.
struct ReaderContext;

impl ClientContext for ReaderContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() != Some(RDKafkaErrorCode::PartitionEOF) && !matches!(error, KafkaError::PartitionEOF(_)) {
            warn!(%error, reason, "changelog reader: kafka client error");
        }
    }
}

impl ConsumerContext for ReaderContext {}

/// What a snapshot of this member's settings carries in its headers.
struct Expected {
    identity: String,
    format: String,
}

/// The newest readable snapshot of each partition of `starts`, reading it
/// from its start there to its end (its last stable offset).
fn newest_from(
    reader: &BaseConsumer<ReaderContext>,
    topic: &str,
    starts: &BTreeMap<i32, i64>,
    expected: &Expected,
) -> Result<BTreeMap<i32, PartitionCheckpoint>> {
    let mut list = TopicPartitionList::new();
    for (partition, from) in starts {
        list.add_partition_offset(topic, *partition, Offset::Offset(*from)).map_err(|e| Error::kafka("changelog assign", e))?;
    }
    reader.assign(&list).map_err(|e| Error::kafka("changelog assign", e))?;
    let mut open: std::collections::BTreeSet<i32> = starts.keys().copied().collect();
    let deadline = std::time::Instant::now() + STEP_TIMEOUT * 2;
    let mut newest = BTreeMap::new();
    while !open.is_empty() {
        if std::time::Instant::now() > deadline {
            return Err(Error::Timeout {
                what: format!("reading the changelog {topic} to its end (partitions {open:?})"),
                after: STEP_TIMEOUT * 2,
            });
        }
        match reader.poll(Duration::from_millis(200)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                open.remove(&partition);
            }
            Some(Err(e)) => return Err(Error::kafka("changelog read", e)),
            Some(Ok(message)) => {
                let header = |name: &str| {
                    message.headers().and_then(|h| {
                        h.iter().find(|h| h.key == name).and_then(|h| h.value.map(|v| String::from_utf8_lossy(v).into_owned()))
                    })
                };
                let partition = message.partition();
                if header(FORMAT_HEADER).as_deref() != Some(&expected.format)
                    || header(IDENTITY_HEADER).as_deref() != Some(&expected.identity)
                {
                    warn!(%topic, partition, offset = message.offset(), "changelog snapshot of another format or identity (window settings, partitions) skipped");
                    continue;
                }
                match message.payload().and_then(PartitionCheckpoint::decode) {
                    Some(checkpoint) => {
                        newest.insert(partition, checkpoint);
                    }
                    None => warn!(%topic, partition, offset = message.offset(), "unreadable changelog snapshot skipped"),
                }
            }
        }
    }
    Ok(newest)
}
