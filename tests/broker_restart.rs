//! The local Kafka broker killed with SIGKILL and restarted while trades
//! stream through: producer and consumer ride it out and Redis ends as in an
//! undisturbed run. Its own test binary, so no other test runs while the
//! broker is down; it needs the broker of `scripts/services`.

// The helpers of the integration tests (`tests/it/`); this test uses few of them.
#[allow(dead_code)]
#[path = "it/common/mod.rs"]
mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::fixture::{ARCHIVE, TRADES};
use common::{wait_for, Lane};
use cryptopulse::replay::{self, ReplayOptions, Speed};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_and_restarted_mid_run_ends_identical() {
    let want = Lane::undisturbed("steady").await;

    let lane = Lane::new("restart");
    lane.kafka.ensure_topics().await.unwrap();
    let state = tempfile::tempdir().unwrap();
    let consumer = lane.spawn_consumer(state.path());
    // 346 s of trades at 15x: the broker dies a few seconds in.
    let options = ReplayOptions {
        files: vec![PathBuf::from(ARCHIVE)],
        speed: Speed::Factor(15.0),
        symbols: None,
        from_ms: None,
        to_ms: None,
        progress: false,
    };
    let kafka = lane.kafka.clone();
    let replaying = tokio::spawn(async move { replay::run(&kafka, options).await });
    tokio::time::sleep(Duration::from_secs(6)).await;
    let restart = tokio::task::spawn_blocking(|| std::process::Command::new("scripts/services").args(["kafka-restart", "--kill"]).status())
        .await
        .unwrap()
        .unwrap();
    assert!(restart.success(), "scripts/services kafka-restart --kill failed");
    assert!(!consumer.is_finished(), "the consumer must ride out the restart");

    assert_eq!(replaying.await.unwrap().expect("replay survives the restart").trades, TRADES);
    wait_for(|| async { lane.digest().await.sha256 == want.sha256 }).await;
    let summary = consumer.stop().await;
    assert_eq!((summary.counts.applied, summary.counts.duplicates), (TRADES, 0));
    assert_eq!(lane.digest().await.dump, want.dump);
}
