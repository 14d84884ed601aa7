//! The `doctor` binary against the running broker and Redis, a real
//! Prometheus scraping a running consumer, and ports nothing listens on.
//! Grafana is not installable here (no Debian package, no Docker): its
//! check is exercised on a closed port only.

use std::process::{Command, Output};

use crate::common::prometheus::{free_addr, spawn_consumer, Prometheus};
use crate::common::{wait_for, Lane};

fn doctor(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_doctor")).args(args).args(["--timeout-secs", "3"]).output().expect("doctor binary")
}

fn lane_args(lane: &Lane) -> Vec<String> {
    ["--brokers", &lane.kafka.brokers, "--topic", &lane.kafka.topic, "--dlq-topic", &lane.kafka.dlq_topic]
        .into_iter()
        .chain(["--redis-url", &lane.redis.target.url, "--redis-prefix", &lane.redis.target.prefix])
        .map(str::to_owned)
        .collect()
}

/// The verdict lines (`PASS ...`, `FAIL ...`) of the output, and all of it.
fn verdicts(output: &Output) -> (Vec<String>, String) {
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let lines = text.lines().filter(|l| l.starts_with("PASS") || l.starts_with("FAIL")).map(str::to_owned).collect();
    (lines, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_check_passes_against_running_services() {
    let lane = Lane::new("doctor-ok");
    lane.kafka.ensure_topics().await.unwrap();
    let (state, consumer_addr) = (tempfile::tempdir().unwrap(), free_addr());
    let _consumer = spawn_consumer(&lane, state.path(), consumer_addr);
    let prometheus = Prometheus::start(&[("consumer", consumer_addr)]);
    wait_for(|| {
        let up = prometheus.query(r#"up{job="consumer"}"#).first().map(|r| r.1);
        async move { up == Some(1.0) }
    })
    .await;

    let mut args = lane_args(&lane);
    args.extend(["--prometheus-url".to_owned(), prometheus.url.clone()]);
    let output = doctor(&args);
    let (lines, text) = verdicts(&output);
    assert!(output.status.success(), "{text}");
    assert_eq!(lines.len(), 6, "broker, two topics, redis, prometheus ready and targets:\n{text}");
    assert!(lines.iter().all(|l| l.starts_with("PASS")), "{text}");
    assert!(text.contains(&format!("topic {}: 6 partition(s)", lane.kafka.topic)), "{text}");
    assert!(text.contains(&format!("topic {}: 1 partition(s)", lane.kafka.dlq_topic)), "{text}");
    // The consumer named its layout on start.
    assert!(text.contains(&format!("layout {}:layout = cryptopulse-v2", lane.redis.target.prefix)), "{text}");
    assert!(text.contains(&format!("1 target(s) up: consumer http://{consumer_addr}/metrics")), "{text}");
    assert!(text.contains("doctor: 6 of 6 checks passed"), "{text}");
}

#[test]
fn services_that_are_not_there_fail_with_what_to_do() {
    let url = |scheme: &str| format!("{scheme}://{}", free_addr());
    let args: Vec<String> = [
        "--brokers".to_owned(),
        free_addr().to_string(),
        "--redis-url".to_owned(),
        url("redis"),
        "--grafana-url".to_owned(),
        url("http"),
        "--prometheus-url".to_owned(),
        url("http"),
    ]
    .into();
    let output = doctor(&args);
    let (lines, text) = verdicts(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert_eq!(lines.len(), 4, "{text}");
    for (line, system) in lines.iter().zip(["kafka", "redis", "grafana", "prometheus"]) {
        assert!(line.starts_with(&format!("FAIL  {system}")), "{text}");
    }
    assert_eq!(text.matches("\n      -> start it with").count(), 4, "each failure says what to do:\n{text}");
    assert!(text.contains("doctor: 0 of 4 checks passed"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_topics_fail_while_the_broker_and_redis_pass() {
    let lane = Lane::new("doctor-no-topics");
    let output = doctor(&lane_args(&lane));
    let (lines, text) = verdicts(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    let verdict: Vec<&str> = lines.iter().map(|l| &l[..4]).collect();
    assert_eq!(verdict, ["PASS", "FAIL", "FAIL", "PASS"], "{text}");
    assert!(text.contains(&format!("topic {} does not exist", lane.kafka.topic)), "{text}");
    assert!(text.contains(&format!("scripts/services topic {} 6", lane.kafka.topic)), "{text}");
    assert!(text.contains("no layout"), "nothing written under a fresh prefix:\n{text}");
}

#[test]
fn json_output_carries_every_check_with_what_to_do() {
    let args: Vec<String> = [
        "--brokers".to_owned(),
        free_addr().to_string(),
        "--redis-url".to_owned(),
        format!("redis://{}", free_addr()),
        "--json".to_owned(),
    ]
    .into();
    let output = doctor(&args);
    assert_eq!(output.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("one JSON object on stdout");
    assert_eq!(report["passed"], false);
    let checks = report["checks"].as_array().expect("checks");
    let systems: Vec<&str> = checks.iter().filter_map(|c| c["system"].as_str()).collect();
    assert_eq!(systems, ["kafka", "redis"]);
    for check in checks {
        assert_eq!(check["passed"], false, "{check}");
        assert!(check["fix"].as_str().is_some_and(|fix| fix.starts_with("start it with")), "{check}");
        assert!(check["detail"].as_str().is_some_and(|d| !d.is_empty()), "{check}");
    }
}
