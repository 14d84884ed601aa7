//! The throughput benchmark behind `bench` (issue 9): loads N generated
//! trades into a fresh topic and then, on that same topic and in rotation,
//! measures the no-op consumer (the ceiling), the consumer binary with
//! `--exit-at-end`, and the replay producer beside Kafka's own
//! `ProducerPerformance`, each as its own child process so its CPU and peak
//! RSS are its own. Optionally sweeps the symbol count, and measures bar
//! latency at real-time replay from the consumer's Prometheus histogram.

pub mod measure;
pub mod noop;
pub mod prom;
pub mod report;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use tracing::{info, warn};

use crate::archive::{self, ArchiveSummary};
use crate::error::{Error, Result};
use crate::kafka::KafkaArgs;
use crate::kafka::REQUEST_TIMEOUT;
use crate::synth::{self, SynthConfig};
use crate::trade::TradeColumns;
use crate::{binance, sink};
use measure::Measured;
use report::{BarCost, CpuBound, LatencyPoint, ProducerPoint, Report, Sample, Series, SymbolPoint};

/// The histogram the consumer exports (`--metrics-addr`).
pub const BAR_LATENCY_METRIC: &str = "cryptopulse_bar_latency_seconds";
/// The replay producer's settings (`KafkaArgs::producer_config`), given to
/// ProducerPerformance too.
const PRODUCER_SETTINGS: &str = "acks=all enable.idempotence=true compression.type=lz4 linger.ms=5 batch.size=1000000";

/// The programs measured.
#[derive(Debug, Clone)]
pub struct Bins {
    pub consumer: PathBuf,
    pub replay: PathBuf,
    /// `bench` itself, started with `--noop` for the no-op consumer.
    pub noop: PathBuf,
}

/// Real-time replay for bar latency.
#[derive(Debug, Clone)]
pub struct LatencyConfig {
    pub symbols: usize,
    pub seconds: u64,
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Brokers, partitions and librdkafka settings; topic names are made per run.
    pub kafka: KafkaArgs,
    pub redis_url: String,
    pub trades: u64,
    /// Symbol counts to sweep; the producers are measured at the first.
    pub symbols: Vec<usize>,
    pub repeats: usize,
    /// Real trades `gen` repeats.
    pub source: PathBuf,
    /// Inputs, state directories, results.
    pub out_dir: PathBuf,
    pub bins: Bins,
    /// Extra flags for the consumer (`--batch-rows 65536`, ...).
    pub consumer_args: Vec<String>,
    /// Classpath of the Kafka tools; `None` skips the producer comparison.
    pub kafka_classpath: Option<String>,
    pub latency: Option<LatencyConfig>,
    /// A progress bar of the measurements on stderr (on a terminal).
    pub progress: bool,
}

/// Runs everything, deleting the run's topics and keys at the end.
pub async fn run(config: &BenchConfig) -> Result<Report> {
    let now = std::time::SystemTime::now();
    let secs = now.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let run = format!("bench-{secs}-{}", std::process::id());
    for dir in ["inputs", "state"] {
        let dir = config.out_dir.join(dir);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    }
    let mut report = Report {
        run: run.clone(),
        started_utc: humantime::format_rfc3339_seconds(now).to_string(),
        load_average_before: std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        cpus: std::thread::available_parallelism().map_or(1, usize::from),
        partitions: config.kafka.partitions,
        repeats: config.repeats,
        consumer_args: config.consumer_args.clone(),
        kafka_properties: config.kafka.properties.iter().map(|(k, v)| format!("{k}={v}")).collect(),
        points: Vec::new(),
        producer: None,
        latency: None,
    };
    let redis = sink::connect(&config.redis_url).await?;
    let steps = config.symbols.len() * config.repeats + usize::from(config.latency.is_some());
    let progress = crate::cli::progress_bar(steps as u64, "measurements", config.progress);
    let mut bench = Bench { config, run, topics: Vec::new(), redis, progress };
    let result = bench.all(&mut report).await;
    bench.progress.finish_and_clear();
    bench.drop_topics().await;
    result.map(|()| report)
}

