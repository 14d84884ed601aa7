//! `scripts/services clean-tests` against the running broker and Redis: it
//! deletes the topics and Redis keys of lanes whose test process has ended,
//! and keeps those of a process still running (this one).

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use common::{wait_for, Lane};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use redis::AsyncCommands;

/// A lane named as `Lane::new` names one, but for process `pid`.
fn lane_of_process(pid: u32) -> Lane {
    let mut lane = Lane::new("clean");
    let own = lane.name.clone();
    lane.name = own.replacen(&format!("-{}-", std::process::id()), &format!("-{pid}-"), 1);
    assert_ne!(lane.name, own, "the lane name carries the process id");
    lane.kafka.topic = format!("{}.raw", lane.name);
    lane.kafka.dlq_topic = format!("{}.dlq", lane.name);
    lane.redis.target.prefix = lane.name.clone();
    lane
}

/// The id of a process that has ended.
fn ended_process() -> u32 {
    let mut child = Command::new("true").spawn().expect("spawn true");
    child.wait().expect("wait");
    child.id()
}

fn topics(brokers: &str) -> BTreeSet<String> {
    let consumer: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers).create().expect("consumer");
    let metadata = consumer.fetch_metadata(None, Duration::from_secs(10)).expect("metadata");
    metadata.topics().iter().map(|t| t.name().to_owned()).collect()
}

/// Creates the lane's topics, and Redis keys under its prefix and under a
/// suffixed prefix (`Lane::with_prefix`).
async fn populate(lane: &Lane) -> Vec<String> {
    lane.kafka.ensure_topics().await.expect("topics");
    let keys = vec![format!("{}:latest:BTCUSDT", lane.name), format!("{}:symbols", lane.with_prefix("again").redis.target.prefix)];
    let mut redis = lane.redis().await;
    for key in &keys {
        let () = redis.set(key, "x").await.expect("set");
    }
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_tests_deletes_only_the_lanes_of_ended_processes() {
    let (ended, running) = (lane_of_process(ended_process()), Lane::new("clean"));
    let ended_keys = populate(&ended).await;
    let running_keys = populate(&running).await;
    let brokers = running.kafka.brokers.clone();
    let present = topics(&brokers);
    for topic in [&ended.kafka.topic, &ended.kafka.dlq_topic, &running.kafka.topic] {
        assert!(present.contains(topic), "{topic} was created");
    }

    let status = Command::new("scripts/services").arg("clean-tests").status().expect("scripts/services");
    assert!(status.success(), "clean-tests failed: {status}");

    // The broker deletes topics in the background: wait until they are gone.
    let gone = [ended.kafka.topic.clone(), ended.kafka.dlq_topic.clone()];
    wait_for(|| {
        let done = !topics(&brokers).iter().any(|t| gone.contains(t));
        async move { done }
    })
    .await;
    let present = topics(&brokers);
    assert!(present.contains(&running.kafka.topic) && present.contains(&running.kafka.dlq_topic), "a running test's topics stay");
    let mut redis = running.redis().await;
    for key in &ended_keys {
        assert!(!redis.exists::<_, bool>(key).await.expect("exists"), "{key} of an ended run is deleted");
    }
    for key in &running_keys {
        assert!(redis.exists::<_, bool>(key).await.expect("exists"), "{key} of a running test stays");
    }
}
