//! The randomized hostile-input run (`hostile`): the trades of an archive,
//! with seeded mutants of them mixed in at random places (truncations, bit
//! flips, huge numbers, deep nesting, invalid UTF-8, 10 MB strings, times a
//! century ahead, duplicates, symbols nobody subscribed to, bytes that are
//! not JSON), go through Kafka to the consumer binary. Every record must be
//! accounted for (applied + duplicates + dead letters = produced, and
//! every clean trade applied), Redis must equal a run of the clean trades
//! alone, and the consumer's peak RSS is reported beside the clean run's.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use crate::archive;
use crate::binance;
use crate::error::{Error, Result};
use crate::kafka::{KafkaArgs, REQUEST_TIMEOUT};
use crate::sink::{self, RedisArgs};
use crate::tooling::crashtest::SplitMix64;
use crate::tooling::digest;
use crate::trade::TradeColumns;

/// Largest record the run's raw topic and producer take: room for the
/// 10 MB strings, which a default topic (1 MB) would refuse at the door.
const MAX_RECORD_BYTES: usize = 16 << 20;
/// Length of a huge string.
const HUGE_STRING_BYTES: usize = 10 << 20;
/// How far ahead a future time is: a century.
const CENTURY_MS: i64 = 100 * 365 * 24 * 3600 * 1000;

/// What was done to a clean trade's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mutation {
    Truncated,
    BitFlips,
    HugeNumber,
    DeepNesting,
    InvalidUtf8,
    HugeString,
    FutureTime,
    Duplicate,
    UnknownSymbol,
    NotJson,
}

impl std::str::FromStr for Mutation {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, String> {
        Mutation::ALL.into_iter().find(|kind| kind.name() == text).ok_or_else(|| {
            let names: Vec<&str> = Mutation::ALL.iter().map(|kind| kind.name()).collect();
            format!("no mutation {text:?}; there are: {}", names.join(", "))
        })
    }
}

impl Mutation {
    pub const ALL: [Mutation; 10] = [
        Mutation::Truncated,
        Mutation::BitFlips,
        Mutation::HugeNumber,
        Mutation::DeepNesting,
        Mutation::InvalidUtf8,
        Mutation::HugeString,
        Mutation::FutureTime,
        Mutation::Duplicate,
        Mutation::UnknownSymbol,
        Mutation::NotJson,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mutation::Truncated => "truncated",
            Mutation::BitFlips => "bit_flips",
            Mutation::HugeNumber => "huge_number",
            Mutation::DeepNesting => "deep_nesting",
            Mutation::InvalidUtf8 => "invalid_utf8",
            Mutation::HugeString => "huge_string",
            Mutation::FutureTime => "future_time",
            Mutation::Duplicate => "duplicate",
            Mutation::UnknownSymbol => "unknown_symbol",
            Mutation::NotJson => "not_json",
        }
    }
}

/// One record to produce: its key and payload, and the mutation that made
/// it (`None` for a clean trade).
#[derive(Debug, Clone)]
pub struct Record {
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
    pub mutation: Option<Mutation>,
}

/// The byte range of the value of `"key":` in an encoded trade (quotes
/// included for a string), as [`binance::encode`] writes it.
fn value_span(payload: &[u8], key: &str) -> Option<(usize, usize)> {
    let needle = format!("\"{key}\":");
    let start = payload.windows(needle.len()).position(|w| w == needle.as_bytes())? + needle.len();
    let end = if payload.get(start) == Some(&b'"') {
        start + 1 + payload[start + 1..].iter().position(|&b| b == b'"')? + 1
    } else {
        start + payload[start..].iter().position(|&b| b == b',' || b == b'}')?
    };
    Some((start, end))
}

/// `payload` with the value of `key` replaced by the raw JSON `value`.
fn with_value(payload: &[u8], key: &str, value: &[u8]) -> Vec<u8> {
    let Some((start, end)) = value_span(payload, key) else { return payload.to_vec() };
    [&payload[..start], value, &payload[end..]].concat()
}

