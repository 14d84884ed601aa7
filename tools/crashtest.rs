//! `crashtest`: kills the consumer again and again (SIGKILL at seeded random
//! instants, then once at every named crash point) and checks that Redis ends
//! identical to a run that never crashed (SPEC §7). Exits non-zero otherwise.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use cryptopulse::kafka::KafkaArgs;
use cryptopulse::sink::RedisArgs;
use cryptopulse::tooling::crashtest::{self, Cadence, CrashConfig};
use cryptopulse::{cli, tooling};

const DEFAULT_INPUT: &str = "fixtures/binance-spot-trades-2024-08-08.parquet";

/// Crash-tests the consumer binary against the real broker and Redis.
///
/// Every run gets its own topics and key prefixes: `--topic`, `--dlq-topic`
/// and `--redis-prefix` are stems to which `.crashtest-<seed>-<time>` is added.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    redis: RedisArgs,
    #[command(flatten)]
    cadence: Cadence,
    /// The consumer binary under test [default: `consumer` next to this program].
    #[arg(long, env = "CRYPTOPULSE_CRASHTEST_CONSUMER_BIN")]
    consumer_bin: Option<PathBuf>,
    /// Parquet archives to replay.
    #[arg(long, num_args = 1.., default_value = DEFAULT_INPUT)]
    inputs: Vec<PathBuf>,
    /// SIGKILLs at random instants.
    #[arg(long, env = "CRYPTOPULSE_CRASHTEST_KILLS", default_value_t = 25)]
    kills: u32,
    /// Seed of the kill schedule [default: from the clock, printed].
    #[arg(long, env = "CRYPTOPULSE_CRASHTEST_SEED")]
    seed: Option<u64>,
    /// Skip the named crash points.
    #[arg(long)]
    no_named_points: bool,
    /// Where the consumers' state directories go [default: a new one in the temp dir].
    #[arg(long, env = "CRYPTOPULSE_CRASHTEST_WORK_DIR")]
    work_dir: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args: Cli = cli::parse();
    let (seed, run) = tooling::own_run("crashtest", args.seed, &mut args.kafka, &mut args.redis)?;
    println!("seed {seed}, run {run}");
    let consumer_bin = tooling::consumer_bin(args.consumer_bin).context("locate this program")?;
    let config = CrashConfig {
        consumer_bin,
        inputs: args.inputs,
        kafka: args.kafka,
        redis: args.redis,
        work_dir: args.work_dir.unwrap_or_else(|| std::env::temp_dir().join(format!("cryptopulse-{run}"))),
        kills: args.kills,
        seed,
        named_points: !args.no_named_points,
        cadence: args.cadence,
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let report = crashtest::run(config).await.context("crash test failed to run")?;
    println!("{report}");
    anyhow::ensure!(report.passed(), "Redis after the crashes differs from the uncrashed run (seed {seed})");
    Ok(())
}
