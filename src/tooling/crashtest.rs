//! The crash harness behind SPEC §7: a consumer SIGKILLed at seeded random
//! instants and aborted at every named crash point must leave Redis identical
//! to a run that never crashed.
//!
//! The inputs go into a fresh topic one slice per round, so every crash hits
//! unread data and every restart can be timed to the end of its slice. Round
//! 0 runs uninterrupted and measures startup and processing time; each later
//! round crashes the consumer once (SIGKILL during startup or while it reads,
//! timed from the consumer's [`ASSIGNED_LOG`], or a [`CrashPoint`] armed
//! through [`CRASH_AT_ENV`]) and restarts it to the end. A reference consumer
//! then reads the whole topic in one go, and the canonical dumps of both key
//! prefixes are compared.

use std::collections::BTreeSet;
use std::fmt;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tracing::warn;

use super::digest;
use crate::consumer::ASSIGNED_LOG;
use crate::crash_point::{CrashPoint, ABORT_MESSAGE, CRASH_AT_ENV};
use crate::error::{Error, Result};
use crate::kafka::KafkaArgs;
use crate::kafka::REQUEST_TIMEOUT;
use crate::replay::{ReplayOptions, Speed};
use crate::sink::RedisArgs;
use crate::trade::TradeColumns;
use crate::{archive, replay, sink};

/// Longest a single consumer run may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);
/// Attempts per round to land a kill before the consumer finishes first.
const KILL_ATTEMPTS: u32 = 10;
const SIGABRT: i32 = 6;
const SIGKILL: i32 = 9;

/// How often the consumers under test batch and checkpoint: often, so that
/// one slice of a small fixture spans many batches and checkpoints.
#[derive(clap::Args, Debug, Clone)]
pub struct Cadence {
    #[arg(long, env = "CRYPTOPULSE_CRASHTEST_BATCH_ROWS", default_value_t = 16)]
    pub batch_rows: usize,
    #[arg(long, env = "CRYPTOPULSE_CRASHTEST_CHECKPOINT_RECORDS", default_value_t = 64)]
    pub checkpoint_records: u64,
    #[arg(long, env = "CRYPTOPULSE_CRASHTEST_CHECKPOINT_MS", default_value_t = 50)]
    pub checkpoint_ms: u64,
}

impl Default for Cadence {
    fn default() -> Self {
        Cadence { batch_rows: 16, checkpoint_records: 64, checkpoint_ms: 50 }
    }
}

/// What to crash and how often.
#[derive(Debug, Clone)]
pub struct CrashConfig {
    /// The `consumer` binary under test.
    pub consumer_bin: PathBuf,
    /// Parquet archives to replay.
    pub inputs: Vec<PathBuf>,
    /// `topic` must not exist: it is created with unlimited retention, as the
    /// broker would delete replayed trades by their old timestamps. The
    /// reference run uses `dlq_topic`, the crashed one `<dlq_topic>-crash`.
    pub kafka: KafkaArgs,
    /// The Redis prefix is a base: the runs write under `-reference` and `-crash`.
    pub redis: RedisArgs,
    /// State directories go here; must not hold earlier runs.
    pub work_dir: PathBuf,
    pub kills: u32,
    pub seed: u64,
    /// Also crash once at every point of [`CrashPoint::ALL`].
    pub named_points: bool,
    pub cadence: Cadence,
    /// A progress bar of the rounds on stderr (on a terminal).
    pub progress: bool,
}