/// A mutant of the clean payload `base`; `now_ms` dates the future times.
/// A bit flip that leaves a valid trade (a digit of the price changed into
/// another) is no hostile input but a different trade, indistinguishable
/// from a real one: such flips are drawn again, and counted in `redrawn`.
pub(crate) fn mutate(kind: Mutation, base: &[u8], rng: &mut SplitMix64, now_ms: i64, redrawn: &mut u64) -> Vec<u8> {
    let pick = |rng: &mut SplitMix64, n: usize| rng.below(n as u64) as usize;
    match kind {
        Mutation::Truncated => base[..pick(rng, base.len())].to_vec(),
        Mutation::BitFlips => loop {
            let mut out = base.to_vec();
            for _ in 0..1 + pick(rng, 3) {
                let at = pick(rng, out.len());
                out[at] ^= 1 << pick(rng, 8);
            }
            if binance::decode(&out).is_err() {
                break out;
            }
            *redrawn += 1;
        },
        Mutation::HugeNumber => {
            let digits = "9".repeat(300 + pick(rng, 200));
            match pick(rng, 4) {
                0 => with_value(base, "p", format!("\"{digits}.5\"").as_bytes()),
                1 => with_value(base, "q", format!("\"{digits}\"").as_bytes()),
                2 => with_value(base, "t", digits.as_bytes()),
                _ => with_value(base, "T", digits.as_bytes()),
            }
        }
        Mutation::DeepNesting => {
            let depth = 10_000 + pick(rng, 90_000);
            let nested = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
            [b"{\"x\":".as_slice(), nested.as_bytes(), b",", &base[1..]].concat()
        }
        Mutation::InvalidUtf8 => {
            let (start, end) = value_span(base, "s").unwrap_or((0, base.len()));
            let mut out = base.to_vec();
            let at = (start + 1 + pick(rng, (end - start).saturating_sub(2).max(1))).min(out.len() - 1);
            out[at] = [0xff, 0xc3, 0x80, 0xfe][pick(rng, 4)];
            out
        }
        Mutation::HugeString => {
            let huge = format!("\"{}\"", "A".repeat(HUGE_STRING_BYTES));
            with_value(base, "s", huge.as_bytes())
        }
        Mutation::FutureTime => with_value(base, "T", (now_ms + CENTURY_MS).to_string().as_bytes()),
        Mutation::Duplicate => base.to_vec(),
        Mutation::UnknownSymbol => with_value(base, "s", format!("\"ZZ{}USDT\"", pick(rng, 1000)).as_bytes()),
        Mutation::NotJson => (0..pick(rng, 64)).map(|_| rng.next() as u8).collect(),
    }
}

/// The clean trades of `input` with `mutants` mutants mixed in at seeded
/// random places; a mutant that is still a valid trade of its base's
/// symbol always comes after its base. At most one 10 MB string per 1,000
/// mutants (and at least one): further draws of it draw another mutation
/// (a duplicate when only huge strings are asked for). Returns the
/// records and how many bit flips were drawn again.
pub fn mix(clean: &[Record], mutants: usize, kinds: &[Mutation], seed: u64, now_ms: i64) -> (Vec<Record>, u64) {
    let mut rng = SplitMix64(seed);
    let mut redrawn = 0;
    let huge_cap = (mutants / 1000).max(1);
    let mut huge = 0;
    let mut placed: Vec<(usize, Record)> = Vec::with_capacity(mutants);
    for _ in 0..mutants {
        let mut kind = kinds[rng.below(kinds.len() as u64) as usize];
        if kind == Mutation::HugeString {
            huge += 1;
            if huge > huge_cap {
                let others: Vec<Mutation> = kinds.iter().copied().filter(|k| *k != Mutation::HugeString).collect();
                kind = others.get(rng.below(others.len() as u64) as usize).copied().unwrap_or(Mutation::Duplicate);
            }
        }
        let base = rng.below(clean.len() as u64) as usize;
        let payload = mutate(kind, &clean[base].payload, &mut rng, now_ms, &mut redrawn);
        // A mutant that is still its base's trade (a copy; deep nesting in a
        // key the decoder skips) comes after its base, as an exchange's
        // resend would: before it, it would be the first copy of a trade
        // from further on, and the trades in between would be duplicates.
        let same_trade = binance::decode(&payload).is_ok_and(|trade| trade.symbol.as_bytes() == clean[base].key.as_slice());
        let at = if same_trade {
            base + 1 + rng.below((clean.len() - base) as u64) as usize
        } else {
            rng.below(clean.len() as u64 + 1) as usize
        };
        let key = match kind {
            Mutation::UnknownSymbol => value_span(&payload, "s").map_or_else(Vec::new, |(s, e)| payload[s + 1..e - 1].to_vec()),
            _ => clean[base].key.clone(),
        };
        placed.push((at, Record { key, payload, mutation: Some(kind) }));
    }
    placed.sort_by_key(|(at, _)| *at);
    let mut out = Vec::with_capacity(clean.len() + mutants);
    let mut mutants = placed.into_iter().peekable();
    for (i, record) in clean.iter().enumerate() {
        while let Some((_, mutant)) = mutants.next_if(|(at, _)| *at == i) {
            out.push(mutant);
        }
        out.push(record.clone());
    }
    out.extend(mutants.map(|(_, mutant)| mutant));
    (out, redrawn)
}

