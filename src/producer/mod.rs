//! `producer`: Binance spot trade streams into Kafka (SPEC §2), without
//! losing a trade. Binance numbers each symbol's trades consecutively, so
//! every skipped id is visible: the sequencer keeps the last id published
//! per symbol, drops ids it already has (overlaps after a reconnect or a
//! rotation) and fetches the ones a stream skipped from the REST endpoint
//! before publishing newer ones, so each symbol reaches Kafka in id order
//! without holes. At start it reads the last published ids from the tail of
//! the topic and backfills what it missed while it was down. An id range
//! that cannot be had is logged, counted and written to the gaps topic.
//!
//! Pieces: [`connection`] keeps the WebSocket streams flowing, [`rest`]
//! fetches old trades within Binance's limits, [`tail`] reads the topic's
//! end. This module sequences and publishes.

pub mod connection;
pub mod rest;
pub mod tail;

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{error, info, warn};

use crate::binance::{self, Frame};
use crate::cli::KafkaArgs;
use crate::error::{Error, Result};
use connection::{Event, SlotConfig};
use rest::{Rest, RestLimits};

/// Binance's public spot stream endpoint.
pub const DEFAULT_WS_URL: &str = "wss://stream.binance.com:9443";
pub use rest::DEFAULT_REST_URL;

/// Binance serves at most this many streams on one connection.
pub const MAX_STREAMS_PER_CONNECTION: usize = 1024;

/// What the producer connects to and how patient it is.
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    pub kafka: KafkaArgs,
    /// Topic of id ranges that could not be filled.
    pub gaps_topic: String,
    /// WebSocket base URL; `/stream` is appended.
    pub ws_url: String,
    /// REST base URL; `/api/v3/historicalTrades` is appended.
    pub rest_url: String,
    pub symbols: Vec<String>,
    /// Streams per connection, at most [`MAX_STREAMS_PER_CONNECTION`].
    pub streams_per_connection: usize,
    /// Reconnect when nothing (data or ping) arrived for this long.
    pub silence_timeout: Duration,
    /// Largest frame accepted; a bigger one is an error and a reconnect.
    pub max_frame_bytes: usize,
    /// Replace a connection after this long (Binance cuts them at 24 h).
    pub connection_lifetime: Duration,
    pub rest_limits: RestLimits,
    /// Most trades fetched over REST for one gap; the rest of a longer gap
    /// is recorded as unfilled.
    pub max_gap_fill: i64,
    /// How far back from the end of each partition to look for the last
    /// published trade of each symbol at start.
    pub tail_scan_records: i64,
}

impl ProducerConfig {
    /// The settings a user would start from, against `ws_url` / `rest_url`.
    pub fn new(kafka: KafkaArgs, symbols: Vec<String>, ws_url: &str, rest_url: &str) -> Self {
        ProducerConfig {
            kafka,
            gaps_topic: DEFAULT_GAPS_TOPIC.to_owned(),
            ws_url: ws_url.to_owned(),
            rest_url: rest_url.to_owned(),
            symbols,
            streams_per_connection: MAX_STREAMS_PER_CONNECTION,
            silence_timeout: Duration::from_secs(30),
            max_frame_bytes: 1 << 20,
            connection_lifetime: Duration::from_secs(23 * 3600),
            rest_limits: RestLimits::default(),
            max_gap_fill: 1_000_000,
            tail_scan_records: 1_000_000,
        }
    }
}

/// Default topic of unfillable gaps.
pub const DEFAULT_GAPS_TOPIC: &str = "trades.gaps";

/// Records sent but not yet acknowledged that the producer holds at most;
/// beyond it, it waits for the oldest (backpressure with bounded memory).
const IN_FLIGHT: usize = 10_000;

/// Frames read but not yet sequenced, over all connections.
const FRAME_QUEUE: usize = 65_536;

/// Counts of one run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProducerSummary {
    /// Trades acknowledged by the broker, from the streams and from REST.
    pub published: u64,
    /// Of those, fetched over REST to fill gaps or to backfill at start.
    pub from_rest: u64,
    /// Trades received again (overlaps) and dropped.
    pub duplicates: u64,
    pub dead_letters: u64,
    pub reconnects: u64,
    pub rotations: u64,
    /// Gaps seen in a stream (ids skipped).
    pub gaps_found: u64,
    /// Trade ids that could not be had, recorded on the gaps topic.
    pub unfilled: u64,
    pub rest_requests: u64,
    /// REST answers 429 or 418 that were waited out.
    pub rest_throttled: u64,
}

