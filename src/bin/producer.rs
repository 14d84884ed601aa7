//! `producer`: Binance spot trade streams into Kafka.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use cryptopulse::cli::{self, KafkaArgs, MetricsArgs};
use cryptopulse::producer::{self, ProducerConfig, DEFAULT_WS_URL};

/// Subscribes to Binance `<symbol>@trade` streams and publishes every trade to Kafka.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    metrics: MetricsArgs,
    /// Symbols to follow, comma-separated.
    #[arg(long, env = "CRYPTOPULSE_SYMBOLS", value_delimiter = ',', default_value = "BTCUSDT,ETHUSDT")]
    symbols: Vec<String>,
    /// WebSocket base URL (Binance, `wss://data-stream.binance.vision`, the testnet or a local server).
    #[arg(long, env = "CRYPTOPULSE_WS_URL", default_value = DEFAULT_WS_URL)]
    ws_url: String,
    /// Reconnect after this many seconds without data or ping.
    #[arg(long, env = "CRYPTOPULSE_SILENCE_SECS", default_value_t = 30)]
    silence_secs: u64,
    /// Largest WebSocket frame accepted, in bytes.
    #[arg(long, env = "CRYPTOPULSE_MAX_FRAME_BYTES", default_value_t = 1 << 20)]
    max_frame_bytes: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    cli::init_tracing();
    let args = Cli::parse();
    cryptopulse::metrics::install(args.metrics.metrics_addr)?;
    let config = ProducerConfig {
        kafka: args.kafka,
        ws_url: args.ws_url,
        symbols: args.symbols.iter().map(|s| s.to_uppercase()).collect(),
        silence_timeout: Duration::from_secs(args.silence_secs),
        max_frame_bytes: args.max_frame_bytes,
    };
    let summary = producer::run(config, cli::shutdown_signal()).await.context("producer failed")?;
    println!("published {} trades, {} dead letters, {} reconnects", summary.published, summary.dead_letters, summary.reconnects);
    Ok(())
}
