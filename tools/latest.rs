//! `latest`: a table of the newest final bar of every symbol, read back
//! from Redis (SPEC §6 `latest` hashes).

use anyhow::Context;
use clap::Parser;
use cryptopulse::cli;
use cryptopulse::sink::RedisTarget;
use cryptopulse::sink::{self, Keys};
use redis::AsyncCommands;

/// Prints the latest metrics per symbol as a table.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    redis: RedisTarget,
    /// Print one JSON object per symbol (a JSON array), every value as
    /// Redis holds it, instead of the table.
    #[arg(long)]
    json: bool,
}

const COLUMNS: [&str; 12] =
    ["window_end", "open", "high", "low", "close", "volume", "trades", "buy_volume", "sell_volume", "vwap_1s", "vwap_5s", "rsi_14"];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Cli = cli::parse();
    let keys = Keys { prefix: args.redis.prefix.clone() };
    let mut conn = sink::connect_any(&args.redis.url).await.context("connect to redis")?;
    let mut symbols: Vec<String> = conn.smembers(keys.symbols()).await.context("read symbols")?;
    symbols.sort();
    let mut rows = vec![std::iter::once("symbol".to_owned()).chain(COLUMNS.iter().map(|c| c.to_string())).collect::<Vec<_>>()];
    let mut objects = Vec::new();
    for symbol in &symbols {
        let fields: std::collections::BTreeMap<String, String> = conn.hgetall(keys.latest(symbol)).await.context("read latest")?;
        let cell = |name: &str| fields.get(name).map_or_else(|| "-".to_owned(), |v| shorten(name, v));
        rows.push(std::iter::once(symbol.clone()).chain(COLUMNS.iter().map(|c| cell(c))).collect());
        let mut object = serde_json::Map::new();
        object.insert("symbol".into(), symbol.clone().into());
        object.extend(fields.into_iter().map(|(k, v)| (k, v.into())));
        objects.push(serde_json::Value::Object(object));
    }
    if args.json {
        println!("{}", serde_json::Value::Array(objects));
        return Ok(());
    }
    print_table(&rows);
    if symbols.is_empty() {
        println!("(no symbols under {}: nothing written yet)", args.redis.prefix);
    }
    Ok(())
}

/// Floats to a readable number of places; times as UTC.
fn shorten(name: &str, value: &str) -> String {
    match (name, value.parse::<f64>()) {
        ("window_end", Ok(ms)) => {
            humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms as u64)).to_string()
        }
        ("vwap_1s" | "vwap_5s" | "rsi_14", Ok(v)) => format!("{v:.4}"),
        _ => value.to_owned(),
    }
}

fn print_table(rows: &[Vec<String>]) {
    let widths: Vec<usize> = (0..rows[0].len()).map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0)).collect();
    for (i, row) in rows.iter().enumerate() {
        let line: Vec<String> = row.iter().zip(&widths).map(|(cell, w)| format!("{cell:>w$}")).collect();
        println!("{}", line.join("  "));
        if i == 0 {
            println!("{}", widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>().join("  "));
        }
    }
}
