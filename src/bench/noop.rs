//! The no-op consumer, the ceiling the real consumer is measured against:
//! the same librdkafka client settings and the same poll loop shape as the
//! consumer's source thread, but it only counts records and bytes.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use crate::cli::KafkaArgs;
use crate::error::{Error, Result};
use crate::kafka::{self, SourceConsumer, SourceContext, REQUEST_TIMEOUT};
use crate::pipeline::source_client_config;

/// What the no-op consumer read.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NoopSummary {
    pub records: u64,
    pub bytes: u64,
    /// From assignment to the last record.
    pub seconds: f64,
}

/// Reads every partition of `kafka.topic` from its start to the end it had
/// when this started, counting records and payload bytes.
pub fn run(kafka: &KafkaArgs, group_id: &str) -> Result<NoopSummary> {
    let consumer: SourceConsumer = source_client_config(kafka, group_id)?
        .create_with_context(SourceContext { topic: kafka.topic.clone() })
        .map_err(|e| Error::kafka("create consumer", e))?;
    let mut list = TopicPartitionList::new();
    // As the consumer's source: looked up per record, so not hashed.
    let mut unfinished = BTreeMap::new();
    for partition in kafka::partitions_of(&consumer, &kafka.topic)? {
        let (low, high) =
            consumer.fetch_watermarks(&kafka.topic, partition, REQUEST_TIMEOUT).map_err(|e| Error::kafka("fetch watermarks", e))?;
        list.add_partition_offset(&kafka.topic, partition, Offset::Offset(low)).map_err(|e| Error::kafka("assign", e))?;
        if high > low {
            unfinished.insert(partition, high);
        }
    }
    consumer.assign(&list).map_err(|e| Error::kafka("assign", e))?;
    let started = Instant::now();
    let mut summary = NoopSummary::default();
    while !unfinished.is_empty() {
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                unfinished.remove(&partition);
            }
            Some(Err(e)) => return Err(Error::kafka("consume", e)),
            Some(Ok(message)) => {
                summary.records += 1;
                summary.bytes += message.payload().map_or(0, |p| p.len() as u64);
                if unfinished.get(&message.partition()).is_some_and(|end| message.offset() + 1 >= *end) {
                    unfinished.remove(&message.partition());
                }
            }
        }
    }
    summary.seconds = started.elapsed().as_secs_f64();
    kafka::close_in_background(consumer);
    Ok(summary)
}
