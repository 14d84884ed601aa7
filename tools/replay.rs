//! `replay`: Parquet archives into Kafka, at full speed or paced by trade time.

use std::collections::BTreeSet;
use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use cryptopulse::cli;
use cryptopulse::kafka::KafkaArgs;
use cryptopulse::replay::{self, parse_time, ReplayOptions, Speed};

/// Publishes recorded trades to Kafka as Binance trade events keyed by symbol.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    /// Archives to replay, in order (`fixtures/*.parquet`).
    #[arg(required = true)]
    files: Vec<PathBuf>,
    #[command(flatten)]
    kafka: KafkaArgs,
    /// `max`, or a factor of real time (1 = as recorded, 10 = ten times faster).
    #[arg(long, env = "CRYPTOPULSE_SPEED", default_value = "max")]
    speed: Speed,
    /// Only these symbols (comma-separated).
    #[arg(long, value_delimiter = ',')]
    symbols: Vec<String>,
    /// Only trades at or after this time (ms since the epoch or RFC 3339).
    #[arg(long, value_parser = parse_time)]
    from: Option<i64>,
    /// Only trades before this time (ms since the epoch or RFC 3339).
    #[arg(long, value_parser = parse_time)]
    to: Option<i64>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Cli = cli::parse();
    let options = ReplayOptions {
        files: args.files,
        speed: args.speed,
        symbols: (!args.symbols.is_empty()).then(|| args.symbols.iter().map(|s| s.to_uppercase()).collect::<BTreeSet<_>>()),
        from_ms: args.from,
        to_ms: args.to,
        progress: std::io::stderr().is_terminal(),
    };
    let summary = replay::run(&args.kafka, options).await.context("replay failed")?;
    println!(
        "replayed {} trades to {} in {:.2}s ({:.0} trades/s), {} filtered out",
        summary.trades,
        args.kafka.topic,
        summary.elapsed.as_secs_f64(),
        summary.trades_per_second(),
        summary.skipped
    );
    Ok(())
}
