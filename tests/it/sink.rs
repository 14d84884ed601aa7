//! The Redis sink on its own, against the real Redis: the fixtures' bars
//! written in different cuts (one call per bar, one for all, uneven pieces,
//! pieces written again as after a crash) end in the same Redis, and a short
//! retention keeps exactly the bars from the cutoff of each symbol's newest
//! bar, rounded down to the retention's granule.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use cryptopulse::archive;
use cryptopulse::sink::{self, granule_ms, Keys, RedisSink};
use cryptopulse::tooling::digest::{self, Digest};
use cryptopulse::window::{FinalBar, PartitionState, WindowConfig};
use redis::AsyncCommands;

use crate::common::{fixture, Lane};

/// Shorter than the fixtures' 345 s, and not a multiple of the bar width.
const RETENTION_MS: i64 = 250_000;

fn fixture_bars() -> Vec<FinalBar> {
    let cfg = WindowConfig::default();
    let mut state = PartitionState::default();
    let mut bars = Vec::new();
    for batch in archive::open(Path::new(fixture::ARCHIVE), 1000).expect("fixtures") {
        bars.extend(state.apply(&batch.expect("batch"), &cfg).expect("apply").bars);
    }
    bars
}

fn url() -> String {
    std::env::var("CRYPTOPULSE_REDIS_URL").expect("CRYPTOPULSE_REDIS_URL is not set: run the tests with scripts/test")
}

/// Writes `calls` (each a slice of bars, one `write` each) under a fresh prefix.
async fn written(test: &str, retention_ms: i64, calls: &[&[FinalBar]]) -> (String, Digest) {
    let prefix = Lane::new(test).name;
    let names = WindowConfig::default().names();
    let mut sink = RedisSink::connect(&url(), &prefix, names, retention_ms, Duration::from_secs(10)).await.expect("redis");
    sink.set_layout().await.expect("layout");
    for bars in calls {
        sink.write(bars).await.expect("write");
    }
    let mut conn = sink::connect(&url()).await.expect("redis");
    let digest = digest::digest(&mut conn, &prefix).await.expect("digest");
    (prefix, digest)
}

