//! Dead letters: records that are not usable trades, published to their own
//! topic with the reason and where they came from in headers (SPEC §2).
//!
//! A dead letter always fits its topic: the detail is capped at
//! [`MAX_DETAIL_BYTES`], the key at [`MAX_KEY_BYTES`], and a payload too
//! large for the topic is cut, with its full length and SHA-256 in headers,
//! so no record, however large, stops the process that turns it away.

use std::borrow::Cow;

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;

use sha2::{Digest, Sha256};

use super::{admin, KafkaArgs};
use crate::error::{Error, Result};
use crate::rejection::Reject;

/// Longest `detail` header, in bytes (SPEC §2).
pub const MAX_DETAIL_BYTES: usize = 256;
/// Longest key kept on a dead letter, in bytes: keys are symbols, and a
/// longer one is itself a reason to turn the record away.
pub const MAX_KEY_BYTES: usize = 256;
/// Dead letters queued unacknowledged at most, unless `-X` says otherwise.
const QUEUED: usize = 10_000;
/// Header with the full length of a payload that was cut.
pub const PAYLOAD_LENGTH_HEADER: &str = "payload.length";
/// Header with the SHA-256 (hex) of a payload that was cut.
pub const PAYLOAD_SHA256_HEADER: &str = "payload.sha256";

/// `text` cut to at most `max` bytes at a character boundary, ending in
/// `…` when it was cut.
pub fn capped(text: &str, max: usize) -> Cow<'_, str> {
    if text.len() <= max {
        return Cow::Borrowed(text);
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}…", &text[..end]))
}

/// `bytes` cut to at most `max`.
fn cut(bytes: &[u8], max: usize) -> &[u8] {
    &bytes[..bytes.len().min(max)]
}

/// The headers that say what a dead letter is: its reason, its capped
/// detail, and for a payload cut to `room` bytes its full length and
/// SHA-256. Returns them with the part of the payload that is sent.
pub fn describe<'a>(reason: &str, detail: &str, payload: &'a [u8], room: usize) -> (OwnedHeaders, &'a [u8]) {
    let headers = OwnedHeaders::new()
        .insert(Header { key: "reason", value: Some(reason) })
        .insert(Header { key: "detail", value: Some(capped(detail, MAX_DETAIL_BYTES).as_ref()) });
    if payload.len() <= room {
        return (headers, payload);
    }
    let (length, sha256) = (payload.len().to_string(), format!("{:x}", Sha256::digest(payload)));
    let headers = headers
        .insert(Header { key: PAYLOAD_LENGTH_HEADER, value: Some(&length) })
        .insert(Header { key: PAYLOAD_SHA256_HEADER, value: Some(&sha256) });
    (headers, cut(payload, room))
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
    /// The producer, and the most payload bytes one dead letter may carry.
    producer: Option<(FutureProducer, usize)>,
    topic: String,
    source_topic: String,
    pending: Vec<DeliveryFuture>,
    sent: u64,
}

impl DeadLetters {
    /// Checks the producer settings; connects on the first dead letter.
    pub fn new(args: &KafkaArgs) -> Result<Self> {
        let mut config = args.producer_config()?;
        // librdkafka queues 100,000 records by default: a topic of nothing
        // but bad records (a million unknown symbols, say) then holds that
        // many payloads in memory between checkpoints.
        if config.get("queue.buffering.max.messages").is_none() {
            config.set("queue.buffering.max.messages", QUEUED.to_string());
        }
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
        let (producer, room) = match &mut self.producer {
            Some(producer) => producer,
            slot @ None => {
                let producer = self.config.create().map_err(|e| Error::kafka("dead-letter producer", e))?;
                let [room] = admin::payload_rooms(&self.config, [&self.topic]).await;
                slot.insert((producer, room))
            }
        };
        let (partition, offset) = (letter.partition.to_string(), letter.offset.to_string());
        let (headers, payload) = describe(letter.reason.as_str(), &letter.detail, &letter.payload, *room);
        let headers = headers
            .insert(Header { key: "source.topic", value: Some(&self.source_topic) })
            .insert(Header { key: "source.partition", value: Some(&partition) })
            .insert(Header { key: "source.offset", value: Some(&offset) });
        loop {
            let mut record = FutureRecord::to(&self.topic).payload(payload).headers(headers.clone());
            if let Some(key) = &letter.key {
                record = record.key(cut(key, MAX_KEY_BYTES));
            }
            match producer.send_result(record) {
                Ok(delivery) => {
                    self.pending.push(delivery);
                    self.sent += 1;
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => flush(&mut self.pending).await?,
                Err((e, _)) => return Err(Error::kafka("queue dead letter", e)),
            }
        }
    }

    /// Waits until the broker acknowledged every dead letter sent so far.
    pub async fn flush(&mut self) -> Result<()> {
        flush(&mut self.pending).await
    }

    pub fn sent(&self) -> u64 {
        self.sent
    }
}

/// Waits for every delivery in `pending`.
async fn flush(pending: &mut Vec<DeliveryFuture>) -> Result<()> {
    for delivery in pending.drain(..) {
        match delivery.await {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => {
                metrics::counter!(crate::telemetry::KAFKA_DELIVERY_ERRORS, "topic_kind" => "dead_letter").increment(1);
                return Err(Error::kafka("deliver dead letter", e));
            }
            Err(_) => return Err(Error::task_failed("dead-letter producer", "shut down before delivery")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Headers;

    fn header(headers: &OwnedHeaders, key: &str) -> Option<String> {
        headers.iter().find(|h| h.key == key).and_then(|h| h.value).map(|v| String::from_utf8_lossy(v).into_owned())
    }

    #[test]
    fn a_detail_is_capped_at_a_character_boundary() {
        assert_eq!(capped("short", 256), "short");
        let long = "é".repeat(1000);
        let got = capped(&long, MAX_DETAIL_BYTES);
        assert!(got.len() <= MAX_DETAIL_BYTES && got.ends_with('…'), "{} bytes", got.len());
        assert_eq!(got.trim_end_matches('…'), "é".repeat((MAX_DETAIL_BYTES - 3) / 2));
    }

    #[test]
    fn a_payload_that_fits_is_sent_whole_and_a_larger_one_cut_with_its_length_and_hash() {
        let (headers, sent) = describe("bad_symbol", "symbol \"x\"", b"{}", 10);
        assert_eq!((sent, header(&headers, PAYLOAD_LENGTH_HEADER)), (&b"{}"[..], None));
        assert_eq!(header(&headers, "reason").as_deref(), Some("bad_symbol"));

        let payload = vec![b'x'; 5000];
        let (headers, sent) = describe("malformed_json", &"d".repeat(10_000), &payload, 1000);
        assert_eq!(sent, &payload[..1000]);
        assert_eq!(header(&headers, PAYLOAD_LENGTH_HEADER).as_deref(), Some("5000"));
        assert_eq!(header(&headers, PAYLOAD_SHA256_HEADER), Some(format!("{:x}", Sha256::digest(&payload))));
        assert!(header(&headers, "detail").is_some_and(|d| d.len() <= MAX_DETAIL_BYTES));
    }
}
