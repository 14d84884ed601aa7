//! `scripts/services clean-tests` against the running broker and Redis: it
//! deletes the topics and Redis keys of lanes whose test process has ended,
//! and keeps those of a process still running (this one). And the patterns
//! it matches lanes with, read from the script, against the names
//! `common::lane_name` and `Lane` make, so the two cannot drift apart.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use redis::AsyncCommands;

use regex::Regex;

use crate::common::{lane_name, wait_for, Lane};

const SCRIPT: &str = "scripts/services";

/// A lane named as `Lane::new` names one, but for process `pid`.
fn lane_of_process(pid: u32) -> Lane {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    Lane::named(lane_name("clean", pid, 0, nanos))
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
    let keys = vec![format!("{}:latest:{{BTCUSDT}}", lane.name), format!("{}:symbols", lane.with_prefix("again").redis.target.prefix)];
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

/// The patterns of `clean-tests`, as the script spells them: a lane name
/// (capturing its process id), a topic, a Redis key, and the expression it
/// deletes the topics of ended processes with (for Kafka, a whole-name match).
struct CleanPatterns {
    lane: Regex,
    topic: Regex,
    key: Regex,
    delete: String,
}

impl CleanPatterns {
    fn read() -> Self {
        let script = std::fs::read_to_string(SCRIPT).unwrap_or_else(|e| panic!("{SCRIPT}: {e}"));
        let lane_re = script
            .lines()
            .find_map(|line| line.strip_prefix("readonly LANE_RE='")?.strip_suffix('\''))
            .unwrap_or_else(|| panic!("{SCRIPT} sets no LANE_RE"));
        // `[[ $topic =~ <pattern> ]]`, with $LANE_RE put in as bash does.
        let tested = |variable: &str| {
            let start = format!("[[ ${variable} =~ ");
            let pattern = script
                .lines()
                .find_map(|line| line.trim().strip_prefix(start.as_str())?.split_once(" ]]").map(|(p, _)| p.to_owned()))
                .unwrap_or_else(|| panic!("{SCRIPT} tests no ${variable} against a pattern"));
            assert!(pattern.contains("$LANE_RE"), "{SCRIPT}: ${variable} is not matched with LANE_RE: {pattern}");
            Regex::new(&pattern.replace("$LANE_RE", lane_re)).unwrap_or_else(|e| panic!("{pattern}: {e}"))
        };
        let delete = script
            .lines()
            .find_map(|line| line.split_once("--delete --topic \"")?.1.split_once('"').map(|(p, _)| p.to_owned()))
            .unwrap_or_else(|| panic!("{SCRIPT} deletes no topics by pattern"));
        let lane = Regex::new(lane_re).unwrap_or_else(|e| panic!("LANE_RE {lane_re}: {e}"));
        CleanPatterns { lane, topic: tested("topic"), key: tested("key"), delete }
    }

    /// The process id `pattern` finds in `name`, if it matches.
    fn pid(pattern: &Regex, name: &str) -> Option<u32> {
        pattern.captures(name).map(|c| c[1].parse().unwrap_or_else(|e| panic!("{name}: {e}")))
    }

    /// Whether the topic deletion for ended processes `pids` takes `topic`.
    fn deletes(&self, pids: &[u32], topic: &str) -> bool {
        let alternatives = pids.iter().map(u32::to_string).collect::<Vec<_>>().join("|");
        let pattern = format!("^(?:{})$", self.delete.replace("$alternatives", &alternatives));
        Regex::new(&pattern).unwrap_or_else(|e| panic!("{pattern}: {e}")).is_match(topic)
    }
}

#[test]
fn lane_names_are_what_clean_tests_matches() {
    let patterns = CleanPatterns::read();
    let this = std::process::id();
    let tests = ["clean", "e2e", "record-topic", "doctor-no-topics", "sink-retention"];
    for (test, pid) in tests.iter().flat_map(|t| [(*t, 1), (*t, 4_194_304), (*t, this)]) {
        for (seq, nanos) in [(0, 0), (7, 5), (1_234, 999_999_999)] {
            let name = lane_name(test, pid, seq, nanos);
            assert_eq!(CleanPatterns::pid(&patterns.lane, &name), Some(pid), "{name}");
        }
    }

    // What tests make on a lane: topics `<lane>.<suffix>`, Redis keys
    // `<lane>[-<suffix>]:...`, both carrying the lane's process id.
    let lane = Lane::new("clean");
    let again = lane.with_prefix("again").redis.target.prefix;
    let topics = [lane.kafka.topic.clone(), lane.kafka.dlq_topic.clone(), lane.topic("gaps"), lane.topic("produced-dlq")];
    for topic in &topics {
        assert_eq!(CleanPatterns::pid(&patterns.topic, topic), Some(this), "topic {topic}");
        assert!(patterns.deletes(&[1, this], topic), "topic {topic} is deleted once its process has ended");
        assert!(!patterns.deletes(&[this + 1, this * 10], topic), "topic {topic} is kept while its process runs");
    }
    for key in
        [format!("{}:layout", lane.redis.target.prefix), format!("{again}:bars:{{BTCUSDT}}"), format!("{again}:ts:{{ETHUSDT}}:close")]
    {
        assert_eq!(CleanPatterns::pid(&patterns.key, &key), Some(this), "key {key}");
    }

    // Nothing but a lane's: the services' own names and other runs' are left alone.
    for name in ["cryptopulse.raw", "cryptopulse:bars:{BTCUSDT}", "bench-1723161255-4242.raw", "t-clean-x-1-2.raw", "t-42:symbols"] {
        assert_eq!(CleanPatterns::pid(&patterns.topic, name), None, "{name}");
        assert_eq!(CleanPatterns::pid(&patterns.key, name), None, "{name}");
    }
    assert!(!patterns.deletes(&[4242], "bench-1723161255-4242.raw"));
}
