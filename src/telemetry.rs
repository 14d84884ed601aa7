//! Pipeline health, for Prometheus: the names of every series the services
//! export, the exporter behind `--metrics-addr`, and the consumer's handles.
//! (The trading analytics, VWAP and RSI, live in [`crate::window`].)
//!
//! Code records through the `metrics` facade (`metrics::counter!(NAME)`);
//! without [`install`] those calls go nowhere and cost next to nothing.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Args;
use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use tracing::info;

use crate::error::{Error, Result};
use crate::window::FinalBar;

/// Where the Prometheus endpoint listens, if anywhere, and how often a live
/// service logs its heartbeat.
#[derive(Args, Debug, Clone)]
pub struct MetricsArgs {
    /// Serve Prometheus metrics on http://HOST:PORT/metrics; off when absent.
    #[arg(long, env = "CRYPTOPULSE_METRICS_ADDR", value_name = "HOST:PORT")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Seconds between INFO heartbeat lines of a live service (rates,
    /// lag, dead letters); 0 for none.
    #[arg(long, env = "CRYPTOPULSE_HEARTBEAT_SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub heartbeat_secs: u64,
}

impl MetricsArgs {
    /// The heartbeat period, if any.
    pub fn heartbeat(&self) -> Option<Duration> {
        (self.heartbeat_secs > 0).then(|| Duration::from_secs(self.heartbeat_secs))
    }
}

/// When a live service logs its heartbeat line, and the per-second rates of
/// its running totals since the last one.
#[derive(Debug)]
pub struct Heartbeat {
    every: Option<Duration>,
    last: Instant,
    totals: Vec<u64>,
}

impl Heartbeat {
    /// Beats every `every` (never without), the first one `every` from now.
    pub fn new(every: Option<Duration>) -> Self {
        Heartbeat { every, last: Instant::now(), totals: Vec::new() }
    }

    /// Whether a beat is due now.
    pub fn is_due(&self) -> bool {
        self.every.is_some_and(|every| self.last.elapsed() >= every)
    }

    /// A beat: per second, what each of `totals` (running totals, always in
    /// the same order; the first beat counts from zero) grew by since the last.
    pub fn beat<const N: usize>(&mut self, totals: [u64; N]) -> [f64; N] {
        let seconds = self.last.elapsed().as_secs_f64().max(1e-3);
        let rates = std::array::from_fn(|i| totals[i].saturating_sub(self.totals.get(i).copied().unwrap_or(0)) as f64 / seconds);
        let round = |rate: f64| (rate * 10.0).round() / 10.0;
        self.last = Instant::now();
        self.totals = totals.to_vec();
        rates.map(round)
    }
}

// Consumer.
/// Records read from Kafka, usable trades or not.
pub const CONSUMER_RECORDS: &str = "cryptopulse_consumer_records_total";
/// Trades applied to the windows (not duplicates, not late).
pub const CONSUMER_TRADES_APPLIED: &str = "cryptopulse_consumer_trades_applied_total";
/// Bars Redis acknowledged.
pub const BARS_WRITTEN: &str = "cryptopulse_bars_written_total";
/// Records sent to the dead-letter topic, label `reason` (SPEC §2, §5).
pub const DEAD_LETTERS: &str = "cryptopulse_dead_letters_total";
/// Trades for a bar already final (also dead letters with reason `late`).
pub const LATE_TRADES: &str = "cryptopulse_late_trades_total";
/// Trades whose id was not above the last applied one of their symbol.
pub const DUPLICATES: &str = "cryptopulse_duplicates_total";
/// Gauge, label `partition`: high watermark minus the next offset to read.
pub const CONSUMER_LAG: &str = "cryptopulse_consumer_lag";
/// Histogram: one synced checkpoint write.
pub const CHECKPOINT_SECONDS: &str = "cryptopulse_checkpoint_seconds";
/// Histogram: one pipelined Redis write of a batch's bars.
pub const REDIS_WRITE_SECONDS: &str = "cryptopulse_redis_write_seconds";
/// Redis writes that failed and were retried (Redis away, paused or slow).
pub const REDIS_WRITE_RETRIES: &str = "cryptopulse_redis_write_retries_total";
/// Redis writes given up on: an error no retry fixes, or retries ran out.
pub const REDIS_WRITE_ERRORS: &str = "cryptopulse_redis_write_errors_total";
/// Gauge, label `symbol`: Unix time (wall clock) at which Redis acknowledged
/// the symbol's newest bar; as many series as symbols (`--max-symbols`
/// bounds them per partition).
pub const LAST_BAR_WRITTEN: &str = "cryptopulse_last_bar_written_timestamp_seconds";
/// Histogram, per bar: wall time of the Redis ack minus the bar's end E, the
/// latest trade time a bar holds; for a bar closed by the next second's
/// first trade this is that trade's exchange-to-Redis time.
pub const TRADE_TO_REDIS_SECONDS: &str = "cryptopulse_trade_to_redis_seconds";
/// Histogram, per bar: from the poll of the batch holding the trade that
/// closed it (or the tick that finalised it) to the Redis ack.
pub const BAR_LATENCY_SECONDS: &str = "cryptopulse_bar_latency_seconds";

