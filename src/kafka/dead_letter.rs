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
    describe_cut(reason, detail, payload, None, room)
}

/// [`describe`] of a payload that may already have been cut from `whole`.
fn describe_cut<'a>(reason: &str, detail: &str, payload: &'a [u8], whole: Option<&Whole>, room: usize) -> (OwnedHeaders, &'a [u8]) {
    let headers = OwnedHeaders::new()
        .insert(Header { key: "reason", value: Some(reason) })
        .insert(Header { key: "detail", value: Some(capped(detail, MAX_DETAIL_BYTES).as_ref()) });
    if payload.len() <= room && whole.is_none() {
        return (headers, payload);
    }
    let whole = whole.cloned().unwrap_or_else(|| Whole::of(payload));
    let length = whole.length.to_string();
    let headers = headers
        .insert(Header { key: PAYLOAD_LENGTH_HEADER, value: Some(&length) })
        .insert(Header { key: PAYLOAD_SHA256_HEADER, value: Some(&whole.sha256) });
    (headers, cut(payload, room))
}

/// Most payload bytes a dead letter holds on its way to the topic: a
/// record of any size costs the consumer this much, not its size, while
/// it waits in a round (measured: twenty 10 MB records in one run took the
/// consumer's peak RSS from 41 MiB to 485 MiB when they were held whole).
/// The dead-letter producer's own limit (1,000,000 bytes by default) is
/// below it, so nothing more would be sent anyway.
pub const MAX_HELD_PAYLOAD_BYTES: usize = 1 << 20;

/// The length and SHA-256 (hex) of a payload that was cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Whole {
    pub length: usize,
    pub sha256: String,
}

impl Whole {
    fn of(payload: &[u8]) -> Self {
        Whole { length: payload.len(), sha256: format!("{:x}", Sha256::digest(payload)) }
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
    /// At most [`MAX_HELD_PAYLOAD_BYTES`] of the payload.
    pub payload: Vec<u8>,
    /// The whole payload's length and SHA-256, when `payload` is cut.
    pub whole: Option<Whole>,
}

impl DeadLetter {
    /// A dead letter of the record at `partition`/`offset`, its detail,
    /// key and payload cut to what a dead letter carries.
    pub fn new(reason: Reject, detail: String, (partition, offset): (i32, i64), key: Option<&[u8]>, payload: &[u8]) -> Self {
        let whole = (payload.len() > MAX_HELD_PAYLOAD_BYTES).then(|| Whole::of(payload));
        let detail = match capped(&detail, MAX_DETAIL_BYTES) {
            Cow::Owned(shorter) => shorter,
            Cow::Borrowed(_) => detail,
        };
        DeadLetter {
            reason,
            detail,
            partition,
            offset,
            key: key.map(|key| cut(key, MAX_KEY_BYTES).to_vec()),
            payload: cut(payload, MAX_HELD_PAYLOAD_BYTES).to_vec(),
            whole,
        }
    }
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
        let (headers, payload) = describe_cut(letter.reason.as_str(), &letter.detail, &letter.payload, letter.whole.as_ref(), *room);
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

    #[test]
    fn a_dead_letter_holds_at_most_a_mebibyte_and_still_names_the_whole_payload() {
        let payload: Vec<u8> = (0..3 * MAX_HELD_PAYLOAD_BYTES).map(|i| (i % 251) as u8).collect();
        let key = vec![b'K'; 10_000];
        let letter = DeadLetter::new(Reject::BadSymbol, "d".repeat(5000), (2, 7), Some(&key), &payload);
        assert!(letter.detail.len() <= MAX_DETAIL_BYTES);
        assert_eq!((letter.payload.len(), letter.key.as_ref().map(Vec::len)), (MAX_HELD_PAYLOAD_BYTES, Some(MAX_KEY_BYTES)));
        let (headers, sent) = describe_cut("bad_symbol", "d", &letter.payload, letter.whole.as_ref(), 1000);
        assert_eq!(sent, &payload[..1000]);
        assert_eq!(header(&headers, PAYLOAD_LENGTH_HEADER), Some(payload.len().to_string()));
        assert_eq!(header(&headers, PAYLOAD_SHA256_HEADER), Some(format!("{:x}", Sha256::digest(&payload))));
        // Cut to a mebibyte, it still says so when the topic would take that much.
        let (headers, sent) = describe_cut("bad_symbol", "d", &letter.payload, letter.whole.as_ref(), 2 * MAX_HELD_PAYLOAD_BYTES);
        assert_eq!((sent.len(), header(&headers, PAYLOAD_LENGTH_HEADER)), (MAX_HELD_PAYLOAD_BYTES, Some(payload.len().to_string())));
        // A small one is held whole and sent as it is.
        let small = DeadLetter::new(Reject::BadSymbol, "d".into(), (0, 0), None, b"{}");
        assert_eq!((small.payload.as_slice(), small.whole.is_none()), (&b"{}"[..], true));
    }
}