/// What a crash test found.
#[derive(Debug, Clone, Default)]
pub struct CrashReport {
    pub seed: u64,
    pub kills_done: u32,
    /// Kills before the consumer logged [`ASSIGNED_LOG`]; the rest hit reading.
    pub kills_in_startup: u32,
    /// Runs that reached their end before the planned kill.
    pub kills_missed: u32,
    pub crash_points_hit: Vec<CrashPoint>,
    pub crash_points_armed: usize,
    /// The canonical dumps are byte for byte the same.
    pub identical: bool,
    /// Bars (stream entries) of the reference: 0 would prove nothing.
    pub bars: usize,
    /// Bars of the reference absent from the crashed run, and the reverse.
    pub missing: usize,
    pub extra: usize,
    /// Dump lines of any key type in one run but not the other.
    pub differing_lines: usize,
    /// Distinct dead-letter sources (partition, offset) of the reference,
    /// those missing from the crashed run and those only in it.
    pub dead_letters: usize,
    pub dead_letters_missing: usize,
    pub dead_letters_extra: usize,
    /// Dead letters sent again after a crash: same source, recognisable.
    pub dead_letters_resent: usize,
    /// From a restart after a crash until the consumer exits at the end.
    pub recovery_p50: Duration,
    pub recovery_p99: Duration,
    pub restarts: usize,
    pub reference_run: Duration,
    pub elapsed: Duration,
    pub reference_digest: String,
    pub crash_digest: String,
    /// The base key prefix.
    pub prefix: String,
}

impl CrashReport {
    /// Bars written, dumps identical, no bar missing or extra.
    pub fn passed(&self) -> bool {
        self.bars > 0
            && self.identical
            && self.missing == 0
            && self.extra == 0
            && self.dead_letters > 0
            && self.dead_letters_missing + self.dead_letters_extra == 0
    }
}

impl fmt::Display for CrashReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (verdict, ms) = (if self.passed() { "PASSED" } else { "FAILED" }, |d: Duration| d.as_millis());
        let (kills, startup, missed) = (self.kills_done, self.kills_in_startup, self.kills_missed);
        let (hit, armed, points) = (self.crash_points_hit.len(), self.crash_points_armed, names(&self.crash_points_hit));
        writeln!(f, "crash test {verdict}, seed {}, {:.1} s", self.seed, self.elapsed.as_secs_f64())?;
        write!(f, "  crashes: {kills} SIGKILLs ({startup} in startup, {} while reading; {missed} runs ended first)", kills - startup)?;
        writeln!(f, ", named crash points hit {hit}/{armed} [{points}]")?;
        let (identical, bars, missing, extra, lines) = (self.identical, self.bars, self.missing, self.extra, self.differing_lines);
        writeln!(f, "  redis: identical {identical} | {bars} bars, missing {missing}, extra {extra} | differing dump lines {lines}")?;
        let (letters, resent) = (self.dead_letters, self.dead_letters_resent);
        let (missing, extra) = (self.dead_letters_missing, self.dead_letters_extra);
        writeln!(f, "  dead letters: {letters} distinct sources, missing {missing}, extra {extra} | {resent} sent again after a crash")?;
        let (p50, p99, reference) = (ms(self.recovery_p50), ms(self.recovery_p99), ms(self.reference_run));
        writeln!(f, "  recovery over {} restarts: p50 {p50} ms, p99 {p99} ms | uncrashed run {reference} ms", self.restarts)?;
        writeln!(f, "  sha256 {} under {}-reference:", self.reference_digest, self.prefix)?;
        write!(f, "  sha256 {} under {}-crash:", self.crash_digest, self.prefix)
    }
}

/// A consumer identity: key prefix, dead-letter topic and state directory.
struct Lane {
    prefix: String,
    dlq_topic: String,
    state_dir: PathBuf,
}

/// When to SIGKILL a consumer.
#[derive(Debug, Clone, Copy)]
enum Kill {
    AfterSpawn(Duration),
    AfterStarted(Duration),
}

/// How one consumer run ended.
struct Exit {
    status: ExitStatus,
    killed: bool,
    /// From spawn to [`ASSIGNED_LOG`], if it came.
    startup: Option<Duration>,
    took: Duration,
    log: String,
}

/// The crashed lane and what is learned along the way.
struct Harness<'a> {
    config: &'a CrashConfig,
    lane: Lane,
    rng: SplitMix64,
    report: CrashReport,
    startup: Duration,
    per_record: Duration,
}

