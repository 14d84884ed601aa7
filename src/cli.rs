//! Flags shared by the binaries, as clap argument groups to flatten. Every
//! flag has an environment twin so docker-compose configures through the
//! environment; secrets go in the environment or in a file, never in a flag.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::producer::{self, rest::RestLimits, StreamConfig};
use crate::window::{WindowConfig, DEFAULT_BAR_MS, DEFAULT_RSI_PERIOD, DEFAULT_VWAP_MS};

pub const DEFAULT_BROKERS: &str = "127.0.0.1:9092";
pub const DEFAULT_TOPIC: &str = "trades.raw";
pub const DEFAULT_DLQ_TOPIC: &str = "trades.dlq";
pub const DEFAULT_PARTITIONS: i32 = 6;
pub const DEFAULT_TOPIC_RETENTION_BYTES: i64 = 1 << 30;
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
pub const DEFAULT_REDIS_PREFIX: &str = "cryptopulse";
pub const DEFAULT_RETENTION_SECS: u64 = 24 * 60 * 60;
pub const DEFAULT_STATE_DIR: &str = "state";

/// Where Kafka is and what to pass to librdkafka.
#[derive(Args, Debug, Clone)]
pub struct KafkaArgs {
    /// Bootstrap brokers, host:port[,host:port...].
    #[arg(long, env = "CRYPTOPULSE_BROKERS", default_value = DEFAULT_BROKERS)]
    pub brokers: String,
    /// Topic of raw trades.
    #[arg(long, env = "CRYPTOPULSE_TOPIC", default_value = DEFAULT_TOPIC)]
    pub topic: String,
    /// Dead-letter topic for records that are not usable trades.
    #[arg(long, env = "CRYPTOPULSE_DLQ_TOPIC", default_value = DEFAULT_DLQ_TOPIC)]
    pub dlq_topic: String,
    /// Partitions of the raw topic when this program creates it.
    #[arg(long, env = "CRYPTOPULSE_PARTITIONS", default_value_t = DEFAULT_PARTITIONS)]
    pub partitions: i32,
    /// Bytes kept per partition of the topics this program creates. Their
    /// time retention is off: record timestamps are trade times, and a
    /// replay of old trades would be deleted minutes after it was written.
    #[arg(long, env = "CRYPTOPULSE_TOPIC_RETENTION_BYTES", default_value_t = DEFAULT_TOPIC_RETENTION_BYTES)]
    pub topic_retention_bytes: i64,
    /// Any librdkafka property, as kcat takes it: `-X key=value`, repeatable.
    #[arg(short = 'X', value_name = "KEY=VALUE", value_parser = parse_key_value, env = "CRYPTOPULSE_KAFKA_PROPERTIES", value_delimiter = ';')]
    pub properties: Vec<(String, String)>,
    /// A file of librdkafka properties, `key=value` per line (`#` comments):
    /// the place for secrets such as `sasl.password`.
    #[arg(long, env = "CRYPTOPULSE_KAFKA_CONFIG_FILE")]
    pub kafka_config_file: Option<PathBuf>,
}

/// Where Redis is and the prefix of the keys: all the read-only tools need.
#[derive(Args, Debug, Clone)]
pub struct RedisTarget {
    /// Redis URL; put a password here only through the environment.
    #[arg(id = "redis_url", long = "redis-url", value_name = "URL", env = "CRYPTOPULSE_REDIS_URL", default_value = DEFAULT_REDIS_URL, hide_env_values = true)]
    pub url: String,
    /// Prefix of every key.
    #[arg(id = "redis_prefix", long = "redis-prefix", value_name = "PREFIX", env = "CRYPTOPULSE_REDIS_PREFIX", default_value = DEFAULT_REDIS_PREFIX)]
    pub prefix: String,
}

/// Where Redis is, how its keys are named and how writes are kept.
#[derive(Args, Debug, Clone)]
pub struct RedisArgs {
    #[command(flatten)]
    pub target: RedisTarget,
    /// Event time kept in sorted sets and streams, in seconds.
    #[arg(long, env = "CRYPTOPULSE_RETENTION_SECS", default_value_t = DEFAULT_RETENTION_SECS)]
    pub retention_secs: u64,
    /// How long a write keeps being retried while Redis is away, in seconds.
    #[arg(long, env = "CRYPTOPULSE_REDIS_RETRY_SECS", default_value_t = 300)]
    pub redis_retry_secs: u64,
}

impl RedisArgs {
    pub fn retention_ms(&self) -> i64 {
        i64::try_from(self.retention_secs.saturating_mul(1000)).unwrap_or(i64::MAX)
    }

    pub fn retry_for(&self) -> Duration {
        Duration::from_secs(self.redis_retry_secs)
    }
}

/// Where the Prometheus endpoint listens, if anywhere.
#[derive(Args, Debug, Clone)]
pub struct MetricsArgs {
    /// Serve Prometheus metrics on http://HOST:PORT/metrics; off when absent.
    #[arg(long, env = "CRYPTOPULSE_METRICS_ADDR", value_name = "HOST:PORT")]
    pub metrics_addr: Option<std::net::SocketAddr>,
}