struct Bench<'a> {
    config: &'a BenchConfig,
    run: String,
    /// Topics created and not yet deleted.
    topics: Vec<String>,
    /// For Redis's CPU time around each consumer run and the clean-up after it.
    redis: redis::aio::ConnectionManager,
    progress: indicatif::ProgressBar,
}

impl Bench<'_> {
    async fn all(&mut self, report: &mut Report) -> Result<()> {
        for (i, &symbols) in self.config.symbols.iter().enumerate() {
            let input = self.input(symbols, SynthConfig { symbols, repeats: 1, trades: Some(self.config.trades) }).await?;
            let producers = i == 0 && self.config.kafka_classpath.is_some();
            let (point, producer) = self.symbol_point(symbols, &input, producers, report.cpus).await?;
            println!("{} symbols: consumer / ceiling {:.2}, CPU ratio {:.2}", symbols, point.throughput_ratio, point.cpu_ratio);
            report.points.push(point);
            report.producer = report.producer.take().or(producer);
        }
        if let Some(latency) = &self.config.latency {
            self.progress.set_message(format!("bar latency, {} s", latency.seconds));
            report.latency = Some(self.latency(latency).await?);
            self.progress.inc(1);
        }
        Ok(())
    }

    /// Loads the input into a fresh topic, then measures in rotation.
    async fn symbol_point(
        &mut self,
        symbols: usize,
        input: &Path,
        producers: bool,
        cpus: usize,
    ) -> Result<(SymbolPoint, Option<ProducerPoint>)> {
        let topic = format!("{}.s{symbols}", self.run);
        let trades = self.config.trades;
        self.replay(input, &topic, None, None).await?;
        let (mut noop, mut consumer, mut replay, mut perf) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let record_bytes = if producers { mean_payload_bytes(input)? } else { 0 };
        for r in 0..self.config.repeats {
            info!(symbols, repeat = r, "measuring");
            self.progress.set_message(format!("{symbols} symbols, run {} of {}", r + 1, self.config.repeats));
            noop.push(self.noop(&topic, trades).await?);
            consumer.push(self.consumer(&topic, &format!("{topic}.r{r}"), trades).await?);
            if producers {
                let (sample, replay_topic) = self.replay(input, &format!("{}.replay{r}", self.run), None, None).await?;
                replay.push(sample);
                self.drop_topic(&replay_topic).await;
                perf.push(self.perf_test(&format!("{}.perf{r}", self.run), trades, record_bytes).await?);
            }
            self.progress.inc(1);
        }
        self.drop_topic(&topic).await;
        let (noop, consumer) = (Series::new("noop", noop), Series::new("consumer", consumer));
        let bar_cost = BarCost::of(&consumer);
        let point = SymbolPoint {
            symbols,
            trades,
            throughput_ratio: consumer.trades_per_s.median / noop.trades_per_s.median,
            cpu_ratio: consumer.cpu_s_per_million.median / noop.cpu_s_per_million.median,
            cpu_bound: CpuBound::of(cpus, &noop, &consumer, &bar_cost),
            bar_cost,
            noop,
            consumer,
        };
        let producer = producers.then(|| {
            let (replay, perf_test) = (Series::new("replay", replay), Series::new("perf_test", perf));
            ProducerPoint {
                record_bytes,
                settings: PRODUCER_SETTINGS.into(),
                ratio: replay.trades_per_s.median / perf_test.trades_per_s.median,
                replay,
                perf_test,
            }
        });
        Ok((point, producer))
    }

    /// The generated input, made once per shape and kept in `out/inputs`.
    async fn input(&self, name: usize, synth: SynthConfig) -> Result<PathBuf> {
        let count = synth.trades.map_or(format!("x{}", synth.repeats), |n| n.to_string());
        let path = self.config.out_dir.join("inputs").join(format!("gen-{name}sym-{count}.parquet"));
        if ArchiveSummary::read(&path).is_ok_and(|s| synth.trades.is_none_or(|n| s.rows == n)) {
            return Ok(path);
        }
        info!(path = %path.display(), "generating input");
        let (source, out) = (self.config.source.clone(), path.clone());
        tokio::task::spawn_blocking(move || synth::generate(&source, &out, &synth)).await.map_err(|e| Error::join("gen", e))??;
        Ok(path)
    }

    /// A child with no `CRYPTOPULSE_*` settings but the run's Kafka ones.
    fn command(&self, program: &Path) -> Command {
        let kafka = &self.config.kafka;
        let mut cmd = Command::new(program);
        for (key, _) in std::env::vars_os().filter(|(key, _)| key.to_string_lossy().starts_with("CRYPTOPULSE_")) {
            cmd.env_remove(key);
        }
        cmd.args(["--brokers", &kafka.brokers, "--partitions", &kafka.partitions.to_string()]);
        if let Some(file) = &kafka.kafka_config_file {
            cmd.arg("--kafka-config-file").arg(file);
        }
        if !kafka.properties.is_empty() {
            let properties: Vec<String> = kafka.properties.iter().map(|(k, v)| format!("{k}={v}")).collect();
            cmd.env("CRYPTOPULSE_KAFKA_PROPERTIES", properties.join(";"));
        }
        cmd.env("RUST_LOG", "warn");
        cmd
    }

    /// Replays `input` into `topic` (created with the run's dead-letter topic).
    async fn replay(&mut self, input: &Path, topic: &str, speed: Option<&str>, to_ms: Option<i64>) -> Result<(Sample, String)> {
        let mut cmd = self.command(&self.config.bins.replay);
        cmd.arg(input).args(["--topic", topic, "--dlq-topic", &format!("{}.dlq", self.run), "--speed", speed.unwrap_or("max")]);
        if let Some(to) = to_ms {
            cmd.args(["--to", &to.to_string()]);
        }
        self.topics.extend([topic.to_owned(), format!("{}.dlq", self.run)]);
        let measured = measured(cmd).await?;
        measured.check("replay")?;
        let (trades, rate) = parse_replay(&measured.stdout)
            .ok_or_else(|| Error::invalid_data("replay's output", format!("no summary in {:?}", measured.stdout)))?;
        Ok((Sample::new(&measured, trades, Some(rate)), topic.to_owned()))
    }

    async fn noop(&self, topic: &str, trades: u64) -> Result<Sample> {
        let mut cmd = self.command(&self.config.bins.noop);
        cmd.args(["--noop", "--topic", topic, "--group-id", &format!("{topic}.noop")]);
        let measured = measured(cmd).await?;
        measured.check("no-op consumer")?;
        let summary: noop::NoopSummary = serde_json::from_str(measured.stdout.trim())
            .map_err(|e| Error::invalid_data("the no-op consumer's output", format!("{:?}: {e}", measured.stdout)))?;
        expect_count("no-op consumer", summary.records, trades)?;
        Ok(Sample::new(&measured, trades, None))
    }

    /// The consumer binary over the whole topic, with fresh state and prefix.
    async fn consumer(&mut self, topic: &str, prefix: &str, trades: u64) -> Result<Sample> {
        let state = self.config.out_dir.join("state").join(prefix);
        let mut cmd = self.consumer_command(topic, prefix, &state);
        cmd.arg("--exit-at-end");
        let redis_before = redis_cpu_seconds(&mut self.redis).await?;
        let measured = measured(cmd).await;
        let redis_cpu = redis_cpu_seconds(&mut self.redis).await.map(|after| after - redis_before);
        let cleaned = self.clean(prefix, &state).await;
        let measured = measured?;
        measured.check("consumer")?;
        cleaned?;
        let (records, bars) = parse_consumer(&measured.stdout)
            .ok_or_else(|| Error::invalid_data("the consumer's output", format!("no summary in {:?}", measured.stdout)))?;
        expect_count("consumer", records, trades)?;
        Ok(Sample { bars: Some(bars), redis_cpu_s: Some(redis_cpu?), ..Sample::new(&measured, trades, None) })
    }

    fn consumer_command(&self, topic: &str, prefix: &str, state: &Path) -> Command {
        let mut cmd = self.command(&self.config.bins.consumer);
        cmd.args(["--topic", topic, "--dlq-topic", &format!("{}.dlq", self.run), "--redis-prefix", prefix, "--group-id", prefix]);
        cmd.arg("--state-dir").arg(state).args(&self.config.consumer_args);
        cmd.env("CRYPTOPULSE_REDIS_URL", &self.config.redis_url);
        // Every partition, as one consumer: through the environment, which
        // builds from before `--assign` ignore.
        cmd.env("CRYPTOPULSE_ASSIGN", "all");
        cmd
    }

    /// Kafka's own producer benchmark at the replay's record size and settings.
    async fn perf_test(&mut self, topic: &str, trades: u64, record_bytes: usize) -> Result<Sample> {
        let kafka = KafkaArgs { topic: topic.to_owned(), dlq_topic: format!("{}.dlq", self.run), ..self.config.kafka.clone() };
        kafka.ensure_topics().await?;
        self.topics.push(topic.to_owned());
        let mut cmd = Command::new("java");
        cmd.arg("-cp").arg(self.config.kafka_classpath.as_deref().unwrap_or_default()).arg("org.apache.kafka.tools.ProducerPerformance");
        cmd.args([
            "--topic",
            topic,
            "--num-records",
            &trades.to_string(),
            "--record-size",
            &record_bytes.to_string(),
            "--throughput",
            "-1",
        ]);
        cmd.arg("--producer-props").arg(format!("bootstrap.servers={}", kafka.brokers)).args(PRODUCER_SETTINGS.split(' '));
        let measured = measured(cmd).await?;
        self.drop_topic(topic).await;
        measured.check("ProducerPerformance")?;
        let (sent, rate) = parse_perf(&measured.stdout)
            .ok_or_else(|| Error::invalid_data("ProducerPerformance's output", format!("no total in {:?}", measured.stdout)))?;
        expect_count("ProducerPerformance", sent, trades)?;
        Ok(Sample::new(&measured, trades, Some(rate)))
    }

    /// Bar latency: the consumer running live with `--metrics-addr` while a
    /// generated input is replayed at real time, then its histogram scraped.
    async fn latency(&mut self, latency: &LatencyConfig) -> Result<LatencyPoint> {
        let mut point = LatencyPoint { symbols: latency.symbols, seconds: latency.seconds, trades: 0, latency: None, unavailable: None };
        let help = Command::new(&self.config.bins.consumer).arg("--help").output().map_err(|e| Error::io(&self.config.bins.consumer, e))?;
        if !String::from_utf8_lossy(&help.stdout).contains("--metrics-addr") {
            point.unavailable = Some(format!(
                "{} has no --metrics-addr flag, so there is no {BAR_LATENCY_METRIC} histogram to read (the Prometheus metrics are not in this build)",
                self.config.bins.consumer.display()
            ));
            return Ok(point);
        }
        let input = self.input(latency.symbols, SynthConfig { symbols: latency.symbols, repeats: 1, trades: None }).await?;
        let to_ms = first_time(&input)? + latency.seconds as i64 * 1000;
        let topic = format!("{}.latency", self.run);
        KafkaArgs { topic: topic.clone(), dlq_topic: format!("{}.dlq", self.run), ..self.config.kafka.clone() }.ensure_topics().await?;
        self.topics.push(topic.clone());
        let addr = free_local_addr()?;
        let (prefix, state) = (topic.clone(), self.config.out_dir.join("state").join(&topic));
        let log = self.config.out_dir.join(format!("{topic}.consumer.log"));
        let mut cmd = self.consumer_command(&topic, &prefix, &state);
        cmd.arg("--metrics-addr").arg(addr.to_string()).stdin(Stdio::null()).stdout(Stdio::null());
        cmd.stderr(std::fs::File::create(&log).map_err(|e| Error::io(&log, e))?);
        let mut child = cmd.spawn().map_err(|e| Error::io(&self.config.bins.consumer, e))?;
        let scraped = self.replay_and_scrape(&input, &topic, to_ms, addr).await;
        let _ = child.kill();
        let _ = child.wait();
        self.clean(&prefix, &state).await?;
        let (trades, text) = scraped?;
        point.trades = trades;
        point.latency = prom::latency(&text, BAR_LATENCY_METRIC);
        if point.latency.is_none() {
            point.unavailable = Some(format!("{BAR_LATENCY_METRIC} has no observations at http://{addr}/metrics (log: {})", log.display()));
        }
        Ok(point)
    }

    async fn replay_and_scrape(&mut self, input: &Path, topic: &str, to_ms: i64, addr: SocketAddr) -> Result<(u64, String)> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while prom::scrape(addr).await.is_err() {
            if Instant::now() > deadline {
                return Err(Error::Timeout { what: format!("the consumer serving http://{addr}/metrics"), after: Duration::from_secs(30) });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (sample, _) = self.replay(input, topic, Some("1"), Some(to_ms)).await?;
        // The bars closed by the last trades are written within a batch linger and a Redis round trip.
        tokio::time::sleep(Duration::from_secs(2)).await;
        Ok((sample.trades, prom::scrape(addr).await?))
    }

    /// Removes a consumer run's state directory and Redis keys.
    async fn clean(&mut self, prefix: &str, state: &Path) -> Result<()> {
        if state.exists() {
            std::fs::remove_dir_all(state).map_err(|e| Error::io(state, e))?;
        }
        let conn = &mut self.redis;
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{prefix}:*"))
                .arg("COUNT")
                .arg(1000)
                .query_async(conn)
                .await
                .map_err(|e| Error::redis("scan", e))?;
            if !keys.is_empty() {
                let _: u64 = redis::cmd("UNLINK").arg(&keys).query_async(conn).await.map_err(|e| Error::redis("unlink", e))?;
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }

    async fn drop_topic(&mut self, topic: &str) {
        self.topics.retain(|t| t != topic);
        delete_topics(&self.config.kafka, &[topic.to_owned()]).await;
    }

    async fn drop_topics(&mut self) {
        self.topics.sort();
        self.topics.dedup();
        delete_topics(&self.config.kafka, &self.topics).await;
        self.topics.clear();
    }
}

async fn delete_topics(kafka: &KafkaArgs, topics: &[String]) {
    if topics.is_empty() {
        return;
    }
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let admin: std::result::Result<AdminClient<DefaultClientContext>, _> =
        kafka.client_config().and_then(|c| c.create().map_err(|e| Error::kafka("admin client", e)));
    let options = AdminOptions::new().operation_timeout(Some(REQUEST_TIMEOUT));
    match admin {
        Ok(admin) => match admin.delete_topics(&names, &options).await {
            Ok(results) => results.into_iter().filter_map(|r| r.err()).for_each(|(topic, code)| warn!(%topic, %code, "topic not deleted")),
            Err(e) => warn!(error = %e, ?names, "topics not deleted"),
        },
        Err(e) => warn!(error = %e, ?names, "topics not deleted"),
    }
}

async fn measured(cmd: Command) -> Result<Measured> {
    tokio::task::spawn_blocking(move || measure::run(cmd)).await.map_err(|e| Error::join("measure thread", e))?
}

fn expect_count(what: &str, got: u64, want: u64) -> Result<()> {
    if got == want {
        return Ok(());
    }
    Err(Error::task_failed(what, format!("handled {got} records, expected {want}")))
}

/// Mean size of the trade events replay publishes for `input`.
fn mean_payload_bytes(input: &Path) -> Result<usize> {
    let (mut bytes, mut rows, mut value) = (0usize, 0usize, Vec::with_capacity(256));
    for batch in archive::open(input, 8192)?.take(16) {
        let batch = batch?;
        let cols = TradeColumns::new(&batch)?;
        for row in 0..batch.num_rows() {
            value.clear();
            binance::encode(&cols.trade(row), &mut value);
            bytes += value.len();
        }
        rows += batch.num_rows();
    }
    Ok((bytes as f64 / rows.max(1) as f64).round() as usize)
}

fn first_time(input: &Path) -> Result<i64> {
    let batch = archive::open(input, 1)?.next().ok_or_else(|| Error::invalid_data(input.display().to_string(), "no trades"))??;
    Ok(TradeColumns::new(&batch)?.time.value(0))
}

fn free_local_addr() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| Error::io("127.0.0.1:0", e))?;
    listener.local_addr().map_err(|e| Error::io("127.0.0.1:0", e))
}