/// Runs the whole test: slices, crashes, the reference run and the comparison.
pub async fn run(config: CrashConfig) -> Result<CrashReport> {
    let started = Instant::now();
    let lane = |name: &str, dlq_topic: String| Lane {
        prefix: format!("{}-{name}", config.redis.target.prefix),
        dlq_topic,
        state_dir: config.work_dir.join(name),
    };
    let reference = lane("reference", config.kafka.dlq_topic.clone());
    let crashed = lane("crash", format!("{}-crash", config.kafka.dlq_topic));
    prepare(&config, &[&reference, &crashed]).await?;
    let mut schedule: Vec<Option<CrashPoint>> = vec![None; config.kills as usize];
    if config.named_points {
        schedule.extend(CrashPoint::ALL.map(Some));
    }
    let (mut rng, report) =
        (SplitMix64(config.seed), CrashReport { seed: config.seed, prefix: config.redis.target.prefix.clone(), ..Default::default() });
    rng.shuffle(&mut schedule);
    let bounds = slice_bounds(&config.inputs, schedule.len() + 1)?;
    let mut h = Harness { config: &config, lane: crashed, rng, report, startup: Duration::ZERO, per_record: Duration::ZERO };
    h.calibrate(replay_slice(&config, &bounds, 0).await?).await?;
    let mut recoveries = Vec::new();
    let progress = crate::cli::progress_bar(schedule.len() as u64, "rounds", config.progress);
    for (round, crash) in schedule.iter().enumerate() {
        progress.set_message(match crash {
            Some(point) => format!("crash point {point}"),
            None => "SIGKILL".to_owned(),
        });
        let records = replay_slice(&config, &bounds, round + 1).await?;
        match crash {
            Some(point) => h.point_round(*point, records).await?,
            None => h.kill_round(records).await?,
        }
        recoveries.push(run_to_end(&config, &h.lane).await?);
        progress.inc(1);
    }
    progress.set_message("the uncrashed reference run, then the comparison");
    run_to_end(&config, &h.lane).await?;
    let mut report = h.report;
    report.crash_points_hit.sort();
    report.crash_points_armed = schedule.iter().flatten().count();
    report.reference_run = run_to_end(&config, &reference).await?;
    recoveries.sort();
    (report.recovery_p50, report.recovery_p99, report.restarts) =
        (percentile(&recoveries, 50), percentile(&recoveries, 99), recoveries.len());
    compare(&config, &reference, &h.lane, &mut report).await?;
    progress.finish_and_clear();
    report.elapsed = started.elapsed();
    Ok(report)
}

impl Harness<'_> {
    /// Runs slice 0 uninterrupted: how long startup takes, and each record.
    async fn calibrate(&mut self, records: u64) -> Result<()> {
        let exit = supervise(command(self.config, &self.lane, None), None).await?;
        check_ok(&exit)?;
        self.startup = exit.startup.ok_or_else(|| Error::task_failed("consumer", format!("it never logged {ASSIGNED_LOG:?}")))?;
        self.per_record = exit.took.saturating_sub(self.startup) / u32::try_from(records.max(1)).unwrap_or(u32::MAX);
        Ok(())
    }

    /// SIGKILLs the consumer at a seeded instant: a third of the time during
    /// startup, otherwise while it reads its slice. If it finishes first, it
    /// is tried again (now caught up, so during startup), within the time
    /// the run that got away took.
    async fn kill_round(&mut self, records: u64) -> Result<()> {
        let reading = self.per_record * u32::try_from(records).unwrap_or(u32::MAX);
        let mut kill = if reading.is_zero() || self.rng.below(3) == 0 {
            Kill::AfterSpawn(self.rng.up_to(self.startup))
        } else {
            Kill::AfterStarted(self.rng.up_to(reading))
        };
        for _ in 0..KILL_ATTEMPTS {
            let exit = supervise(command(self.config, &self.lane, None), Some(kill)).await?;
            if exit.killed {
                self.report.kills_done += 1;
                self.report.kills_in_startup += u32::from(exit.startup.is_none());
                return Ok(());
            }
            check_ok(&exit)?;
            self.report.kills_missed += 1;
            // The run ended before its kill: the machine may be less busy
            // than when startup was measured (the tests run beside other
            // tests). The next delay is drawn within what this run took.
            self.startup = self.startup.min(exit.took);
            kill = Kill::AfterSpawn(self.rng.up_to(exit.took));
        }
        Err(Error::task_failed("crash test", format!("no kill landed in {KILL_ATTEMPTS} attempts: the consumer keeps finishing first")))
    }

    /// Arms `point` at a seeded record in the first half of the slice; the
    /// consumer passes the point at or after it, and must then die of SIGABRT.
    async fn point_round(&mut self, point: CrashPoint, records: u64) -> Result<()> {
        let armed = point.arm_at(1 + self.rng.below((records / 2).max(1)));
        let exit = supervise(command(self.config, &self.lane, Some(&armed)), None).await?;
        if signal_of(&exit.status) == Some(SIGABRT) && exit.log.contains(ABORT_MESSAGE) {
            self.report.crash_points_hit.push(point);
            return Ok(());
        }
        check_ok(&exit)?;
        warn!(%armed, records, "the consumer finished its slice without reaching the armed crash point");
        Ok(())
    }
}

