//! `replay`: Parquet archives back into Kafka, per SPEC §2: the value is the
//! Binance trade event, the key the symbol, the timestamp the trade time.
//! Files are read in the order given and rows in stored order, which keeps
//! each symbol in trade-id order; at full speed or paced by trade time.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, ClientContext};
use tracing::warn;

use crate::archive;
use crate::binance;
use crate::error::{Error, Result};
use crate::kafka::KafkaArgs;
use crate::trade::{Trade, TradeColumns};

/// How fast to replay.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Speed {
    /// As fast as the broker takes it.
    Max,
    /// Trade time divided by this factor: 1 is real time, 10 ten times faster.
    Factor(f64),
}

impl FromStr for Speed {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if text == "max" {
            return Ok(Speed::Max);
        }
        match text.parse::<f64>() {
            Ok(factor) if factor.is_finite() && factor > 0.0 => Ok(Speed::Factor(factor)),
            _ => Err(format!("speed must be `max` or a positive factor, got {text:?}")),
        }
    }
}

/// Parses a time filter: ms since the epoch or RFC 3339 (`2024-08-08T23:55:00Z`).
pub fn parse_time(text: &str) -> Result<i64, String> {
    if let Ok(ms) = text.parse::<i64>() {
        return Ok(ms);
    }
    let time = humantime::parse_rfc3339_weak(text).map_err(|e| format!("{text:?}: {e}"))?;
    let since = time.duration_since(std::time::UNIX_EPOCH).map_err(|e| e.to_string())?;
    i64::try_from(since.as_millis()).map_err(|e| e.to_string())
}

/// What to replay.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    pub files: Vec<PathBuf>,
    pub speed: Speed,
    /// Only these symbols, when given.
    pub symbols: Option<BTreeSet<String>>,
    /// Trades with `from_ms <= T < to_ms`.
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
    pub progress: bool,
}

/// What a replay did.
#[derive(Debug, Clone, Default)]
pub struct ReplaySummary {
    pub trades: u64,
    pub skipped: u64,
    pub elapsed: Duration,
}

impl ReplaySummary {
    pub fn trades_per_second(&self) -> f64 {
        self.trades as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Creates the topics if needed and publishes the archives.
pub async fn run(kafka: &KafkaArgs, options: ReplayOptions) -> Result<ReplaySummary> {
    kafka.ensure_topics().await?;
    let config = kafka.producer_config()?;
    let topic = kafka.topic.clone();
    tokio::task::spawn_blocking(move || publish(&config, &topic, &options)).await.map_err(|e| Error::join("replay thread", e))?
}

#[derive(Default)]
struct Deliveries {
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((error, _)) = result {
            self.failed.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut first) = self.first_error.lock() {
                first.get_or_insert_with(|| error.to_string());
            }
        }
    }
}

fn publish(config: &ClientConfig, topic: &str, options: &ReplayOptions) -> Result<ReplaySummary> {
    let producer: ThreadedProducer<Deliveries> =
        config.create_with_context(Deliveries::default()).map_err(|e| Error::kafka("replay producer", e))?;
    let total: u64 = options.files.iter().map(|f| archive::row_count(f)).sum::<Result<u64>>()?;
    let progress = crate::cli::progress_bar(total, "trades", options.progress);
    let started = Instant::now();
    let mut summary = ReplaySummary::default();
    let mut pacer = Pacer::new(options.speed);
    let mut last_ids: HashMap<String, i64> = HashMap::new();
    let mut value = Vec::with_capacity(256);
    for file in &options.files {
        for batch in archive::open(file, 8192)? {
            let batch = batch?;
            let cols = TradeColumns::new(&batch)?;
            for row in 0..batch.num_rows() {
                let trade = cols.trade(row);
                if !options.wants(&trade) {
                    summary.skipped += 1;
                    continue;
                }
                check_order(&mut last_ids, &trade);
                pacer.wait_for(trade.time_ms);
                value.clear();
                binance::encode(&trade, &mut value);
                send(&producer, topic, &trade, &value)?;
                summary.trades += 1;
            }
            progress.inc(batch.num_rows() as u64);
        }
    }
    producer.flush(Duration::from_secs(120)).map_err(|e| Error::kafka("flush replay", e))?;
    progress.finish_and_clear();
    summary.elapsed = started.elapsed();
    let failed = producer.context().failed.load(Ordering::Relaxed);
    if failed > 0 {
        let first = producer.context().first_error.lock().ok().and_then(|f| f.clone()).unwrap_or_default();
        return Err(Error::task_failed(
            "replay",
            format!("{failed} of {} trades were not delivered; first error: {first}", summary.trades),
        ));
    }
    Ok(summary)
}

impl ReplayOptions {
    fn wants(&self, trade: &Trade<'_>) -> bool {
        self.symbols.as_ref().is_none_or(|s| s.contains(trade.symbol.as_ref()))
            && self.from_ms.is_none_or(|from| trade.time_ms >= from)
            && self.to_ms.is_none_or(|to| trade.time_ms < to)
    }
}

fn send(producer: &ThreadedProducer<Deliveries>, topic: &str, trade: &Trade<'_>, value: &[u8]) -> Result<()> {
    let key = trade.symbol.as_bytes();
    let mut record = BaseRecord::to(topic).key(key).payload(value).timestamp(trade.time_ms);
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                // Backpressure: the background thread drains the queue.
                record = back;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => return Err(Error::kafka("send trade", e)),
        }
    }
}

fn check_order(last_ids: &mut HashMap<String, i64>, trade: &Trade<'_>) {
    match last_ids.get_mut(trade.symbol.as_ref()) {
        Some(last) if trade.id <= *last => {
            warn!(symbol = %trade.symbol, id = trade.id, previous = *last, "trade ids out of order in the input; the consumer drops it as a duplicate");
        }
        Some(last) => *last = trade.id,
        None => {
            last_ids.insert(trade.symbol.to_string(), trade.id);
        }
    }
}

/// Sleeps so trade time advances `factor` times faster than the wall clock.
struct Pacer {
    speed: Speed,
    origin: Option<(i64, Instant)>,
}

impl Pacer {
    fn new(speed: Speed) -> Self {
        Pacer { speed, origin: None }
    }

    fn wait_for(&mut self, time_ms: i64) {
        let Speed::Factor(factor) = self.speed else { return };
        let (first_ms, first_at) = *self.origin.get_or_insert((time_ms, Instant::now()));
        let due = first_at + Duration::from_secs_f64((time_ms - first_ms).max(0) as f64 / 1000.0 / factor);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_speeds_and_times() {
        assert_eq!("max".parse::<Speed>(), Ok(Speed::Max));
        assert_eq!("10".parse::<Speed>(), Ok(Speed::Factor(10.0)));
        assert!("0".parse::<Speed>().is_err());
        assert!("fast".parse::<Speed>().is_err());
        assert_eq!(parse_time("1723161256000"), Ok(1_723_161_256_000));
        assert_eq!(parse_time("2024-08-08T23:54:16Z"), Ok(1_723_161_256_000));
        assert!(parse_time("yesterday").is_err());
    }
}
