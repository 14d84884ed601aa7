//! What a benchmark run found: per measured process and repeat, then
//! min / median / max; printed as a table, saved as JSON, and plotted
//! against the symbol count as a small hand-written SVG.

use std::fmt::Write as _;

use serde::Serialize;

use super::measure::Measured;
use super::prom::Latency;

/// One run of one measured process.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub trades: u64,
    pub wall_s: f64,
    /// Trades over the process's wall time, startup included.
    pub trades_per_s: f64,
    /// The rate the process reported itself, where it does (replay,
    /// ProducerPerformance: from their first send to the last acknowledgement).
    pub reported_per_s: Option<f64>,
    pub cpu_s: f64,
    pub cpu_s_per_million: f64,
    pub peak_rss_mib: f64,
    /// Consumer runs: the bars it wrote (from its summary).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bars: Option<u64>,
    /// Consumer runs: Redis's CPU time (user + system, from `INFO cpu`)
    /// over the run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_cpu_s: Option<f64>,
}

impl Sample {
    pub fn new(measured: &Measured, trades: u64, reported_per_s: Option<f64>) -> Self {
        let (wall, cpu) = (measured.wall.as_secs_f64(), measured.cpu.as_secs_f64());
        Sample {
            trades,
            wall_s: wall,
            trades_per_s: trades as f64 / wall.max(1e-9),
            reported_per_s,
            cpu_s: cpu,
            cpu_s_per_million: per_million(trades, cpu),
            peak_rss_mib: measured.peak_rss_kib as f64 / 1024.0,
            bars: None,
            redis_cpu_s: None,
        }
    }

    /// The rate compared across processes: the process's own where it has one.
    pub fn rate(&self) -> f64 {
        self.reported_per_s.unwrap_or(self.trades_per_s)
    }
}

/// `value` for `trades` trades, scaled to a million trades.
fn per_million(trades: u64, value: f64) -> f64 {
    value / (trades.max(1) as f64 / 1e6)
}

/// Minimum, median and maximum over the repeats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Stats {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Stats {
    pub fn of(values: impl IntoIterator<Item = f64>) -> Self {
        let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return Stats { min: f64::NAN, median: f64::NAN, max: f64::NAN };
        }
        v.sort_by(f64::total_cmp);
        let mid = v.len() / 2;
        let median = if v.len() % 2 == 1 { v[mid] } else { (v[mid - 1] + v[mid]) / 2.0 };
        Stats { min: v[0], median, max: v[v.len() - 1] }
    }
}

/// Every repeat of one measured process, and their spread.
#[derive(Debug, Clone, Serialize)]
pub struct Series {
    pub name: String,
    pub samples: Vec<Sample>,
    pub trades_per_s: Stats,
    pub cpu_s_per_million: Stats,
    pub peak_rss_mib: Stats,
}

impl Series {
    pub fn new(name: &str, samples: Vec<Sample>) -> Self {
        Series {
            name: name.to_owned(),
            trades_per_s: Stats::of(samples.iter().map(Sample::rate)),
            cpu_s_per_million: Stats::of(samples.iter().map(|s| s.cpu_s_per_million)),
            peak_rss_mib: Stats::of(samples.iter().map(|s| s.peak_rss_mib)),
            samples,
        }
    }
}

/// The consumer against its ceiling at one symbol count.
#[derive(Debug, Clone, Serialize)]
pub struct SymbolPoint {
    pub symbols: usize,
    pub trades: u64,
    pub noop: Series,
    pub consumer: Series,
    /// Median consumer rate over median no-op rate (target >= 0.8).
    pub throughput_ratio: f64,
    /// Median consumer CPU per trade over the no-op's (target <= 1.5).
    pub cpu_ratio: f64,
    /// What the trades cost per bar: the same input makes the same bars.
    pub bar_cost: BarCost,
    /// What the machine's cores allow at these costs.
    pub cpu_bound: CpuBound,
}

/// The most the cores can carry at the CPU per trade measured, were they
/// busy with nothing else (the broker and the benchmark left out, so the
/// true bound is lower): `cpus / (fetching + Redis CPU per trade)`.
///
/// `fetch_and_redis` counts the no-op's CPU for fetching: the bound on any
/// consumer that reads like the ceiling and writes the same bars to Redis,
/// however little it spent on the rest. `consumer_and_redis` counts the
/// consumer's own CPU. Each rate also over the ceiling's median, the
/// throughput ratio's denominator.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct CpuBound {
    pub cpus: usize,
    pub fetch_and_redis_per_s: f64,
    pub fetch_and_redis_ratio: f64,
    pub consumer_and_redis_per_s: f64,
    pub consumer_and_redis_ratio: f64,
}