/// `replayed 1000 trades to t in 0.52s (1923 trades/s), 0 filtered out`
fn parse_replay(stdout: &str) -> Option<(u64, f64)> {
    let line = stdout.lines().find(|l| l.starts_with("replayed "))?;
    let trades = line.split_whitespace().nth(1)?.parse().ok()?;
    let rate = line.split_once(" (")?.1.split_whitespace().next()?.parse().ok()?;
    Some((trades, rate))
}

/// Records of this run and bars of the state directory (fresh, so this
/// run's too), from `this run: 1000 records in 0.81s, ... | totals of the
/// state dir: ... bars 42`.
fn parse_consumer(stdout: &str) -> Option<(u64, u64)> {
    let line = stdout.lines().find_map(|l| l.strip_prefix("this run: "))?;
    let records = line.split_whitespace().next()?.parse().ok()?;
    let (_, totals) = line.split_once("totals of the state dir:")?;
    let words: Vec<&str> = totals.split_whitespace().collect();
    let bars = words.windows(2).find(|w| w[0] == "bars")?[1].parse().ok()?;
    Some((records, bars))
}

/// Redis's CPU time so far, user + system (`INFO cpu`), in seconds.
async fn redis_cpu_seconds(conn: &mut redis::aio::ConnectionManager) -> Result<f64> {
    let info: String = redis::cmd("INFO").arg("cpu").query_async(conn).await.map_err(|e| Error::redis("info cpu", e))?;
    let field = |name: &str| info.lines().find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok());
    match (field("used_cpu_user:"), field("used_cpu_sys:")) {
        (Some(user), Some(sys)) => Ok(user + sys),
        _ => Err(Error::invalid_data("redis INFO cpu", format!("no used_cpu_user / used_cpu_sys in {info:?}"))),
    }
}

