//! Group membership (SPEC §8): Kafka's consumer-group protocol decides
//! which member reads which partition; each partition's window state and
//! next offset follow it. On assignment a partition starts from its
//! checkpoint; on revocation it is given up only after the loop wrote its
//! bars and checkpointed it; a lost partition (this member was fenced,
//! e.g. paused past its session timeout) is dropped without a checkpoint,
//! since another member already owns it.
//!
//! All of it runs inside librdkafka's rebalance callback, on the source
//! thread between two rounds of fetching, so the loop sees an assignment
//! before any record of it and a revocation after every record read
//! before it.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::oneshot;
use tracing::{error, info, warn};

use super::changelog;
use crate::checkpoint::{CheckpointStore, Identity, PartitionCheckpoint};
use crate::error::{Error, Result};
use crate::kafka::fetch::Forwarding;
use crate::kafka::{KafkaArgs, REQUEST_TIMEOUT};
use crate::telemetry;

/// What a member logs when a partition's state comes from the changelog,
/// newer than its own (or it has none: another machine's state).
pub const RESTORED_LOG: &str = "partition restored from the changelog";

/// A member speaks KIP-848's consumer-group protocol (`group.protocol=
/// consumer`, Kafka 4.0 and librdkafka 2.12 on): the broker assigns the
/// partitions, incrementally, so a rebalance moves only those that change
/// owner and the others are read on; session timeout and heartbeat are the
/// broker's settings. With `-X group.protocol=classic` (older brokers) the
/// same callbacks serve the classic protocol with these settings beside
/// the user's: its cooperative assignor, a 10 s session instead of 45, and
/// static membership (`group.instance.id`, the state dir's
/// [`member_id`](CheckpointStore::member_id)).
pub const CLASSIC_SETTINGS: [(&str, &str); 2] = [("partition.assignment.strategy", "cooperative-sticky"), ("session.timeout.ms", "10000")];

/// A change of the partitions a member owns, for the loop.
pub enum Change {
    /// The group gave this member these partitions, at these checkpoints;
    /// sent before any of their records.
    Assigned(Vec<(i32, PartitionCheckpoint)>),
    /// The group takes these partitions away: checkpoint them, then `done`.
    /// Sent after every record of them that was read.
    Revoked { partitions: Vec<i32>, done: oneshot::Sender<()> },
    /// Another member owns these partitions already: drop them, and
    /// `done` once no checkpoint queued before can commit their offsets.
    Lost { partitions: Vec<i32>, done: oneshot::Sender<()> },
}

/// What the rebalance callback needs; set on the consumer's context once
/// the source's queue exists.
pub struct Hooks {
    pub topic: String,
    pub kafka: KafkaArgs,
    pub group_id: String,
    /// What the state depends on: a changelog snapshot of another is skipped.
    pub identity: Identity,
    pub store: Arc<CheckpointStore>,
    /// The source's queue, which newly assigned partitions are forwarded to.
    pub forwarding: Weak<Forwarding>,
    /// Hands a change to the loop, in order with the records; false once
    /// the loop or the source is gone.
    pub send: Box<dyn Fn(Change) -> bool + Send + Sync>,
    /// Whether the loop still takes changes: false once the consumer stops.
    pub open: Box<dyn Fn() -> bool + Send + Sync>,
    /// The first error met in a callback: the source ends with it.
    pub failed: Mutex<Option<Error>>,
}

