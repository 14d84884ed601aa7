//! `gen`: a larger deterministic input from real trades, for benchmarks and
//! crash tests: `gen --symbols 20 --repeats 3 --out big.parquet`, or an
//! exact count: `gen --symbols 20 --trades 10000000 --out 10m.parquet`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use cryptopulse::cli;
use cryptopulse::synth::{self, SynthConfig};

/// Repeats the trades of an archive over many symbols and forward in time.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    /// Archive of real trades to repeat.
    #[arg(long, default_value = "fixtures/binance-spot-trades-2024-08-08.parquet")]
    source: PathBuf,
    /// Symbols in the output.
    #[arg(long, default_value_t = 20)]
    symbols: usize,
    /// Times the source is repeated, later in time each.
    #[arg(long, default_value_t = 1)]
    repeats: usize,
    /// Exactly this many trades (repeating as often as needed) instead of `--repeats`.
    #[arg(long, conflicts_with = "repeats")]
    trades: Option<u64>,
    /// The archive to write.
    #[arg(long)]
    out: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args: Cli = cli::parse();
    let config = SynthConfig { symbols: args.symbols, repeats: args.repeats, trades: args.trades };
    let show = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let summary = synth::generate_showing(&args.source, &args.out, &config, show).context("gen failed")?;
    println!("{}: {} trades, {} symbols", args.out.display(), summary.rows, summary.symbols.len());
    Ok(())
}
