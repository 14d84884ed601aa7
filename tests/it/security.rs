//! The pipeline against the secured broker of `scripts/secure-kafka`
//! (SASL_SSL with SCRAM-SHA-512/256 and PLAIN, SSL with client
//! certificates, the standard authorizer with ACLs), as the account
//! `pipeline`, which may only read, write and describe topics `secure.*`
//! and read groups `secure*`: the binaries run end to end and leave the
//! plain run's Redis; every wrong setting is an error naming it within 15 s;
//! and the account's password, the test's sentinel, shows nowhere.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use cryptopulse::kafka::KafkaArgs;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::Message;

use crate::common::prometheus::free_addr;
use crate::common::{fixture, wait_for, Lane};
use crate::fake_binance::FakeBinance;

/// What `scripts/secure-kafka env` exports, which `scripts/test` evaluates.
struct Secure {
    sasl_brokers: String,
    ssl_brokers: String,
    other_ca: PathBuf,
    admin: PathBuf,
    /// The limited account on SASL_SSL with SCRAM-SHA-512, SCRAM-SHA-256 and
    /// PLAIN, and with its client certificate on the SSL listener.
    scram512: PathBuf,
    scram256: PathBuf,
    plain: PathBuf,
    certificate: PathBuf,
}

fn secure() -> Secure {
    let env = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| {
            panic!("{name} is not set: run the tests with scripts/test, which starts the secured broker (scripts/secure-kafka up)")
        })
    };
    Secure {
        sasl_brokers: env("CRYPTOPULSE_SECURE_BROKERS"),
        ssl_brokers: env("CRYPTOPULSE_SECURE_SSL_BROKERS"),
        other_ca: env("CRYPTOPULSE_SECURE_OTHER_CA").into(),
        admin: env("CRYPTOPULSE_SECURE_ADMIN_CONFIG").into(),
        scram512: env("CRYPTOPULSE_SECURE_PIPELINE_CONFIG").into(),
        scram256: env("CRYPTOPULSE_SECURE_PIPELINE_SCRAM256_CONFIG").into(),
        plain: env("CRYPTOPULSE_SECURE_PIPELINE_PLAIN_CONFIG").into(),
        certificate: env("CRYPTOPULSE_SECURE_PIPELINE_SSL_CONFIG").into(),
    }
}

/// The value of `key` in a properties file.
fn property(file: &Path, key: &str) -> String {
    let text = std::fs::read_to_string(file).expect("properties file");
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in {}", file.display()))
        .to_owned()
}

/// `file` with `key` set to `value` (added when missing), written to `to`.
fn with_property(file: &Path, key: &str, value: &str, to: &Path) -> PathBuf {
    without(file, &[key], to);
    let mut text = std::fs::read_to_string(to).unwrap();
    text.push_str(&format!("{key}={value}\n"));
    std::fs::write(to, text).unwrap();
    to.to_owned()
}

