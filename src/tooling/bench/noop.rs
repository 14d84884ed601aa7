//! The no-op consumer, the ceiling the real consumer is measured against:
//! the same librdkafka client settings and the same fetch path
//! ([`FetchQueue`]) as the consumer's source thread, but it only counts
//! records and bytes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use crate::consumer::source::{SourceConsumer, SourceContext};
use crate::consumer::source_client_config;
use crate::error::{Error, Result};
use crate::kafka::fetch::{FetchQueue, MAX_BATCH};
use crate::kafka::KafkaArgs;
use crate::kafka::{self, REQUEST_TIMEOUT};

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
        .create_with_context(SourceContext::new(&kafka.topic))
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
    let consumer = Arc::new(consumer);
    // Every partition, empty ones too: their end-of-partition events come
    // on the queue they are forwarded to.
    let mut fetch = FetchQueue::assign(consumer.clone(), &list)?;
    let started = Instant::now();
    let mut summary = NoopSummary::default();
    while !unfinished.is_empty() {
        if let Some(e) = fetch.serve_events() {
            return Err(Error::kafka("consume", e));
        }
        let batch = fetch.fetch(Duration::from_millis(100), MAX_BATCH);
        for record in batch.iter() {
            match record.error {
                Some(KafkaError::PartitionEOF(partition)) => {
                    unfinished.remove(&partition);
                }
                Some(e) => return Err(Error::kafka("consume", e)),
                None => {
                    summary.records += 1;
                    summary.bytes += record.payload.len() as u64;
                    if unfinished.get(&record.partition).is_some_and(|end| record.offset + 1 >= *end) {
                        unfinished.remove(&record.partition);
                    }
                }
            }
        }
    }
    summary.seconds = started.elapsed().as_secs_f64();
    drop(fetch);
    kafka::close_in_background(consumer);
    Ok(summary)
}
