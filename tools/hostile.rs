//! `hostile`: the randomized hostile-input run. The trades of an archive
//! with seeded mutants mixed in go through Kafka to the consumer binary;
//! every record must be accounted for and Redis must equal a run of the
//! clean trades alone. Exits non-zero otherwise.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use cryptopulse::kafka::KafkaArgs;
use cryptopulse::sink::RedisArgs;
use cryptopulse::tooling::hostile::{self, HostileConfig};
use cryptopulse::{cli, tooling};

const DEFAULT_INPUT: &str = "fixtures/binance-spot-trades-2024-08-08.parquet";

/// Mixes seeded mutants of real trades (truncations, bit flips, huge
/// numbers, deep nesting, invalid UTF-8, 10 MB strings, times a century
/// ahead, duplicates, unknown symbols, bytes that are not JSON) into an
/// archive's trades and checks that the consumer accounts for every record.
///
/// Every run gets its own topics and key prefixes: `--topic`, `--dlq-topic`
/// and `--redis-prefix` are stems to which `.hostile-<seed>-<time>` is added.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    redis: RedisArgs,
    /// The consumer binary under test [default: `consumer` next to this program].
    #[arg(long, env = "CRYPTOPULSE_HOSTILE_CONSUMER_BIN")]
    consumer_bin: Option<PathBuf>,
    /// The Parquet archive whose trades are the clean input.
    #[arg(long, default_value = DEFAULT_INPUT)]
    input: PathBuf,
    /// Mutants to mix in (1 to 1,000,000).
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    mutants: u32,
    /// Only these mutations, comma-separated [default: all].
    #[arg(long, value_delimiter = ',')]
    kinds: Vec<hostile::Mutation>,
    /// Seed of the mutants and their places [default: from the clock, printed].
    #[arg(long, env = "CRYPTOPULSE_HOSTILE_SEED")]
    seed: Option<u64>,
    /// Where the consumers' state directories go [default: a new one in the temp dir].
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args: Cli = cli::parse();
    let (seed, run) = tooling::own_run("hostile", args.seed, &mut args.kafka, &mut args.redis)?;
    if !args.json {
        println!("seed {seed}, run {run}");
    }
    let consumer_bin = tooling::consumer_bin(args.consumer_bin).context("locate this program")?;
    let config = HostileConfig {
        kafka: args.kafka,
        redis: args.redis,
        consumer_bin,
        input: args.input,
        mutants: args.mutants as usize,
        kinds: if args.kinds.is_empty() { hostile::Mutation::ALL.to_vec() } else { args.kinds },
        seed,
        work_dir: args.work_dir.unwrap_or_else(|| std::env::temp_dir().join(format!("cryptopulse-{run}"))),
    };
    let report = hostile::run(config).await.context("hostile run failed to run")?;
    if args.json {
        println!("{}", report.to_json());
    } else {
        println!("{report}");
    }
    let failures = report.failures();
    anyhow::ensure!(failures.is_empty(), "not every record is accounted for (seed {seed}): {}", failures.join("; "));
    Ok(())
}