/// Gauge: work items (bars or checkpoints) queued for the consumer's
/// writer, at most its queue's length: near it, Redis or RocksDB is behind.
pub const WRITER_QUEUE: &str = "cryptopulse_writer_queue";
/// Partitions a group member took over from the changelog, its own state
/// being older or absent (SPEC §8).
pub const CHANGELOG_RESTORES: &str = "cryptopulse_changelog_restores_total";
/// Changelog transactions refused because the group moved on without
/// this member (it was fenced); nothing of them was published.
pub const CHANGELOG_FENCED: &str = "cryptopulse_changelog_fenced_total";
/// Records the broker refused for good (the process then stops), label
/// `topic_kind`: `raw`, `dead_letter` or `gaps`.
pub const KAFKA_DELIVERY_ERRORS: &str = "cryptopulse_kafka_delivery_errors_total";
/// Gauge, always 1, labels `service` and `version`: which build runs.
pub const BUILD_INFO: &str = "cryptopulse_build_info";

// Producer.
/// Trades the broker acknowledged.
pub const PRODUCER_TRADES: &str = "cryptopulse_producer_trades_total";
/// Frames the producer sent to the dead-letter topic.
pub const PRODUCER_DEAD_LETTERS: &str = "cryptopulse_producer_dead_letters_total";
/// WebSocket reconnects.
pub const WS_RECONNECTS: &str = "cryptopulse_ws_reconnects_total";
/// Gaps in trade ids found after a reconnect.
pub const GAPS_FOUND: &str = "cryptopulse_gaps_found_total";
/// Trades of a gap fetched and published.
pub const GAP_TRADES_FILLED: &str = "cryptopulse_gap_trades_filled_total";
/// Trades of a gap that could not be fetched.
pub const GAP_TRADES_UNFILLED: &str = "cryptopulse_gap_trades_unfilled_total";
/// Gauge: records sent and not yet acknowledged by the broker.
pub const PRODUCER_IN_FLIGHT: &str = "cryptopulse_producer_in_flight";

/// Every name above: what the dashboard may query.
pub const ALL: [&str; 26] = [
    CONSUMER_RECORDS,
    CONSUMER_TRADES_APPLIED,
    BARS_WRITTEN,
    DEAD_LETTERS,
    LATE_TRADES,
    DUPLICATES,
    CONSUMER_LAG,
    CHECKPOINT_SECONDS,
    REDIS_WRITE_SECONDS,
    REDIS_WRITE_RETRIES,
    REDIS_WRITE_ERRORS,
    LAST_BAR_WRITTEN,
    WRITER_QUEUE,
    CHANGELOG_RESTORES,
    CHANGELOG_FENCED,
    KAFKA_DELIVERY_ERRORS,
    BUILD_INFO,
    TRADE_TO_REDIS_SECONDS,
    BAR_LATENCY_SECONDS,
    PRODUCER_TRADES,
    PRODUCER_DEAD_LETTERS,
    WS_RECONNECTS,
    GAPS_FOUND,
    GAP_TRADES_FILLED,
    GAP_TRADES_UNFILLED,
    PRODUCER_IN_FLIGHT,
];

/// Bucket bounds of every `_seconds` histogram: 100 µs to 1 min, every
/// 2.5 ms from 5 to 30 ms, where bar latency lies (a p99 of 20 ms is a
/// target, and a quantile is only as fine as the buckets around it).
pub const LATENCY_BUCKETS: [f64; 25] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.0175, 0.02, 0.0225, 0.025, 0.0275, 0.03, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
];

