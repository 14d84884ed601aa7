//! `producer`: Binance combined trade streams into Kafka (SPEC §2). Each
//! trade event goes out as received, keyed by symbol, timestamped with its
//! trade time; frames that are not valid trades go to the dead-letter topic.
//! The connection is re-opened with capped, jittered backoff when it drops,
//! errs, or stays silent past a deadline.

use std::collections::VecDeque;
use std::future::Future;
use std::time::Duration;

use futures::StreamExt;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tracing::{debug, error, info, warn};

use crate::binance::{self, Frame};
use crate::cli::KafkaArgs;
use crate::error::{Error, Result};

/// Binance's public spot stream endpoint.
pub const DEFAULT_WS_URL: &str = "wss://stream.binance.com:9443";

/// What the producer connects to and how patient it is.
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    pub kafka: KafkaArgs,
    /// Base URL; `/stream?streams=...` is appended.
    pub ws_url: String,
    pub symbols: Vec<String>,
    /// Reconnect when nothing (data or ping) arrived for this long.
    pub silence_timeout: Duration,
    /// Largest frame accepted; a bigger one is an error and a reconnect.
    pub max_frame_bytes: usize,
}

/// Records sent but not yet acknowledged that the producer holds at most;
/// beyond it, it waits for the oldest (backpressure with bounded memory).
const IN_FLIGHT: usize = 10_000;

/// Counts of one run.
#[derive(Debug, Clone, Default)]
pub struct ProducerSummary {
    pub published: u64,
    pub dead_letters: u64,
    pub reconnects: u64,
}

/// Streams trades into Kafka until `shutdown` resolves, then flushes.
pub async fn run(config: ProducerConfig, shutdown: impl Future<Output = ()>) -> Result<ProducerSummary> {
    config.kafka.ensure_topics().await?;
    let producer: FutureProducer = config.kafka.producer_config()?.create().map_err(|e| Error::kafka("producer", e))?;
    let mut summary = ProducerSummary::default();
    let mut in_flight = InFlight::default();
    tokio::pin!(shutdown);
    let mut backoff = Duration::from_millis(250);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            ended = stream_once(&config, &producer, &mut in_flight, &mut summary) => {
                match ended {
                    Ok(()) => backoff = Duration::from_millis(250),
                    Err(e) => warn!(error = %e, "websocket connection lost"),
                }
            }
        }
        summary.reconnects += 1;
        let jitter = Duration::from_millis(u64::from(std::process::id() ^ summary.reconnects as u32) % 250);
        info!(wait_ms = (backoff + jitter).as_millis() as u64, "reconnecting");
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tokio::time::sleep(backoff + jitter) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
    producer.flush(Duration::from_secs(30)).map_err(|e| Error::kafka("flush", e))?;
    in_flight.drain(&mut summary).await?;
    Ok(summary)
}

fn stream_url(config: &ProducerConfig) -> String {
    let streams: Vec<String> = config.symbols.iter().map(|s| format!("{}@trade", s.to_lowercase())).collect();
    format!("{}/stream?streams={}", config.ws_url.trim_end_matches('/'), streams.join("/"))
}

/// One connection, until it ends; `Ok` when the server closed it cleanly.
async fn stream_once(
    config: &ProducerConfig,
    producer: &FutureProducer,
    in_flight: &mut InFlight,
    summary: &mut ProducerSummary,
) -> Result<()> {
    let url = stream_url(config);
    let ws_config = WebSocketConfig::default().max_message_size(Some(config.max_frame_bytes)).max_frame_size(Some(config.max_frame_bytes));
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(&url, Some(ws_config), false)
        .await
        .map_err(|e| Error::Config(format!("connect {url}: {e}")))?;
    info!(%url, "connected");
    loop {
        let message = match tokio::time::timeout(config.silence_timeout, ws.next()).await {
            Err(_) => return Err(Error::Config(format!("no data or ping for {:?}", config.silence_timeout))),
            Ok(None) => return Ok(()),
            Ok(Some(Err(e))) => return Err(Error::Config(format!("websocket: {e}"))),
            Ok(Some(Ok(message))) => message,
        };
        match message {
            Message::Text(text) => on_frame(config, producer, text.as_str(), in_flight, summary).await?,
            Message::Close(frame) => {
                info!(?frame, "server closed the connection");
                return Ok(());
            }
            // Pings are answered by tungstenite as reading goes on.
            _ => {}
        }
    }
}

