//! Dead letters: records that are not usable trades, published to their own
//! topic with the reason and where they came from in headers (SPEC §2).

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;

use super::KafkaArgs;
use crate::error::{Error, Result};
use crate::rejection::Reject;

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
                Err(_) => return Err(Error::task_failed("dead-letter producer", "shut down before delivery")),
            }
        }
        Ok(())
    }

    pub fn sent(&self) -> u64 {
        self.sent
    }
}
