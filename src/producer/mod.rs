//! `producer`: Binance spot trade streams into Kafka (SPEC §2), without
//! losing a trade. Binance numbers each symbol's trades consecutively, so
//! every skipped id is visible: the sequencer keeps the last id published
//! per symbol, drops ids it already has (overlaps after a reconnect or a
//! rotation) and fetches the ones a stream skipped from the REST endpoint
//! before publishing newer ones, so each symbol reaches Kafka in id order
//! without holes. At start the producer reads the last published ids from
//! the tail of the topic and backfills what it missed while it was down. An
//! id range that cannot be had is logged, counted and written to the gaps
//! topic.
//!
//! Pieces: [`connection`] keeps the WebSocket streams flowing, [`rest`]
//! fetches old trades within Binance's limits, [`sequencer`] orders them
//! into a [`Sink`], [`tail`] reads the topic's end. This module is the
//! Kafka sink.

pub mod connection;
pub mod rest;
pub mod sequencer;
pub mod tail;

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use tracing::info;

use crate::cli::KafkaArgs;
use crate::error::{Error, Result};
use crate::metrics as m;
pub use rest::DEFAULT_REST_URL;
pub use sequencer::{Sink, StreamConfig, StreamCounts, MAX_STREAMS_PER_CONNECTION};

/// Binance's public spot stream endpoint.
pub const DEFAULT_WS_URL: &str = "wss://stream.binance.com:9443";

/// Default topic of unfillable gaps.
pub const DEFAULT_GAPS_TOPIC: &str = "trades.gaps";

/// What the producer reads and where it writes.
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    pub kafka: KafkaArgs,
    pub stream: StreamConfig,
    /// Topic of id ranges that could not be filled.
    pub gaps_topic: String,
    /// How far back from the end of each partition to look for the last
    /// published trade of each symbol at start.
    pub tail_scan_records: i64,
}

impl ProducerConfig {
    pub fn new(kafka: KafkaArgs, stream: StreamConfig) -> Self {
        ProducerConfig { kafka, stream, gaps_topic: DEFAULT_GAPS_TOPIC.to_owned(), tail_scan_records: 1_000_000 }
    }
}

/// Records sent but not yet acknowledged that the producer holds at most;
/// beyond it, it waits for the oldest (backpressure with bounded memory).
const IN_FLIGHT: usize = 10_000;

/// Counts of one run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProducerSummary {
    /// Trades acknowledged by the broker, from the streams and from REST.
    pub published: u64,
    /// Of those, fetched over REST to fill gaps or to backfill at start.
    pub from_rest: u64,
    pub dead_letters: u64,
    /// What the sequencer saw: overlaps dropped, reconnects, gaps.
    pub stream: StreamCounts,
}

/// Streams trades into Kafka until `shutdown` resolves, then flushes.
pub async fn run(config: ProducerConfig, shutdown: impl Future<Output = ()>) -> Result<ProducerSummary> {
    if config.stream.symbols.is_empty() {
        return Err(Error::Config("no symbols to follow".into()));
    }
    config.kafka.ensure_topics().await?;
    config.kafka.ensure(&[(&config.gaps_topic, 1)]).await?;
    let producer: FutureProducer = config.kafka.producer_config()?.create().map_err(|e| Error::kafka("producer", e))?;
    let (kafka, symbols, scan) = (config.kafka.clone(), config.stream.symbols.clone(), config.tail_scan_records);
    let last = tokio::task::spawn_blocking(move || tail::last_ids(&kafka, &symbols, scan))
        .await
        .map_err(|e| Error::Config(format!("tail reader: {e}")))??;
    for name in
        [m::PRODUCER_TRADES, m::PRODUCER_DEAD_LETTERS, m::WS_RECONNECTS, m::GAPS_FOUND, m::GAP_TRADES_FILLED, m::GAP_TRADES_UNFILLED]
    {
        metrics::counter!(name).increment(0);
    }
    let mut publisher = Publisher {
        producer,
        raw_topic: config.kafka.topic.as_str().into(),
        dlq_topic: config.kafka.dlq_topic.as_str().into(),
        gaps_topic: config.gaps_topic.as_str().into(),
        in_flight: VecDeque::new(),
        summary: ProducerSummary::default(),
    };
    let streamed = sequencer::stream(&config.stream, last, &mut publisher, shutdown).await;
    // Whatever ended the run, what was sent is flushed and settled.
    let flushed = publisher.producer.flush(Duration::from_secs(30)).map_err(|e| Error::kafka("flush", e));
    let drained = publisher.drain().await;
    let counts = streamed?;
    flushed.and(drained)?;
    publisher.summary.stream = counts;
    info!(summary = ?publisher.summary, "producer stopped");
    Ok(publisher.summary)
}

/// Sends records and keeps the in-flight window bounded.
struct Publisher {
    producer: FutureProducer,
    // Shared, so that naming the topic of a record does not allocate.
    raw_topic: Arc<str>,
    dlq_topic: Arc<str>,
    gaps_topic: Arc<str>,
    /// Deliveries not yet acknowledged, oldest first, with what they are.
    in_flight: VecDeque<(DeliveryFuture, Sent)>,
    summary: ProducerSummary,
}

