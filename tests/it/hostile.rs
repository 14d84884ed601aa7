//! Input from the wild, against the real broker and Redis: records of any
//! size and shape, and implausible trades, are dead letters with a reason,
//! the consumer runs to the end, and the bars of everything else are those
//! of a clean run. A state dir refuses settings it was not made with. A
//! symbol outside ASCII and a quantity past 18 digits flow exactly.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use sha2::{Digest as _, Sha256};

use crate::common::{fixture, Lane, Letter};
use cryptopulse::kafka::dead_letter::{MAX_DETAIL_BYTES, PAYLOAD_LENGTH_HEADER, PAYLOAD_SHA256_HEADER};
use cryptopulse::replay::{self, ReplayOptions, Speed};
use redis::AsyncCommands;

/// The value of header `key` of a dead letter.
fn header<'a>(letter: &'a Letter, key: &str) -> Option<&'a str> {
    letter.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// Sends `payloads` keyed `key` with a producer that takes records up to 2 MB.
async fn produce_large(lane: &Lane, key: &str, payloads: &[&str]) {
    let mut config = lane.kafka.producer_config().expect("producer config");
    config.set("message.max.bytes", "2000000");
    let producer: FutureProducer = config.create().expect("producer");
    for payload in payloads {
        let record = FutureRecord::to(&lane.kafka.topic).key(key).payload(*payload);
        producer.send(record, Duration::from_secs(30)).await.map_err(|(e, _)| e).expect("send");
    }
}