/// The trades of `input`, encoded as the producer publishes them.
pub fn clean_records(input: &Path) -> Result<Vec<Record>> {
    let mut out = Vec::new();
    for batch in archive::open(input, 8192)? {
        let batch = batch?;
        let cols = TradeColumns::new(&batch)?;
        for row in 0..batch.num_rows() {
            let trade = cols.trade(row);
            let mut payload = Vec::with_capacity(160);
            binance::encode(&trade, &mut payload);
            out.push(Record { key: trade.symbol.as_bytes().to_vec(), payload, mutation: None });
        }
    }
    Ok(out)
}

/// What a run reads, where it writes, and how many mutants it mixes in.
#[derive(Debug, Clone)]
pub struct HostileConfig {
    /// Topic, dead-letter topic: made for this run (they must be new).
    pub kafka: KafkaArgs,
    pub redis: RedisArgs,
    pub consumer_bin: PathBuf,
    pub input: PathBuf,
    pub mutants: usize,
    /// The mutations drawn from (all of them by default).
    pub kinds: Vec<Mutation>,
    pub seed: u64,
    pub work_dir: PathBuf,
}

/// What one consumer run did.
#[derive(Debug, Default, Clone)]
pub struct ConsumerRun {
    pub applied: u64,
    pub duplicates: u64,
    pub late: u64,
    pub rejected: u64,
    pub bars: u64,
    pub peak_rss_kib: u64,
    pub elapsed: Duration,
}

/// How a run went.
#[derive(Debug, Default)]
pub struct HostileReport {
    pub seed: u64,
    pub clean: u64,
    pub produced: u64,
    /// Mutants per mutation.
    pub mutants: BTreeMap<&'static str, u64>,
    /// Bit flips drawn again because they left a valid trade.
    pub redrawn: u64,
    pub hostile: ConsumerRun,
    pub reference: ConsumerRun,
    /// Dead letters per reason.
    pub dead_letters: BTreeMap<String, u64>,
    /// The digest of the hostile run's Redis and of the clean run's.
    pub digests: (String, String),
}

impl HostileReport {
    pub fn dead_lettered(&self) -> u64 {
        self.dead_letters.values().sum()
    }

    /// Every record accounted for, every clean trade applied, Redis equal.
    pub fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        let accounted = self.hostile.applied + self.hostile.duplicates + self.dead_lettered();
        if accounted != self.produced {
            out.push(format!(
                "applied {} + duplicates {} + dead letters {} = {accounted}, produced {}",
                self.hostile.applied,
                self.hostile.duplicates,
                self.dead_lettered(),
                self.produced
            ));
        }
        if self.hostile.applied != self.reference.applied {
            out.push(format!("applied {} trades; the clean run applied {}", self.hostile.applied, self.reference.applied));
        }
        if self.digests.0 != self.digests.1 {
            out.push(format!("Redis digest {} differs from the clean run's {}", self.digests.0, self.digests.1));
        }
        out
    }

    pub fn to_json(&self) -> serde_json::Value {
        let run = |r: &ConsumerRun| {
            serde_json::json!({"applied": r.applied, "duplicates": r.duplicates, "late": r.late, "rejected": r.rejected,
                "bars": r.bars, "peak_rss_kib": r.peak_rss_kib, "elapsed_s": r.elapsed.as_secs_f64()})
        };
        serde_json::json!({
            "seed": self.seed, "clean": self.clean, "produced": self.produced, "mutants": self.mutants,
            "redrawn_bit_flips": self.redrawn, "hostile": run(&self.hostile), "clean_run": run(&self.reference),
            "dead_letters": self.dead_letters, "digest": self.digests.0, "clean_digest": self.digests.1,
            "failures": self.failures(),
        })
    }
}

