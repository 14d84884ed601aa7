//! Several consumers in one group (SPEC §8), as processes of the consumer
//! binary against the local broker and Redis: they share the partitions,
//! and Redis ends as one consumer alone leaves it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cryptopulse::consumer::ASSIGNED_LOG;
use cryptopulse::replay::{self, ReplayOptions, Speed};
use cryptopulse::sink;
use cryptopulse::synth::{self, SynthConfig};
use cryptopulse::tooling::digest;

use crate::common::{fixture, Lane};
use crate::fake_binance::FakeBinance;

/// Partitions of the topics here: more than members, fewer than symbols.
const PARTITIONS: i32 = 12;

/// A consumer process of the group, its log in a file.
struct Member {
    child: Child,
    log: PathBuf,
}

impl Member {
    /// A member on `state`, logging to `name`.log in [`log_dir`], with
    /// librdkafka's group debugging: a member that waits is explained there.
    fn start(lane: &Lane, group: &str, state: &Path, name: &str) -> Member {
        Self::start_with(lane, group, state, name, &[])
    }

    /// [`start`](Self::start) with `extra` arguments.
    fn start_with(lane: &Lane, group: &str, state: &Path, name: &str, extra: &[&str]) -> Member {
        let log = log_dir(lane).join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_consumer"))
            .env("CRYPTOPULSE_REDIS_URL", &lane.redis.target.url)
            .env("RUST_LOG", "info,librdkafka=debug")
            .args(["-X", "debug=cgrp"])
            .args(["--topic", &lane.kafka.topic, "--dlq-topic", &lane.kafka.dlq_topic, "--group-id", group])
            .args(["--redis-prefix", &lane.redis.target.prefix, "--checkpoint-ms", "200"])
            .arg("--state-dir")
            .arg(state)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("consumer");
        Member { child, log }
    }

    /// Its log without librdkafka's debugging (which stays in the file).
    fn log(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let own: Vec<&str> = log.lines().filter(|line| !line.contains(" DEBUG librdkafka")).collect();
        format!("{} (librdkafka's debugging left out):\n{}", self.log.display(), own.join("\n"))
    }

    /// Whether it was given at least one partition.
    fn has_partitions(&self) -> bool {
        self.log().lines().any(|line| line.contains(ASSIGNED_LOG) && !line.contains("partitions=[]"))
    }

    /// SIGTERM, then its exit status.
    fn stop(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().expect("kill");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "member did not stop within 30 s of SIGTERM:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where the members of `lane`'s test log: kept after the run, under the
/// build's target directory.
fn log_dir(lane: &Lane) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("group-logs").join(&lane.name);
    std::fs::create_dir_all(&dir).expect("log dir");
    dir
}

/// One row of `kafka-consumer-groups --describe`.
#[derive(Debug)]
struct Row {
    partition: i32,
    lag: Option<i64>,
    member: String,
}

/// Kafka's own `kafka-consumer-groups --describe` for `group`, its rows of `topic`.
fn describe(group: &str, topic: &str) -> Vec<Row> {
    let services = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/services");
    let brokers = std::env::var("CRYPTOPULSE_BROKERS").expect("brokers");
    let output = Command::new(services)
        .args(["kafka-tool", "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand"])
        .args(["--bootstrap-server", &brokers, "--describe", "--group", group])
        .output()
        .expect("kafka-consumer-groups");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .filter(|cols| cols.len() >= 7 && cols[1] == topic)
        .map(|cols| Row { partition: cols[2].parse().expect("partition"), lag: cols[5].parse().ok(), member: cols[6].to_owned() })
        .collect()
}

/// One consumer alone over `lane`'s topic to its end, under Redis prefix
/// and dead-letter topic `name`, its state in `state` (live mode with
/// `idle`): its lane and the digest it leaves.
async fn one_consumer(lane: &Lane, name: &str, state: &Path, idle: Option<Duration>) -> (Lane, digest::Digest) {
    let mut single = lane.with_prefix(name);
    single.kafka.dlq_topic = lane.topic(&format!("dlq-{name}"));
    single.kafka.ensure_topics().await.expect("topics");
    let mut config = single.consumer_config(state);
    config.idle_finalize = idle;
    cryptopulse::consumer::run(config, std::future::pending()).await.expect("single consumer");
    let digest = single.digest().await;
    (single, digest)
}

/// Where each dead letter came from: (partition, offset).
fn letter_sources(lane: &Lane, expected: usize) -> BTreeSet<(String, String)> {
    lane.dead_letters(expected)
        .into_iter()
        .map(|(headers, _)| {
            let get = |key: &str| headers.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone()).unwrap_or_default();
            (get("source.partition"), get("source.offset"))
        })
        .collect()
}

