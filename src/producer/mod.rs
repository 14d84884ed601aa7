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

use clap::Args;
use futures::FutureExt;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use tracing::{info, warn};

use crate::binance;
use crate::cli;
use crate::error::{Error, Result};
use crate::kafka::{admin, dead_letter, KafkaArgs, CLOCK_HEADER};
use crate::rejection::Reject;
use crate::telemetry;
use rest::RestLimits;
pub use rest::DEFAULT_REST_URL;
pub use sequencer::{Sink, StreamConfig, StreamCounts, MAX_STREAMS_PER_CONNECTION};

/// The live Binance source: what `producer` and `record --ws` follow.
#[derive(Args, Debug, Clone)]
pub struct StreamArgs {
    /// Symbols to follow, comma-separated.
    #[arg(long, env = "CRYPTOPULSE_SYMBOLS", value_delimiter = ',', default_value = "BTCUSDT,ETHUSDT")]
    pub symbols: Vec<String>,
    /// WebSocket base URL (Binance, `wss://data-stream.binance.vision`, the testnet or a local server).
    #[arg(long, env = "CRYPTOPULSE_WS_URL", default_value = DEFAULT_WS_URL)]
    pub ws_url: String,
    /// REST base URL for filling gaps (`/api/v3/historicalTrades`).
    #[arg(long, env = "CRYPTOPULSE_REST_URL", default_value = DEFAULT_REST_URL)]
    pub rest_url: String,
    /// Streams per WebSocket connection (Binance allows 1024).
    #[arg(long, env = "CRYPTOPULSE_STREAMS_PER_CONNECTION", default_value_t = MAX_STREAMS_PER_CONNECTION as u16, value_parser = clap::value_parser!(u16).range(1..=MAX_STREAMS_PER_CONNECTION as i64))]
    pub streams_per_connection: u16,
    /// Reconnect after this long without data or ping.
    #[arg(long, env = "CRYPTOPULSE_SILENCE_TIMEOUT", default_value = "30s", value_parser = cli::duration_between::<1_000, 3_600_000>)]
    pub silence_timeout: Duration,
    /// Replace each connection after this long, before Binance's 24-hour cut.
    #[arg(long, env = "CRYPTOPULSE_CONNECTION_LIFETIME", default_value = "23h", value_parser = cli::duration_between::<60_000, 86_400_000>)]
    pub connection_lifetime: Duration,
    /// Largest WebSocket frame accepted, in bytes.
    #[arg(long, env = "CRYPTOPULSE_MAX_FRAME_BYTES", default_value_t = 1 << 20, value_parser = clap::value_parser!(u32).range(1024..=64 << 20))]
    pub max_frame_bytes: u32,
    /// REST request weight to spend per minute at most (Binance allows 6000).
    #[arg(long, env = "CRYPTOPULSE_REST_WEIGHT_PER_MINUTE", default_value_t = 5000, value_parser = clap::value_parser!(u32).range(25..=6000))]
    pub rest_weight_per_minute: u32,
    /// Longest a REST 429's Retry-After is waited out; a longer one leaves
    /// the gap recorded as unfilled. A 418 ban is never waited out: gaps
    /// during it are recorded unfilled, the streams go on.
    #[arg(long, env = "CRYPTOPULSE_REST_MAX_WAIT", default_value = "60s", value_parser = cli::duration_between::<1_000, 3_600_000>)]
    pub rest_max_wait: Duration,
    /// Most trades fetched over REST for one gap.
    #[arg(long, env = "CRYPTOPULSE_MAX_GAP_FILL", default_value_t = 1_000_000, value_parser = clap::value_parser!(i64).range(0..=1_000_000_000))]
    pub max_gap_fill: i64,
    /// A trade dated more than this ahead of this machine's clock is a dead
    /// letter (`bad_time`).
    #[arg(long, env = "CRYPTOPULSE_FUTURE_TOLERANCE", default_value = "1h", value_parser = cli::duration_between::<1_000, 604_800_000>)]
    pub future_tolerance: Duration,
}

impl StreamArgs {
    pub fn config(&self) -> StreamConfig {
        let symbols = self.symbols.iter().map(|s| s.trim().to_uppercase()).filter(|s| !s.is_empty()).collect();
        let mut config = StreamConfig::new(symbols, &self.ws_url, &self.rest_url);
        config.streams_per_connection = usize::from(self.streams_per_connection);
        config.silence_timeout = self.silence_timeout;
        config.connection_lifetime = self.connection_lifetime;
        config.max_frame_bytes = self.max_frame_bytes as usize;
        config.rest_limits =
            RestLimits { weight_per_minute: self.rest_weight_per_minute, max_wait: self.rest_max_wait, ..RestLimits::default() };
        config.max_gap_fill = self.max_gap_fill;
        config.future_tolerance = self.future_tolerance;
        config
    }
}

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