impl Hooks {
    /// librdkafka's rebalance callback: an assignment, a revocation, or an error.
    pub fn rebalance<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>, event: RDKafkaRespErr, list: &mut TopicPartitionList) {
        let done = match event {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => self.assign(consumer, list),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => self.revoke(consumer, list),
            other => {
                warn!(error = ?other, "consumer group rebalance failed; the group retries");
                Ok(())
            }
        };
        if let Err(e) = done {
            error!(error = %e, "consumer group rebalance could not be served: the consumer stops");
            self.failed.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(e);
        }
    }

    /// The error a callback met, once.
    pub fn take_failure(&self) -> Option<Error> {
        self.failed.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Each new partition at the newer of its local checkpoint and its
    /// snapshot in the changelog (or at its start), announced to the loop
    /// before its first record can be fetched.
    fn assign<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>, list: &mut TopicPartitionList) -> Result<()> {
        if !(self.open)() {
            // Partitions given while the consumer closes (other members
            // left as it stopped): taken as librdkafka requires, and given
            // back at once by the close, with nothing restored or read.
            return consumer.incremental_assign(list).map_err(|e| Error::kafka("incremental assign", e));
        }
        let partitions = partitions_of(list, &self.topic);
        settle_transactions(consumer, list);
        let restored = with_retries("restoring assigned partitions", || self.restore(consumer, &partitions))?;
        for (partition, checkpoint) in &restored {
            list.set_partition_offset(&self.topic, *partition, Offset::Offset(checkpoint.next_offset))
                .map_err(|e| Error::kafka("assign", e))?;
        }
        let shown: Vec<i32> = restored.iter().map(|(p, _)| *p).collect();
        // librdkafka waits for the assignment whether the loop takes it or
        // not (it stopped meanwhile): the close then revokes it.
        if (self.send)(Change::Assigned(restored)) {
            if let Some(forwarding) = self.forwarding.upgrade() {
                forwarding.add(list)?;
            }
        }
        consumer.incremental_assign(list).map_err(|e| Error::kafka("incremental assign", e))?;
        info!(topic = %self.topic, partitions = ?shown, "{}", super::ASSIGNED_LOG);
        Ok(())
    }

    /// Each of `partitions` at the newer of its local checkpoint and its
    /// changelog snapshot, or at the log start without either.
    fn restore<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>, partitions: &[i32]) -> Result<Vec<(i32, PartitionCheckpoint)>> {
        let mut kept = changelog::restore(&self.kafka, &self.group_id, &self.identity, partitions)?;
        let mut restored = Vec::with_capacity(partitions.len());
        for &partition in partitions {
            let (low, high) =
                consumer.fetch_watermarks(&self.topic, partition, REQUEST_TIMEOUT).map_err(|e| Error::kafka("fetch watermarks", e))?;
            let local = self.store.load_partition(partition)?;
            let checkpoint = match (local, kept.remove(&partition)) {
                (local, Some(snapshot)) if local.as_ref().is_none_or(|l| snapshot.next_offset > l.next_offset) => {
                    let local_offset = local.map(|l| l.next_offset);
                    info!(topic = %self.topic, partition, next_offset = snapshot.next_offset, ?local_offset, "{RESTORED_LOG}");
                    metrics::counter!(telemetry::CHANGELOG_RESTORES).increment(1);
                    Some(snapshot)
                }
                (local, _) => local,
            };
            let start = start_offset(&self.topic, partition, checkpoint.as_ref(), (low, high))?;
            restored.push((partition, checkpoint.unwrap_or(PartitionCheckpoint { next_offset: start, ..Default::default() })));
        }
        Ok(restored)
    }

    /// Revoked partitions are checkpointed by the loop first; lost ones are
    /// dropped at once.
    fn revoke<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>, list: &mut TopicPartitionList) -> Result<()> {
        let partitions = partitions_of(list, &self.topic);
        if consumer.assignment_lost() {
            warn!(topic = %self.topic, ?partitions, "partitions lost: this member was fenced (paused or cut off past its session timeout) and another owns them now; their state since the last checkpoint is dropped, and the member rejoins");
            // Not unassigned (which lets librdkafka rejoin, under a new
            // member epoch) before the writer let them go: a checkpoint
            // queued before would otherwise commit their old offsets and
            // publish their old state under that epoch, which the broker
            // accepts, over the new owner's: the likely cause of a CI run
            // in which Kafka's own tool showed four partitions of another
            // member at a lag of 14,000-32,000 for 90 s, no error logged.
            let (done, released) = oneshot::channel();
            if (self.send)(Change::Lost { partitions, done }) {
                let _ = released.blocking_recv();
            }
        } else {
            let (done, written) = oneshot::channel();
            if (self.send)(Change::Revoked { partitions: partitions.clone(), done }) {
                // An error of the loop drops `done`: the partitions go anyway.
                let _ = written.blocking_recv();
            }
            info!(topic = %self.topic, ?partitions, "partitions revoked after their bars and checkpoint were written");
        }
        if let Some(forwarding) = self.forwarding.upgrade() {
            forwarding.remove(list);
        }
        consumer.incremental_unassign(list).map_err(|e| Error::kafka("incremental unassign", e))
    }
}

