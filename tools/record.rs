//! `record`: trades to zstd Parquet archives, from files of frames, from
//! Binance's live streams, or from the raw Kafka topic.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use clap::{ArgGroup, Parser};
use cryptopulse::archive::ArchiveSummary;
use cryptopulse::cli;
use cryptopulse::kafka::stop_flag;
use cryptopulse::kafka::KafkaArgs;
use cryptopulse::producer::StreamArgs;
use cryptopulse::record::{self, live};

/// Records Binance trades into Parquet archives.
#[derive(Parser, Debug)]
#[command(version, group(ArgGroup::new("source").required(true)))]
struct Cli {
    /// Files of frames: `<recv_ns> <frame>` lines, bare frames or bare trade
    /// events; `.gz` is read as gzip. One archive per input.
    #[arg(long, num_args = 1.., group = "source")]
    frames: Vec<PathBuf>,
    /// Binance's public trade dumps (data.binance.vision spot trades:
    /// `SYMBOL-trades-DATE.zip` or its `.csv`; times in ms or, from 2025,
    /// µs). One archive per dump.
    #[arg(long, num_args = 1.., group = "source")]
    binance_csv: Vec<PathBuf>,
    /// `--binance-csv`: the symbol of the dumps, when their names do not start with it.
    #[arg(long)]
    symbol: Option<String>,
    /// Record Binance's live streams (the stream flags below), gaps filled
    /// from REST, until SIGINT/SIGTERM.
    #[arg(long, group = "source")]
    ws: bool,
    /// Record the raw Kafka topic with a consumer group, from its committed
    /// offsets; they are committed once each archive is complete.
    #[arg(long, group = "source")]
    from_kafka: bool,
    /// Directory the archives go to.
    #[arg(long, env = "CRYPTOPULSE_RECORD_DIR")]
    out: PathBuf,
    /// Live sources: start the next archive once one holds this many bytes.
    #[arg(long, env = "CRYPTOPULSE_ROTATE_BYTES", default_value_t = 256 << 20)]
    rotate_bytes: u64,
    /// Live sources: start the next archive once one is this old.
    #[arg(long, env = "CRYPTOPULSE_ROTATE_AFTER", default_value = "1h", value_parser = humantime::parse_duration)]
    rotate_after: Duration,
    /// `--from-kafka`: the consumer group whose offsets say what is recorded.
    #[arg(long, env = "CRYPTOPULSE_RECORD_GROUP_ID", default_value = "cryptopulse-record")]
    group_id: String,
    /// `--from-kafka`: stop at the end of the topic as it was at start.
    #[arg(long)]
    exit_at_end: bool,
    #[command(flatten)]
    stream: StreamArgs,
    #[command(flatten)]
    kafka: KafkaArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Cli = cli::parse();
    if !args.binance_csv.is_empty() {
        let recorded = record::binance_csv::import(&args.binance_csv, &args.out, args.symbol.as_deref()).context("import failed")?;
        for r in &recorded {
            println!("{} -> {}: {} trades, {} rejected", r.input.display(), r.output.display(), r.summary.rows, r.rejected);
            print_ids(&r.summary);
        }
        return Ok(());
    }
    if !args.frames.is_empty() {
        // A file at a time, so a terminal shows how many are done.
        let progress = cli::progress_bar(args.frames.len() as u64, "files", std::io::IsTerminal::is_terminal(&std::io::stderr()));
        let mut recorded = Vec::new();
        for file in &args.frames {
            progress.set_message(file.display().to_string());
            recorded.extend(record::record_frames(std::slice::from_ref(file), &args.out).context("record failed")?);
            progress.inc(1);
        }
        progress.finish_and_clear();
        for r in &recorded {
            println!(
                "{} -> {}: {} trades, {} rejected, {} other frames",
                r.input.display(),
                r.output.display(),
                r.summary.rows,
                r.rejected,
                r.other_frames
            );
            print_ids(&r.summary);
        }
        return Ok(());
    }
    let rotation = live::Rotation { max_bytes: args.rotate_bytes, max_age: args.rotate_after };
    let recorded = if args.ws {
        live::record_stream(&args.stream.config(), &args.out, rotation, cli::shutdown_signal()).await.context("record --ws failed")?
    } else {
        let stop = stop_flag();
        let stopper = stop.clone();
        tokio::spawn(async move {
            cli::shutdown_signal().await;
            stopper.store(true, Ordering::Relaxed);
        });
        let (kafka, group, out) = (args.kafka, args.group_id, args.out);
        tokio::task::spawn_blocking(move || live::record_topic(&kafka, &group, &out, rotation, args.exit_at_end, &stop))
            .await?
            .context("record --from-kafka failed")?
    };
    for (path, summary) in &recorded.archives {
        println!("{}: {} trades", path.display(), summary.rows);
        print_ids(summary);
    }
    println!(
        "{} archives, {} rejected, {} duplicates left out, {} ids missing (gaps.jsonl); stream: {}",
        recorded.archives.len(),
        recorded.rejected,
        recorded.duplicates,
        recorded.unfilled,
        recorded.stream
    );
    Ok(())
}

fn print_ids(summary: &ArchiveSummary) {
    for (symbol, ids) in &summary.symbols {
        println!("  {symbol}: ids {}..={} ({} trades, {} gaps)", ids.first, ids.last, ids.count, ids.missing.len());
    }
}