static INSTALLED: AtomicBool = AtomicBool::new(false);

/// Serves `/metrics` in the Prometheus text format on `addr`; `None` leaves
/// metrics off. Histograms get [`LATENCY_BUCKETS`] (real Prometheus
/// histograms, so quantiles can be taken over any set of series). Call it
/// once, inside the tokio runtime, before the pipeline starts.
pub fn install(addr: Option<SocketAddr>) -> Result<()> {
    let Some(addr) = addr else { return Ok(()) };
    let fail = |e: &dyn std::fmt::Display| Error::Metrics { addr, reason: e.to_string() };
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)
        .map_err(|e| fail(&e))?
        .install()
        .map_err(|e| fail(&e))?;
    describe();
    let service =
        std::env::args().next().and_then(|arg0| std::path::Path::new(&arg0).file_name().map(|name| name.to_string_lossy().into_owned()));
    metrics::gauge!(BUILD_INFO, "service" => service.unwrap_or_default(), "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    INSTALLED.store(true, Ordering::Relaxed);
    info!(%addr, "serving Prometheus metrics on /metrics");
    Ok(())
}

/// Whether [`install`] ran: costly sources (librdkafka statistics) are
/// switched on only then.
pub fn is_installed() -> bool {
    INSTALLED.load(Ordering::Relaxed)
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(CONSUMER_RECORDS, "Records read from Kafka, usable trades or not");
    describe_counter!(CONSUMER_TRADES_APPLIED, "Trades applied to the windows");
    describe_counter!(BARS_WRITTEN, "Final bars acknowledged by Redis");
    describe_counter!(DEAD_LETTERS, "Records sent to the dead-letter topic, by reason");
    describe_counter!(LATE_TRADES, "Trades for a bar already final");
    describe_counter!(DUPLICATES, "Trades dropped as duplicates");
    describe_gauge!(CONSUMER_LAG, "High watermark minus the next offset to read, per partition");
    describe_histogram!(CHECKPOINT_SECONDS, Unit::Seconds, "One synced RocksDB checkpoint write");
    describe_histogram!(REDIS_WRITE_SECONDS, Unit::Seconds, "One pipelined Redis write of bars");
    describe_counter!(REDIS_WRITE_RETRIES, "Redis writes that failed and were retried");
    describe_counter!(REDIS_WRITE_ERRORS, "Redis writes given up on");
    describe_gauge!(LAST_BAR_WRITTEN, Unit::Seconds, "Unix time at which Redis acknowledged the symbol's newest bar");
    describe_gauge!(WRITER_QUEUE, "Work items queued for the consumer's writer");
    describe_counter!(CHANGELOG_RESTORES, "Partitions taken over from the changelog");
    describe_counter!(CHANGELOG_FENCED, "Changelog transactions refused: the group moved on without this member");
    describe_counter!(KAFKA_DELIVERY_ERRORS, "Records the broker refused for good, by topic kind");
    describe_gauge!(BUILD_INFO, "Always 1: the service and version of the running build");
    describe_histogram!(TRADE_TO_REDIS_SECONDS, Unit::Seconds, "Redis ack wall time minus the bar's end (trade time)");
    describe_histogram!(BAR_LATENCY_SECONDS, Unit::Seconds, "Poll of the closing trade (or tick) to the Redis ack of its bar");
    describe_counter!(PRODUCER_TRADES, "Trades acknowledged by the broker");
    describe_counter!(PRODUCER_DEAD_LETTERS, "Frames sent to the dead-letter topic");
    describe_counter!(WS_RECONNECTS, "WebSocket reconnects");
    describe_counter!(GAPS_FOUND, "Trade id gaps found after a reconnect");
    describe_counter!(GAP_TRADES_FILLED, "Trades of gaps fetched and published");
    describe_counter!(GAP_TRADES_UNFILLED, "Trades of gaps that could not be fetched");
    describe_gauge!(PRODUCER_IN_FLIGHT, "Records sent and not yet acknowledged");
}