/// How long a member's broker requests (at start and on assignment) are
/// tried again: a changelog topic another member created a moment ago, or
/// a broker slow under load, is no reason to stop.
const RETRY_FOR: Duration = Duration::from_secs(120);

/// `attempt` until it succeeds, fails for a reason a retry cannot mend (a
/// setting, a checkpoint the broker no longer has), or [`RETRY_FOR`] passed.
pub(super) fn with_retries<T>(what: &str, mut attempt: impl FnMut() -> Result<T>) -> Result<T> {
    let started = Instant::now();
    let mut pause = Duration::from_millis(200);
    loop {
        match attempt() {
            Err(e @ (Error::Kafka { .. } | Error::Timeout { .. })) if started.elapsed() < RETRY_FOR && !refused(&e) => {
                warn!(error = %e, what, retry_in_ms = pause.as_millis() as u64, "a broker request failed; trying again");
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            other => return other,
        }
    }
}

/// A refusal a retry cannot change: the account lacks a right, or the
/// client is unusable.
fn refused(error: &Error) -> bool {
    let Error::Kafka { source, .. } = error else { return false };
    matches!(
        source.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::TransactionalIdAuthorizationFailed
                | RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::GroupAuthorizationFailed
                | RDKafkaErrorCode::ClusterAuthorizationFailed
                | RDKafkaErrorCode::Fatal
        )
    )
}

/// Waits until no transaction of an earlier owner of `list`'s partitions
/// is open (KIP-447): the broker answers a read-committed consumer's
/// request for committed offsets only then, so its snapshot, if it is
/// committed after all, is in the changelog before the restore reads it.
/// No answer in time is logged: the transaction timeout ends such a
/// transaction anyway, and the restore reads committed snapshots only.
fn settle_transactions<C: ConsumerContext>(consumer: &BaseConsumer<C>, list: &TopicPartitionList) {
    let started = Instant::now();
    match consumer.committed_offsets(list.clone(), REQUEST_TIMEOUT) {
        Ok(_) if started.elapsed() > Duration::from_secs(1) => {
            info!(
                waited_ms = started.elapsed().as_millis() as u64,
                "waited for the group's committed offsets (an earlier owner's open transaction, or a slow broker) before the restore"
            )
        }
        Ok(_) => {}
        Err(e) => warn!(error = %e, "the group's committed offsets did not come; restoring from the committed snapshots"),
    }
}

/// Where a partition is read from: its checkpoint's next offset, which
/// the broker must still hold, or without one its log start.
pub fn start_offset(topic: &str, partition: i32, checkpoint: Option<&PartitionCheckpoint>, (low, high): (i64, i64)) -> Result<i64> {
    match checkpoint {
        Some(c) if c.next_offset < low || c.next_offset > high => Err(Error::Config(format!(
            "checkpointed offset {} of {topic}/{partition} is not on the broker (it holds {low}..{high}); \
             the records in between are lost to this consumer: restore the topic or start with a fresh --state-dir",
            c.next_offset
        ))),
        Some(c) => Ok(c.next_offset),
        None => Ok(low),
    }
}

fn partitions_of(list: &TopicPartitionList, topic: &str) -> Vec<i32> {
    list.elements().iter().filter(|e| e.topic() == topic).map(|e| e.partition()).collect()
}