impl CpuBound {
    pub fn of(cpus: usize, noop: &Series, consumer: &Series, bar_cost: &BarCost) -> Self {
        let redis = bar_cost.redis_cpu_s_per_million.median;
        let per_s = |cpu_s_per_million: f64| cpus as f64 / (cpu_s_per_million + redis) * 1e6;
        let (fetch, own) = (per_s(noop.cpu_s_per_million.median), per_s(consumer.cpu_s_per_million.median));
        let ceiling = noop.trades_per_s.median;
        CpuBound {
            cpus,
            fetch_and_redis_per_s: fetch,
            fetch_and_redis_ratio: fetch / ceiling,
            consumer_and_redis_per_s: own,
            consumer_and_redis_ratio: own / ceiling,
        }
    }
}

/// The consumer's and Redis's work per bar at one symbol count: a million
/// trades over more symbols make more bars, and each bar is Redis work.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct BarCost {
    pub bars_per_million: f64,
    pub redis_cpu_s_per_million: Stats,
    /// Medians over the repeats, in microseconds.
    pub consumer_cpu_us_per_bar: f64,
    pub redis_cpu_us_per_bar: f64,
}

impl BarCost {
    pub fn of(consumer: &Series) -> Self {
        let bars = Stats::of(consumer.samples.iter().filter_map(|s| Some(per_million(s.trades, s.bars? as f64)))).median;
        let redis = Stats::of(consumer.samples.iter().filter_map(|s| Some(per_million(s.trades, s.redis_cpu_s?))));
        let us_per_bar = |cpu_per_million: f64| cpu_per_million / bars * 1e6;
        BarCost {
            bars_per_million: bars,
            redis_cpu_s_per_million: redis,
            consumer_cpu_us_per_bar: us_per_bar(consumer.cpu_s_per_million.median),
            redis_cpu_us_per_bar: us_per_bar(redis.median),
        }
    }
}

/// The replay producer beside Kafka's own producer benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct ProducerPoint {
    pub record_bytes: usize,
    pub settings: String,
    pub replay: Series,
    pub perf_test: Series,
    /// Median replay rate over median ProducerPerformance rate (target >= 0.8).
    pub ratio: f64,
}

/// Bar latency at real-time replay, or why it could not be measured.
#[derive(Debug, Clone, Serialize)]
pub struct LatencyPoint {
    pub symbols: usize,
    pub seconds: u64,
    pub trades: u64,
    pub latency: Option<Latency>,
    pub unavailable: Option<String>,
}

/// Everything a run found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub run: String,
    pub started_utc: String,
    pub load_average_before: String,
    pub cpus: usize,
    pub partitions: i32,
    pub repeats: usize,
    pub consumer_args: Vec<String>,
    pub kafka_properties: Vec<String>,
    pub points: Vec<SymbolPoint>,
    pub producer: Option<ProducerPoint>,
    pub latency: Option<LatencyPoint>,
}

fn row(out: &mut String, name: &str, s: &Series) {
    let t = s.trades_per_s;
    let c = s.cpu_s_per_million;
    let r = s.peak_rss_mib;
    let _ = writeln!(
        out,
        "  {name:<28} {:>9.0} {:>9.0} {:>9.0}   {:>6.2} {:>6.2} {:>6.2}   {:>7.1} {:>7.1}",
        t.min, t.median, t.max, c.min, c.median, c.max, r.median, r.max
    );
}