impl std::fmt::Display for HostileReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mutants: u64 = self.mutants.values().sum();
        writeln!(f, "seed {}: {} records produced = {} clean trades + {mutants} mutants", self.seed, self.produced, self.clean)?;
        let kinds: Vec<String> = self.mutants.iter().map(|(k, n)| format!("{k} {n}")).collect();
        writeln!(f, "  mutants: {} ({} bit flips that left a valid trade drawn again)", kinds.join(", "), self.redrawn)?;
        let reasons: Vec<String> = self.dead_letters.iter().map(|(k, n)| format!("{k} {n}")).collect();
        writeln!(
            f,
            "  outcome: applied {} + duplicates {} + dead letters {} ({})",
            self.hostile.applied,
            self.hostile.duplicates,
            self.dead_lettered(),
            reasons.join(", ")
        )?;
        writeln!(
            f,
            "  consumer peak RSS {:.1} MiB in {:.1} s; clean run {:.1} MiB in {:.1} s",
            self.hostile.peak_rss_kib as f64 / 1024.0,
            self.hostile.elapsed.as_secs_f64(),
            self.reference.peak_rss_kib as f64 / 1024.0,
            self.reference.elapsed.as_secs_f64()
        )?;
        write!(f, "  Redis digest {} (clean run {})", short(&self.digests.0), short(&self.digests.1))?;
        for failure in self.failures() {
            write!(f, "\n  FAILED: {failure}")?;
        }
        Ok(())
    }
}

fn short(digest: &str) -> &str {
    &digest[..digest.len().min(12)]
}

/// Produces the mixed records, runs the consumer over them and over the
/// clean trades alone (topics `<topic>` and `<topic>.clean`), and compares.
pub async fn run(config: HostileConfig) -> Result<HostileReport> {
    let clean = clean_records(&config.input)?;
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    let (records, redrawn) = mix(&clean, config.mutants, &config.kinds, config.seed, now_ms);
    let mut report =
        HostileReport { seed: config.seed, clean: clean.len() as u64, produced: records.len() as u64, redrawn, ..Default::default() };
    for record in &records {
        if let Some(kind) = record.mutation {
            *report.mutants.entry(kind.name()).or_default() += 1;
        }
    }
    let mut symbols: Vec<String> = clean.iter().map(|r| String::from_utf8_lossy(&r.key).into_owned()).collect();
    symbols.sort();
    symbols.dedup();

    let hostile_kafka = config.kafka.clone();
    let clean_kafka = KafkaArgs {
        topic: format!("{}.clean", config.kafka.topic),
        dlq_topic: format!("{}.clean", config.kafka.dlq_topic),
        ..config.kafka.clone()
    };
    create_topics(&[&hostile_kafka, &clean_kafka]).await?;
    produce(&hostile_kafka, &records).await?;
    produce(&clean_kafka, &clean).await?;

    let hostile_prefix = config.redis.target.prefix.clone();
    let clean_prefix = format!("{hostile_prefix}.clean");
    report.hostile = run_consumer(&config, &hostile_kafka, &hostile_prefix, &symbols, "hostile")?;
    report.reference = run_consumer(&config, &clean_kafka, &clean_prefix, &symbols, "clean")?;
    report.dead_letters = dead_letters(&hostile_kafka)?;
    let mut conn = sink::connect(&config.redis.target.url).await?;
    report.digests = (digest::digest(&mut conn, &hostile_prefix).await?.sha256, digest::digest(&mut conn, &clean_prefix).await?.sha256);
    Ok(report)
}

/// Creates each run's raw topic (6 partitions, records up to 16 MiB) and
/// dead-letter topic (the broker's default record size); they must be new.
async fn create_topics(runs: &[&KafkaArgs]) -> Result<()> {
    let kafka = runs[0].clone();
    tokio::task::spawn_blocking(move || kafka.check_reachable()).await.map_err(|e| Error::join("kafka probe", e))??;
    let admin: AdminClient<DefaultClientContext> = runs[0].client_config()?.create().map_err(|e| Error::kafka("admin client", e))?;
    let max = MAX_RECORD_BYTES.to_string();
    let mut topics = Vec::new();
    for run in runs {
        topics.push(
            NewTopic::new(&run.topic, run.partitions, TopicReplication::Fixed(-1)).set("retention.ms", "-1").set("max.message.bytes", &max),
        );
        topics.push(NewTopic::new(&run.dlq_topic, 1, TopicReplication::Fixed(-1)));
    }
    let options = AdminOptions::new().operation_timeout(Some(REQUEST_TIMEOUT));
    for result in admin.create_topics(&topics, &options).await.map_err(|e| Error::kafka("create topics", e))? {
        result.map_err(|(topic, code)| Error::Config(format!("cannot create topic {topic} ({code}); the hostile run needs new topics")))?;
    }
    Ok(())
}