/// The consumer's handles, taken once so the loop records without lookups.
/// Every counter is registered at zero, so its series exists from the start.
pub struct ConsumerMetrics {
    pub records: Counter,
    pub applied: Counter,
    pub bars: Counter,
    pub late: Counter,
    pub duplicates: Counter,
    trade_to_redis: Histogram,
    bar_latency: Histogram,
}

impl ConsumerMetrics {
    pub fn new() -> Self {
        let counter = |name: &'static str| {
            let counter = metrics::counter!(name);
            counter.increment(0);
            counter
        };
        ConsumerMetrics {
            records: counter(CONSUMER_RECORDS),
            applied: counter(CONSUMER_TRADES_APPLIED),
            bars: counter(BARS_WRITTEN),
            late: counter(LATE_TRADES),
            duplicates: counter(DUPLICATES),
            trade_to_redis: metrics::histogram!(TRADE_TO_REDIS_SECONDS),
            bar_latency: metrics::histogram!(BAR_LATENCY_SECONDS),
        }
    }

    /// Redis acknowledged `bars`, which became final at `since` (a poll or a tick).
    pub fn bars_written(&self, bars: &[FinalBar], since: Instant) {
        if bars.is_empty() {
            return;
        }
        let latency = since.elapsed().as_secs_f64();
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_millis() as i64;
        let mut previous: Option<&str> = None;
        for bar in bars {
            self.bar_latency.record(latency);
            self.trade_to_redis.record(now_ms.saturating_sub(bar.end).max(0) as f64 / 1000.0);
            // Once per run of a symbol's bars: a registry lookup each.
            if previous != Some(bar.symbol.as_str()) {
                metrics::gauge!(LAST_BAR_WRITTEN, "symbol" => bar.symbol.clone()).set(now_ms as f64 / 1000.0);
                previous = Some(bar.symbol.as_str());
            }
        }
        self.bars.increment(bars.len() as u64);
    }
}

impl Default for ConsumerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Counts one dead letter under its reason.
pub fn dead_letter(reason: &'static str) {
    metrics::counter!(DEAD_LETTERS, "reason" => reason).increment(1);
}

/// Sets the lag gauge of one partition.
pub fn set_lag(partition: i32, lag: i64) {
    metrics::gauge!(CONSUMER_LAG, "partition" => partition.to_string()).set(lag.max(0) as f64);
    if let Ok(mut lags) = LAGS.lock() {
        lags.insert(partition, lag.max(0));
    }
}

/// The last lag of each partition, for the heartbeat line.
static LAGS: std::sync::Mutex<std::collections::BTreeMap<i32, i64>> = std::sync::Mutex::new(std::collections::BTreeMap::new());

/// The consumer's lag over all partitions, once librdkafka reported it.
pub fn total_lag() -> Option<i64> {
    let lags = LAGS.lock().ok()?;
    (!lags.is_empty()).then(|| lags.values().sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_prometheus_names_and_unique() {
        let mut seen = std::collections::BTreeSet::new();
        for name in ALL {
            assert!(name.starts_with("cryptopulse_") && name.chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{name}");
            assert!(seen.insert(name), "{name} twice");
            let counter = name.ends_with("_total");
            let gauge =
                [CONSUMER_LAG, PRODUCER_IN_FLIGHT, WRITER_QUEUE, BUILD_INFO].contains(&name) || name.ends_with("_timestamp_seconds");
            assert!(counter || gauge || name.ends_with("_seconds"), "{name}: a counter ends in _total, a histogram in its unit");
        }
        assert!(LATENCY_BUCKETS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn a_heartbeat_gives_rates_since_the_last_one() {
        let mut heartbeat = Heartbeat::new(Some(Duration::from_millis(200)));
        assert!(!heartbeat.is_due());
        std::thread::sleep(Duration::from_millis(250));
        assert!(heartbeat.is_due());
        let [a, b] = heartbeat.beat([1_000, 0]);
        // 1,000 over a quarter second or a little more.
        assert!((1_000.0..=4_000.0).contains(&a) && b == 0.0, "{a} {b}");
        assert!(!heartbeat.is_due());
        std::thread::sleep(Duration::from_millis(250));
        let [a, b] = heartbeat.beat([1_000, 500]);
        assert!(a == 0.0 && (500.0..=2_000.0).contains(&b), "{a} {b}");
        assert!(!Heartbeat::new(None).is_due());
    }
}
