//! `producer`: Binance spot trade streams into Kafka, gap-free.

use anyhow::Context;
use clap::Parser;
use cryptopulse::cli;
use cryptopulse::kafka::KafkaArgs;
use cryptopulse::producer::StreamArgs;
use cryptopulse::producer::{self, ProducerConfig, DEFAULT_GAPS_TOPIC};
use cryptopulse::telemetry::MetricsArgs;

/// Subscribes to Binance `<symbol>@trade` streams and publishes every trade
/// to Kafka, keyed by symbol, each symbol in id order without holes.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    metrics: MetricsArgs,
    #[command(flatten)]
    stream: StreamArgs,
    /// Topic where id ranges that could not be filled are recorded.
    #[arg(long, env = "CRYPTOPULSE_GAPS_TOPIC", default_value = DEFAULT_GAPS_TOPIC)]
    gaps_topic: String,
    /// Records read back from the end of each partition at start to find
    /// each symbol's last published trade.
    #[arg(long, env = "CRYPTOPULSE_TAIL_SCAN_RECORDS", default_value_t = 1_000_000)]
    tail_scan_records: i64,
    /// Print the run's summary as one JSON object instead of a line.
    #[arg(long = "json", env = "CRYPTOPULSE_SUMMARY_JSON")]
    json: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Cli = cli::parse();
    cryptopulse::telemetry::install(args.metrics.metrics_addr)?;
    let mut stream = args.stream.config();
    stream.heartbeat = args.metrics.heartbeat();
    let mut config = ProducerConfig::new(args.kafka, stream);
    config.gaps_topic = args.gaps_topic;
    config.tail_scan_records = args.tail_scan_records;
    let summary = producer::run(config, cli::shutdown_signal()).await.context("producer failed")?;
    if args.json {
        let s = &summary.stream;
        println!(
            "{}",
            serde_json::json!({
                "published": summary.published,
                "from_rest": summary.from_rest,
                "dead_letters": summary.dead_letters,
                "reconnects": s.reconnects,
                "rotations": s.rotations,
                "gaps_found": s.gaps_found,
                "unfilled": s.unfilled,
                "overlaps_dropped": s.duplicates,
                "rest_requests": s.rest_requests,
                "rest_throttled": s.rest_throttled,
            })
        );
    } else {
        println!("{summary}");
    }
    Ok(())
}