/// Replays the fixtures' first half, then `inject`, then the second half;
/// runs the consumer to the end (it must not fail) and returns the lane.
async fn fixtures_around(test: &str, inject: impl AsyncFnOnce(&Lane)) -> Lane {
    let lane = Lane::new(test);
    lane.replay(None, Some(fixture::MIDDLE_MS)).await;
    inject(&lane).await;
    lane.replay(Some(fixture::MIDDLE_MS), None).await;
    let summary = lane.consume(tempfile::tempdir().expect("tempdir").path()).await;
    assert_eq!(summary.counts.applied, fixture::TRADES, "{summary:?}");
    lane
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_too_large_for_a_dead_letter_are_cut_and_the_run_goes_on() {
    let want = Lane::undisturbed("large-clean").await;
    // 990 KB whose symbol is 900 KB: its detail would repeat the symbol; and
    // 1.04 MB of a price that is no number, more than a record may carry.
    let long_symbol = format!(
        r#"{{"e":"trade","E":1,"s":"{}","t":1,"p":"1","q":"1","T":1723161400000,"m":false,"pad":"{}"}}"#,
        "X".repeat(900_000),
        "p".repeat(90_000)
    );
    let long_price = format!(r#"{{"e":"trade","s":"BTCUSDT","t":2,"p":"{}","q":"1","T":1723161400000,"m":false}}"#, "9".repeat(1_040_000));
    let lane = fixtures_around("large", async |lane| produce_large(lane, "BTCUSDT", &[&long_symbol, &long_price]).await).await;

    assert_eq!(lane.digest().await.sha256, want.sha256, "the bars of the other trades are a clean run's");
    let letters = lane.dead_letters(2);
    assert_eq!(letters.len(), 2);
    let reasons: Vec<&str> = letters.iter().filter_map(|l| header(l, "reason")).collect();
    assert_eq!(reasons, ["bad_symbol", "bad_price"]);
    for letter in &letters {
        assert!(header(letter, "detail").is_some_and(|d| d.len() <= MAX_DETAIL_BYTES), "{:?}", header(letter, "detail").map(str::len));
    }
    // The first fits whole; the second is cut, with its length and hash.
    assert_eq!((letters[0].1.len(), header(&letters[0], PAYLOAD_LENGTH_HEADER)), (long_symbol.len(), None));
    assert!(letters[1].1.len() < 1_000_000 && long_price.as_bytes().starts_with(&letters[1].1));
    assert_eq!(header(&letters[1], PAYLOAD_LENGTH_HEADER), Some(long_price.len().to_string().as_str()));
    let sha256 = format!("{:x}", Sha256::digest(long_price.as_bytes()));
    assert_eq!(header(&letters[1], PAYLOAD_SHA256_HEADER), Some(sha256.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn implausible_trades_are_dead_letters_and_the_trades_after_them_are_exact() {
    let want = Lane::undisturbed("implausible-clean").await;
    // BTCUSDT's ids in the fixtures are below 3.74e9; times in 2024-08-08.
    let trade = |id: &str, price: &str, qty: &str, time: &str| {
        format!(r#"{{"e":"trade","E":1,"s":"BTCUSDT","t":{id},"p":"{price}","q":"{qty}","T":{time},"m":false}}"#)
    };
    let century_ahead = (std::time::SystemTime::now() + Duration::from_secs(100 * 366 * 86_400))
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis()
        .to_string();
    let bad = [
        trade("3800000000", "61000.00000000", "0.1", &century_ahead),
        trade(&i64::MAX.to_string(), "61000.00000000", "0.1", "1723161400000"),
        trade("-1", "61000.00000000", "0.1", "1723161400000"),
        trade("3800000001", "61000.00000000", "0.000000001", "1723161400000"),
        trade("3800000002", "61000.123456789", "0.1", "1723161400000"),
    ];
    let lane = fixtures_around("implausible", async |lane| lane.produce("BTCUSDT", &bad.each_ref().map(String::as_str)).await).await;

    assert_eq!(lane.digest().await.sha256, want.sha256, "the trades after them are neither late nor duplicates");
    let letters = lane.dead_letters(bad.len());
    let reasons: Vec<&str> = letters.iter().filter_map(|l| header(l, "reason")).collect();
    assert_eq!(reasons, ["bad_time", "bad_id", "bad_id", "bad_qty", "bad_price"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_dir_refuses_other_windows_and_added_partitions_and_writes_nothing() {
    let lane = Lane::new("identity");
    lane.replay(None, None).await;
    let state = tempfile::tempdir().expect("tempdir");
    lane.consume(state.path()).await;
    let written = lane.digest().await;

    let refused = async |change: &dyn Fn(&mut cryptopulse::consumer::ConsumerConfig)| {
        let mut config = lane.consumer_config(state.path());
        change(&mut config);
        cryptopulse::consumer::run(config, std::future::pending()).await.expect_err("other settings are refused").to_string()
    };
    let err = refused(&|c| c.window.rsi_period = 7).await;
    assert!(err.contains("rsi-period: stored 14, given 7") && err.contains("fresh --state-dir"), "{err}");
    let err = refused(&|c| {
        c.window.bar_ms = 2_000;
        c.window.vwap_ms = 10_000;
    })
    .await;
    assert!(err.contains("bar-ms: stored 1000, given 2000") && err.contains("vwap-ms: stored 5000, given 10000"), "{err}");

    let admin: AdminClient<DefaultClientContext> = lane.kafka.client_config().expect("config").create().expect("admin");
    let added =
        admin.create_partitions(&[NewPartitions::new(&lane.kafka.topic, 8)], &AdminOptions::new()).await.expect("create partitions");
    assert!(added.iter().all(Result::is_ok), "{added:?}");
    let err = refused(&|_| {}).await;
    assert!(err.contains("partitions: stored 6, given 8"), "{err}");

    assert_eq!(lane.digest().await.sha256, written.sha256, "nothing written by the refused runs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caseless_symbol_and_tens_of_billions_of_units_flow_exactly_also_through_record_and_replay() {
    let symbol = "币安人生USDT";
    let trade = |id: i64, price: &str, qty: &str, time: i64| {
        format!(r#"{{"e":"trade","E":{time},"s":"{symbol}","t":{id},"p":"{price}","q":"{qty}","T":{time},"m":false}}"#)
    };
    let trades = [
        trade(1, "0.00000123", "25000000000.5", 1_723_161_255_100),
        trade(2, "0.00000125", "1000000000000", 1_723_161_255_900),
        trade(3, "0.00000124", "1", 1_723_161_256_100),
    ];
    let direct = Lane::new("wide");
    direct.kafka.ensure_topics().await.expect("topics");
    direct.produce(symbol, &trades.each_ref().map(String::as_str)).await;
    let summary = direct.consume(tempfile::tempdir().expect("tempdir").path()).await;
    assert_eq!((summary.counts.applied, summary.counts.rejected, summary.counts.bars), (3, 0, 1), "{summary:?}");
    let mut redis = direct.redis().await;
    let latest: HashMap<String, String> = redis.hgetall(direct.keys().latest(symbol)).await.expect("latest hash");
    // Σq = 1,025,000,000,000.5; Σp·q = 1,280,750.000000615 exactly; the
    // VWAP is the float nearest to their quotient (Python's Fraction).
    assert_eq!(latest["volume"], "1025000000000.50000000");
    assert_eq!((latest["close"].as_str(), latest["trades"].as_str(), latest["window_end"].as_str()), ("0.00000125", "2", "1723161256000"));
    assert_eq!((latest["buy_volume"].as_str(), latest["sell_volume"].as_str()), ("1025000000000.50000000", "0.00000000"));
    assert_eq!(latest["vwap_1s"].parse::<f64>(), Ok(1.2495121951219418e-06));
    let symbols: Vec<String> = redis.smembers(format!("{}:symbols", direct.redis.target.prefix)).await.expect("symbols");
    assert_eq!(symbols, [symbol]);

    // The same frames recorded to Parquet and replayed: the same Redis.
    let dir = tempfile::tempdir().expect("tempdir");
    let frames = dir.path().join("wide.txt");
    let lines: Vec<String> = trades.iter().map(|t| format!(r#"{{"stream":"币安人生usdt@trade","data":{t}}}"#)).collect();
    std::fs::write(&frames, lines.join("\n")).expect("frames");
    let recorded = cryptopulse::record::record_frames(&[frames], &dir.path().join("out")).expect("record");
    assert_eq!((recorded[0].summary.rows, recorded[0].rejected, recorded[0].summary.symbols[symbol].count), (3, 0, 3));
    let replayed = Lane::new("wide-replayed");
    let options = ReplayOptions {
        files: vec![recorded[0].output.clone()],
        speed: Speed::Max,
        symbols: None,
        from_ms: None,
        to_ms: None,
        progress: false,
    };
    assert_eq!(replay::run(&replayed.kafka, options).await.expect("replay").trades, 3);
    replayed.consume(tempfile::tempdir().expect("tempdir").path()).await;
    assert_eq!(replayed.digest().await.sha256, direct.digest().await.sha256);

    // The same frames from the fake Binance through the producer: its
    // subscription names the stream in the symbol's own letters.
    let fake = crate::fake_binance::FakeBinance::start_with(&lines, 100).await;
    let live = Lane::new("wide-live");
    let produced = crate::producer::run(&fake, &live, crate::producer::config(&fake, &live)).await;
    assert_eq!((produced.published, produced.dead_letters), (3, 0), "{produced}");
    assert_eq!(fake.seen().streams, ["币安人生usdt@trade"], "{:?}", fake.seen());
    live.consume(tempfile::tempdir().expect("tempdir").path()).await;
    assert_eq!(live.digest().await.sha256, direct.digest().await.sha256);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symbols_off_the_list_are_dead_letters_and_the_others_exact() {
    let clean = Lane::new("allow-clean");
    clean.replay(None, None).await;
    clean.consume(tempfile::tempdir().expect("tempdir").path()).await;
    let lane = Lane::new("allow");
    lane.replay(None, None).await;
    let mut config = lane.consumer_config(tempfile::tempdir().expect("tempdir").path());
    config.symbols = Some(["BTCUSDT".to_owned()].into());
    let summary = cryptopulse::consumer::run(config, std::future::pending()).await.expect("consumer");
    // The fixtures hold 9,757 BTCUSDT and 6,106 ETHUSDT trades.
    assert_eq!((summary.counts.applied, summary.counts.rejected), (9_757, 6_106), "{summary:?}");
    let (mut want, mut got) = (clean.redis().await, lane.redis().await);
    for (theirs, ours) in
        [(clean.keys().latest("BTCUSDT"), lane.keys().latest("BTCUSDT")), (clean.keys().bars("BTCUSDT"), lane.keys().bars("BTCUSDT"))]
    {
        let dump = async |conn: &mut redis::aio::ConnectionManager, key: &str| -> Vec<u8> {
            redis::cmd("DUMP").arg(key).query_async(conn).await.expect("dump")
        };
        assert_eq!(dump(&mut got, &ours).await, dump(&mut want, &theirs).await, "{ours}");
    }
    let symbols: Vec<String> = got.smembers(format!("{}:symbols", lane.redis.target.prefix)).await.expect("symbols");
    assert_eq!(symbols, ["BTCUSDT"]);
    let letters = lane.dead_letters(6_106);
    assert_eq!(letters.len(), 6_106);
    assert!(letters.iter().all(|l| header(l, "reason") == Some("unknown_symbol")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_holds_at_most_max_symbols_and_a_restart_admits_the_same() {
    let lane = Lane::new("max-symbols");
    lane.kafka.ensure_topics().await.expect("topics");
    let trade = |symbol: &str, id: i64, time: i64| {
        format!(r#"{{"e":"trade","E":1,"s":"{symbol}","t":{id},"p":"1.5","q":"2","T":{time},"m":false}}"#)
    };
    let symbols: Vec<String> = (0..40).map(|i| format!("S{i}USDT")).collect();
    let producer: FutureProducer = lane.kafka.producer_config().expect("producer config").create().expect("producer");
    let send = async |id: i64, time: i64| {
        for symbol in &symbols {
            let payload = trade(symbol, id, time);
            let record = FutureRecord::to(&lane.kafka.topic).key(symbol.as_str()).payload(payload.as_str());
            producer.send(record, Duration::from_secs(30)).await.map_err(|(e, _)| e).expect("send");
        }
    };
    send(1, 1_723_161_255_000).await;
    send(2, 1_723_161_256_500).await;
    let state = tempfile::tempdir().expect("tempdir");
    let mut config = lane.consumer_config(state.path());
    config.max_symbols = 2;
    let first = cryptopulse::consumer::run(config.clone(), std::future::pending()).await.expect("consumer");
    // Six partitions, at most two symbols each; every trade accounted for.
    let admitted = (first.counts.applied / 2) as usize;
    assert!((1..=12).contains(&admitted), "{first:?}");
    assert_eq!((first.counts.applied + first.counts.rejected, first.counts.bars), (80, admitted as u64), "{first:?}");
    let mut redis = lane.redis().await;
    let held: Vec<String> = redis.smembers(format!("{}:symbols", lane.redis.target.prefix)).await.expect("symbols");
    assert_eq!(held.len(), admitted);
    let letters = lane.dead_letters(80 - 2 * admitted);
    assert!(letters.len() == 80 - 2 * admitted && letters.iter().all(|l| header(l, "reason") == Some("too_many_symbols")));

    // After a restart the same symbols are in, the others still out.
    send(3, 1_723_161_258_000).await;
    let second = cryptopulse::consumer::run(config, std::future::pending()).await.expect("consumer");
    assert_eq!((second.counts.applied, second.counts.rejected), (first.counts.applied + admitted as u64, 120 - 3 * admitted as u64));
    let again: Vec<String> = redis.smembers(format!("{}:symbols", lane.redis.target.prefix)).await.expect("symbols");
    assert_eq!(again.iter().collect::<std::collections::BTreeSet<_>>(), held.iter().collect());
}

/// The randomized run (`hostile`) on a lane of its own, with a fixed seed
/// and every mutation: it exits 0, its report accounts for every record
/// (applied + duplicates + dead letters = produced, every clean trade
/// applied) and the Redis of the mixed input equals the clean run's.
#[test]
fn the_randomized_run_accounts_for_every_record_and_leaves_the_clean_bars() {
    let lane = Lane::new("hostile-run");
    let work = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_hostile"))
        .args(["--brokers", &lane.kafka.brokers, "--topic", &lane.kafka.topic, "--dlq-topic", &lane.kafka.dlq_topic])
        .args(["--redis-prefix", &lane.name, "--mutants", "600", "--seed", "18", "--json"])
        .arg("--work-dir")
        .arg(work.path())
        .env("CRYPTOPULSE_HOSTILE_CONSUMER_BIN", env!("CARGO_BIN_EXE_consumer"))
        .output()
        .expect("hostile");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or_default()).expect("one JSON report");
    let number = |path: &[&str]| path.iter().fold(&report, |v, key| &v[key]).as_u64().unwrap_or_else(|| panic!("{path:?} in {report}"));
    assert_eq!(number(&["clean"]), fixture::TRADES);
    assert_eq!(number(&["produced"]), fixture::TRADES + 600);
    let mutants = report["mutants"].as_object().unwrap();
    assert_eq!(mutants.len(), cryptopulse::tooling::hostile::Mutation::ALL.len(), "every mutation drawn: {report}");
    let dead: u64 = report["dead_letters"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(number(&["hostile", "applied"]), fixture::TRADES);
    assert_eq!(number(&["hostile", "applied"]) + number(&["hostile", "duplicates"]) + dead, number(&["produced"]));
    assert_eq!(number(&["hostile", "bars"]), fixture::BARS);
    assert_eq!(report["digest"], report["clean_digest"]);
    assert!(report["failures"].as_array().unwrap().is_empty(), "{report}");
    for reason in ["malformed_json", "bad_time", "unknown_symbol"] {
        assert!(report["dead_letters"][reason].as_u64().unwrap_or(0) > 0, "no {reason} dead letter: {report}");
    }
}