/// 475,890 trades of 60 symbols, the fixtures repeated over more symbols.
fn many_symbols(dir: &Path) -> PathBuf {
    let out = dir.join("many.parquet");
    synth::generate(Path::new(fixture::ARCHIVE), &out, &SynthConfig { symbols: 60, repeats: 1, trades: None }).expect("gen");
    out
}

async fn replay_file(lane: &Lane, file: &Path) {
    let options =
        ReplayOptions { files: vec![file.to_owned()], speed: Speed::Max, symbols: None, from_ms: None, to_ms: None, progress: false };
    replay::run(&lane.kafka, options).await.expect("replay");
}

/// Bad records keyed to several partitions: dead letters to account for.
async fn bad_records(lane: &Lane) {
    for key in ["AAAUSDT", "BBBUSDT", "CCCUSDT", "DDDUSDT", "EEEUSDT"] {
        lane.produce(key, &["not json", r#"{"e":"trade","s":"AAAUSDT"}"#]).await;
    }
}

/// Three members on `redis_url` over a 12-partition topic of 60 symbols
/// with bad records in it, started before the trades come, run until
/// Kafka's own tool shows lag 0 everywhere: they must own the partitions
/// between them and leave the bars and dead letters of one consumer alone
/// (on the standalone Redis).
async fn three_members_leave_one_consumers_bars(test: &str, redis_url: Option<String>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let archive = many_symbols(dir.path());
    let mut lane = Lane::new(test);
    lane.kafka.partitions = PARTITIONS;
    lane.kafka.ensure_topics().await.expect("topics");
    let mut members_lane = lane.clone();
    if let Some(url) = redis_url {
        members_lane.redis.target.url = url;
    }
    let group = format!("{}-group", lane.name);

    // The members start on the empty topic and share it before any trade comes.
    let members: Vec<Member> =
        (0..3).map(|i| Member::start(&members_lane, &group, &dir.path().join(format!("state{i}")), &format!("member{i}"))).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !members.iter().all(Member::has_partitions) {
        if Instant::now() > deadline {
            let logs: Vec<String> = members.iter().map(Member::log).collect();
            panic!("not every member was given partitions within 60 s:\n{}", logs.join("\n----\n"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bad_records(&lane).await;
    replay_file(&lane, &archive).await;

    // Done when Kafka's own tool shows every partition at lag 0.
    let deadline = Instant::now() + Duration::from_secs(60);
    let rows = loop {
        let rows = describe(&group, &lane.kafka.topic);
        if rows.len() == PARTITIONS as usize && rows.iter().all(|r| r.lag == Some(0)) {
            break rows;
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = members.iter().map(Member::log).collect();
            panic!("the group did not reach lag 0 within 60 s: {rows:?}\n{}", logs.join("\n----\n"));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let owners: BTreeSet<&str> = rows.iter().map(|r| r.member.as_str()).collect();
    let logs: Vec<String> = members.iter().map(Member::log).collect();
    assert_eq!(owners.len(), 3, "three members own the partitions: {rows:?}\n{}", logs.join("\n----\n"));
    assert!(!owners.contains("-"), "every partition has an owner: {rows:?}");
    assert_eq!(rows.iter().map(|r| r.partition).collect::<BTreeSet<_>>().len(), PARTITIONS as usize);
    let mut conn = sink::connect_any(&members_lane.redis.target.url).await.expect("redis");
    let group_digest = digest::digest_any(&mut conn, &members_lane.redis.target.prefix).await.expect("digest");

    // One consumer alone, over the same topic.
    let (single, single_digest) = one_consumer(&lane, "single", &dir.path().join("single"), None).await;
    assert!(single_digest.keys > 400, "{} keys", single_digest.keys);
    assert_eq!(
        (group_digest.keys, &group_digest.sha256),
        (single_digest.keys, &single_digest.sha256),
        "three members left other bars than one consumer"
    );
    assert_eq!(letter_sources(&lane, 10), letter_sources(&single, 10), "dead letters of other records");
    assert_eq!(letter_sources(&single, 10).len(), 10);

    for member in members {
        let log = member.log();
        assert!(member.stop().success(), "a member failed:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn three_members_share_the_partitions_and_leave_one_consumers_bars() {
    three_members_leave_one_consumers_bars("group-three", None).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn three_members_writing_to_a_redis_cluster_leave_one_consumers_bars() {
    let url = std::env::var("CRYPTOPULSE_REDIS_CLUSTER_URL")
        .expect("CRYPTOPULSE_REDIS_CLUSTER_URL is not set: run the tests with scripts/test, which starts scripts/redis-cluster");
    three_members_leave_one_consumers_bars("group-cluster", Some(url)).await;
}

/// The records of every partition of `lane`'s topic deleted, up to its end now.
async fn delete_all_records(lane: &Lane) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = lane.kafka.client_config().expect("settings").create().expect("admin");
    let mut list = rdkafka::TopicPartitionList::new();
    for partition in 0..lane.kafka.partitions {
        list.add_partition_offset(&lane.kafka.topic, partition, rdkafka::Offset::End).expect("partition");
    }
    let deleted = admin.delete_records(&list, &AdminOptions::new()).await.expect("delete records");
    for element in deleted.elements() {
        assert!(element.error().is_ok(), "{element:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_member_on_an_empty_state_dir_takes_over_from_the_changelog_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let reference = Lane::undisturbed("group-takeover-ref").await;
    let lane = Lane::new("group-takeover");
    let group = |state: &str| {
        let mut config = lane.consumer_config(&dir.path().join(state));
        config.assignment = cryptopulse::consumer::Assignment::Group;
        config
    };

    // A member reads the first half, then its machine is gone; so are the
    // records it read, deleted by the broker's retention.
    lane.replay(None, Some(fixture::MIDDLE_MS)).await;
    let first = cryptopulse::consumer::run(group("first"), std::future::pending()).await.expect("first member");
    assert!(first.records > 0 && first.records < fixture::TRADES, "{first:?}");
    delete_all_records(&lane).await;
    lane.replay(Some(fixture::MIDDLE_MS), None).await;

    // Another machine: a fresh state dir, the same group. Without the
    // changelog it could not even start (the checkpointless start is the
    // log start, after the deleted records, and RSI and VWAP would differ).
    let second = cryptopulse::consumer::run(group("second"), std::future::pending()).await.expect("second member");
    assert_eq!(first.records + second.records, fixture::TRADES, "the second member read only the second half: {second:?}");
    let digest = lane.digest().await;
    assert_eq!((digest.keys, &digest.sha256), (reference.keys, &reference.sha256), "the taken-over bars differ from one undisturbed run");
}

/// A redis-server of this test's own, so pausing it stops no other test.
struct OwnRedis {
    child: Child,
    url: String,
}

impl OwnRedis {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("port").port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (installed by scripts/services)");
        let started = Instant::now();
        while std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            assert!(started.elapsed() < Duration::from_secs(10), "redis-server on {port} did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        OwnRedis { child, url: format!("redis://127.0.0.1:{port}") }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_paused_for_3_s_during_a_rebalance_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let archive = many_symbols(dir.path());
    let redis = OwnRedis::start();
    let mut lane = Lane::new("group-redis-pause");
    lane.kafka.partitions = PARTITIONS;
    lane.kafka.ensure_topics().await.expect("topics");
    let mut members_lane = lane.clone();
    members_lane.redis.target.url = redis.url.clone();
    let group = format!("{}-group", lane.name);
    let start = |name: &str| Member::start(&members_lane, &group, &dir.path().join(name), name);

    let (a, b) = (start("a"), start("b"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(a.has_partitions() && b.has_partitions()) {
        assert!(Instant::now() < deadline, "the two members were not given partitions within 60 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let replay = {
        let lane = lane.clone();
        let options = ReplayOptions {
            files: vec![archive.clone()],
            speed: Speed::Factor(20.0),
            symbols: None,
            from_ms: None,
            to_ms: None,
            progress: false,
        };
        tokio::spawn(async move { replay::run(&lane.kafka, options).await.expect("replay") })
    };
    tokio::time::sleep(Duration::from_secs(4)).await;
    // Redis stops answering for 3 s, and a member joins: the partitions
    // it takes must be written and checkpointed by their owners first,
    // which waits for Redis.
    let mut conn = sink::connect(&redis.url).await.expect("redis");
    redis::cmd("CLIENT").arg("PAUSE").arg(3000).arg("ALL").query_async::<()>(&mut conn).await.expect("client pause");
    let c = start("c");
    replay.await.expect("replay task");

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let rows = describe(&group, &lane.kafka.topic);
        if rows.len() == PARTITIONS as usize && rows.iter().all(|r| r.lag == Some(0) && r.member != "-") {
            let owners: BTreeSet<&str> = rows.iter().map(|r| r.member.as_str()).collect();
            assert_eq!(owners.len(), 3, "the member that joined during the pause owns partitions: {rows:?}");
            break;
        }
        assert!(Instant::now() < deadline, "the group did not reach lag 0 within 60 s: {rows:?}\n{}", c.log());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let paused_digest = digest::digest(&mut conn, &members_lane.redis.target.prefix).await.expect("digest");

    let (_, single_digest) = one_consumer(&lane, "single", &dir.path().join("single"), None).await;
    assert!(single_digest.keys > 400, "{} keys", single_digest.keys);
    assert_eq!(
        (paused_digest.keys, &paused_digest.sha256),
        (single_digest.keys, &single_digest.sha256),
        "Redis paused during a rebalance changed the bars"
    );
    for member in [a, b, c] {
        let log = member.log();
        assert!(member.stop().success(), "a member failed:\n{log}");
    }
}

/// Sends `signal` (`-KILL`, `-STOP`, ...) to a member.
fn signal(member: &Member, signal: &str) {
    Command::new("kill").args([signal, &member.child.id().to_string()]).status().expect("kill");
}

#[tokio::test(flavor = "multi_thread")]
async fn members_killed_added_restarted_and_paused_while_trades_stream_leave_one_consumers_bars() {
    let dir = tempfile::tempdir().expect("tempdir");
    let archive = many_symbols(dir.path());
    let mut lane = Lane::new("group-chaos");
    lane.kafka.partitions = PARTITIONS;
    lane.kafka.ensure_topics().await.expect("topics");
    let group = format!("{}-group", lane.name);
    let state = |name: &str| dir.path().join(name);

    let a = Member::start(&lane, &group, &state("a"), "a");
    let mut b = Member::start(&lane, &group, &state("b"), "b");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(a.has_partitions() && b.has_partitions()) {
        assert!(Instant::now() < deadline, "the two members were not given partitions within 60 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The fixtures' 346 s of trades at 15 times their pace: about 23 s.
    let replay = {
        let lane = lane.clone();
        let options = ReplayOptions {
            files: vec![archive.clone()],
            speed: Speed::Factor(15.0),
            symbols: None,
            from_ms: None,
            to_ms: None,
            progress: false,
        };
        tokio::spawn(async move { replay::run(&lane.kafka, options).await.expect("replay") })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    // A machine gone: SIGKILL, no checkpoint, no goodbye to the group.
    signal(&a, "-KILL");
    drop(a);
    // A member added on a fresh machine.
    let c = Member::start(&lane, &group, &state("c"), "c");
    tokio::time::sleep(Duration::from_secs(3)).await;
    // A member stopped and restarted on its state dir.
    let status = b.stop();
    assert!(status.success(), "SIGTERM is a clean stop: {status}");
    b = Member::start(&lane, &group, &state("b"), "b-again");
    tokio::time::sleep(Duration::from_secs(3)).await;
    // A member paused past its session timeout (10 s on the local broker), then resumed.
    signal(&c, "-STOP");
    tokio::time::sleep(Duration::from_secs(14)).await;
    signal(&c, "-CONT");
    replay.await.expect("replay task");

    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let rows = describe(&group, &lane.kafka.topic);
        if rows.len() == PARTITIONS as usize && rows.iter().all(|r| r.lag == Some(0) && r.member != "-") {
            break;
        }
        if Instant::now() > deadline {
            panic!("the group did not reach lag 0 within 90 s: {rows:?}\n{}\n----\n{}", b.log(), c.log());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let group_digest = lane.digest().await;

    let (_, single_digest) = one_consumer(&lane, "single", &state("single"), None).await;
    assert!(single_digest.keys > 400, "{} keys", single_digest.keys);
    assert_eq!(
        (group_digest.keys, &group_digest.sha256),
        (single_digest.keys, &single_digest.sha256),
        "members killed, added, restarted and paused left other bars than one consumer\n{}\n----\n{}",
        b.log(),
        c.log()
    );

    // The paused member learnt it was fenced, and the partitions of the
    // killed one were taken over from the changelog.
    let (c_log, logs) = (c.log(), [b.log(), c.log(), std::fs::read_to_string(log_dir(&lane).join("b.log")).unwrap_or_default()].join("\n"));
    assert!(c_log.contains("this member was fenced") || c_log.contains("changelog transaction refused"), "{c_log}");
    assert!(logs.contains(cryptopulse::consumer::RESTORED_LOG), "no partition was restored from the changelog:\n{logs}");
    for member in [b, c] {
        let log = member.log();
        assert!(member.stop().success(), "a member failed:\n{log}");
    }
}

/// Live mode (data contract §3, §8): the producer streams the fake
/// Binance's trades into the topic, with its clock records; two members
/// with `--idle-finalize-ms`, one SIGKILLed mid-run and its partitions
/// taken over, leave the bars one consumer leaves over the same topic
/// afterwards. Bars are made final by the clock records in the log, which
/// every reader meets at the same trade, not by each process's clock.
#[tokio::test(flavor = "multi_thread")]
async fn live_members_one_killed_finalize_by_the_producers_clock_as_one_consumer() {
    const IDLE_MS: u64 = 500;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut lane = Lane::new("group-live");
    lane.kafka.partitions = 4;
    lane.kafka.ensure_topics().await.expect("topics");
    let group = format!("{}-group", lane.name);
    // The fixtures' 15,863 frames at 1,500 a second: about 10 s.
    let fake = FakeBinance::start(1500, &[], 0).await;
    let mut producer = Command::new(env!("CARGO_BIN_EXE_producer"))
        .args(["--topic", &lane.kafka.topic, "--dlq-topic", &lane.kafka.dlq_topic, "--gaps-topic", &lane.topic("gaps")])
        .args(["--symbols", &fake.symbols().join(","), "--ws-url", &fake.ws_url, "--rest-url", &fake.rest_url])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log_dir(&lane).join("producer.log")).expect("log"))
        .spawn()
        .expect("producer");
    let idle = IDLE_MS.to_string();
    let live = ["--idle-finalize-ms", idle.as_str()];
    let a = Member::start_with(&lane, &group, &dir.path().join("a"), "a", &live);
    let b = Member::start_with(&lane, &group, &dir.path().join("b"), "b", &live);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(a.has_partitions() && b.has_partitions()) {
        assert!(Instant::now() < deadline, "the two members were not given partitions within 60 s:\n{}\n{}", a.log(), b.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    signal(&a, "-KILL");
    drop(a);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !fake.all_released() {
        assert!(Instant::now() < deadline, "the fake Binance did not release its frames within 60 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Clock records after the last trade, which make the last bars final.
    tokio::time::sleep(Duration::from_secs(3)).await;
    Command::new("kill").args(["-TERM", &producer.id().to_string()]).status().expect("kill");
    assert!(producer.wait().expect("producer").success(), "the producer failed");

    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let rows = describe(&group, &lane.kafka.topic);
        if rows.len() == lane.kafka.partitions as usize && rows.iter().all(|r| r.lag == Some(0) && r.member != "-") {
            break;
        }
        assert!(Instant::now() < deadline, "the group did not reach lag 0 within 90 s: {rows:?}\n{}", b.log());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let group_digest = lane.digest().await;

    // One consumer over the same topic afterwards, with the same idle time...
    let idle = Some(Duration::from_millis(IDLE_MS));
    let (_, single_digest) = one_consumer(&lane, "single", &dir.path().join("single"), idle).await;
    assert!(single_digest.keys > 10, "{} keys", single_digest.keys);
    assert_eq!(
        (group_digest.keys, &group_digest.sha256),
        (single_digest.keys, &single_digest.sha256),
        "two live members, one killed, left other bars than one consumer\n{}",
        b.log()
    );
    // ... and without it: the clock records made bars final (the trades
    // are of 2024, so each clock closes every open bar).
    let (_, replayed_digest) = one_consumer(&lane, "no-idle", &dir.path().join("no-idle"), None).await;
    assert_ne!(replayed_digest.sha256, single_digest.sha256, "no bar was made final by a clock record");
    let log = b.log();
    assert!(b.stop().success(), "the surviving member failed:\n{log}");
}