impl Report {
    /// The human-readable summary.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "run {} ({} UTC, {} cpus, load before: {})", self.run, self.started_utc, self.cpus, self.load_average_before);
        let header = "trades/s min    median       max   CPU s per M trades     RSS MiB median/max";
        for p in &self.points {
            let _ = writeln!(out, "\n{} symbols, {} trades, {} partitions, {} repeats", p.symbols, p.trades, self.partitions, self.repeats);
            let _ = writeln!(out, "  {:<28} {header}", "");
            row(&mut out, "no-op consumer (ceiling)", &p.noop);
            row(&mut out, "consumer", &p.consumer);
            let _ = writeln!(
                out,
                "  consumer / ceiling: throughput {:.2} (target >= 0.8), CPU per trade {:.2} (target <= 1.5)",
                p.throughput_ratio, p.cpu_ratio
            );
            let (b, r) = (&p.bar_cost, &p.bar_cost.redis_cpu_s_per_million);
            let _ = writeln!(
                out,
                "  {:.0} bars per M trades; Redis CPU s per M trades {:.2} {:.2} {:.2}; CPU per bar: consumer {:.1} us, Redis {:.1} us",
                b.bars_per_million, r.min, r.median, r.max, b.consumer_cpu_us_per_bar, b.redis_cpu_us_per_bar
            );
            let c = &p.cpu_bound;
            let _ = writeln!(
                out,
                "  {} cpus carry at most: no-op fetching + Redis {:.0} trades/s ({:.2} x ceiling), consumer + Redis {:.0} ({:.2} x)",
                c.cpus, c.fetch_and_redis_per_s, c.fetch_and_redis_ratio, c.consumer_and_redis_per_s, c.consumer_and_redis_ratio
            );
        }
        if let Some(p) = &self.producer {
            let _ = writeln!(
                out,
                "\nproducers, {} trades of {} bytes, {}",
                p.replay.samples.first().map_or(0, |s| s.trades),
                p.record_bytes,
                p.settings
            );
            let _ = writeln!(out, "  {:<28} {header}", "");
            row(&mut out, "replay", &p.replay);
            row(&mut out, "kafka ProducerPerformance", &p.perf_test);
            let _ = writeln!(out, "  replay / ProducerPerformance: {:.2} (target >= 0.8)", p.ratio);
        }
        if let Some(l) = &self.latency {
            let _ = write!(out, "\nbar latency, {} symbols replayed at real time for {} s ({} trades): ", l.symbols, l.seconds, l.trades);
            match (&l.latency, &l.unavailable) {
                (Some(x), _) => {
                    let ms = |s: f64| s * 1000.0;
                    let bound = if x.source == "histogram" { "<= " } else { "" };
                    let _ = writeln!(
                        out,
                        "{} bars, p50 {:.2} ms, p99 {:.2} ms, max {bound}{:.2} ms, mean {:.2} ms ({})",
                        x.count,
                        ms(x.p50),
                        ms(x.p99),
                        ms(x.max),
                        ms(x.mean),
                        x.source
                    );
                }
                (None, reason) => {
                    let _ = writeln!(out, "not available: {}", reason.as_deref().unwrap_or("no bars observed"));
                }
            }
        }
        out
    }

    /// Consumer and ceiling trades/s, consumer peak RSS, and the CPU cost
    /// per trade of the no-op, the consumer and Redis, against the symbol
    /// count (log scale), as three panels of one SVG.
    pub fn svg(&self) -> String {
        let xs: Vec<f64> = self.points.iter().map(|p| p.symbols as f64).collect();
        let median = |f: fn(&SymbolPoint) -> f64| self.points.iter().map(f).collect::<Vec<_>>();
        let rates = [
            ("no-op consumer", NOOP, median(|p| p.noop.trades_per_s.median)),
            ("consumer", CONSUMER, median(|p| p.consumer.trades_per_s.median)),
        ];
        let rss = [("consumer peak RSS", RSS, median(|p| p.consumer.peak_rss_mib.median))];
        let cost = [
            ("no-op consumer", NOOP, median(|p| p.noop.cpu_s_per_million.median)),
            ("consumer", CONSUMER, median(|p| p.consumer.cpu_s_per_million.median)),
            ("redis-server", REDIS, median(|p| p.bar_cost.redis_cpu_s_per_million.median)),
        ];
        let mut out = String::from(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"1350\" height=\"360\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"1350\" height=\"360\" fill=\"white\"/>\n",
        );
        panel(&mut out, 0.0, "trades/s (median)", &xs, &rates);
        panel(&mut out, 450.0, "peak RSS, MiB (median)", &xs, &rss);
        panel(&mut out, 900.0, "CPU s per M trades (median)", &xs, &cost);
        out.push_str("</svg>\n");
        out
    }
}