impl std::fmt::Display for ProducerSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "published {} trades ({} fetched over REST), {} dead letters; {}",
            self.published, self.from_rest, self.dead_letters, self.stream
        )
    }
}

/// Streams trades into Kafka until `shutdown` resolves, then flushes.
pub async fn run(config: ProducerConfig, shutdown: impl Future<Output = ()>) -> Result<ProducerSummary> {
    if config.stream.symbols.is_empty() {
        return Err(Error::Config("no symbols to follow".into()));
    }
    config.kafka.ensure_topics().await?;
    config.kafka.ensure(&[(&config.gaps_topic, 1)]).await?;
    let producer_config = config.kafka.producer_config()?;
    let producer: FutureProducer = producer_config.create().map_err(|e| Error::kafka("producer", e))?;
    let (kafka, symbols, scan) = (config.kafka.clone(), config.stream.symbols.clone(), config.tail_scan_records);
    let last =
        tokio::task::spawn_blocking(move || tail::last_ids(&kafka, &symbols, scan)).await.map_err(|e| Error::join("tail reader", e))??;
    for name in [
        telemetry::PRODUCER_TRADES,
        telemetry::PRODUCER_DEAD_LETTERS,
        telemetry::WS_RECONNECTS,
        telemetry::GAPS_FOUND,
        telemetry::GAP_TRADES_FILLED,
        telemetry::GAP_TRADES_UNFILLED,
    ] {
        metrics::counter!(name).increment(0);
    }
    let [raw_room, dlq_room] = admin::payload_rooms(&producer_config, [&config.kafka.topic, &config.kafka.dlq_topic]).await;
    let mut publisher = Publisher {
        producer,
        raw_topic: config.kafka.topic.as_str().into(),
        dlq_topic: config.kafka.dlq_topic.as_str().into(),
        gaps_topic: config.gaps_topic.as_str().into(),
        raw_room,
        dlq_room,
        in_flight: VecDeque::new(),
        summary: ProducerSummary::default(),
        partitions: raw_partitions(&config.kafka).await?,
        clock_ms: 0,
    };
    let streamed = sequencer::stream(&config.stream, last, &mut publisher, shutdown).await;
    // Whatever ended the run, what was sent is flushed and settled.
    let flushed = publisher.producer.flush(Duration::from_secs(30)).map_err(|e| Error::kafka("flush", e));
    let drained = publisher.drain().await;
    let counts = streamed?;
    flushed.and(drained)?;
    publisher.summary.stream = counts;
    info!(summary = %publisher.summary, "producer stopped");
    Ok(publisher.summary)
}

/// Sends records and keeps the in-flight window bounded.
struct Publisher {
    producer: FutureProducer,
    // Shared, so that naming the topic of a record does not allocate.
    raw_topic: Arc<str>,
    dlq_topic: Arc<str>,
    gaps_topic: Arc<str>,
    /// The most payload bytes a record to the raw and the dead-letter topic may carry.
    raw_room: usize,
    dlq_room: usize,
    /// Deliveries not yet acknowledged, oldest first, with what they are.
    in_flight: VecDeque<(DeliveryFuture, Sent)>,
    summary: ProducerSummary,
    /// The raw topic's partitions, each given a clock record a second.
    partitions: Vec<i32>,
    /// The last clock written: clocks never go back, whatever this
    /// machine's clock does.
    clock_ms: i64,
}

/// What a delivery was, to count it when acknowledged.
#[derive(Debug, Clone, Copy)]
enum Sent {
    Trade { from_rest: bool },
    DeadLetter,
    Gap,
    Clock,
}

impl Sink for Publisher {
    async fn trade(&mut self, symbol: &str, event: &[u8], time_ms: i64, from_rest: bool) -> Result<()> {
        if event.len() > self.raw_room {
            warn!(%symbol, bytes = event.len(), limit = self.raw_room, "a trade too large for the raw topic goes to the dead-letter topic");
            let detail = format!("{} bytes, the raw topic takes {}", event.len(), self.raw_room);
            return self.dead_letter(Reject::TooLarge.as_str(), &detail, event).await;
        }
        let headers = from_rest.then(|| OwnedHeaders::new().insert(Header { key: "source", value: Some("rest") }));
        let topic = self.raw_topic.clone();
        self.send(&topic, To::Key(symbol), event, headers, Some(time_ms), Sent::Trade { from_rest }).await
    }