/// Window widths and the RSI period (SPEC §4).
#[derive(Args, Debug, Clone)]
pub struct WindowArgs {
    /// Bar width in ms.
    #[arg(long, env = "CRYPTOPULSE_BAR_MS", default_value_t = DEFAULT_BAR_MS)]
    pub bar_ms: i64,
    /// Width of the longer VWAP window in ms, a multiple of the bar.
    #[arg(long, env = "CRYPTOPULSE_VWAP_MS", default_value_t = DEFAULT_VWAP_MS)]
    pub vwap_ms: i64,
    /// RSI period, in bars.
    #[arg(long, env = "CRYPTOPULSE_RSI_PERIOD", default_value_t = DEFAULT_RSI_PERIOD)]
    pub rsi_period: u32,
}

impl WindowArgs {
    pub fn config(&self) -> WindowConfig {
        WindowConfig { bar_ms: self.bar_ms, vwap_ms: self.vwap_ms, rsi_period: self.rsi_period }
    }
}

fn parse_key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => Ok((key.trim().to_owned(), value.to_owned())),
        _ => Err(format!("expected key=value, got {text:?}")),
    }
}

/// Reads a properties file: `key=value` lines, blank lines and `#` comments.
pub fn read_properties(text: &str) -> Result<Vec<(String, String)>, String> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| parse_key_value(line).map(|(key, value)| (key, value.trim().to_owned())))
        .collect()
}

/// The live Binance source: what `producer` and `record --ws` follow.
#[derive(Args, Debug, Clone)]
pub struct StreamArgs {
    /// Symbols to follow, comma-separated.
    #[arg(long, env = "CRYPTOPULSE_SYMBOLS", value_delimiter = ',', default_value = "BTCUSDT,ETHUSDT")]
    pub symbols: Vec<String>,
    /// WebSocket base URL (Binance, `wss://data-stream.binance.vision`, the testnet or a local server).
    #[arg(long, env = "CRYPTOPULSE_WS_URL", default_value = producer::DEFAULT_WS_URL)]
    pub ws_url: String,
    /// REST base URL for filling gaps (`/api/v3/historicalTrades`).
    #[arg(long, env = "CRYPTOPULSE_REST_URL", default_value = producer::DEFAULT_REST_URL)]
    pub rest_url: String,
    /// Streams per WebSocket connection (Binance allows 1024).
    #[arg(long, env = "CRYPTOPULSE_STREAMS_PER_CONNECTION", default_value_t = producer::MAX_STREAMS_PER_CONNECTION)]
    pub streams_per_connection: usize,
    /// Reconnect after this long without data or ping.
    #[arg(long, env = "CRYPTOPULSE_SILENCE_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub silence_timeout: Duration,
    /// Replace each connection after this long, before Binance's 24-hour cut.
    #[arg(long, env = "CRYPTOPULSE_CONNECTION_LIFETIME", default_value = "23h", value_parser = humantime::parse_duration)]
    pub connection_lifetime: Duration,
    /// Largest WebSocket frame accepted, in bytes.
    #[arg(long, env = "CRYPTOPULSE_MAX_FRAME_BYTES", default_value_t = 1 << 20)]
    pub max_frame_bytes: usize,
    /// REST request weight to spend per minute at most (Binance allows 6000).
    #[arg(long, env = "CRYPTOPULSE_REST_WEIGHT_PER_MINUTE", default_value_t = 5000)]
    pub rest_weight_per_minute: u32,
    /// Most trades fetched over REST for one gap.
    #[arg(long, env = "CRYPTOPULSE_MAX_GAP_FILL", default_value_t = 1_000_000)]
    pub max_gap_fill: i64,
}

impl StreamArgs {
    pub fn config(&self) -> StreamConfig {
        let symbols = self.symbols.iter().map(|s| s.trim().to_uppercase()).filter(|s| !s.is_empty()).collect();
        let mut config = StreamConfig::new(symbols, &self.ws_url, &self.rest_url);
        config.streams_per_connection = self.streams_per_connection;
        config.silence_timeout = self.silence_timeout;
        config.connection_lifetime = self.connection_lifetime;
        config.max_frame_bytes = self.max_frame_bytes;
        config.rest_limits = RestLimits { weight_per_minute: self.rest_weight_per_minute, ..RestLimits::default() };
        config.max_gap_fill = self.max_gap_fill;
        config
    }
}

/// Logging for the binaries: `RUST_LOG` or INFO, to stderr.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

/// Resolves when the process gets SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = interrupt => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_properties_files() {
        let props = read_properties("# secrets\nsasl.username=u\n\n sasl.password = p=w \n").unwrap();
        assert_eq!(props, vec![("sasl.username".into(), "u".into()), ("sasl.password".into(), "p=w".into())]);
        assert!(read_properties("novalue").is_err());
    }
}