/// One panel at horizontal offset `left`: axes, ticks, lines and a legend.
fn panel(out: &mut String, left: f64, title: &str, xs: &[f64], lines: &[(&str, &str, Vec<f64>)]) {
    let (x0, x1, y0, y1) = (left + 70.0, left + 430.0, 310.0, 40.0);
    let (lo, hi) = xs.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x.log10()), hi.max(x.log10())));
    let (lo, hi) = if hi > lo { (lo, hi) } else { (lo - 0.5, hi + 0.5) };
    let ymax = lines.iter().flat_map(|l| l.2.iter()).copied().filter(|v| v.is_finite()).fold(0.0, f64::max) * 1.1;
    let ymax = if ymax > 0.0 { ymax } else { 1.0 };
    let px = |x: f64| x0 + (x.log10() - lo) / (hi - lo) * (x1 - x0);
    let py = |y: f64| y0 - y / ymax * (y0 - y1);
    let _ = writeln!(out, "<text x=\"{}\" y=\"22\" font-weight=\"bold\">{title} vs symbols</text>", x0);
    let _ = writeln!(out, "<path d=\"M{x0} {y1} V{y0} H{x1}\" stroke=\"black\" fill=\"none\"/>");
    for &x in xs {
        let _ = writeln!(out, "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{x}</text>", px(x), y0 + 16.0);
    }
    for i in 0..=4 {
        let v = ymax * f64::from(i) / 4.0;
        let _ = writeln!(out, "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>", x0 - 6.0, py(v) + 4.0, compact(v));
        let _ = writeln!(out, "<path d=\"M{x0} {:.1} H{x1}\" stroke=\"#eeeeee\"/>", py(v));
    }
    for (i, (name, colour, ys)) in lines.iter().enumerate() {
        let points: Vec<String> =
            xs.iter().zip(ys).filter(|(_, y)| y.is_finite()).map(|(&x, &y)| format!("{:.1},{:.1}", px(x), py(y))).collect();
        let _ = writeln!(out, "<polyline points=\"{}\" stroke=\"{colour}\" stroke-width=\"2\" fill=\"none\"/>", points.join(" "));
        for p in &points {
            let (cx, cy) = p.split_once(',').unwrap_or(("0", "0"));
            let _ = writeln!(out, "<circle cx=\"{cx}\" cy=\"{cy}\" r=\"3\" fill=\"{colour}\"/>");
        }
        let ly = y1 + 14.0 * i as f64;
        let _ = writeln!(out, "<text x=\"{}\" y=\"{ly}\" fill=\"{colour}\">{name}</text>", x1 - 120.0);
    }
    let _ = writeln!(out, "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">symbols (log scale)</text>", (x0 + x1) / 2.0, y0 + 36.0);
}

const NOOP: &str = "#888888";
const CONSUMER: &str = "#1f77b4";
const RSS: &str = "#d62728";
const REDIS: &str = "#2ca02c";

fn compact(v: f64) -> String {
    match v {
        v if v >= 1e6 => format!("{:.1}M", v / 1e6),
        v if v >= 1e3 => format!("{:.0}k", v / 1e3),
        v if v >= 10.0 || v == 0.0 => format!("{v:.0}"),
        v => format!("{v:.2}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_take_min_median_max() {
        assert_eq!(Stats::of([3.0, 1.0, 2.0]), Stats { min: 1.0, median: 2.0, max: 3.0 });
        assert_eq!(Stats::of([4.0, 1.0, 2.0, 3.0]).median, 2.5);
        assert!(Stats::of([]).median.is_nan());
    }

    #[test]
    fn svg_has_a_line_per_series() {
        let sample = Sample {
            trades: 10,
            wall_s: 1.0,
            trades_per_s: 10.0,
            reported_per_s: None,
            cpu_s: 0.5,
            cpu_s_per_million: 5e4,
            peak_rss_mib: 30.0,
            bars: None,
            redis_cpu_s: None,
        };
        let consumer = Sample { bars: Some(4), redis_cpu_s: Some(0.25), cpu_s_per_million: 1.75e5, ..sample.clone() };
        let point = |symbols| {
            let consumer = Series::new("consumer", vec![consumer.clone()]);
            let (noop, bar_cost) = (Series::new("noop", vec![sample.clone()]), BarCost::of(&consumer));
            SymbolPoint {
                symbols,
                trades: 10,
                cpu_bound: CpuBound::of(2, &noop, &consumer, &bar_cost),
                noop,
                bar_cost,
                consumer,
                throughput_ratio: 1.0,
                cpu_ratio: 1.0,
            }
        };
        let report = Report {
            run: "r".into(),
            started_utc: String::new(),
            load_average_before: String::new(),
            cpus: 2,
            partitions: 6,
            repeats: 1,
            consumer_args: Vec::new(),
            kafka_properties: Vec::new(),
            points: vec![point(20), point(10_000)],
            producer: None,
            latency: None,
        };
        let svg = report.svg();
        assert_eq!(svg.matches("<polyline").count(), 6);
        assert!(svg.contains(">10000</text>") && svg.contains(">redis-server</text>") && svg.ends_with("</svg>\n"));
        let table = report.table();
        assert!(table.contains("consumer / ceiling: throughput 1.00"), "{table}");
        // 4 bars of 10 trades, 1.75 consumer CPU s and 0.25 Redis CPU s over them.
        assert!(table.contains("400000 bars per M trades; Redis CPU s per M trades 25000.00"), "{table}");
        assert!(table.contains("CPU per bar: consumer 437500.0 us, Redis 62500.0 us"), "{table}");
        // Two cpus over (50,000 or 175,000, + 25,000) CPU s per M trades, the ceiling at 10 trades/s.
        assert!(
            table.contains("2 cpus carry at most: no-op fetching + Redis 27 trades/s (2.67 x ceiling), consumer + Redis 10 (1.00 x)"),
            "{table}"
        );
    }
}
