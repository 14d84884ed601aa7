//! Shared setup of the tests that cross a process boundary: the real broker
//! and Redis that `scripts/test` starts, a fresh topic, dead-letter topic,
//! key prefix and state directory per test, so tests run in parallel; and
//! the facts of the fixtures, declared once.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use cryptopulse::consumer::{self, ConsumerConfig, Summary};
use cryptopulse::kafka::KafkaArgs;
use cryptopulse::replay::{self, ReplayOptions, ReplaySummary, Speed};
use cryptopulse::sink;
use cryptopulse::sink::{RedisArgs, RedisTarget};
use cryptopulse::tooling::digest::{self, Digest};
use cryptopulse::window::WindowConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

pub mod prometheus;

/// What the fixtures hold, for every test that relies on it.
pub mod fixture {
    /// 2024-08-08's BTCUSDT and ETHUSDT trades, archived.
    pub const ARCHIVE: &str = "fixtures/binance-spot-trades-2024-08-08.parquet";
    /// The same trades as the WebSocket frames they were recorded from.
    pub const FRAMES: &str = "fixtures/binance-spot-trades-2024-08-08.txt.gz";
    /// Every final bar of those trades, one JSON object a line.
    pub const EXPECTED: &str = "fixtures/expected-bars-2024-08-08.jsonl";
    /// Trades in the archive.
    pub const TRADES: u64 = 15_863;
    /// Final bars they make.
    pub const BARS: u64 = 663;
    /// Redis keys those bars leave under a prefix: the layout, the symbols
    /// set, and per symbol the latest hash, the stream and five sorted sets.
    pub const KEYS: usize = 2 + 2 * 7;
    /// A trade time (ms) inside the archive's span (1_723_161_255_342 to
    /// 1_723_161_601_271), with trades on either side of it.
    pub const MIDDLE_MS: i64 = 1_723_161_400_000;
}

fn env(name: &str) -> String {
    std::env::var(name)
        .unwrap_or_else(|_| panic!("{name} is not set: run the tests with scripts/test, which starts Kafka and Redis and sets it"))
}

/// A dead-letter record read back: headers as pairs, and the payload.
pub type Letter = (Vec<(String, String)>, Vec<u8>);

/// The name of a lane of test `test` in process `pid`: the one place it is
/// made. `scripts/services clean-tests` reads the pid back out of it (its
/// `LANE_RE`; `services::lane_names_are_what_clean_tests_matches` keeps the
/// two in step).
pub fn lane_name(test: &str, pid: u32, seq: u32, nanos: u32) -> String {
    assert!(
        !test.is_empty() && test.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
        "a lane's test name is lowercase letters, digits and dashes: {test:?}"
    );
    format!("t-{test}-{pid}-{seq}-{nanos}")
}

fn topic_of(lane: &str, suffix: &str) -> String {
    format!("{lane}.{suffix}")
}

/// A topic, dead-letter topic and Redis prefix of its own.
#[derive(Debug, Clone)]
pub struct Lane {
    pub kafka: KafkaArgs,
    pub redis: RedisArgs,
    pub name: String,
}

