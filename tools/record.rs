//! `record`: raw trade frames to zstd Parquet archives.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use cryptopulse::{cli, record};

/// Records raw Binance trade frames into Parquet archives, one per input.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    /// Files of frames: `<recv_ns> <frame>` lines, bare frames or bare trade events; `.gz` is read as gzip.
    #[arg(long, required = true, num_args = 1..)]
    frames: Vec<PathBuf>,
    /// Directory the archives go to.
    #[arg(long, env = "CRYPTOPULSE_RECORD_DIR")]
    out: PathBuf,
}

fn main() -> anyhow::Result<()> {
    cli::init_tracing();
    let args = Cli::parse();
    let recorded = record::record_frames(&args.frames, &args.out).context("record failed")?;
    for r in &recorded {
        println!(
            "{} -> {}: {} trades, {} rejected, {} other frames",
            r.input.display(),
            r.output.display(),
            r.summary.rows,
            r.rejected,
            r.other_frames
        );
        for (symbol, ids) in &r.summary.symbols {
            println!("  {symbol}: ids {}..={} ({} trades, {} gaps)", ids.first, ids.last, ids.count, ids.missing.len());
        }
    }
    Ok(())
}
