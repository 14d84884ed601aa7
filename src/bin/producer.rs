//! `producer`: Binance spot trade streams into Kafka, gap-free.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use cryptopulse::cli::{self, KafkaArgs};
use cryptopulse::producer::rest::RestLimits;
use cryptopulse::producer::{
    self, ProducerConfig, StreamConfig, DEFAULT_GAPS_TOPIC, DEFAULT_REST_URL, DEFAULT_WS_URL, MAX_STREAMS_PER_CONNECTION,
};

/// Subscribes to Binance `<symbol>@trade` streams and publishes every trade
/// to Kafka, keyed by symbol, each symbol in id order without holes.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    kafka: KafkaArgs,
    /// Symbols to follow, comma-separated.
    #[arg(long, env = "CRYPTOPULSE_SYMBOLS", value_delimiter = ',', default_value = "BTCUSDT,ETHUSDT")]
    symbols: Vec<String>,
    /// WebSocket base URL (Binance, `wss://data-stream.binance.vision`, the testnet or a local server).
    #[arg(long, env = "CRYPTOPULSE_WS_URL", default_value = DEFAULT_WS_URL)]
    ws_url: String,
    /// REST base URL for filling gaps (`historicalTrades`).
    #[arg(long, env = "CRYPTOPULSE_REST_URL", default_value = DEFAULT_REST_URL)]
    rest_url: String,
    /// Topic where id ranges that could not be filled are recorded.
    #[arg(long, env = "CRYPTOPULSE_GAPS_TOPIC", default_value = DEFAULT_GAPS_TOPIC)]
    gaps_topic: String,
    /// Streams per WebSocket connection (Binance allows 1024).
    #[arg(long, env = "CRYPTOPULSE_STREAMS_PER_CONNECTION", default_value_t = MAX_STREAMS_PER_CONNECTION)]
    streams_per_connection: usize,
    /// Reconnect after this long without data or ping.
    #[arg(long, env = "CRYPTOPULSE_SILENCE_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    silence_timeout: Duration,
    /// Replace each connection after this long, before Binance's 24-hour cut.
    #[arg(long, env = "CRYPTOPULSE_CONNECTION_LIFETIME", default_value = "23h", value_parser = humantime::parse_duration)]
    connection_lifetime: Duration,
    /// Largest WebSocket frame accepted, in bytes.
    #[arg(long, env = "CRYPTOPULSE_MAX_FRAME_BYTES", default_value_t = 1 << 20)]
    max_frame_bytes: usize,
    /// REST request weight to spend per minute at most (Binance allows 6000).
    #[arg(long, env = "CRYPTOPULSE_REST_WEIGHT_PER_MINUTE", default_value_t = 5000)]
    rest_weight_per_minute: u32,
    /// Most trades fetched over REST for one gap.
    #[arg(long, env = "CRYPTOPULSE_MAX_GAP_FILL", default_value_t = 1_000_000)]
    max_gap_fill: i64,
    /// Records read back from the end of each partition at start to find
    /// each symbol's last published trade.
    #[arg(long, env = "CRYPTOPULSE_TAIL_SCAN_RECORDS", default_value_t = 1_000_000)]
    tail_scan_records: i64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    cli::init_tracing();
    let args = Cli::parse();
    let symbols = args.symbols.iter().map(|s| s.trim().to_uppercase()).filter(|s| !s.is_empty()).collect();
    let mut stream = StreamConfig::new(symbols, &args.ws_url, &args.rest_url);
    stream.streams_per_connection = args.streams_per_connection;
    stream.silence_timeout = args.silence_timeout;
    stream.connection_lifetime = args.connection_lifetime;
    stream.max_frame_bytes = args.max_frame_bytes;
    stream.rest_limits = RestLimits { weight_per_minute: args.rest_weight_per_minute, ..RestLimits::default() };
    stream.max_gap_fill = args.max_gap_fill;
    let mut config = ProducerConfig::new(args.kafka, stream);
    config.gaps_topic = args.gaps_topic;
    config.tail_scan_records = args.tail_scan_records;
    let summary = producer::run(config, cli::shutdown_signal()).await.context("producer failed")?;
    println!("{summary:?}");
    Ok(())
}