impl Lane {
    /// A lane of this process no other lane shares.
    pub fn new(test: &str) -> Self {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        Lane::named(lane_name(test, std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed), nanos))
    }

    /// The lane called `name`: topics `<name>.raw` and `<name>.dlq`, Redis prefix `<name>`.
    pub fn named(name: String) -> Self {
        Lane {
            kafka: KafkaArgs {
                brokers: env("CRYPTOPULSE_BROKERS"),
                topic: topic_of(&name, "raw"),
                dlq_topic: topic_of(&name, "dlq"),
                partitions: 6,
                topic_retention_bytes: cryptopulse::kafka::DEFAULT_TOPIC_RETENTION_BYTES,
                properties: Vec::new(),
                kafka_config_file: None,
                no_create_topics: false,
            },
            redis: RedisArgs {
                target: RedisTarget { url: env("CRYPTOPULSE_REDIS_URL"), prefix: name.clone() },
                retention_secs: 24 * 3600,
                redis_retry_secs: 60,
            },
            name,
        }
    }

    /// Another topic of the lane: `<name>.<suffix>`.
    pub fn topic(&self, suffix: &str) -> String {
        topic_of(&self.name, suffix)
    }

    /// Sends `payloads` to the raw topic as they are, keyed `key`, each
    /// acknowledged before the next.
    pub async fn produce(&self, key: &str, payloads: &[&str]) {
        let producer: FutureProducer = self.kafka.producer_config().expect("producer config").create().expect("producer");
        for payload in payloads {
            let record = FutureRecord::to(&self.kafka.topic).key(key).payload(*payload);
            producer.send(record, Duration::from_secs(30)).await.map_err(|(e, _)| e).expect("send");
        }
    }

    /// A clock record reading `ms` to every partition of the topic, as the
    /// producer writes one a second (data contract §3).
    pub async fn produce_clock(&self, ms: i64) {
        let producer: FutureProducer = self.kafka.producer_config().expect("producer config").create().expect("producer");
        let value = ms.to_string();
        for partition in 0..self.kafka.partitions {
            let headers = rdkafka::message::OwnedHeaders::new()
                .insert(rdkafka::message::Header { key: cryptopulse::kafka::CLOCK_HEADER, value: Some(&value) });
            let record = FutureRecord::<(), [u8]>::to(&self.kafka.topic).partition(partition).payload(&[]).headers(headers);
            producer.send(record, Duration::from_secs(30)).await.map_err(|(e, _)| e).expect("send");
        }
    }

    /// The same topic, under another Redis prefix.
    pub fn with_prefix(&self, prefix: &str) -> Self {
        let mut lane = self.clone();
        lane.redis.target.prefix = format!("{}-{prefix}", self.name);
        lane
    }

    pub async fn replay(&self, from_ms: Option<i64>, to_ms: Option<i64>) -> ReplaySummary {
        let options = ReplayOptions {
            files: vec![PathBuf::from(fixture::ARCHIVE)],
            speed: Speed::Max,
            symbols: None,
            from_ms,
            to_ms,
            progress: false,
        };
        replay::run(&self.kafka, options).await.expect("replay")
    }

    pub fn consumer_config(&self, state_dir: &std::path::Path) -> ConsumerConfig {
        ConsumerConfig {
            heartbeat: None,
            kafka: self.kafka.clone(),
            redis: self.redis.clone(),
            state_dir: state_dir.to_owned(),
            window: WindowConfig::default(),
            group_id: format!("{}-group", self.name),
            assignment: cryptopulse::consumer::Assignment::Static(None),
            exit_at_end: true,
            checkpoint_interval: Duration::from_millis(200),
            checkpoint_records: 5_000,
            max_batch_rows: 4096,
            linger: Duration::ZERO,
            idle_finalize: None,
            future_tolerance: cryptopulse::binance::DEFAULT_FUTURE_TOLERANCE,
            symbols: None,
            max_symbols: cryptopulse::window::DEFAULT_MAX_SYMBOLS,
        }
    }

    /// Runs the consumer to the end of the topic.
    pub async fn consume(&self, state_dir: &std::path::Path) -> Summary {
        consumer::run(self.consumer_config(state_dir), std::future::pending()).await.expect("consumer")
    }

    /// The digest of an undisturbed replay and run of the fixtures on a lane
    /// of its own: what a disturbed run must end with.
    pub async fn undisturbed(test: &str) -> Digest {
        let lane = Lane::new(test);
        lane.replay(None, None).await;
        lane.consume(tempfile::tempdir().expect("tempdir").path()).await;
        lane.digest().await
    }

    /// Starts a consumer that runs (not to the end) until stopped.
    pub fn spawn_consumer(&self, state_dir: &std::path::Path) -> RunningConsumer {
        let mut config = self.consumer_config(state_dir);
        config.exit_at_end = false;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(consumer::run(config, async move {
            let _ = stopped.await;
        }));
        RunningConsumer { stop, handle }
    }

    pub async fn digest(&self) -> Digest {
        let mut conn = sink::connect(&self.redis.target.url).await.expect("redis");
        digest::digest(&mut conn, &self.redis.target.prefix).await.expect("digest")
    }

    /// The names of this lane's Redis keys.
    pub fn keys(&self) -> sink::Keys {
        sink::Keys { prefix: self.redis.target.prefix.clone() }
    }

    pub async fn redis(&self) -> redis::aio::ConnectionManager {
        sink::connect(&self.redis.target.url).await.expect("redis")
    }

    /// Every record of the dead-letter topic.
    pub fn dead_letters(&self, expected: usize) -> Vec<Letter> {
        let consumer: BaseConsumer =
            self.kafka.config_with(&[("group.id", &format!("{}-dlq-reader", self.name))]).expect("settings").create().expect("consumer");
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(&self.kafka.dlq_topic, 0, Offset::Beginning).expect("partition");
        consumer.assign(&list).expect("assign");
        let mut out = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while out.len() < expected && std::time::Instant::now() < deadline {
            if let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) {
                let headers = message
                    .headers()
                    .map(|h| {
                        h.iter().map(|h| (h.key.to_owned(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned())).collect()
                    })
                    .unwrap_or_default();
                out.push((headers, message.payload().unwrap_or_default().to_vec()));
            }
        }
        // Anything beyond what was expected is a failure too.
        while let Some(Ok(message)) = consumer.poll(Duration::from_millis(500)) {
            out.push((Vec::new(), message.payload().unwrap_or_default().to_vec()));
        }
        out
    }
}

/// A consumer started by [`Lane::spawn_consumer`].
pub struct RunningConsumer {
    stop: tokio::sync::oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<cryptopulse::Result<Summary>>,
}

impl RunningConsumer {
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// Shuts it down (a final checkpoint) and returns its summary.
    pub async fn stop(self) -> Summary {
        let _ = self.stop.send(());
        self.handle.await.expect("consumer task").expect("consumer")
    }
}

/// Polls `condition` every 100 ms for up to 60 s.
pub async fn wait_for<F, Fut>(mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..600 {
        if condition().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("condition not met within 60 s");
}