/// Streams trades into Kafka until `shutdown` resolves, then flushes.
pub async fn run(config: ProducerConfig, shutdown: impl Future<Output = ()>) -> Result<ProducerSummary> {
    if config.symbols.is_empty() {
        return Err(Error::Config("no symbols to follow".into()));
    }
    config.kafka.ensure_topics().await?;
    config.kafka.ensure(&[(&config.gaps_topic, 1)]).await?;
    let producer: FutureProducer = config.kafka.producer_config()?.create().map_err(|e| Error::kafka("producer", e))?;
    let (kafka, symbols, scan) = (config.kafka.clone(), config.symbols.clone(), config.tail_scan_records);
    let last = tokio::task::spawn_blocking(move || tail::last_ids(&kafka, &symbols, scan))
        .await
        .map_err(|e| Error::Config(format!("tail reader: {e}")))??;
    let mut sequencer = Sequencer {
        publisher: Publisher { producer, config: config.clone(), in_flight: VecDeque::new(), summary: ProducerSummary::default() },
        rest: Rest::new(&config.rest_url, config.rest_limits.clone())?,
        last,
    };

    let (events, mut frames) = mpsc::channel(FRAME_QUEUE);
    let mut slots = JoinSet::new();
    let per_connection = config.streams_per_connection.clamp(1, MAX_STREAMS_PER_CONNECTION);
    for (slot, symbols) in config.symbols.chunks(per_connection).enumerate() {
        let slot_config = SlotConfig {
            ws_url: config.ws_url.clone(),
            symbols: symbols.to_vec(),
            silence_timeout: config.silence_timeout,
            max_frame_bytes: config.max_frame_bytes,
            lifetime: config.connection_lifetime,
        };
        slots.spawn(connection::run(slot, slot_config, events.clone()));
    }
    drop(events);

    tokio::pin!(shutdown);
    let ended = tokio::select! {
        _ = &mut shutdown => Ok(()),
        ended = sequencer.run(&mut frames) => ended,
    };
    slots.abort_all();
    let publisher = &mut sequencer.publisher;
    publisher.summary.rest_requests = sequencer.rest.requests;
    publisher.summary.rest_throttled = sequencer.rest.throttled;
    // Whatever ended the run, what was sent is flushed and settled.
    let flushed = publisher.producer.flush(Duration::from_secs(30)).map_err(|e| Error::kafka("flush", e));
    let drained = publisher.drain().await;
    ended.and(flushed).and(drained)?;
    info!(summary = ?publisher.summary, "producer stopped");
    Ok(publisher.summary.clone())
}

/// The single loop that orders trades per symbol and publishes them.
struct Sequencer {
    publisher: Publisher,
    rest: Rest,
    /// Last trade id published per symbol.
    last: HashMap<String, i64>,
}

impl Sequencer {
    async fn run(&mut self, frames: &mut mpsc::Receiver<Event>) -> Result<()> {
        let known: Vec<(String, i64)> = self.last.iter().map(|(s, &id)| (s.clone(), id)).collect();
        for (symbol, id) in known {
            self.fill(&symbol, id + 1, None).await?;
        }
        while let Some(event) = frames.recv().await {
            match event {
                Event::Frame(text) => self.on_frame(&text).await?,
                Event::Lost { .. } => self.publisher.summary.reconnects += 1,
                Event::Rotated { .. } => self.publisher.summary.rotations += 1,
            }
        }
        Ok(())
    }

    async fn on_frame(&mut self, text: &str) -> Result<()> {
        let decoded = binance::unwrap_frame(text).and_then(|frame| match frame {
            Frame::Trade(bytes) => binance::decode(bytes).map(|t| Some((t.symbol.into_owned(), t.id, t.time_ms, bytes))),
            _ => Ok(None),
        });
        let (symbol, id, time_ms, payload) = match decoded {
            Ok(Some(trade)) => trade,
            Ok(None) => return Ok(()),
            Err(rejection) => {
                warn!(reason = %rejection.reason, detail = %rejection.detail, "frame sent to the dead-letter topic");
                return self.publisher.dead_letter(rejection.reason.as_str(), &rejection.detail, text.as_bytes()).await;
            }
        };
        match self.last.get(&symbol) {
            Some(&last) if id <= last => {
                self.publisher.summary.duplicates += 1;
                return Ok(());
            }
            Some(&last) if id > last + 1 => {
                self.publisher.summary.gaps_found += 1;
                warn!(%symbol, from = last + 1, to = id - 1, "trade ids skipped; filling from REST");
                self.fill(&symbol, last + 1, Some(id)).await?;
            }
            _ => {}
        }
        self.publisher.trade(&symbol, payload, time_ms, false).await?;
        self.last.insert(symbol, id);
        Ok(())
    }

