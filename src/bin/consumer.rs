//! `consumer`: raw trades from Kafka to bars, VWAP and RSI in Redis, with
//! window state and offsets checkpointed in RocksDB.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use cryptopulse::cli;
use cryptopulse::consumer::DEFAULT_STATE_DIR;
use cryptopulse::consumer::{self, Assignment, ConsumerConfig};
use cryptopulse::kafka::KafkaArgs;
use cryptopulse::sink::RedisArgs;
use cryptopulse::telemetry::MetricsArgs;
use cryptopulse::window::{WindowArgs, DEFAULT_MAX_SYMBOLS};

/// Reads trades from Kafka and writes 1 s bars, VWAP and RSI to Redis, exactly once.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    redis: RedisArgs,
    #[command(flatten)]
    window: WindowArgs,
    #[command(flatten)]
    metrics: MetricsArgs,
    /// Directory of the RocksDB checkpoint store; one consumer each.
    #[arg(long, env = "CRYPTOPULSE_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Consumer group: consumers with the same group id share the topic's
    /// partitions, each partition's state following it (one --state-dir
    /// each); the checkpointed offsets are committed to it.
    #[arg(long, env = "CRYPTOPULSE_GROUP_ID", default_value = "cryptopulse-consumer")]
    group_id: String,
    /// Read these partitions whatever the group does: `all`, or a list
    /// such as 0,3,5 (static assignment). Without it the group assigns them.
    #[arg(long, env = "CRYPTOPULSE_ASSIGN", value_parser = Assignment::parse)]
    assign: Option<Assignment>,
    /// Stop once everything that was in the partitions at start is
    /// processed (in a group: committed, by this member or others).
    #[arg(long, env = "CRYPTOPULSE_EXIT_AT_END")]
    exit_at_end: bool,
    /// Checkpoint at least this often while there is new data, in ms.
    #[arg(long, env = "CRYPTOPULSE_CHECKPOINT_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    checkpoint_ms: u64,
    /// ... or after this many records, whichever comes first.
    #[arg(long, env = "CRYPTOPULSE_CHECKPOINT_RECORDS", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    checkpoint_records: u64,
    /// Most records in one batch.
    #[arg(long, env = "CRYPTOPULSE_BATCH_ROWS", default_value_t = 16_384, value_parser = clap::value_parser!(u32).range(1..=1 << 20))]
    batch_rows: u32,
    /// How long a batch may wait for more records once the queue ran dry,
    /// counted from its first record, in ms. 0: never wait, ship what came.
    #[arg(long, env = "CRYPTOPULSE_LINGER_MS", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    linger_ms: u64,
    /// Live mode: a bar is also final this many ms after its end without a
    /// newer trade of its symbol, by the producer's clock records in the
    /// partition (the same for every reader). Off for replays and tests.
    #[arg(long, env = "CRYPTOPULSE_IDLE_FINALIZE_MS", value_parser = clap::value_parser!(u64).range(1..=86_400_000))]
    idle_finalize_ms: Option<u64>,
    /// A trade dated more than this ahead of this machine's clock is a dead
    /// letter (`bad_time`), so one bad clock cannot make its symbol's later
    /// trades late.
    #[arg(long, env = "CRYPTOPULSE_FUTURE_TOLERANCE", default_value = "1h", value_parser = cli::duration_between::<1_000, 604_800_000>)]
    future_tolerance: Duration,
    /// Take only these symbols, comma-separated; trades of others go to the
    /// dead-letter topic (`unknown_symbol`). All when absent.
    #[arg(long = "symbols", env = "CRYPTOPULSE_CONSUMER_SYMBOLS", value_delimiter = ',')]
    symbols: Option<Vec<String>>,
    /// Most symbols one partition's state holds; trades of further symbols
    /// go to the dead-letter topic (`too_many_symbols`). Bounds memory,
    /// checkpoints and Redis keys.
    #[arg(long, env = "CRYPTOPULSE_MAX_SYMBOLS", default_value_t = DEFAULT_MAX_SYMBOLS as u32, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    max_symbols: u32,
    /// Print the run's summary as one JSON object instead of a line.
    #[arg(long = "json", env = "CRYPTOPULSE_SUMMARY_JSON")]
    json: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Cli = cli::parse();
    cryptopulse::telemetry::install(args.metrics.metrics_addr)?;
    let config = ConsumerConfig {
        kafka: args.kafka,
        redis: args.redis,
        state_dir: args.state_dir,
        window: args.window.config(),
        group_id: args.group_id,
        assignment: args.assign.unwrap_or(Assignment::Group),
        exit_at_end: args.exit_at_end,
        checkpoint_interval: Duration::from_millis(args.checkpoint_ms),
        checkpoint_records: args.checkpoint_records,
        max_batch_rows: args.batch_rows as usize,
        linger: Duration::from_millis(args.linger_ms),
        idle_finalize: args.idle_finalize_ms.map(Duration::from_millis),
        future_tolerance: args.future_tolerance,
        symbols: args.symbols.map(|s| s.iter().map(|s| s.trim().to_uppercase()).filter(|s| !s.is_empty()).collect()),
        max_symbols: args.max_symbols as usize,
        heartbeat: args.metrics.heartbeat(),
    };
    let summary = consumer::run(config, cli::shutdown_signal()).await.context("consumer failed")?;
    let c = &summary.counts;
    if args.json {
        let totals =
            serde_json::json!({"applied": c.applied, "duplicates": c.duplicates, "late": c.late, "rejected": c.rejected, "bars": c.bars});
        let run = serde_json::json!({
            "records": summary.records,
            "elapsed_s": summary.elapsed.as_secs_f64(),
            "dead_letters": summary.dead_letters,
            "checkpoints": summary.checkpoints,
            "rebuilds": summary.rebuilds,
            "totals": totals,
        });
        println!("{run}");
        return Ok(());
    }
    println!(
        "this run: {} records in {:.2}s, {} dead letters, {} checkpoints | totals of the state dir: applied {} duplicates {} late {} rejected {} bars {}",
        summary.records,
        summary.elapsed.as_secs_f64(),
        summary.dead_letters,
        summary.checkpoints,
        c.applied,
        c.duplicates,
        c.late,
        c.rejected,
        c.bars
    );
    Ok(())
}