/// The total line: `1000000 records sent, 412345.6 records/sec (52.3 MB/sec), ...`
fn parse_perf(stdout: &str) -> Option<(u64, f64)> {
    let line = stdout.lines().rev().find(|l| l.contains(" records sent, "))?;
    let (sent, rest) = line.split_once(" records sent, ")?;
    Some((sent.trim().parse().ok()?, rest.split_whitespace().next()?.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_children_summaries() {
        assert_eq!(parse_replay("replayed 1000 trades to t in 0.52s (1923 trades/s), 0 filtered out\n"), Some((1000, 1923.0)));
        let consumer = "this run: 15863 records in 0.81s, 0 dead letters, 2 checkpoints | totals of the state dir: applied 15863 duplicates 0 late 0 rejected 0 bars 663\n";
        assert_eq!(parse_consumer(consumer), Some((15_863, 663)));
        assert_eq!(parse_consumer("this run: 15863 records in 0.81s | totals of the state dir: applied 15863\n"), None);
        let perf = "500000 records sent, 99000.1 records/sec (13.50 MB/sec), 30.1 ms avg latency, 200.0 ms max latency.\n\
                    1000000 records sent, 410000.5 records/sec (55.90 MB/sec), 25.00 ms avg latency, 310.00 ms max latency, 20 ms 50th, 90 ms 95th, 150 ms 99th, 300 ms 99.9th.\n";
        assert_eq!(parse_perf(perf), Some((1_000_000, 410_000.5)));
        assert_eq!(parse_perf("nothing"), None);
    }
}
