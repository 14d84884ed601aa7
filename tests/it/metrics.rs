//! `--metrics-addr` end to end: the consumer binary reads a topic filled by
//! a replay of the fixtures (plus duplicates and one malformed record), a
//! real Prometheus scrapes it and the producer binary, and what Prometheus
//! stored is read back through its query API and compared with the run.

use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use cryptopulse::telemetry;

use crate::common::prometheus::{free_addr, spawn_consumer, Killed, Prometheus};
use crate::common::{fixture, wait_for, Lane};

const FIXTURE_TRADES: f64 = fixture::TRADES as f64;
const FIXTURE_BARS: f64 = fixture::BARS as f64;
/// The fixtures' second minute again: every one of its trades a duplicate.
const AGAIN_FROM_MS: i64 = 1_723_161_300_000;
const AGAIN_TO_MS: i64 = 1_723_161_360_000;
/// The fixtures' trades with `AGAIN_FROM_MS <= T < AGAIN_TO_MS` (1,255
/// BTCUSDT, 1,029 ETHUSDT).
const AGAIN_TRADES: f64 = 2_284.0;

fn now_secs() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// The producer binary with metrics on `addr`, against a WebSocket port
/// nothing listens on: it keeps reconnecting and keeps serving metrics.
fn spawn_producer(lane: &Lane, addr: std::net::SocketAddr) -> Killed {
    let child = Command::new(env!("CARGO_BIN_EXE_producer"))
        // Its own topics: on the lane's replayed topic it would first try to
        // backfill from Binance's REST endpoint, which is out of reach here.
        .args(["--brokers", &lane.kafka.brokers, "--topic", &lane.topic("produced")])
        .args(["--dlq-topic", &lane.topic("produced-dlq"), "--gaps-topic", &lane.topic("gaps")])
        .args(["--ws-url", &format!("ws://{}", free_addr()), "--metrics-addr", &addr.to_string()])
        .env("RUST_LOG", "warn,cryptopulse::producer=error")
        .stdout(Stdio::null())
        .spawn()
        .expect("producer binary");
    Killed(child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_what_the_consumer_did() {
    let lane = Lane::new("metrics");
    let trades = lane.replay(None, None).await.trades as f64;
    assert_eq!(trades, FIXTURE_TRADES);
    let duplicates = lane.replay(Some(AGAIN_FROM_MS), Some(AGAIN_TO_MS)).await.trades as f64;
    assert_eq!(duplicates, AGAIN_TRADES);
    lane.produce("BTCUSDT", &[r#"{"e":"trade","s":"BTCUSDT","t":1"#]).await;

    let (consumer_addr, producer_addr) = (free_addr(), free_addr());
    let state = tempfile::tempdir().unwrap();
    let _consumer = spawn_consumer(&lane, state.path(), consumer_addr);
    let _producer = spawn_producer(&lane, producer_addr);
    let prometheus = Prometheus::start(&[("consumer", consumer_addr), ("producer", producer_addr)]);

    // Done when Redis holds every bar; then wait for two scrapes after that.
    let conn = lane.redis().await;
    let keys = lane.keys();
    wait_for(|| {
        let (mut conn, keys) = (conn.clone(), keys.clone());
        async move {
            let mut bars = 0;
            for symbol in ["BTCUSDT", "ETHUSDT"] {
                bars += redis::cmd("XLEN").arg(keys.bars(symbol)).query_async::<u64>(&mut conn).await.unwrap_or(0);
            }
            bars == FIXTURE_BARS as u64
        }
    })
    .await;
    // Prometheus may add the second job's target one discovery round (5 s) after the first.
    let done = now_secs() + 2.5;
    wait_for(|| {
        let scrapes = prometheus.query("timestamp(up)");
        async move { scrapes.len() == 2 && scrapes.iter().all(|(_, at)| *at > done) }
    })
    .await;

    let consumer = |name: &str| prometheus.value(&format!(r#"sum({name}{{job="consumer"}})"#));
    assert_eq!(prometheus.value(r#"up{job="consumer"}"#), 1.0);
    assert_eq!(prometheus.value(r#"up{job="producer"}"#), 1.0, "the producer's /metrics is scraped");
    let builds = prometheus.query(telemetry::BUILD_INFO);
    let services: Vec<&str> = builds.iter().filter_map(|(labels, _)| labels["service"].as_str()).collect();
    assert!(services.contains(&"consumer") && services.contains(&"producer"), "{builds:?}");
    assert!(builds.iter().all(|(labels, v)| *v == 1.0 && labels["version"] == env!("CARGO_PKG_VERSION")), "{builds:?}");
    // The writer's queue was written to, and is at most its length.
    let queued = prometheus.value(&format!(r#"{}{{job="consumer"}}"#, telemetry::WRITER_QUEUE));
    assert!((0.0..=16.0).contains(&queued), "{queued}");
    // Nothing listens where the producer connects: it keeps reconnecting.
    assert!(prometheus.value(&format!(r#"sum({}{{job="producer"}})"#, telemetry::WS_RECONNECTS)) >= 1.0);
    assert_eq!(consumer(telemetry::CONSUMER_RECORDS), FIXTURE_TRADES + duplicates + 1.0);
    assert_eq!(consumer(telemetry::CONSUMER_TRADES_APPLIED), FIXTURE_TRADES);
    assert_eq!(consumer(telemetry::DUPLICATES), duplicates);
    assert_eq!(consumer(telemetry::LATE_TRADES), 0.0);
    assert_eq!(consumer(telemetry::BARS_WRITTEN), FIXTURE_BARS);
    let letters = prometheus.query(&format!(r#"{}{{job="consumer"}}"#, telemetry::DEAD_LETTERS));
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!((letters[0].0["reason"].as_str(), letters[0].1), (Some("malformed_json"), 1.0));

    // Every partition read to its end.
    let lag = prometheus.query(&format!(r#"{}{{job="consumer"}}"#, telemetry::CONSUMER_LAG));
    assert_eq!(lag.len(), 6, "one lag series per partition: {lag:?}");
    assert!(lag.iter().all(|(_, v)| *v == 0.0), "{lag:?}");

    // Real histograms: every bound of LATENCY_BUCKETS and +Inf, one observation per bar.
    for name in [telemetry::BAR_LATENCY_SECONDS, telemetry::TRADE_TO_REDIS_SECONDS] {
        assert_eq!(consumer(&format!("{name}_count")), FIXTURE_BARS, "{name}");
        let buckets = prometheus.query(&format!(r#"{name}_bucket{{job="consumer"}}"#));
        assert_eq!(buckets.len(), telemetry::LATENCY_BUCKETS.len() + 1, "{name}");
    }
    for name in [telemetry::CHECKPOINT_SECONDS, telemetry::REDIS_WRITE_SECONDS] {
        assert!(consumer(&format!("{name}_count")) > 0.0, "{name}");
    }
    // The fixtures are from 2024: every bar is older than a minute, so each
    // trade-to-Redis observation is in the +Inf bucket only.
    let within_a_minute = prometheus.value(&format!(r#"sum({}_bucket{{job="consumer",le="60"}})"#, telemetry::TRADE_TO_REDIS_SECONDS));
    assert_eq!(within_a_minute, 0.0);
    let p99 = prometheus
        .value(&format!(r#"histogram_quantile(0.99, sum by (le) ({}_bucket{{job="consumer"}}))"#, telemetry::BAR_LATENCY_SECONDS));
    assert!(p99 > 0.0 && p99.is_finite(), "bar latency p99 {p99}");
}

#[test]
fn a_metrics_port_in_use_stops_either_service_with_the_address_in_the_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let state = tempfile::tempdir().unwrap();
    let state_dir = format!("--state-dir={}", state.path().display());
    for (binary, extra) in [(env!("CARGO_BIN_EXE_consumer"), Some(state_dir.as_str())), (env!("CARGO_BIN_EXE_producer"), None)] {
        // Nothing listens on the broker port either: were the exporter not
        // the first thing to fail, the service would stop on that instead.
        let output = Command::new(binary)
            .args(["--metrics-addr", &addr, "--brokers", &free_addr().to_string()])
            .args(extra)
            .output()
            .expect("binary");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{binary}: {stderr}");
        assert!(stderr.contains(&format!("metrics on {addr}")), "{binary}: {stderr}");
    }
}