/// Sends `records` in order, keyed, each acknowledged before the run goes
/// on (a mutant of any size must be in the topic, or the run fails).
async fn produce(kafka: &KafkaArgs, records: &[Record]) -> Result<()> {
    let max = MAX_RECORD_BYTES.to_string();
    let producer: FutureProducer =
        kafka.config_with(&[("message.max.bytes", &max), ("linger.ms", "5")])?.create().map_err(|e| Error::kafka("producer", e))?;
    let mut pending = futures::stream::FuturesOrdered::new();
    for record in records {
        let sent = producer.send(FutureRecord::to(&kafka.topic).key(&record.key).payload(&record.payload), Duration::from_secs(60));
        pending.push_back(sent);
        if pending.len() >= 10_000 {
            drain(&mut pending).await?;
        }
    }
    drain(&mut pending).await
}

async fn drain<F>(pending: &mut futures::stream::FuturesOrdered<F>) -> Result<()>
where
    F: std::future::Future<
        Output = std::result::Result<
            rdkafka::producer::future_producer::Delivery,
            (rdkafka::error::KafkaError, rdkafka::message::OwnedMessage),
        >,
    >,
{
    while let Some(result) = futures::StreamExt::next(pending).await {
        result.map_err(|(e, _)| Error::kafka("produce", e))?;
    }
    Ok(())
}