async fn on_frame(
    config: &ProducerConfig,
    producer: &FutureProducer,
    text: &str,
    in_flight: &mut InFlight,
    summary: &mut ProducerSummary,
) -> Result<()> {
    let trade = binance::unwrap_frame(text).and_then(|frame| match frame {
        Frame::Trade(bytes) => binance::decode(bytes).map(|t| Some((t.symbol.into_owned(), t.time_ms, bytes))),
        Frame::Other(other) => {
            debug!(frame = other, "non-trade frame");
            Ok(None)
        }
        Frame::Error { code, msg } => {
            error!(code, %msg, "binance answered with an error");
            Ok(None)
        }
    });
    let (topic, key, value, headers, timestamp) = match trade {
        Ok(None) => return Ok(()),
        Ok(Some((symbol, time_ms, bytes))) => (&config.kafka.topic, Some(symbol), bytes, OwnedHeaders::new(), Some(time_ms)),
        Err(rejection) => {
            warn!(reason = %rejection.reason, detail = %rejection.detail, "frame sent to the dead-letter topic");
            let headers = OwnedHeaders::new()
                .insert(Header { key: "reason", value: Some(rejection.reason.as_str()) })
                .insert(Header { key: "detail", value: Some(&rejection.detail) })
                .insert(Header { key: "source", value: Some("websocket") });
            (&config.kafka.dlq_topic, None, text.as_bytes(), headers, None)
        }
    };
    let mut record = FutureRecord::<String, [u8]>::to(topic).payload(value).headers(headers);
    if let Some(key) = &key {
        record = record.key(key);
    }
    if let Some(ms) = timestamp {
        record = record.timestamp(ms);
    }
    loop {
        match producer.send_result(record) {
            Ok(delivery) => return in_flight.push(delivery, timestamp.is_some(), summary).await,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                in_flight.settle_oldest(summary).await?;
            }
            Err((e, _)) => return Err(Error::kafka("publish trade", e)),
        }
    }
}

/// Deliveries not yet acknowledged by the broker, oldest first, each marked
/// whether it is a trade (or a dead letter).
#[derive(Default)]
struct InFlight {
    pending: VecDeque<(DeliveryFuture, bool)>,
}

impl InFlight {
    async fn push(&mut self, delivery: DeliveryFuture, trade: bool, summary: &mut ProducerSummary) -> Result<()> {
        self.pending.push_back((delivery, trade));
        while self.pending.len() > IN_FLIGHT {
            self.settle_oldest(summary).await?;
        }
        Ok(())
    }

    /// Waits for the oldest delivery; a failed one is an error (after
    /// librdkafka's own retries), never a silent loss.
    async fn settle_oldest(&mut self, summary: &mut ProducerSummary) -> Result<()> {
        let Some((delivery, trade)) = self.pending.pop_front() else { return Ok(()) };
        match delivery.await {
            Ok(Ok(_)) if trade => summary.published += 1,
            Ok(Ok(_)) => summary.dead_letters += 1,
            Ok(Err((e, _))) => return Err(Error::kafka("publish trade", e)),
            Err(_) => return Err(Error::Config("producer shut down before delivery".into())),
        }
        Ok(())
    }

    async fn drain(&mut self, summary: &mut ProducerSummary) -> Result<()> {
        while !self.pending.is_empty() {
            self.settle_oldest(summary).await?;
        }
        Ok(())
    }
}