    async fn dead_letter(&mut self, reason: &str, detail: &str, raw: &[u8]) -> Result<()> {
        let (headers, payload) = dead_letter::describe(reason, detail, raw, self.dlq_room);
        let headers = headers.insert(Header { key: "source", value: Some("websocket") });
        let topic = self.dlq_topic.clone();
        self.send(&topic, To::Any, payload, Some(headers), None, Sent::DeadLetter).await
    }

    /// Records ids `from..=to` of `symbol` on the gaps topic.
    async fn gap(&mut self, symbol: &str, from: i64, to: i64, why: &str) -> Result<()> {
        let record = serde_json::json!({ "symbol": symbol, "from_id": from, "to_id": to, "count": to - from + 1, "reason": why });
        let topic = self.gaps_topic.clone();
        self.send(&topic, To::Key(symbol), record.to_string().as_bytes(), None, None, Sent::Gap).await
    }

    /// On a quiet stream, the last deliveries are counted within a second;
    /// every partition gets a clock record.
    async fn idle(&mut self) -> Result<()> {
        self.clock().await?;
        self.settle_ready()?;
        metrics::gauge!(telemetry::PRODUCER_IN_FLIGHT).set(self.in_flight.len() as f64);
        Ok(())
    }

    fn progress(&self) -> (u64, u64) {
        (self.summary.published, self.summary.dead_letters)
    }
}

/// Where a record goes.
enum To<'a> {
    /// The partition of this key.
    Key(&'a str),
    Partition(i32),
    /// Where librdkafka's partitioner puts a record without a key.
    Any,
}

impl Publisher {
    /// A clock record (data contract §3) to every partition of the raw
    /// topic, after the trades sent to it before: a consumer in live mode
    /// finalizes quiet symbols' bars by it.
    async fn clock(&mut self) -> Result<()> {
        self.clock_ms = binance::now_ms().max(self.clock_ms);
        let value = self.clock_ms.to_string();
        let topic = self.raw_topic.clone();
        for partition in self.partitions.clone() {
            let headers = OwnedHeaders::new().insert(Header { key: CLOCK_HEADER, value: Some(&value) });
            self.send(&topic, To::Partition(partition), &[], Some(headers), Some(self.clock_ms), Sent::Clock).await?;
        }
        Ok(())
    }

    async fn send(
        &mut self,
        topic: &str,
        to: To<'_>,
        payload: &[u8],
        headers: Option<OwnedHeaders>,
        timestamp: Option<i64>,
        sent: Sent,
    ) -> Result<()> {
        let mut record = FutureRecord::<str, [u8]>::to(topic).payload(payload);
        match to {
            To::Key(key) => record = record.key(key),
            To::Partition(partition) => record = record.partition(partition),
            To::Any => {}
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
                    metrics::gauge!(telemetry::PRODUCER_IN_FLIGHT).set(self.in_flight.len() as f64);
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
                    metrics::counter!(telemetry::PRODUCER_TRADES).increment(1);
                    if from_rest {
                        self.summary.from_rest += 1;
                        metrics::counter!(telemetry::GAP_TRADES_FILLED).increment(1);
                    }
                }
                Sent::DeadLetter => {
                    self.summary.dead_letters += 1;
                    metrics::counter!(telemetry::PRODUCER_DEAD_LETTERS).increment(1);
                }
                Sent::Gap | Sent::Clock => {}
            },
            Ok(Err((e, _))) => {
                let kind = match sent {
                    Sent::Trade { .. } | Sent::Clock => "raw",
                    Sent::DeadLetter => "dead_letter",
                    Sent::Gap => "gaps",
                };
                metrics::counter!(telemetry::KAFKA_DELIVERY_ERRORS, "topic_kind" => kind).increment(1);
                return Err(Error::kafka("publish", e));
            }
            Err(_) => return Err(Error::task_failed("producer", "shut down before delivery")),
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

/// The partitions of the raw topic, which exists by now.
async fn raw_partitions(kafka: &KafkaArgs) -> Result<Vec<i32>> {
    let kafka = kafka.clone();
    tokio::task::spawn_blocking(move || {
        let client: rdkafka::consumer::BaseConsumer = kafka.client_config()?.create().map_err(|e| Error::kafka("metadata client", e))?;
        admin::partitions_of(&client, &kafka.topic)
    })
    .await
    .map_err(|e| Error::join("topic metadata", e))?
}