/// Runs the consumer binary to the end of `kafka`'s topic with the input's
/// symbols as its allow-list, sampling its peak RSS.
fn run_consumer(config: &HostileConfig, kafka: &KafkaArgs, prefix: &str, symbols: &[String], name: &str) -> Result<ConsumerRun> {
    let state = config.work_dir.join(name);
    let started = Instant::now();
    let mut child = Command::new(&config.consumer_bin)
        .args(["--brokers", &kafka.brokers, "--topic", &kafka.topic, "--dlq-topic", &kafka.dlq_topic])
        .args(["--redis-prefix", prefix, "--group-id", prefix, "--exit-at-end", "--json", "--symbols", &symbols.join(",")])
        .arg("--state-dir")
        .arg(&state)
        .env("CRYPTOPULSE_REDIS_URL", &config.redis.target.url)
        .env("CRYPTOPULSE_ASSIGN", "all")
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| Error::io(&config.consumer_bin, e))?;
    let mut peak = 0;
    let status = loop {
        peak = peak.max(peak_rss_kib(child.id()).unwrap_or(0));
        if let Some(status) = child.try_wait().map_err(|e| Error::io(&config.consumer_bin, e))? {
            break status;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stdout = String::new();
    if let Some(mut out) = child.stdout.take() {
        std::io::Read::read_to_string(&mut out, &mut stdout).map_err(|e| Error::io(&config.consumer_bin, e))?;
    }
    if !status.success() {
        return Err(Error::task_failed("consumer", format!("{name} run exited with {status}")));
    }
    let summary: serde_json::Value = stdout
        .lines()
        .rev()
        .find_map(|line| serde_json::from_str(line).ok())
        .ok_or_else(|| Error::task_failed("consumer", format!("{name} run printed no JSON summary: {stdout}")))?;
    let count = |key: &str| summary["totals"][key].as_u64().unwrap_or(0);
    Ok(ConsumerRun {
        applied: count("applied"),
        duplicates: count("duplicates"),
        late: count("late"),
        rejected: count("rejected"),
        bars: count("bars"),
        peak_rss_kib: peak,
        elapsed: started.elapsed(),
    })
}

/// VmHWM of process `pid`, in KiB.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| line.strip_prefix("VmHWM:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Dead letters per `reason` header, the whole dead-letter topic.
fn dead_letters(kafka: &KafkaArgs) -> Result<BTreeMap<String, u64>> {
    let consumer: BaseConsumer = kafka
        .config_with(&[("group.id", "cryptopulse-hostile"), ("enable.auto.commit", "false")])?
        .create()
        .map_err(|e| Error::kafka("dead-letter reader", e))?;
    let (low, high) = consumer.fetch_watermarks(&kafka.dlq_topic, 0, REQUEST_TIMEOUT).map_err(|e| Error::kafka("watermarks", e))?;
    let mut list = TopicPartitionList::new();
    list.add_partition_offset(&kafka.dlq_topic, 0, Offset::Offset(low)).map_err(|e| Error::kafka("assign", e))?;
    consumer.assign(&list).map_err(|e| Error::kafka("assign", e))?;
    let mut out = BTreeMap::new();
    let (mut next, deadline) = (low, Instant::now() + Duration::from_secs(120));
    while next < high {
        if Instant::now() > deadline {
            return Err(Error::task_failed("dead-letter reader", format!("read {next} of {high} within 120 s")));
        }
        let Some(message) = consumer.poll(Duration::from_millis(500)) else { continue };
        let message = message.map_err(|e| Error::kafka("read dead letters", e))?;
        next = message.offset() + 1;
        let reason = message
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == "reason").and_then(|h| h.value).map(|v| String::from_utf8_lossy(v).into_owned()))
            .unwrap_or_else(|| "(none)".into());
        *out.entry(reason).or_default() += 1;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clean() -> Vec<Record> {
        let trades = [
            r#"{"e":"trade","E":1723161255343,"s":"BTCUSDT","t":3714358427,"p":"61302.01000000","q":"0.00100000","T":1723161255342,"m":true,"M":true}"#,
            r#"{"e":"trade","E":1723161255350,"s":"ETHUSDT","t":1519722380,"p":"2650.10000000","q":"0.50000000","T":1723161255349,"m":false,"M":true}"#,
        ];
        (0..50)
            .map(|i| {
                let payload = trades[i % 2].as_bytes().to_vec();
                Record { key: if i % 2 == 0 { b"BTCUSDT".to_vec() } else { b"ETHUSDT".to_vec() }, payload, mutation: None }
            })
            .collect()
    }

    #[test]
    fn every_mutant_is_refused_by_the_decoder_or_is_what_the_consumer_refuses() {
        let base = &clean()[0].payload;
        assert!(binance::decode(base).is_ok());
        let mut rng = SplitMix64(7);
        let mut redrawn = 0;
        for kind in Mutation::ALL {
            for _ in 0..50 {
                let mutant = mutate(kind, base, &mut rng, 1_800_000_000_000, &mut redrawn);
                let decoded = binance::decode(&mutant);
                match kind {
                    Mutation::Duplicate => assert_eq!(&mutant, base),
                    // An unknown key is skipped: the same trade as its base, a duplicate.
                    Mutation::DeepNesting => assert!(decoded.is_err() || decoded.unwrap().id == 3714358427),
                    // The consumer refuses it against its clock (bad_time), not the decoder.
                    Mutation::FutureTime => assert_eq!(decoded.unwrap().time_ms, 1_800_000_000_000 + CENTURY_MS),
                    // A valid trade of a symbol the consumer's allow-list refuses.
                    Mutation::UnknownSymbol => assert!(decoded.unwrap().symbol.starts_with("ZZ")),
                    _ => assert!(decoded.is_err(), "{}: {}", kind.name(), String::from_utf8_lossy(&mutant[..mutant.len().min(200)])),
                }
            }
        }
    }

    #[test]
    fn the_mix_keeps_every_clean_record_in_order_and_duplicates_after_their_original() {
        let clean = clean();
        let (mixed, _) = mix(&clean, 500, &Mutation::ALL, 42, 1_800_000_000_000);
        assert_eq!(mixed.len(), 550);
        let kept: Vec<&Record> = mixed.iter().filter(|r| r.mutation.is_none()).collect();
        assert_eq!(kept.len(), 50);
        assert!(kept.iter().zip(&clean).all(|(a, b)| a.payload == b.payload && a.key == b.key));
        assert_eq!(
            mixed.iter().filter(|r| r.mutation == Some(Mutation::HugeString)).count(),
            1,
            "one 10 MB string per 1,000 mutants, at least one"
        );
        assert!(Mutation::ALL.iter().all(|kind| mixed.iter().any(|r| r.mutation == Some(*kind))), "500 draws cover every mutation");
        // The same seed, the same mix.
        let (again, _) = mix(&clean, 500, &Mutation::ALL, 42, 1_800_000_000_000);
        assert!(mixed.iter().zip(&again).all(|(a, b)| a.payload == b.payload));
    }
}
