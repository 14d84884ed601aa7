//! `digest`: the SHA-256 of a canonical dump of everything under a Redis
//! key prefix, to compare two runs; `--dump` prints the dump itself.

use anyhow::Context;
use clap::Parser;
use cryptopulse::cli;
use cryptopulse::sink;
use cryptopulse::sink::RedisTarget;
use cryptopulse::tooling::digest;

/// Prints the canonical digest of what the pipeline wrote under a prefix.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    redis: RedisTarget,
    /// Print the canonical dump, not only its digest.
    #[arg(long)]
    dump: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Cli = cli::parse();
    let mut conn = sink::connect_any(&args.redis.url).await.context("connect to redis")?;
    let digest = digest::digest_any(&mut conn, &args.redis.prefix).await.context("digest")?;
    if args.dump {
        print!("{}", digest.dump);
    }
    println!("{}  {} keys under {}:", digest.sha256, digest.keys, args.redis.prefix);
    Ok(())
}
