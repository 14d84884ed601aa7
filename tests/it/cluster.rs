//! The consumer against a Redis Cluster of three primaries started by
//! `scripts/redis-cluster` (`redis+cluster://` URLs): Redis holds what one
//! Redis holds after the same run, read back from every primary; a symbol
//! whose keys were lost on its node is found and written again.

use cryptopulse::sink::{self, RedisConn};
use cryptopulse::tooling::digest::{self, Digest};
use redis::AsyncCommands;

use crate::common::Lane;

fn cluster_url() -> String {
    std::env::var("CRYPTOPULSE_REDIS_CLUSTER_URL")
        .expect("CRYPTOPULSE_REDIS_CLUSTER_URL is not set: run the tests with scripts/test, which starts scripts/redis-cluster")
}

async fn digest_of(conn: &mut RedisConn, lane: &Lane) -> Digest {
    digest::digest_any(conn, &lane.redis.target.prefix).await.expect("digest")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_holds_what_one_redis_holds_and_repairs_a_lost_symbol() {
    let expected = Lane::undisturbed("cluster-single").await;
    let mut lane = Lane::new("cluster");
    lane.redis.target.url = cluster_url();
    lane.replay(None, None).await;
    let state = tempfile::tempdir().expect("tempdir");
    lane.consume(state.path()).await;
    let mut conn = sink::connect_any(&lane.redis.target.url).await.expect("cluster");
    let written = digest_of(&mut conn, &lane).await;
    assert_eq!((written.sha256.as_str(), written.keys), (expected.sha256.as_str(), expected.keys), "the cluster differs from one Redis");

    // The two symbols' keys, the symbols set and the layout key are spread
    // over the primaries: the digest read more than one node.
    let keys = lane.keys();
    let slots: std::collections::BTreeSet<u16> = [keys.latest("BTCUSDT"), keys.latest("ETHUSDT"), keys.symbols(), keys.layout()]
        .iter()
        .map(|key| sink::slot_of(key.as_bytes()) / 5462)
        .collect();
    assert!(slots.len() >= 2, "all keys on one primary's range: {slots:?}");

    // One symbol's latest hash lost on its node: the next run names it,
    // writes its history again and ends where one Redis ends.
    let _: () = conn.del(keys.latest("ETHUSDT")).await.expect("del");
    let summary = lane.consume(state.path()).await;
    assert_eq!(summary.rebuilds, 1, "{summary:?}");
    assert_eq!(digest_of(&mut conn, &lane).await.sha256, expected.sha256);

    // `latest` and `digest` read the cluster too.
    let latest = std::process::Command::new(env!("CARGO_BIN_EXE_latest"))
        .args(["--redis-prefix", &lane.name])
        .env("CRYPTOPULSE_REDIS_URL", &lane.redis.target.url)
        .output()
        .expect("latest");
    let shown = String::from_utf8_lossy(&latest.stdout);
    assert!(latest.status.success() && shown.contains("BTCUSDT") && shown.contains("ETHUSDT"), "{shown}");
    let digest = std::process::Command::new(env!("CARGO_BIN_EXE_digest"))
        .args(["--redis-prefix", &lane.name])
        .env("CRYPTOPULSE_REDIS_URL", &lane.redis.target.url)
        .output()
        .expect("digest");
    assert!(String::from_utf8_lossy(&digest.stdout).starts_with(&expected.sha256), "{}", String::from_utf8_lossy(&digest.stdout));
}