/// Creates the topics (they must be new) and checks no state or keys exist.
async fn prepare(config: &CrashConfig, lanes: &[&Lane]) -> Result<()> {
    let kafka = config.kafka.clone();
    tokio::task::spawn_blocking(move || kafka.check_reachable()).await.map_err(|e| Error::join("kafka probe", e))??;
    let admin: AdminClient<DefaultClientContext> = config.kafka.client_config()?.create().map_err(|e| Error::kafka("admin client", e))?;
    let raw = NewTopic::new(&config.kafka.topic, config.kafka.partitions, TopicReplication::Fixed(-1)).set("retention.ms", "-1");
    let topics: Vec<NewTopic> =
        lanes.iter().map(|lane| NewTopic::new(&lane.dlq_topic, 1, TopicReplication::Fixed(-1))).chain([raw]).collect();
    let options = AdminOptions::new().operation_timeout(Some(REQUEST_TIMEOUT));
    for result in admin.create_topics(&topics, &options).await.map_err(|e| Error::kafka("create topics", e))? {
        result.map_err(|(topic, code)| Error::Config(format!("cannot create topic {topic} ({code}); the crash test needs new topics")))?;
    }
    let mut conn = sink::connect(&config.redis.target.url).await?;
    for lane in lanes {
        if digest::digest(&mut conn, &lane.prefix).await?.keys > 0 || lane.state_dir.exists() {
            return Err(Error::Config(format!("{} or {} holds an earlier run", lane.prefix, lane.state_dir.display())));
        }
    }
    std::fs::create_dir_all(&config.work_dir).map_err(|e| Error::io(&config.work_dir, e))
}

/// Trade times splitting the inputs into `n` slices of about equal size.
fn slice_bounds(inputs: &[PathBuf], n: usize) -> Result<Vec<i64>> {
    let mut times = Vec::new();
    for file in inputs {
        for batch in archive::open(file, 8192)? {
            times.extend_from_slice(TradeColumns::new(&batch?)?.time.values());
        }
    }
    times.sort_unstable();
    let mut bounds: Vec<i64> = (1..n).filter_map(|i| times.get(i * times.len() / n).copied()).collect();
    bounds.dedup();
    Ok(bounds)
}

/// Replays slice `i`: trades from bound `i - 1` up to bound `i`. Returns its size.
async fn replay_slice(config: &CrashConfig, bounds: &[i64], i: usize) -> Result<u64> {
    if i > bounds.len() {
        return Ok(0);
    }
    let (from_ms, to_ms) = (i.checked_sub(1).and_then(|j| bounds.get(j).copied()), bounds.get(i).copied());
    let options = ReplayOptions { files: config.inputs.clone(), speed: Speed::Max, symbols: None, from_ms, to_ms, progress: false };
    let trades = replay::run(&config.kafka, options).await?.trades;
    inject_bad_record(config, i).await?;
    Ok(trades + 1)
}