/// `file` without the properties `keys`, written to `to`.
fn without(file: &Path, keys: &[&str], to: &Path) -> PathBuf {
    let text = std::fs::read_to_string(file).expect("properties file");
    let kept: Vec<&str> = text.lines().filter(|line| !keys.iter().any(|key| line.starts_with(&format!("{key}=")))).collect();
    std::fs::write(to, kept.join("\n") + "\n").unwrap();
    to.to_owned()
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

/// Topics `secure.<lane>.raw`, `.dlq` and `.gaps`, created by the admin (the
/// limited account may not), the group `secure-<lane>`, and the lane's Redis
/// prefix on the plain Redis.
struct SecureLane {
    lane: Lane,
    topic: String,
    dlq: String,
    gaps: String,
    group: String,
}

impl SecureLane {
    async fn new(test: &str, secure: &Secure) -> Self {
        let lane = Lane::new(test);
        let name = &lane.name;
        let secured = SecureLane {
            topic: format!("secure.{name}.raw"),
            dlq: format!("secure.{name}.dlq"),
            gaps: format!("secure.{name}.gaps"),
            group: format!("secure-{name}"),
            lane,
        };
        let admin = secured.kafka_args(&secure.sasl_brokers, &secure.admin);
        admin.ensure(&[(&secured.topic, 6), (&secured.dlq, 1), (&secured.gaps, 1)]).await.expect("topics created by the admin");
        secured
    }

    fn kafka_args(&self, brokers: &str, config: &Path) -> KafkaArgs {
        KafkaArgs {
            brokers: brokers.to_owned(),
            topic: self.topic.clone(),
            dlq_topic: self.dlq.clone(),
            kafka_config_file: Some(config.to_owned()),
            ..self.lane.kafka.clone()
        }
    }

    /// `binary` on this lane's topics through `brokers` with the settings of
    /// properties file `config`.
    fn command(&self, binary: &str, brokers: &str, config: &Path) -> Command {
        let mut command = Command::new(binary);
        command
            .args(["--brokers", brokers, "--topic", &self.topic, "--dlq-topic", &self.dlq])
            .env("CRYPTOPULSE_KAFKA_CONFIG_FILE", config)
            .env_remove("CRYPTOPULSE_KAFKA_PROPERTIES")
            .env("RUST_BACKTRACE", "0");
        command
    }

    fn replay(&self, brokers: &str, config: &Path) -> Command {
        let mut command = self.command(env!("CARGO_BIN_EXE_replay"), brokers, config);
        command.arg(fixture::ARCHIVE);
        command
    }

    /// The consumer, to the end of the topic.
    fn consumer(&self, brokers: &str, config: &Path, state: &Path) -> Command {
        let mut command = self.live_consumer(brokers, config, state);
        command.arg("--exit-at-end");
        command
    }

    /// The consumer, until stopped.
    fn live_consumer(&self, brokers: &str, config: &Path, state: &Path) -> Command {
        let mut command = self.command(env!("CARGO_BIN_EXE_consumer"), brokers, config);
        command.args(["--group-id", &self.group, "--redis-prefix", &self.lane.name]).arg("--state-dir").arg(state);
        // Every partition, outside the group protocol: the limited account
        // has no rights on a changelog topic or transactional id
        // (docs/security.md lists those a group member needs).
        command.args(["--assign", "all"]);
        command
    }

    fn producer(&self, brokers: &str, config: &Path, fake: &FakeBinance) -> Command {
        let mut command = self.command(env!("CARGO_BIN_EXE_producer"), brokers, config);
        command.args(["--gaps-topic", &self.gaps, "--symbols", &fake.symbols().join(",")]).args([
            "--ws-url",
            &fake.ws_url,
            "--rest-url",
            &fake.rest_url,
            "--silence-timeout",
            "2s",
        ]);
        command
    }

    /// Trades in the raw topic (its records but the producer's clock
    /// records), read as the admin.
    fn trades(&self, secure: &Secure) -> i64 {
        let mut config = self.kafka_args(&secure.sasl_brokers, &secure.admin).client_config().unwrap();
        let consumer: BaseConsumer = config.set("group.id", "secure-trades-reader").set("enable.auto.commit", "false").create().unwrap();
        let mut list = rdkafka::TopicPartitionList::new();
        let mut open = std::collections::BTreeMap::new();
        for partition in 0..6 {
            let (low, high) = consumer.fetch_watermarks(&self.topic, partition, Duration::from_secs(10)).unwrap_or((0, 0));
            if high > low {
                list.add_partition_offset(&self.topic, partition, rdkafka::Offset::Offset(low)).unwrap();
                open.insert(partition, high);
            }
        }
        consumer.assign(&list).unwrap();
        let (mut trades, deadline) = (0, Instant::now() + Duration::from_secs(30));
        while !open.is_empty() {
            assert!(Instant::now() < deadline, "{}: not read to its end within 30 s", self.topic);
            let Some(message) = consumer.poll(Duration::from_millis(200)) else { continue };
            let message = message.unwrap();
            if !cryptopulse::kafka::is_clock(&message) {
                trades += 1;
            }
            if open.get(&message.partition()).is_some_and(|high| message.offset() + 1 >= *high) {
                open.remove(&message.partition());
            }
        }
        trades
    }
}

/// Runs `command` to its end; its output and how long it took.
fn run(mut command: Command) -> (Output, Duration) {
    let started = Instant::now();
    let output = command.stdin(Stdio::null()).output().expect("binary");
    (output, started.elapsed())
}

fn succeeds(what: &str, command: Command) -> String {
    let (output, _) = run(command);
    assert!(output.status.success(), "{what}: {}", text(&output));
    text(&output)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limited_account_runs_replay_and_consumer_over_each_mechanism_with_the_plain_runs_bars() {
    let secure = secure();
    let expected = Lane::undisturbed("security-plain").await;
    let cases = [
        ("SASL_SSL SCRAM-SHA-512", &secure.sasl_brokers, &secure.scram512),
        ("SASL_SSL SCRAM-SHA-256", &secure.sasl_brokers, &secure.scram256),
        ("SASL_SSL PLAIN", &secure.sasl_brokers, &secure.plain),
        ("SSL with a client certificate", &secure.ssl_brokers, &secure.certificate),
    ];
    for (what, brokers, config) in cases {
        let lane = SecureLane::new("security-mechanism", &secure).await;
        let state = tempfile::tempdir().unwrap();
        // The topics exist: replay and the consumer start without CREATE.
        let shown = succeeds(what, lane.replay(brokers, config));
        assert!(shown.contains(&format!("replayed {} trades", fixture::TRADES)), "{what}: {shown}");
        let shown = succeeds(what, lane.consumer(brokers, config, state.path()));
        assert!(shown.contains(&format!("bars {}", fixture::BARS)), "{what}: {shown}");
        assert_eq!(lane.lane.digest().await.sha256, expected.sha256, "{what}: Redis differs from the plain run's");
        if what.starts_with("SASL") {
            assert!(!shown.contains(&property(config, "sasl.password")), "{what}: the output shows the password");
        }
    }
}

/// A consumer-group member (no `--assign`) as the limited account, with
/// the rights docs/security.md lists (its changelog topic, made by the
/// admin, and its transactional id): it reads the topic, publishes its
/// state and commits the group's offsets in transactions; a second member
/// on an empty state dir takes every partition over from that changelog
/// and reads nothing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_member_runs_as_the_limited_account_and_another_takes_over_from_its_changelog() {
    let secure = secure();
    let expected = Lane::undisturbed("security-group-plain").await;
    let mut lane = SecureLane::new("security-group", &secure).await;
    // Under the account's topic prefix: the changelog is `<group>.changelog`.
    lane.group = format!("secure.{}", lane.lane.name);
    let admin = lane.kafka_args(&secure.sasl_brokers, &secure.admin);
    admin.ensure_compacted(&format!("{}.changelog", lane.group), 6).await.expect("changelog made by the admin");
    succeeds("replay", lane.replay(&secure.sasl_brokers, &secure.scram512));
    let member = |state: &Path| {
        let mut command = lane.command(env!("CARGO_BIN_EXE_consumer"), &secure.sasl_brokers, &secure.scram512);
        command.args(["--group-id", &lane.group, "--redis-prefix", &lane.lane.name]).arg("--state-dir").arg(state);
        command
    };

    let (first, second) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut command = member(first.path());
    command.arg("--exit-at-end");
    let shown = succeeds("the first member", command);
    assert!(shown.contains(&format!("bars {}", fixture::BARS)), "{shown}");
    assert_eq!(lane.lane.digest().await.sha256, expected.sha256, "Redis differs from the plain run's");

    let log = second.path().join("member.log");
    let metrics = free_addr();
    let mut command = member(&second.path().join("state"));
    command.args(["--metrics-addr", &metrics.to_string()]);
    let mut child = command.stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap()).spawn().unwrap();
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    let started = Instant::now();
    while !read().lines().any(|line| line.contains(cryptopulse::consumer::ASSIGNED_LOG)) {
        if started.elapsed() > Duration::from_secs(60) || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            panic!("the second member was not assigned the partitions within 60 s:\n{}", read());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let counted = crate::producer::scrape(metrics).await.get(cryptopulse::telemetry::CHANGELOG_RESTORES).copied();
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(child.wait().unwrap().success(), "{}", read());
    let shown = read();
    let restored = shown.lines().filter(|line| line.contains(cryptopulse::consumer::RESTORED_LOG)).count();
    assert_eq!(restored, 6, "every partition restored from the changelog:\n{shown}");
    assert_eq!(counted, Some(6.0), "restores counted by {}", cryptopulse::telemetry::CHANGELOG_RESTORES);
    assert!(shown.contains("consumer stopped records=0 "), "nothing read again:\n{shown}");
    assert!(!shown.contains("uthoriz"), "an ACL is missing:\n{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_producer_publishes_every_trade_as_the_limited_account() {
    let secure = secure();
    let fake = FakeBinance::start(5000, &[], 0).await;
    let lane = SecureLane::new("security-producer", &secure).await;
    let mut producer =
        lane.producer(&secure.sasl_brokers, &secure.scram512, &fake).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let total = fake.total() as i64;
    wait_for(|| {
        let done = producer.try_wait().unwrap().is_some() || (fake.all_released() && lane.trades(&secure) >= total);
        async move { done }
    })
    .await;
    let status = Command::new("kill").args(["-TERM", &producer.id().to_string()]).status().expect("kill");
    assert!(status.success());
    let output = producer.wait_with_output().unwrap();
    assert!(output.status.success(), "the producer: {}", text(&output));
    assert_eq!(lane.trades(&secure), total, "every trade once");

    let state = tempfile::tempdir().unwrap();
    succeeds("consumer", lane.consumer(&secure.sasl_brokers, &secure.scram512, state.path()));
    assert_eq!(lane.lane.digest().await.sha256, Lane::undisturbed("security-producer-plain").await.sha256);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limited_account_may_not_create_a_topic_and_is_told_so() {
    let secure = secure();
    let mut lane = SecureLane::new("security-create", &secure).await;
    lane.topic = format!("{}.absent", lane.topic);
    let (output, took) = run(lane.replay(&secure.sasl_brokers, &secure.scram512));
    let shown = text(&output);
    assert!(!output.status.success(), "{shown}");
    assert!(shown.contains("does not exist and this account may not create it"), "{shown}");
    assert!(took < Duration::from_secs(15), "took {took:?}");
}

/// A wrong setting each, for each binary that talks to Kafka: a non-zero
/// exit within 15 s whose message names the setting, and never the wrong
/// password that was given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_kafka_settings_fail_within_15_s_naming_the_setting() {
    let secure = secure();
    let mut lane = SecureLane::new("security-wrong", &secure).await;
    let dir = tempfile::tempdir().unwrap();
    let wrong_password = "wrong-password-sentinel-5d1e";
    let fake = FakeBinance::start(5000, &[], 0).await;
    let cases: [(&str, String, PathBuf, &str); 4] = [
        (
            "a wrong password",
            secure.sasl_brokers.clone(),
            with_property(&secure.scram512, "sasl.password", wrong_password, &dir.path().join("password")),
            "sasl.password",
        ),
        (
            "an untrusted broker certificate",
            secure.sasl_brokers.clone(),
            with_property(&secure.scram512, "ssl.ca.location", &secure.other_ca.display().to_string(), &dir.path().join("ca")),
            "ssl.ca.location",
        ),
        (
            "plain text to the TLS port",
            secure.sasl_brokers.clone(),
            with_property(&secure.scram512, "security.protocol", "PLAINTEXT", &dir.path().join("plaintext")),
            "security.protocol",
        ),
        (
            "no client certificate",
            secure.ssl_brokers.clone(),
            without(&secure.certificate, &["ssl.certificate.location", "ssl.key.location"], &dir.path().join("no-certificate")),
            "ssl.certificate.location",
        ),
    ];
    let state = tempfile::tempdir().unwrap();
    for (what, brokers, config, setting) in &cases {
        let commands = [
            ("replay", lane.replay(brokers, config)),
            ("consumer", lane.consumer(brokers, config, state.path())),
            ("producer", lane.producer(brokers, config, &fake)),
        ];
        for (binary, command) in commands {
            let (output, took) = run(command);
            let shown = text(&output);
            assert!(!output.status.success(), "{binary}, {what}: {shown}");
            assert!(shown.contains(setting), "{binary}, {what}: the message does not name {setting}: {shown}");
            assert!(took < Duration::from_secs(15), "{binary}, {what}: took {took:?}");
            assert!(!shown.contains(wrong_password), "{binary}, {what}: shows the password: {shown}");
        }
    }

    // A group the account may not use.
    lane.group = "not-the-pipelines-group".into();
    let (output, took) = run(lane.consumer(&secure.sasl_brokers, &secure.scram512, state.path()));
    let shown = text(&output);
    assert!(!output.status.success(), "{shown}");
    assert!(shown.contains("refuse consumer group \"not-the-pipelines-group\"") && shown.contains("--group-id"), "{shown}");
    assert!(took < Duration::from_secs(15), "took {took:?}");
}

/// The account's real password is the sentinel: a running consumer with a
/// dead letter to write, its metrics page, its command line, its output,
/// the dead-letter records and Redis never show it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kafka_password_shows_nowhere_while_the_consumer_runs() {
    let secure = secure();
    let sentinel = property(&secure.scram512, "sasl.password");
    assert!(sentinel.len() >= 20, "scripts/secure-kafka makes long random passwords");
    let lane = SecureLane::new("security-sentinel", &secure).await;
    succeeds("replay", lane.replay(&secure.sasl_brokers, &secure.scram512));
    // One record that is not a trade: a dead letter that carries the payload.
    let admin = lane.kafka_args(&secure.sasl_brokers, &secure.admin);
    let producer: rdkafka::producer::FutureProducer = admin.producer_config().unwrap().create().unwrap();
    let record = rdkafka::producer::FutureRecord::to(&lane.topic).key("BTCUSDT").payload("not a trade");
    producer.send(record, Duration::from_secs(30)).await.map_err(|(e, _)| e).expect("send");

    let state = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let mut consumer = lane.live_consumer(&secure.sasl_brokers, &secure.scram512, state.path());
    consumer.args(["--metrics-addr", &addr.to_string()]);
    let consumer: Child = consumer.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let url = format!("http://{addr}/metrics");
    let mut page = String::new();
    wait_for(|| {
        let url = url.clone();
        async move {
            let Ok(response) = reqwest::get(&url).await else { return false };
            let page = response.text().await.unwrap_or_default();
            page.contains("cryptopulse_dead_letters_total{")
        }
    })
    .await;
    if let Ok(response) = reqwest::get(&url).await {
        page = response.text().await.unwrap();
    }
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", consumer.id())).unwrap();
    Command::new("kill").args(["-TERM", &consumer.id().to_string()]).status().expect("kill");
    let output = consumer.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", text(&output));

    let letters = {
        let admin_lane = Lane { kafka: admin.clone(), ..lane.lane.clone() };
        admin_lane.dead_letters(1)
    };
    assert_eq!(letters.len(), 1, "one dead letter");
    let redis = lane.lane.digest().await.dump;
    for (place, shown) in [
        ("the metrics page", page),
        ("/proc/PID/cmdline", String::from_utf8_lossy(&cmdline).into_owned()),
        ("stdout and stderr", text(&output)),
        ("the dead letter", format!("{:?}", letters)),
        ("Redis", redis),
    ] {
        assert!(!shown.is_empty(), "{place} is empty: nothing was checked");
        assert!(!shown.contains(&sentinel), "{place} shows the password");
    }
}

/// Every binary that takes a secret, run with a sentinel in each secret
/// setting (a wrong Kafka password in its properties file, a Redis
/// password the plain Redis does not want, a Grafana password): each fails
/// or reports the failure within 30 s, and no sentinel shows in its output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_binary_keeps_wrong_secrets_out_of_its_output() {
    let secure = secure();
    let lane = SecureLane::new("security-every", &secure).await;
    let dir = tempfile::tempdir().unwrap();
    let sentinels = ["kafka-sentinel-7c2f", "redis-sentinel-91ab", "grafana-sentinel-3e44"];
    let config = with_property(&secure.scram512, "sasl.password", sentinels[0], &dir.path().join("kafka.properties"));
    let fake = FakeBinance::start(5000, &[], 0).await;
    let brokers = secure.sasl_brokers.as_str();
    let out = dir.path().join("out").display().to_string();
    let tool = |binary: &str, args: &[&str]| {
        let mut command = lane.command(binary, brokers, &config);
        command.args(args);
        command
    };
    let commands = [
        ("producer", lane.producer(brokers, &config, &fake)),
        ("consumer", lane.consumer(brokers, &config, &dir.path().join("state"))),
        ("replay", lane.replay(brokers, &config)),
        ("record", tool(env!("CARGO_BIN_EXE_record"), &["--from-kafka", "--out", &out])),
        ("crashtest", tool(env!("CARGO_BIN_EXE_crashtest"), &["--work-dir", &out])),
        ("bench", tool(env!("CARGO_BIN_EXE_bench"), &["--no-producer", "--symbols", "20", "--out", &out])),
        ("doctor", tool(env!("CARGO_BIN_EXE_doctor"), &["--grafana-url", "http://127.0.0.1:9"])),
        ("latest", Command::new(env!("CARGO_BIN_EXE_latest"))),
        ("digest", Command::new(env!("CARGO_BIN_EXE_digest"))),
    ];
    for (binary, mut command) in commands {
        command.env("CRYPTOPULSE_REDIS_PASSWORD", sentinels[1]).env("GRAFANA_ADMIN_PASSWORD", sentinels[2]).env("RUST_BACKTRACE", "0");
        let mut child = command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("binary");
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", child.id())).unwrap_or_default();
        let started = Instant::now();
        while child.try_wait().unwrap().is_none() && started.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let output = child.wait_with_output().unwrap();
        let shown = text(&output);
        assert!(started.elapsed() < Duration::from_secs(30), "{binary} ran 30 s: {shown}");
        assert!(!output.status.success(), "{binary} succeeded with wrong secrets: {shown}");
        assert!(!shown.is_empty(), "{binary} said nothing");
        for sentinel in sentinels {
            assert!(!shown.contains(sentinel), "{binary} shows {sentinel}: {shown}");
            assert!(!String::from_utf8_lossy(&cmdline).contains(sentinel), "{binary}'s command line holds {sentinel}");
        }
    }
}
