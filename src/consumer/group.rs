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

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::types::RDKafkaRespErr;
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
    /// Another member owns these partitions already: drop them.
    Lost(Vec<i32>),
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
        let partitions = partitions_of(list, &self.topic);
        let mut kept = changelog::restore(&self.kafka, &self.group_id, &self.identity, &partitions)?;
        let mut restored = Vec::new();
        for partition in partitions {
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
            list.set_partition_offset(&self.topic, partition, Offset::Offset(start)).map_err(|e| Error::kafka("assign", e))?;
            restored.push((partition, checkpoint.unwrap_or(PartitionCheckpoint { next_offset: start, ..Default::default() })));
        }
        let shown: Vec<i32> = restored.iter().map(|(p, _)| *p).collect();
        if !(self.send)(Change::Assigned(restored)) {
            return Ok(());
        }
        if let Some(forwarding) = self.forwarding.upgrade() {
            forwarding.add(list)?;
        }
        consumer.incremental_assign(list).map_err(|e| Error::kafka("incremental assign", e))?;
        info!(topic = %self.topic, partitions = ?shown, "{}", super::ASSIGNED_LOG);
        Ok(())
    }

    /// Revoked partitions are checkpointed by the loop first; lost ones are
    /// dropped at once.
    fn revoke<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>, list: &mut TopicPartitionList) -> Result<()> {
        let partitions = partitions_of(list, &self.topic);
        if consumer.assignment_lost() {
            warn!(topic = %self.topic, ?partitions, "partitions lost: this member was fenced (paused or cut off past its session timeout) and another owns them now; their state since the last checkpoint is dropped, and the member rejoins");
            (self.send)(Change::Lost(partitions));
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