    /// Publishes `symbol`'s trades from id `from` up to (not including)
    /// `until`, or up to the newest when `until` is `None`, from REST. What
    /// cannot be had is recorded as a gap.
    async fn fill(&mut self, symbol: &str, from: i64, until: Option<i64>) -> Result<()> {
        let mut next = from;
        let mut fetched = 0;
        loop {
            if until.is_some_and(|until| next >= until) {
                return Ok(());
            }
            if fetched >= self.publisher.config.max_gap_fill {
                if let Some(until) = until {
                    return self.publisher.gap(symbol, next, until - 1, "longer than --max-gap-fill").await;
                }
                return Ok(());
            }
            let limit = until.map_or(rest::PAGE, |until| (until - next).min(rest::PAGE));
            let page = match self.rest.trades_from(symbol, next, limit).await {
                Ok(page) => page,
                Err(e) => {
                    error!(%symbol, from = next, error = %e, "cannot fetch missing trades");
                    return match until {
                        Some(until) => self.publisher.gap(symbol, next, until - 1, &e.to_string()).await,
                        // At start: the first streamed trade shows the gap again.
                        None => Ok(()),
                    };
                }
            };
            let complete = (page.len() as i64) < limit;
            for (id, time_ms, event) in page {
                if id < next || until.is_some_and(|until| id >= until) {
                    continue;
                }
                if id > next {
                    self.publisher.gap(symbol, next, id - 1, "not served by historicalTrades").await?;
                }
                self.publisher.trade(symbol, &event, time_ms, true).await?;
                self.last.insert(symbol.to_owned(), id);
                next = id + 1;
                fetched += 1;
            }
            if complete {
                if let Some(until) = until.filter(|&until| next < until) {
                    self.publisher.gap(symbol, next, until - 1, "not served by historicalTrades").await?;
                }
                return Ok(());
            }
        }
    }
}

/// Sends records and keeps the in-flight window bounded.
struct Publisher {
    producer: FutureProducer,
    config: ProducerConfig,
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

impl Publisher {
    async fn trade(&mut self, symbol: &str, event: &[u8], time_ms: i64, from_rest: bool) -> Result<()> {
        let headers = from_rest.then(|| OwnedHeaders::new().insert(Header { key: "source", value: Some("rest") }));
        let topic = self.config.kafka.topic.clone();
        self.send(&topic, Some(symbol), event, headers, Some(time_ms), Sent::Trade { from_rest }).await
    }

    async fn dead_letter(&mut self, reason: &str, detail: &str, raw: &[u8]) -> Result<()> {
        let headers = OwnedHeaders::new()
            .insert(Header { key: "reason", value: Some(reason) })
            .insert(Header { key: "detail", value: Some(detail) })
            .insert(Header { key: "source", value: Some("websocket") });
        let topic = self.config.kafka.dlq_topic.clone();
        self.send(&topic, None, raw, Some(headers), None, Sent::DeadLetter).await
    }

    /// Records ids `from..=to` of `symbol` as lost for good.
    async fn gap(&mut self, symbol: &str, from: i64, to: i64, why: &str) -> Result<()> {
        error!(%symbol, from, to, why, "trades cannot be had; recorded on the gaps topic");
        self.summary.unfilled += (to - from + 1) as u64;
        let record = serde_json::json!({ "symbol": symbol, "from_id": from, "to_id": to, "count": to - from + 1, "reason": why });
        let topic = self.config.gaps_topic.clone();
        self.send(&topic, Some(symbol), record.to_string().as_bytes(), None, None, Sent::Gap).await
    }

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

    /// Waits for the oldest delivery; a failed one is an error (after
    /// librdkafka's own retries), never a silent loss.
    async fn settle_oldest(&mut self) -> Result<()> {
        let Some((delivery, sent)) = self.in_flight.pop_front() else { return Ok(()) };
        match delivery.await {
            Ok(Ok(_)) => match sent {
                Sent::Trade { from_rest } => {
                    self.summary.published += 1;
                    self.summary.from_rest += u64::from(from_rest);
                }
                Sent::DeadLetter => self.summary.dead_letters += 1,
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