/// One record per slice that must be dead-lettered, so the comparison of
/// dead-letter sources has something to compare.
async fn inject_bad_record(config: &CrashConfig, i: usize) -> Result<()> {
    let producer: FutureProducer = config.kafka.producer_config()?.create().map_err(|e| Error::kafka("producer", e))?;
    let payload = format!(r#"{{"e":"trade","s":"BTCUSDT","t":{i},"p":"not a number"}}"#);
    let record = FutureRecord::to(&config.kafka.topic).key("BTCUSDT").payload(&payload);
    producer.send(record, REQUEST_TIMEOUT).await.map_err(|(e, _)| Error::kafka("inject bad record", e))?;
    Ok(())
}

/// The distinct (partition, offset) sources in a dead-letter topic, and the
/// number of records (a record dead-lettered again after a crash counts twice).
async fn dead_letter_sources(config: &CrashConfig, topic: &str) -> Result<(BTreeSet<(String, String)>, usize)> {
    let consumer: BaseConsumer =
        config.kafka.config_with(&[("group.id", "crashtest-dlq-reader")])?.create().map_err(|e| Error::kafka("dlq reader", e))?;
    let (_, high) = consumer.fetch_watermarks(topic, 0, REQUEST_TIMEOUT).map_err(|e| Error::kafka("dlq watermarks", e))?;
    let mut list = TopicPartitionList::new();
    list.add_partition_offset(topic, 0, Offset::Beginning).map_err(|e| Error::kafka("dlq assign", e))?;
    consumer.assign(&list).map_err(|e| Error::kafka("dlq assign", e))?;
    let (mut sources, mut records, deadline) = (BTreeSet::new(), 0, Instant::now() + REQUEST_TIMEOUT);
    while records < high as usize && Instant::now() < deadline {
        let Some(message) = consumer.poll(Duration::from_millis(200)) else { continue };
        let message = message.map_err(|e| Error::kafka("read dead letters", e))?;
        let header = |key: &str| {
            message.headers().and_then(|h| h.iter().find(|h| h.key == key)?.value.map(|v| String::from_utf8_lossy(v).into_owned()))
        };
        sources.insert((header("source.partition").unwrap_or_default(), header("source.offset").unwrap_or_default()));
        records += 1;
    }
    Ok((sources, records))
}

/// Runs a consumer to the end of its input; it must exit 0.
async fn run_to_end(config: &CrashConfig, lane: &Lane) -> Result<Duration> {
    let exit = supervise(command(config, lane, None), None).await?;
    check_ok(&exit)?;
    Ok(exit.took)
}

fn check_ok(exit: &Exit) -> Result<()> {
    if exit.status.success() {
        return Ok(());
    }
    let tail: Vec<&str> = exit.log.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect();
    Err(Error::task_failed("consumer", format!("{}: {}", exit.status, tail.join(" | "))))
}

/// The consumer command line for `lane`. Secrets (Redis URL, Kafka
/// properties) go through the environment; inherited `CRYPTOPULSE_*`
/// variables are removed so they cannot change what runs.
fn command(config: &CrashConfig, lane: &Lane, crash_at: Option<&str>) -> Command {
    let (kafka, redis, cadence) = (&config.kafka, &config.redis, &config.cadence);
    let mut cmd = Command::new(&config.consumer_bin);
    for (key, _) in std::env::vars_os().filter(|(key, _)| key.to_string_lossy().starts_with("CRYPTOPULSE_")) {
        cmd.env_remove(key);
    }
    // One consumer over every partition: the crash harness measures the
    // checkpoint and recovery path; groups are tested in tests/it/group.rs.
    cmd.env("CRYPTOPULSE_ASSIGN", "all");
    cmd.arg("--exit-at-end").arg("--state-dir").arg(&lane.state_dir);
    let numbers = [redis.retention_secs, redis.redis_retry_secs, cadence.batch_rows as u64, cadence.checkpoint_records];
    let ([retention, retry, batch, records], partitions) = (numbers.map(|n| n.to_string()), kafka.partitions.to_string());
    cmd.args(["--brokers", &kafka.brokers, "--topic", &kafka.topic, "--dlq-topic", &lane.dlq_topic, "--partitions", &partitions]);
    cmd.args(["--redis-prefix", &lane.prefix, "--group-id", &lane.prefix, "--retention-secs", &retention, "--redis-retry-secs", &retry]);
    cmd.args(["--batch-rows", &batch, "--checkpoint-records", &records, "--checkpoint-ms", &cadence.checkpoint_ms.to_string()]);
    if let Some(file) = &kafka.kafka_config_file {
        cmd.arg("--kafka-config-file").arg(file);
    }
    if !kafka.properties.is_empty() {
        let properties: Vec<String> = kafka.properties.iter().map(|(k, v)| format!("{k}={v}")).collect();
        cmd.env("CRYPTOPULSE_KAFKA_PROPERTIES", properties.join(";"));
    }
    if let Some(crash_at) = crash_at {
        cmd.env(CRASH_AT_ENV, crash_at);
    }
    cmd.env("CRYPTOPULSE_REDIS_URL", &redis.target.url).env("RUST_LOG", "info");
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    cmd
}

/// Starts `cmd` and watches it from a blocking thread until it exits, or
/// SIGKILLs it when `kill` is due; its stderr is read on another thread.
async fn supervise(mut cmd: Command, kill: Option<Kill>) -> Result<Exit> {
    tokio::task::spawn_blocking(move || {
        let spawned = Instant::now();
        let mut child = cmd.spawn().map_err(|e| Error::io(cmd.get_program(), e))?;
        let stderr = child.stderr.take().ok_or_else(|| Error::Invariant("consumer stderr not piped".into()))?;
        let (started_tx, started_rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut log = String::new();
            for line in BufReader::new(stderr).lines().map_while(std::result::Result::ok) {
                if line.contains(ASSIGNED_LOG) {
                    let _ = started_tx.send(spawned.elapsed());
                }
                log.extend([line.as_str(), "\n"]);
            }
            log
        });
        let mut startup = None;
        let (status, killed) = loop {
            startup = startup.or_else(|| started_rx.try_recv().ok());
            if let Some(status) = child.try_wait().map_err(|e| Error::io("consumer", e))? {
                break (status, false);
            }
            let due = match kill {
                Some(Kill::AfterSpawn(delay)) => Some(delay),
                Some(Kill::AfterStarted(delay)) => startup.map(|at| at + delay),
                None => None,
            };
            let overdue = spawned.elapsed() > RUN_TIMEOUT;
            if overdue || due.is_some_and(|due| spawned.elapsed() >= due) {
                child.kill().map_err(|e| Error::io("kill consumer", e))?;
                let status = child.wait().map_err(|e| Error::io("consumer", e))?;
                if overdue {
                    return Err(Error::Timeout { what: "a consumer run".into(), after: RUN_TIMEOUT });
                }
                // One that exited just before the signal keeps its own status.
                break (status, signal_of(&status) == Some(SIGKILL));
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let took = spawned.elapsed();
        let log = reader.join().unwrap_or_default();
        // A line still in the pipe at the end was logged before it, too.
        Ok(Exit { status, killed, startup: startup.or_else(|| started_rx.try_recv().ok()), took, log })
    })
    .await
    .map_err(|e| Error::join("crash test thread", e))?
}

#[cfg(unix)]
fn signal_of(status: &ExitStatus) -> Option<i32> {
    std::os::unix::process::ExitStatusExt::signal(status)
}

#[cfg(not(unix))]
fn signal_of(_: &ExitStatus) -> Option<i32> {
    None
}

/// Fills in the verdict: digests, bar differences, dead-letter sources.
async fn compare(config: &CrashConfig, reference: &Lane, crashed: &Lane, report: &mut CrashReport) -> Result<()> {
    let mut conn = sink::connect(&config.redis.target.url).await?;
    let (want, got) = (digest::digest(&mut conn, &reference.prefix).await?, digest::digest(&mut conn, &crashed.prefix).await?);
    report.identical = want.dump == got.dump;
    let (want_bars, got_bars) = (stream_entries(&want.dump), stream_entries(&got.dump));
    (report.bars, (report.missing, report.extra)) = (want_bars.len(), differences(&want_bars, &got_bars));
    let (only_want, only_got) = differences(&dump_lines(&want.dump), &dump_lines(&got.dump));
    (report.differing_lines, report.reference_digest, report.crash_digest) = (only_want + only_got, want.sha256, got.sha256);
    let ((want, _), (got, records)) =
        (dead_letter_sources(config, &reference.dlq_topic).await?, dead_letter_sources(config, &crashed.dlq_topic).await?);
    (report.dead_letters, (report.dead_letters_missing, report.dead_letters_extra)) = (want.len(), differences(&want, &got));
    report.dead_letters_resent = records.saturating_sub(got.len());
    Ok(())
}

/// The points' names, comma-separated.
fn names(points: &[CrashPoint]) -> String {
    points.iter().map(|p| p.name()).collect::<Vec<_>>().join(", ")
}

/// Items in `want` but not `got`, and in `got` but not `want`.
fn differences<T: Ord>(want: &BTreeSet<T>, got: &BTreeSet<T>) -> (usize, usize) {
    (want.difference(got).count(), got.difference(want).count())
}

/// Every line of a dump paired with the header line of its key (headers
/// themselves paired with "").
fn dump_lines(dump: &str) -> BTreeSet<(&str, &str)> {
    let mut header = "";
    let mut lines = BTreeSet::new();
    for line in dump.lines() {
        match line.strip_prefix("  ") {
            Some(item) => lines.insert((header, item)),
            None => lines.insert((std::mem::replace(&mut header, line), "")),
        };
    }
    lines
}

/// The stream entries of a dump: one per bar.
fn stream_entries(dump: &str) -> BTreeSet<(&str, &str)> {
    dump_lines(dump).into_iter().filter(|(header, item)| header.starts_with("stream ") && !item.is_empty()).collect()
}

/// Nearest-rank percentile of sorted durations.
fn percentile(sorted: &[Duration], p: usize) -> Duration {
    let rank = (sorted.len() * p).div_ceil(100).max(1);
    sorted.get(rank - 1).copied().unwrap_or_default()
}

/// splitmix64: a small deterministic generator, so a seed replays a test.
pub(crate) struct SplitMix64(pub(crate) u64);

impl SplitMix64 {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0); the modulo bias is negligible here.
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next().checked_rem(n).unwrap_or(0)
    }

    /// Uniform in `0..max`, in microseconds.
    fn up_to(&mut self, max: Duration) -> Duration {
        Duration::from_micros(self.below(u64::try_from(max.as_micros()).unwrap_or(u64::MAX)))
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i as u64 + 1) as usize);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_is_deterministic_and_stays_in_range() {
        let (mut a, mut b) = (SplitMix64(7), SplitMix64(7));
        let draws: Vec<u64> = (0..100).map(|_| a.below(10)).collect();
        assert_eq!(draws, (0..100).map(|_| b.below(10)).collect::<Vec<_>>());
        assert!(draws.iter().all(|d| *d < 10) && draws.iter().collect::<BTreeSet<_>>().len() == 10);
        assert_eq!(a.below(0), 0);
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let sorted: Vec<Duration> = (1..=10).map(Duration::from_millis).collect();
        assert_eq!((percentile(&sorted, 50), percentile(&sorted, 99)), (Duration::from_millis(5), Duration::from_millis(10)));
        assert_eq!(percentile(&[], 50), Duration::ZERO);
    }

    #[test]
    fn dump_differences_count_bars_per_stream_key() {
        let want = "set \"symbols\"\n  \"BTCUSDT\"\nstream \"bars:BTCUSDT\"\n  1000-0 a=1\n  2000-0 a=2\n";
        let got = "set \"symbols\"\n  \"BTCUSDT\"\nstream \"bars:BTCUSDT\"\n  1000-0 a=1\n  2000-0 a=3\n  3000-0 a=4\n";
        assert_eq!(differences(&stream_entries(want), &stream_entries(got)), (1, 2));
        assert_eq!(differences(&dump_lines(want), &dump_lines(got)), (1, 2));
        assert_eq!(differences(&stream_entries(want), &stream_entries(want)), (0, 0));
    }
}