/// What a delivery was, to count it when acknowledged.
#[derive(Debug, Clone, Copy)]
enum Sent {
    Trade { from_rest: bool },
    DeadLetter,
    Gap,
}

impl Sink for Publisher {
    async fn trade(&mut self, symbol: &str, event: &[u8], time_ms: i64, from_rest: bool) -> Result<()> {
        let headers = from_rest.then(|| OwnedHeaders::new().insert(Header { key: "source", value: Some("rest") }));
        let topic = self.raw_topic.clone();
        self.send(&topic, Some(symbol), event, headers, Some(time_ms), Sent::Trade { from_rest }).await
    }

    async fn dead_letter(&mut self, reason: &str, detail: &str, raw: &[u8]) -> Result<()> {
        let headers = OwnedHeaders::new()
            .insert(Header { key: "reason", value: Some(reason) })
            .insert(Header { key: "detail", value: Some(detail) })
            .insert(Header { key: "source", value: Some("websocket") });
        let topic = self.dlq_topic.clone();
        self.send(&topic, None, raw, Some(headers), None, Sent::DeadLetter).await
    }

    /// Records ids `from..=to` of `symbol` on the gaps topic.
    async fn gap(&mut self, symbol: &str, from: i64, to: i64, why: &str) -> Result<()> {
        let record = serde_json::json!({ "symbol": symbol, "from_id": from, "to_id": to, "count": to - from + 1, "reason": why });
        let topic = self.gaps_topic.clone();
        self.send(&topic, Some(symbol), record.to_string().as_bytes(), None, None, Sent::Gap).await
    }

    /// On a quiet stream, the last deliveries are counted within a second.
    async fn idle(&mut self) -> Result<()> {
        self.settle_ready()?;
        metrics::gauge!(m::PRODUCER_IN_FLIGHT).set(self.in_flight.len() as f64);
        Ok(())
    }
}

impl Publisher {
    async fn send(
        &mut self,
        topic: &str,
        key: Option<&str>,
        payload: &[u8],
        headers: Option<OwnedHeaders>,
        timestamp: Option<i64>,
        sent: Sent,
    ) -> Result<()> {
        let mut record = FutureRecord::<str, [u8]>::to(topic).payload(payload);
        if let Some(key) = key {
            record = record.key(key);
        }
        if let Some(headers) = headers {
            record = record.headers(headers);
        }
        if let Some(ms) = timestamp {
            record = record.timestamp(ms);
        }
        loop {
            match self.producer.send_result(record) {
                Ok(delivery) => {
                    self.in_flight.push_back((delivery, sent));
                    while self.in_flight.len() > IN_FLIGHT {
                        self.settle_oldest().await?;
                    }
                    self.settle_ready()?;
                    metrics::gauge!(m::PRODUCER_IN_FLIGHT).set(self.in_flight.len() as f64);
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    self.settle_oldest().await?;
                }
                Err((e, _)) => return Err(Error::kafka(format!("publish to {topic}"), e)),
            }
        }
    }

    /// Waits for the oldest delivery.
    async fn settle_oldest(&mut self) -> Result<()> {
        let Some((delivery, sent)) = self.in_flight.pop_front() else { return Ok(()) };
        self.settled(delivery.await, sent)
    }

    /// Settles the deliveries already acknowledged, oldest first, without
    /// waiting, so counts and metrics follow the broker closely.
    fn settle_ready(&mut self) -> Result<()> {
        while let Some((delivery, _)) = self.in_flight.front_mut() {
            let Some(result) = delivery.now_or_never() else { break };
            let (_, sent) = self.in_flight.pop_front().expect("front exists");
            self.settled(result, sent)?;
        }
        Ok(())
    }

    /// Counts one delivery; a failed one is an error (after librdkafka's own
    /// retries), never a silent loss.
    fn settled(&mut self, result: <DeliveryFuture as Future>::Output, sent: Sent) -> Result<()> {
        match result {
            Ok(Ok(_)) => match sent {
                Sent::Trade { from_rest } => {
                    self.summary.published += 1;
                    metrics::counter!(m::PRODUCER_TRADES).increment(1);
                    if from_rest {
                        self.summary.from_rest += 1;
                        metrics::counter!(m::GAP_TRADES_FILLED).increment(1);
                    }
                }
                Sent::DeadLetter => {
                    self.summary.dead_letters += 1;
                    metrics::counter!(m::PRODUCER_DEAD_LETTERS).increment(1);
                }
                Sent::Gap => {}
            },
            Ok(Err((e, _))) => return Err(Error::kafka("publish", e)),
            Err(_) => return Err(Error::Config("producer shut down before delivery".into())),
        }
        Ok(())
    }

    async fn drain(&mut self) -> Result<()> {
        while !self.in_flight.is_empty() {
            self.settle_oldest().await?;
        }
        Ok(())
    }
}
