//! The pipeline end to end through the real broker and Redis: replay the
//! fixtures, consume them to the end, and read back what Redis holds.

use std::collections::{BTreeMap, HashMap};

use redis::AsyncCommands;

use crate::common::fixture::{self, BARS, EXPECTED, TRADES};
use crate::common::{wait_for, Lane};

fn expected_bars() -> Vec<serde_json::Value> {
    std::fs::read_to_string(EXPECTED).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn text(v: &serde_json::Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_owned)
}

fn same_number(got: &str, want: &str, what: &str) {
    let (g, w): (f64, f64) = (got.parse().unwrap(), want.parse().unwrap());
    assert!(((g - w) / w).abs() < 1e-9 || g == w, "{what}: redis has {got}, expected {want}");
}

/// Every expected bar is in the stream, the sorted sets and (the newest) the hash.
async fn assert_redis_matches_expected(lane: &Lane) {
    let mut conn = lane.redis().await;
    let prefix = &lane.redis.target.prefix;
    let expected = expected_bars();
    let symbols: Vec<String> = conn.smembers(format!("{prefix}:symbols")).await.unwrap();
    let mut symbols = symbols;
    symbols.sort();
    assert_eq!(symbols, vec!["BTCUSDT", "ETHUSDT"]);
    let mut newest: BTreeMap<String, &serde_json::Value> = BTreeMap::new();
    for row in &expected {
        let (symbol, end) = (row["symbol"].as_str().unwrap(), row["window_end"].as_i64().unwrap());
        let id = format!("{end}-0");
        let entries: redis::streams::StreamRangeReply = conn.xrange(format!("{prefix}:bars:{{{symbol}}}"), &id, &id).await.unwrap();
        assert_eq!(entries.ids.len(), 1, "stream entry {symbol} {id}");
        let fields: HashMap<String, String> =
            entries.ids[0].map.iter().map(|(k, v)| (k.clone(), redis::from_redis_value(v).unwrap())).collect();
        for exact in ["close", "volume", "buy_volume", "sell_volume", "trades"] {
            same_number(&fields[exact], &text(&row[exact]), &format!("{symbol} {end} {exact}"));
        }
        for float in ["vwap_1s", "vwap_5s", "rsi_14"] {
            match row.get(float) {
                Some(want) => same_number(&fields[float], &text(want), &format!("{symbol} {end} {float}")),
                None => assert!(!fields.contains_key(float), "{symbol} {end}: {float} must be absent"),
            }
        }
        let closes: Vec<String> = conn.zrangebyscore(format!("{prefix}:ts:{{{symbol}}}:close"), end, end).await.unwrap();
        assert_eq!(closes, vec![format!("{end}:{}", fields["close"])]);
        newest.insert(symbol.to_owned(), row);
    }
    for (symbol, row) in newest {
        let latest: HashMap<String, String> = conn.hgetall(format!("{prefix}:latest:{{{symbol}}}")).await.unwrap();
        assert_eq!(latest["window_end"], row["window_end"].to_string());
        same_number(&latest["vwap_5s"], &text(&row["vwap_5s"]), "latest vwap_5s");
        let count: usize = conn.xlen(format!("{prefix}:bars:{{{symbol}}}")).await.unwrap();
        assert_eq!(count, expected.iter().filter(|r| r["symbol"] == symbol).count());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_fixtures_land_in_redis_exactly_and_a_second_replay_changes_nothing() {
    let lane = Lane::new("e2e");
    let state = tempfile::tempdir().unwrap();
    assert_eq!(lane.replay(None, None).await.trades, TRADES);
    let first = lane.consume(state.path()).await;
    assert_eq!((first.counts.applied, first.counts.bars, first.counts.duplicates), (TRADES, BARS, 0));
    assert_redis_matches_expected(&lane).await;
    let before = lane.digest().await;
    // layout, symbols set, and per symbol: latest hash, stream, five sorted sets.
    assert_eq!(before.keys, fixture::KEYS);

    // The same trades again: the consumer resumes from its checkpoint and
    // drops every one as a duplicate; Redis stays byte for byte the same.
    lane.replay(None, None).await;
    let second = lane.consume(state.path()).await;
    assert_eq!(second.records, TRADES);
    assert_eq!(second.counts.duplicates, TRADES);
    let after = lane.digest().await;
    assert_eq!(after.dump, before.dump);
    assert_eq!(after.sha256, before.sha256);

    // A consumer without a checkpoint reads both copies in one go: same output.
    let fresh = lane.with_prefix("fresh");
    let fresh_state = tempfile::tempdir().unwrap();
    let run = fresh.consume(fresh_state.path()).await;
    assert_eq!((run.counts.applied, run.counts.duplicates), (TRADES, TRADES));
    assert_eq!(fresh.digest().await.sha256, before.sha256);
}

/// Records that must each end in the dead-letter topic with this reason.
fn malformed() -> Vec<(&'static str, String)> {
    let good = r#"{"e":"trade","E":1723161300000,"s":"BTCUSDT","t":3735700000,"p":"61800.00000000","q":"0.01000000","T":1723161300000,"m":true,"M":true}"#;
    vec![
        ("malformed_json", good[..60].to_string()),
        ("malformed_json", "this is not json".to_string()),
        ("bad_price", good.replace(r#""p":"61800.00000000""#, r#""p":"-1.5""#)),
        ("bad_price", good.replace(r#""p":"61800.00000000""#, r#""p":"NaN""#)),
        ("bad_qty", good.replace(r#""q":"0.01000000""#, r#""q":"0.00000000""#)),
        ("missing_field", good.replace(r#""T":1723161300000,"#, "")),
        ("wrong_event_type", good.replace(r#""e":"trade""#, r#""e":"aggTrade""#)),
        ("wrong_type", good.replace(r#""t":3735700000"#, r#""t":"3735700000""#)),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_late_records_go_to_dead_letters_and_change_nothing_else() {
    let clean = Lane::new("clean");
    clean.replay(None, None).await;
    clean.consume(tempfile::tempdir().unwrap().path()).await;

    let dirty = Lane::new("dirty");
    dirty.replay(None, Some(fixture::MIDDLE_MS)).await;
    let bad = malformed();
    // Keyed like real trades so they land in the partitions the trades use.
    dirty.produce("BTCUSDT", &bad.iter().map(|(_, p)| p.as_str()).collect::<Vec<_>>()).await;
    dirty.produce("ETHUSDT", &[&bad[1].1]).await;
    dirty.replay(Some(fixture::MIDDLE_MS), None).await;
    // After everything: a trade with a new id for a second long final (late),
    // and a copy of a trade already applied (duplicate).
    let late = r#"{"e":"trade","E":1723161256100,"s":"BTCUSDT","t":3735800000,"p":"61800.00000000","q":"0.01000000","T":1723161256100,"m":false,"M":true}"#;
    let duplicate = r#"{"e":"trade","E":1723161255343,"s":"BTCUSDT","t":3735683259,"p":"61837.63000000","q":"0.02000000","T":1723161255342,"m":true,"M":true}"#;
    dirty.produce("BTCUSDT", &[late, duplicate]).await;

    let summary = dirty.consume(tempfile::tempdir().unwrap().path()).await;
    assert_eq!(summary.counts.rejected, bad.len() as u64 + 1);
    assert_eq!((summary.counts.late, summary.counts.duplicates, summary.counts.applied), (1, 1, TRADES));
    assert_eq!(dirty.digest().await.dump, clean.digest().await.dump, "good records give the same Redis contents");

    let letters = dirty.dead_letters(bad.len() + 2);
    let mut want: Vec<(String, String)> = bad.iter().map(|(reason, payload)| (reason.to_string(), payload.clone())).collect();
    want.push(("malformed_json".into(), bad[1].1.clone()));
    want.push(("late".into(), late.to_string()));
    let mut got: Vec<(String, String)> = Vec::new();
    for (headers, payload) in &letters {
        let header = |key: &str| headers.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone()).unwrap_or_default();
        assert_eq!(header("source.topic"), dirty.kafka.topic);
        assert!(header("source.offset").parse::<i64>().is_ok() && header("source.partition").parse::<i32>().is_ok(), "{headers:?}");
        assert!(!header("detail").is_empty());
        got.push((header("reason"), String::from_utf8(payload.clone()).unwrap()));
    }
    got.sort();
    want.sort();
    assert_eq!(got, want);
}

/// The consumer binary to the end of half the fixtures, stderr a pipe; its log.
async fn consumer_log(test: &str, extra: &[&str]) -> String {
    let lane = Lane::new(test);
    lane.replay(None, Some(fixture::MIDDLE_MS)).await;
    let state = tempfile::tempdir().expect("tempdir");
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_consumer"));
    command
        .args(["--exit-at-end", "--brokers", &lane.kafka.brokers, "--topic", &lane.kafka.topic, "--dlq-topic", &lane.kafka.dlq_topic])
        .args(["--redis-prefix", &lane.redis.target.prefix, "--group-id", &lane.name])
        .args(extra)
        .arg("--state-dir")
        .arg(state.path())
        .env("CRYPTOPULSE_REDIS_URL", &lane.redis.target.url)
        .env("RUST_LOG", "info")
        .env_remove("CRYPTOPULSE_LOG_FORMAT")
        .env_remove("NO_COLOR");
    let output = tokio::task::spawn_blocking(move || command.output()).await.expect("thread").expect("consumer");
    let log = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{log}");
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_logs_without_escape_codes_when_stderr_is_no_terminal() {
    let log = consumer_log("no-colour", &[]).await;
    assert!(log.contains(cryptopulse::consumer::ASSIGNED_LOG), "{log}");
    assert!(!log.contains('\x1b'), "escape codes in a log written to a pipe: {log:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_logs_json_lines_for_log_collectors() {
    let log = consumer_log("json-log", &["--log-format", "json"]).await;
    let lines: Vec<serde_json::Value> =
        log.lines().map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON object ({e}): {line}"))).collect();
    assert!(lines.len() >= 2, "{log}");
    for line in &lines {
        assert!(line["timestamp"].is_string() && line["level"].is_string() && line["message"].is_string(), "{line}");
    }
    let assigned = lines.iter().find(|l| l["message"] == cryptopulse::consumer::ASSIGNED_LOG).expect("the assignment line");
    assert_eq!(assigned["level"], "INFO");
    let stopped = lines.iter().find(|l| l["message"] == "consumer stopped").expect("the last line");
    assert!(stopped["records"].as_u64().is_some_and(|n| n > 0), "fields are JSON values: {stopped}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_consumer_logs_a_heartbeat_with_its_rates() {
    let lane = Lane::new("heartbeat");
    lane.replay(None, None).await;
    let state = tempfile::tempdir().expect("tempdir");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_consumer"))
        .args(["--brokers", &lane.kafka.brokers, "--topic", &lane.kafka.topic, "--dlq-topic", &lane.kafka.dlq_topic])
        .args(["--redis-prefix", &lane.redis.target.prefix, "--group-id", &lane.name, "--heartbeat-secs", "1", "--log-format", "json"])
        .arg("--state-dir")
        .arg(state.path())
        .env("CRYPTOPULSE_REDIS_URL", &lane.redis.target.url)
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("consumer");
    // Every trade read, then two more beats while idle.
    wait_for(|| async { lane.digest().await.keys == fixture::KEYS }).await;
    tokio::time::sleep(std::time::Duration::from_millis(2_500)).await;
    let status = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
    assert!(status.success());
    let output = tokio::task::spawn_blocking(move || child.wait_with_output()).await.expect("thread").expect("consumer");
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{log}");
    let beats: Vec<serde_json::Value> =
        log.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).filter(|l| l["message"] == "heartbeat").collect();
    assert!(beats.len() >= 2, "{log}");
    for beat in &beats {
        for field in ["records_per_s", "trades_per_s", "bars_per_s", "dead_letters"] {
            assert!(beat[field].as_f64().is_some_and(|v| v >= 0.0), "{field}: {beat}");
        }
        assert_eq!(beat["level"], "INFO");
    }
    // The last beat comes after the whole topic was read and nothing since.
    assert_eq!(beats.last().expect("a beat")["records_per_s"], 0.0, "{log}");
    let total: f64 = beats.iter().map(|b| b["records_per_s"].as_f64().unwrap_or(0.0)).sum();
    assert!(total > 0.0, "a beat while the fixtures were read counts them: {log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_json_gives_every_field_as_redis_holds_it() {
    let lane = Lane::new("latest-json");
    lane.replay(None, Some(fixture::MIDDLE_MS)).await;
    lane.consume(tempfile::tempdir().expect("tempdir").path()).await;
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_latest"))
        .args(["--redis-prefix", &lane.redis.target.prefix, "--json"])
        .env("CRYPTOPULSE_REDIS_URL", &lane.redis.target.url)
        .output()
        .expect("latest");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let rows: Vec<HashMap<String, String>> = serde_json::from_slice(&output.stdout).expect("a JSON array of objects of strings");
    let mut conn = lane.redis().await;
    assert_eq!(rows.iter().map(|r| r["symbol"].as_str()).collect::<Vec<_>>(), ["BTCUSDT", "ETHUSDT"]);
    for row in rows {
        let mut hash: HashMap<String, String> = conn.hgetall(lane.keys().latest(&row["symbol"])).await.expect("hash");
        hash.insert("symbol".into(), row["symbol"].clone());
        assert_eq!(row, hash);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_are_created_only_when_missing_and_never_with_no_create_topics() {
    let lane = Lane::new("no-create");
    let mut kafka = lane.kafka.clone();
    kafka.no_create_topics = true;
    let err = kafka.ensure_topics().await.expect_err("missing topics").to_string();
    assert!(err.contains(&lane.kafka.topic) && err.contains("--no-create-topics"), "{err}");
    let admin: rdkafka::consumer::BaseConsumer = lane.kafka.client_config().unwrap().create().unwrap();
    assert!(cryptopulse::kafka::partitions_of(&admin, &lane.kafka.topic).is_err(), "nothing created");

    // Once they exist, an account that may not create topics starts.
    lane.kafka.ensure_topics().await.expect("created");
    kafka.ensure_topics().await.expect("they exist: nothing to create");
    assert!(lane.replay(None, Some(fixture::MIDDLE_MS)).await.trades > 0);
    assert_eq!(cryptopulse::kafka::partitions_of(&admin, &lane.kafka.topic).unwrap().len(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_summary_is_one_json_object_with_json() {
    let lane = Lane::new("summary-json");
    lane.replay(None, Some(fixture::MIDDLE_MS)).await;
    let state = tempfile::tempdir().expect("tempdir");
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_consumer"));
    command
        .args([
            "--exit-at-end",
            "--json",
            "--brokers",
            &lane.kafka.brokers,
            "--topic",
            &lane.kafka.topic,
            "--dlq-topic",
            &lane.kafka.dlq_topic,
        ])
        .args(["--redis-prefix", &lane.redis.target.prefix, "--group-id", &lane.name])
        .arg("--state-dir")
        .arg(state.path())
        .env("CRYPTOPULSE_REDIS_URL", &lane.redis.target.url);
    let output = tokio::task::spawn_blocking(move || command.output()).await.expect("thread").expect("consumer");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).expect("one JSON object on stdout");
    let records = summary["records"].as_u64().expect("records");
    assert!(records > 0 && records < TRADES, "half the fixtures: {summary}");
    assert_eq!(summary["totals"]["applied"].as_u64(), Some(records), "{summary}");
    assert_eq!((summary["dead_letters"].as_u64(), summary["rebuilds"].as_u64()), (Some(0), Some(0)), "{summary}");
    assert!(summary["totals"]["bars"].as_u64().is_some_and(|bars| bars > 0 && bars < BARS), "{summary}");
}
