//! `bench`: throughput, CPU and memory of the consumer against the no-op
//! ceiling and of the replay producer against Kafka's ProducerPerformance,
//! plus bar latency at real-time replay. Results go to `<out>/<run>.json`
//! with a plot of the symbol sweep beside it (`<run>.svg`).
//!
//! `bench` (1,000,000 trades over 20 symbols, 3 repeats), or
//! `bench --symbols 20,100,1000,10000 --trades 1000000`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use cryptopulse::cli;
use cryptopulse::kafka::KafkaArgs;
use cryptopulse::sink::DEFAULT_REDIS_URL;
use cryptopulse::tooling::bench::{self, BenchConfig, Bins, LatencyConfig};

/// Measures the consumer and the replay producer against their ceilings.
///
/// Every run makes its own topics (`bench-<time>-<pid>.*`) and Redis
/// prefixes and deletes them at the end; `--topic` only matters with `--noop`.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    kafka: KafkaArgs,
    /// Redis URL; put a password here only through the environment.
    #[arg(long, env = "CRYPTOPULSE_REDIS_URL", default_value = DEFAULT_REDIS_URL, hide_env_values = true)]
    redis_url: String,
    /// Trades loaded into the topic.
    #[arg(long, env = "CRYPTOPULSE_BENCH_TRADES", default_value_t = 1_000_000)]
    trades: u64,
    /// Symbol counts, comma-separated: one topic and one point of the plot each.
    #[arg(long, env = "CRYPTOPULSE_BENCH_SYMBOLS", value_delimiter = ',', default_value = "20")]
    symbols: Vec<usize>,
    /// Runs of each measured process, in rotation.
    #[arg(long, env = "CRYPTOPULSE_BENCH_REPEATS", default_value_t = 3)]
    repeats: usize,
    /// Real trades the inputs are generated from (as `gen`).
    #[arg(long, default_value = "fixtures/binance-spot-trades-2024-08-08.parquet")]
    source: PathBuf,
    /// Generated inputs (kept for the next run), state directories and results.
    #[arg(long, env = "CRYPTOPULSE_BENCH_OUT", default_value = "target/bench")]
    out: PathBuf,
    /// A flag for the consumer under test, repeatable: `--consumer-arg=--batch-rows=65536`.
    #[arg(long = "consumer-arg", allow_hyphen_values = true)]
    consumer_args: Vec<String>,
    /// Classpath of the Kafka 4.1.1 jars with kafka-tools [default: `scripts/services java-cp`].
    #[arg(long, env = "CRYPTOPULSE_KAFKA_CLASSPATH")]
    kafka_classpath: Option<String>,
    /// Skip the replay / ProducerPerformance comparison.
    #[arg(long)]
    no_producer: bool,
    /// Seconds of real-time replay for bar latency; 0 skips it.
    #[arg(long, env = "CRYPTOPULSE_BENCH_LATENCY_SECS", default_value_t = 45)]
    latency_secs: u64,
    /// Symbols of the real-time replay.
    #[arg(long, default_value_t = 100)]
    latency_symbols: usize,
    /// The `consumer` and `replay` binaries are looked for here [default: beside this program].
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Internal: be the no-op consumer on `--topic` and print what it read as JSON.
    #[arg(long, hide = true)]
    noop: bool,
    /// Internal: the no-op consumer's group id.
    #[arg(long, hide = true, default_value = "cryptopulse-bench-noop")]
    group_id: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Cli = cli::parse();
    if args.noop {
        let summary = bench::noop::run(&args.kafka, &args.group_id).context("no-op consumer failed")?;
        println!("{}", serde_json::to_string(&summary)?);
        return Ok(());
    }
    let this = std::env::current_exe().context("locate this program")?;
    let bin_dir = args.bin_dir.clone().or_else(|| this.parent().map(PathBuf::from)).context("no directory for the binaries")?;
    let kafka_classpath = match (args.no_producer, args.kafka_classpath) {
        (true, _) => None,
        (false, Some(cp)) => Some(cp),
        (false, None) => Some(services_classpath()?),
    };
    let config = BenchConfig {
        kafka: args.kafka,
        redis_url: args.redis_url,
        trades: args.trades,
        symbols: args.symbols,
        repeats: args.repeats.max(1),
        source: args.source,
        out_dir: args.out.clone(),
        bins: Bins { consumer: bin_dir.join("consumer"), replay: bin_dir.join("replay"), noop: this },
        consumer_args: args.consumer_args,
        kafka_classpath,
        latency: (args.latency_secs > 0).then_some(LatencyConfig { symbols: args.latency_symbols, seconds: args.latency_secs }),
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let report = bench::run(&config).await.context("bench failed")?;
    print!("\n{}", report.table());
    let json = args.out.join(format!("{}.json", report.run));
    std::fs::write(&json, serde_json::to_string_pretty(&report)?).with_context(|| format!("write {}", json.display()))?;
    let svg = args.out.join(format!("{}.svg", report.run));
    std::fs::write(&svg, report.svg()).with_context(|| format!("write {}", svg.display()))?;
    println!("\nresults: {}\nplot:    {}", json.display(), svg.display());
    Ok(())
}

/// The Kafka classpath from `scripts/services java-cp` (run from the repository).
fn services_classpath() -> anyhow::Result<String> {
    let out = std::process::Command::new("scripts/services")
        .arg("java-cp")
        .output()
        .context("run scripts/services java-cp (from the repository root), or pass --kafka-classpath / --no-producer")?;
    anyhow::ensure!(out.status.success(), "scripts/services java-cp: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}
