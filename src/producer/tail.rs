//! What the topic already holds: the last trade id of each symbol, read
//! backwards from the end of the partition the symbol is keyed to, so a
//! restarted producer knows where it stopped and can backfill from there.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Message, Offset, TopicPartitionList};
use tracing::{debug, info};

use crate::binance;
use crate::error::{Error, Result};
use crate::kafka::KafkaArgs;
use crate::kafka::{partitions_of, REQUEST_TIMEOUT};

/// The partition Kafka's default partitioner (Java's, librdkafka's
/// `murmur2_random`) gives a record keyed `key`.
pub fn partition_for(key: &[u8], partitions: i32) -> i32 {
    ((murmur2(key) & 0x7fff_ffff) % partitions as u32) as i32
}

/// The 32-bit MurmurHash2 variant Kafka uses for keys (seed 0x9747b28c).
fn murmur2(data: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    let mut h = 0x9747_b28c ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M) ^ k;
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        for (i, &byte) in rest.iter().enumerate().rev() {
            h ^= u32::from(byte) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^ (h >> 15)
}

/// The highest trade id of each of `symbols` in the raw topic, looking at
/// most `max_records` back from the end of each partition. A symbol not
/// found is absent from the map: the producer starts it fresh.
pub fn last_ids(kafka: &KafkaArgs, symbols: &[String], max_records: i64) -> Result<HashMap<String, i64>> {
    let consumer: BaseConsumer = kafka
        .config_with(&[
            ("group.id", "cryptopulse-producer-tail"),
            ("enable.auto.commit", "false"),
            ("enable.partition.eof", "true"),
            ("auto.offset.reset", "error"),
        ])?
        .create()
        .map_err(|e| Error::kafka("tail consumer", e))?;
    let partitions = partitions_of(&consumer, &kafka.topic)?;
    let mut found = HashMap::new();
    for &partition in &partitions {
        let mut wanted: Vec<&str> =
            symbols.iter().map(String::as_str).filter(|s| partition_for(s.as_bytes(), partitions.len() as i32) == partition).collect();
        let (low, high) =
            consumer.fetch_watermarks(&kafka.topic, partition, REQUEST_TIMEOUT).map_err(|e| Error::kafka("tail watermarks", e))?;
        let (mut end, mut chunk) = (high, 1000);
        while !wanted.is_empty() && end > low && high - end < max_records {
            let start = (end - chunk).max(low).max(high - max_records);
            let seen = read_range(&consumer, &kafka.topic, partition, start, end)?;
            wanted.retain(|symbol| match seen.get(*symbol) {
                Some(&id) => {
                    found.insert((*symbol).to_owned(), id);
                    false
                }
                None => true,
            });
            end = start;
            chunk = (chunk * 4).min(100_000);
        }
        if !wanted.is_empty() {
            debug!(partition, ?wanted, "no earlier trades of these symbols in the topic's tail");
        }
    }
    info!(known = found.len(), of = symbols.len(), "last published trade ids read from the topic");
    Ok(found)
}

/// The highest trade id per symbol among the records `[start, end)`.
fn read_range(consumer: &BaseConsumer, topic: &str, partition: i32, start: i64, end: i64) -> Result<HashMap<String, i64>> {
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(topic, partition, Offset::Offset(start)).map_err(|e| Error::kafka("tail assign", e))?;
    consumer.assign(&assignment).map_err(|e| Error::kafka("tail assign", e))?;
    let mut seen: HashMap<String, i64> = HashMap::new();
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    let mut next = start;
    while next < end {
        if Instant::now() > deadline {
            return Err(Error::Timeout { what: format!("reading {topic}/{partition} offsets {next}..{end}"), after: REQUEST_TIMEOUT });
        }
        let Some(polled) = consumer.poll(Duration::from_millis(500)) else { continue };
        let message = match polled {
            Ok(message) => message,
            Err(KafkaError::PartitionEOF(_)) => break,
            Err(e) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::PartitionEOF) => break,
            Err(e) => return Err(Error::kafka("tail read", e)),
        };
        next = message.offset() + 1;
        if message.offset() >= end {
            break;
        }
        if let Some(trade) = message.payload().and_then(|payload| binance::decode(payload).ok()) {
            let id = seen.entry(trade.symbol.into_owned()).or_insert(trade.id);
            *id = (*id).max(trade.id);
        }
    }
    Ok(seen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_covers_every_tail_length() {
        // Each length 0..=7 exercises a different remainder; the hashes must
        // all differ and stay stable (checked against the broker in
        // tests/producer.rs, where librdkafka places records).
        let hashes: Vec<u32> = (0..8).map(|n| murmur2(&b"BTCUSDTX"[..n])).collect();
        let mut unique = hashes.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), hashes.len());
        assert!((0..6).contains(&partition_for(b"BTCUSDT", 6)));
    }
}
