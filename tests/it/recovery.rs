//! The consumer's answers to a broken world: a checkpoint the broker cannot
//! serve, a second consumer on the same state, and Redis that stops
//! answering for a while (a private redis-server, paused with SIGSTOP).

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cryptopulse::checkpoint::{CheckpointStore, PartitionCheckpoint};
use cryptopulse::consumer;

use crate::common::fixture::{self, TRADES};
use crate::common::{wait_for, Lane};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_the_broker_cannot_serve_is_a_clear_error() {
    let lane = Lane::new("range");
    lane.replay(None, None).await;
    let state = tempfile::tempdir().unwrap();
    {
        let store = CheckpointStore::open(state.path(), &lane.kafka.topic).unwrap();
        store.save([(2, &PartitionCheckpoint { next_offset: 1_000_000, ..Default::default() })]).unwrap();
    }
    let err = consumer::run(lane.consumer_config(state.path()), std::future::pending()).await.unwrap_err().to_string();
    assert!(err.contains("checkpointed offset 1000000") && err.contains("is not on the broker"), "{err}");
    // Nothing was written.
    assert_eq!(lane.digest().await.keys, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_consumer_on_the_same_state_dir_is_refused() {
    let lane = Lane::new("owner");
    lane.replay(None, None).await;
    let state = tempfile::tempdir().unwrap();
    let first = lane.spawn_consumer(state.path());
    // Wait until the first consumer holds the store (it has written bars).
    wait_for(|| async { lane.digest().await.keys > 0 }).await;
    let err = consumer::run(lane.consumer_config(state.path()), std::future::pending()).await.unwrap_err().to_string();
    assert!(err.contains("in use by another consumer"), "{err}");
    // The first one was not disturbed: it stops cleanly, and its state
    // carries a later run to the end of the topic.
    first.stop().await;
    let summary = lane.consume(state.path()).await;
    assert_eq!(summary.counts.applied, TRADES);
}

/// A redis-server of this test's own, on a free loopback port.
struct PrivateRedis {
    child: Child,
    url: String,
}

impl PrivateRedis {
    fn start() -> Self {
        // The listener is dropped at the end of this statement, freeing the port.
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        Self::start_on(port)
    }

    fn start_on(port: u16) -> Self {
        let mut child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (installed by scripts/services)");
        let url = format!("redis://127.0.0.1:{port}");
        for _ in 0..100 {
            if redis::Client::open(url.as_str()).unwrap().get_connection().is_ok() {
                return PrivateRedis { child, url };
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("redis-server on {port} did not start");
    }

    fn port(&self) -> u16 {
        self.url.rsplit(':').next().unwrap().parse().unwrap()
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill").args([signal, &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.signal("-CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_paused_30_s_mid_run_ends_identical_to_an_undisturbed_run() {
    let want = Lane::undisturbed("calm").await;

    let redis = PrivateRedis::start();
    let mut lane = Lane::new("paused");
    lane.redis.target.url = redis.url.clone();
    lane.kafka.ensure_topics().await.unwrap();
    let state = tempfile::tempdir().unwrap();
    let consumer = lane.spawn_consumer(state.path());
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Redis stops answering while the trades arrive: writes time out and
    // are retried with backoff, and nothing is checkpointed past them.
    redis.signal("-STOP");
    lane.replay(None, None).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(!consumer.is_finished(), "the consumer must wait for Redis, not stop");
    redis.signal("-CONT");
    wait_for(|| async { lane.digest().await.sha256 == want.sha256 }).await;
    let summary = consumer.stop().await;
    assert_eq!(summary.counts.applied, TRADES);
    assert_eq!(lane.digest().await.dump, want.dump);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_is_detected_and_rebuilt_from_the_topic() {
    let want = Lane::undisturbed("whole").await;

    let redis = PrivateRedis::start();
    let port = redis.port();
    let mut lane = Lane::new("amnesia");
    lane.redis.target.url = redis.url.clone();
    lane.replay(None, Some(fixture::MIDDLE_MS)).await;
    let state = tempfile::tempdir().unwrap();
    let consumer = lane.spawn_consumer(state.path());
    // The first half is in Redis; then Redis dies and comes back empty.
    wait_for(|| async { lane.digest().await.keys == fixture::KEYS }).await;
    drop(redis);
    let _redis = PrivateRedis::start_on(port);
    lane.replay(Some(fixture::MIDDLE_MS), None).await;
    wait_for(|| async { lane.digest().await.sha256 == want.sha256 }).await;
    let summary = consumer.stop().await;
    assert_eq!(summary.rebuilds, 1);
    assert_eq!(summary.counts.applied, TRADES);
    assert_eq!(lane.digest().await.dump, want.dump);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_damaged_by_hand_mid_run_are_repaired_per_symbol() {
    let want = Lane::undisturbed("intact").await;

    let lane = Lane::new("damaged");
    lane.replay(None, Some(fixture::MIDDLE_MS)).await;
    let state = tempfile::tempdir().unwrap();
    let consumer = lane.spawn_consumer(state.path());
    wait_for(|| async { lane.digest().await.keys == fixture::KEYS }).await;
    // One symbol's latest hash deleted and the other's stream trimmed, at
    // once: an eviction, a failover or a hand edit.
    let keys = lane.keys();
    let mut conn = lane.redis().await;
    let () = redis::pipe()
        .atomic()
        .cmd("DEL")
        .arg(keys.latest("BTCUSDT"))
        .ignore()
        .cmd("XTRIM")
        .arg(keys.bars("ETHUSDT"))
        .arg("MAXLEN")
        .arg(3)
        .ignore()
        .query_async(&mut conn)
        .await
        .unwrap();
    lane.replay(Some(fixture::MIDDLE_MS), None).await;
    wait_for(|| async { lane.digest().await.sha256 == want.sha256 }).await;
    let summary = consumer.stop().await;
    assert_eq!(summary.rebuilds, 1, "both symbols found and rewound together");
    assert_eq!(summary.counts.applied, TRADES);
    assert_eq!(lane.digest().await.dump, want.dump);
}