/// Cuts `bars` at the given points.
fn cut<'a>(bars: &'a [FinalBar], points: &[usize]) -> Vec<&'a [FinalBar]> {
    let mut out = Vec::new();
    let mut from = 0;
    for &to in points.iter().chain(std::iter::once(&bars.len())) {
        out.push(&bars[from..to]);
        from = to;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bars_written_in_any_cut_or_again_leave_the_same_redis() {
    let bars = fixture_bars();
    assert_eq!(bars.len() as u64, fixture::BARS);
    for retention_ms in [24 * 3600 * 1000, RETENTION_MS] {
        let (_, whole) = written("sink-whole", retention_ms, &[&bars]).await;
        let one_by_one: Vec<&[FinalBar]> = bars.chunks(1).collect();
        let uneven = cut(&bars, &[1, 2, 50, 51, 300, 301, 302, 640]);
        // A crash after the first 400 bars reached Redis, recovery from a
        // checkpoint taken after 150: bars 150..400 are written again.
        let crashed = [&bars[..400], &bars[150..]];
        // A second consumer over the same trades, after the first finished.
        let twice = [&bars[..], &bars[..]];
        for (name, calls) in [("one by one", one_by_one), ("uneven", uneven), ("crashed", crashed.to_vec()), ("twice", twice.to_vec())] {
            let (_, digest) = written("sink-cut", retention_ms, &calls).await;
            assert_eq!(digest.sha256, whole.sha256, "{name}, retention {retention_ms} ms: differs from one write of all bars");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_retention_keeps_the_bars_from_the_granule_below_the_cutoff() {
    let bars = fixture_bars();
    let (prefix, digest) = written("sink-retention", RETENTION_MS, &bars.chunks(97).collect::<Vec<_>>()).await;
    let mut conn = sink::connect(&url()).await.expect("redis");
    let keys = Keys { prefix };
    let granule = granule_ms(RETENTION_MS);
    assert_eq!(granule, 2_500);
    let mut by_symbol: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
    for bar in &bars {
        by_symbol.entry(bar.symbol.as_str()).or_default().push(bar.end);
    }
    let mut kept_total = 0;
    for (symbol, ends) in &by_symbol {
        let newest = *ends.iter().max().expect("bars");
        let cutoff = (newest - RETENTION_MS).div_euclid(granule) * granule;
        let kept: Vec<i64> = ends.iter().copied().filter(|end| *end >= cutoff).collect();
        assert!(kept.len() < ends.len(), "{symbol}: the retention must trim something for this test to mean anything");
        kept_total += kept.len();

        let stream: redis::streams::StreamRangeReply = conn.xrange_all(keys.bars(symbol)).await.expect("xrange");
        let ids: Vec<String> = stream.ids.iter().map(|entry| entry.id.clone()).collect();
        assert_eq!(ids, kept.iter().map(|end| format!("{end}-0")).collect::<Vec<_>>(), "{symbol}: stream entries");

        for metric in ["close", "volume", "vwap_1s", "vwap_5s", "rsi_14"] {
            let members: Vec<(String, f64)> = conn.zrange_withscores(keys.series(symbol, metric), 0, -1).await.expect("zrange");
            let scores: Vec<i64> = members.iter().map(|(_, score)| *score as i64).collect();
            let want: Vec<i64> = if metric == "rsi_14" {
                let with_rsi: Vec<i64> = bars.iter().filter(|bar| bar.symbol == *symbol && bar.rsi.is_some()).map(|bar| bar.end).collect();
                with_rsi.into_iter().filter(|end| *end >= cutoff).collect()
            } else {
                kept.clone()
            };
            assert_eq!(scores, want, "{symbol} {metric}: one member per kept bar");
            for (member, score) in &members {
                assert!(member.starts_with(&format!("{}:", *score as i64)), "{symbol} {metric}: member {member} at {score}");
            }
        }
        let latest: BTreeMap<String, String> = conn.hgetall(keys.latest(symbol)).await.expect("hgetall");
        assert_eq!(latest.get("window_end"), Some(&newest.to_string()), "{symbol}: latest hash");
    }
    assert!(digest.keys > 0 && kept_total > 0);
}

/// Each way a symbol's keys can lose data (SPEC §6), done to BTCUSDT by hand.
const DAMAGE: [(&str, &[&str]); 7] = [
    ("latest hash deleted", &["DEL", "latest"]),
    ("stream trimmed", &["XTRIM", "bars", "MAXLEN", "10"]),
    ("stream deleted", &["DEL", "bars"]),
    ("a sorted set deleted", &["DEL", "ts:vwap_5s"]),
    ("the RSI set deleted", &["DEL", "ts:rsi_14"]),
    ("one member removed", &["ZREMRANGEBYRANK", "ts:close", "3", "3"]),
    ("the hash set back", &["HSET", "latest", "window_end", "1723161300000"]),
];

/// `command` with its key (`latest`, `bars` or `ts:<metric>`) named for `symbol`.
fn damage(keys: &Keys, symbol: &str, command: &[&str]) -> redis::Cmd {
    let key = match command[1] {
        "latest" => keys.latest(symbol),
        "bars" => keys.bars(symbol),
        series => keys.series(symbol, series.strip_prefix("ts:").expect("a sorted set")),
    };
    let mut cmd = redis::cmd(command[0]);
    cmd.arg(key).arg(&command[2..]);
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symbol_that_lost_data_is_named_by_its_next_write_and_rewritten_whole() {
    let bars = fixture_bars();
    let (_, whole) = written("sink-loss-whole", 24 * 3600 * 1000, &[&bars]).await;
    let names = WindowConfig::default().names();
    for (what, command) in DAMAGE {
        let prefix = Lane::new("sink-loss").name;
        let keys = Keys { prefix: prefix.clone() };
        let mut sink = RedisSink::connect(&url(), &prefix, names.clone(), 24 * 3600 * 1000, Duration::from_secs(10)).await.expect("redis");
        sink.set_layout().await.expect("layout");
        sink.write(&bars[..400]).await.expect("write");
        let mut conn = sink::connect(&url()).await.expect("redis");
        damage(&keys, "BTCUSDT", command).query_async::<()>(&mut conn).await.expect("damage");

        // The next write finds it, deletes the symbol's keys and names it;
        // the other symbol's bars of that write are written.
        match sink.write(&bars[400..]).await {
            Err(cryptopulse::error::Error::RedisDataLost { symbols, .. }) => assert_eq!(symbols, ["BTCUSDT"], "{what}"),
            other => panic!("{what}: {other:?}"),
        }
        let left: u32 = redis::cmd("EXISTS")
            .arg(keys.latest("BTCUSDT"))
            .arg(keys.bars("BTCUSDT"))
            .arg(keys.series("BTCUSDT", "close"))
            .query_async(&mut conn)
            .await
            .expect("exists");
        assert_eq!(left, 0, "{what}: the lost symbol's keys are deleted");
        let newest_eth = bars.iter().filter(|b| b.symbol == "ETHUSDT").map(|b| b.end).max().expect("ETHUSDT bars");
        let eth: String = conn.hget(keys.latest("ETHUSDT"), "window_end").await.expect("ETHUSDT");
        assert_eq!(eth, newest_eth.to_string(), "{what}: the other symbol is written");

        // The consumer then reads the symbol's history again: its bars from
        // the first, written over what is there, leave Redis as one clean write.
        sink.write(&bars).await.expect("rewrite");
        let digest = digest::digest(&mut conn, &prefix).await.expect("digest");
        assert_eq!(digest.sha256, whole.sha256, "{what}: repaired");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewrite_from_the_start_over_a_deleted_hash_is_no_error() {
    // Before, the stream refused the rewrite's first entry ("ID smaller
    // than top") on every retry, and the consumer could not get past it.
    let bars = fixture_bars();
    let (prefix, whole) = written("sink-rewrite", 24 * 3600 * 1000, &[&bars]).await;
    let keys = Keys { prefix: prefix.clone() };
    let mut conn = sink::connect(&url()).await.expect("redis");
    let () = conn.del(keys.latest("ETHUSDT")).await.expect("del");
    let mut sink = RedisSink::connect(&url(), &prefix, WindowConfig::default().names(), 24 * 3600 * 1000, Duration::from_secs(10))
        .await
        .expect("redis");
    for chunk in bars.chunks(50) {
        sink.write(chunk).await.expect("a rewrite from the first bar");
    }
    assert_eq!(digest::digest(&mut conn, &prefix).await.expect("digest").sha256, whole.sha256);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_start_check_names_quiet_symbols_that_lost_data() {
    let bars = fixture_bars();
    let (prefix, _) = written("sink-check", 24 * 3600 * 1000, &[&bars]).await;
    let keys = Keys { prefix: prefix.clone() };
    let newest = |symbol: &str| bars.iter().filter(|b| b.symbol == symbol).map(|b| b.end).max().expect("bars");
    let written = [("BTCUSDT", newest("BTCUSDT")), ("ETHUSDT", newest("ETHUSDT"))];
    let mut sink = RedisSink::connect(&url(), &prefix, WindowConfig::default().names(), 24 * 3600 * 1000, Duration::from_secs(10))
        .await
        .expect("redis");
    sink.check(&written).await.expect("nothing lost");
    let mut conn = sink::connect(&url()).await.expect("redis");
    damage(&keys, "ETHUSDT", &["DEL", "ts:volume"]).query_async::<()>(&mut conn).await.expect("damage");
    match sink.check(&written).await {
        Err(cryptopulse::error::Error::RedisDataLost { symbols, .. }) => assert_eq!(symbols, ["ETHUSDT"]),
        other => panic!("{other:?}"),
    }
    // A symbol whose newest bar Redis does not have, though its keys agree.
    let ahead = [("BTCUSDT", newest("BTCUSDT") + 1000)];
    assert!(matches!(sink.check(&ahead).await, Err(cryptopulse::error::Error::RedisDataLost { .. })));
}

/// A deterministic shuffle of `0..n` (SplitMix64 steps): the order two
/// writers' chunks reach Redis in.
fn interleaving(seed: u64, n: usize) -> Vec<bool> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            (z ^ (z >> 31)) & 1 == 1
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_of_the_same_bars_interleaved_leave_what_one_leaves() {
    let bars = fixture_bars();
    for retention_ms in [24 * 3600 * 1000, RETENTION_MS] {
        let (_, one) = written("sink-one-writer", retention_ms, &[&bars]).await;
        for seed in 1..=4u64 {
            let prefix = Lane::new("sink-two-writers").name;
            let names = WindowConfig::default().names();
            let redis_url = url();
            let connect = || RedisSink::connect(&redis_url, &prefix, names.clone(), retention_ms, Duration::from_secs(10));
            let (mut a, mut b) = (connect().await.expect("redis"), connect().await.expect("redis"));
            a.set_layout().await.expect("layout");
            // Each writer goes through all bars in its own chunks, as two
            // consumers over the same trades would; which one writes next
            // is drawn, so either may be ahead by any amount.
            let (chunks_a, chunks_b): (Vec<&[FinalBar]>, Vec<&[FinalBar]>) = (bars.chunks(37).collect(), bars.chunks(53).collect());
            let (mut next_a, mut next_b) = (0, 0);
            for a_goes in interleaving(seed, chunks_a.len() + chunks_b.len()) {
                if (a_goes && next_a < chunks_a.len()) || next_b == chunks_b.len() {
                    a.write(chunks_a[next_a]).await.expect("writer a");
                    next_a += 1;
                } else {
                    b.write(chunks_b[next_b]).await.expect("writer b");
                    next_b += 1;
                }
            }
            while next_a < chunks_a.len() {
                a.write(chunks_a[next_a]).await.expect("writer a");
                next_a += 1;
            }
            while next_b < chunks_b.len() {
                b.write(chunks_b[next_b]).await.expect("writer b");
                next_b += 1;
            }
            let mut conn = sink::connect(&url()).await.expect("redis");
            let two = digest::digest(&mut conn, &prefix).await.expect("digest");
            assert_eq!(two.sha256, one.sha256, "seed {seed}, retention {retention_ms} ms: two writers differ from one");
        }
    }
}
