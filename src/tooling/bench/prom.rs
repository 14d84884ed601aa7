//! Reading a latency histogram back from a Prometheus text exposition
//! (`/metrics`): `<name>_bucket{le="..."}` cumulative counts, `_sum` and
//! `_count`, summed over any other labels. A summary (`<name>{quantile="..."}`
//! lines, what some exporters render by default) is read as well.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Serialize;

use crate::error::{Error, Result};

/// Percentiles of one latency metric, in seconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Latency {
    pub count: u64,
    pub mean: f64,
    pub p50: f64,
    pub p99: f64,
    /// From a histogram: the upper bound of the highest bucket that holds
    /// an observation (the true maximum is at most this).
    pub max: f64,
    /// `histogram` or `summary`.
    pub source: &'static str,
}

/// Fetches `http://<addr>/metrics` (doctor's GET).
pub async fn scrape(addr: SocketAddr) -> Result<String> {
    let url = format!("http://{addr}");
    let fail = |detail: String| Error::invalid_data(format!("{url}/metrics"), detail);
    let response = crate::tooling::doctor::get(&url, "/metrics", None, Duration::from_secs(10)).await.map_err(fail)?;
    if response.status != 200 {
        return Err(fail(format!("HTTP {}", response.status)));
    }
    String::from_utf8(response.body).map_err(|e| fail(e.to_string()))
}

/// The latency of metric `name` in `text`, or `None` when it has no observations.
pub fn latency(text: &str, name: &str) -> Option<Latency> {
    let (mut buckets, mut quantiles) = (Vec::<(f64, f64)>::new(), Vec::<(f64, f64)>::new());
    let (mut sum, mut count) = (0.0, 0.0);
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = sample(line) else { continue };
        let (metric, labels) = series.split_once('{').map_or((series, ""), |(m, l)| (m, l.trim_end_matches('}')));
        if metric == format!("{name}_bucket") {
            let le = label(labels, "le")?;
            match buckets.iter_mut().find(|(bound, _)| *bound == le) {
                Some((_, total)) => *total += value,
                None => buckets.push((le, value)),
            }
        } else if metric == format!("{name}_sum") {
            sum += value;
        } else if metric == format!("{name}_count") {
            count += value;
        } else if metric == name {
            quantiles.push((label(labels, "quantile")?, value));
        }
    }
    if count <= 0.0 {
        return None;
    }
    let mean = sum / count;
    if !buckets.is_empty() {
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        let max =
            buckets.iter().zip(std::iter::once(0.0).chain(buckets.iter().map(|b| b.1))).find(|(b, below)| b.1 >= count && *below < count);
        let max = max.map_or(f64::INFINITY, |(b, _)| b.0);
        let (p50, p99) = (quantile(&buckets, 0.5), quantile(&buckets, 0.99));
        return Some(Latency { count: count as u64, mean, p50, p99, max, source: "histogram" });
    }
    let at = |q: f64| quantiles.iter().find(|(level, _)| (*level - q).abs() < 1e-9).map_or(f64::NAN, |(_, v)| *v);
    Some(Latency { count: count as u64, mean, p50: at(0.5), p99: at(0.99), max: at(1.0), source: "summary" })
}

/// `name{labels} value [timestamp]` split into the series and its value.
fn sample(line: &str) -> Option<(&str, f64)> {
    let line = line.trim();
    let cut = line.rfind('}').map_or_else(|| line.find(char::is_whitespace), |i| Some(i + 1))?;
    let (series, rest) = line.split_at(cut);
    let value = rest.split_whitespace().next()?;
    Some((series.trim(), parse_float(value)?))
}

fn label(labels: &str, key: &str) -> Option<f64> {
    labels.split(',').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k.trim() == key).then(|| parse_float(v.trim().trim_matches('"')))?
    })
}

fn parse_float(text: &str) -> Option<f64> {
    match text {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        _ => text.parse().ok(),
    }
}

/// Prometheus' `histogram_quantile`: linear inside the bucket holding the
/// rank; the `+Inf` bucket answers with the highest finite bound.
fn quantile(buckets: &[(f64, f64)], q: f64) -> f64 {
    let total = buckets.last().map_or(0.0, |b| b.1);
    let rank = q * total;
    let mut below = (0.0, 0.0);
    for &(bound, cumulative) in buckets {
        if cumulative >= rank {
            if bound.is_infinite() {
                return below.0;
            }
            let width = cumulative - below.1;
            return if width > 0.0 { below.0 + (bound - below.0) * (rank - below.1) / width } else { bound };
        }
        below = (bound, cumulative);
    }
    below.0
}

#[cfg(test)]
mod tests {
    use super::*;

    const HISTOGRAM: &str = r#"# HELP cryptopulse_bar_latency_seconds From the trade closing a bar to Redis acknowledging it.
# TYPE cryptopulse_bar_latency_seconds histogram
cryptopulse_bar_latency_seconds_bucket{le="0.005"} 10
cryptopulse_bar_latency_seconds_bucket{le="0.01"} 60
cryptopulse_bar_latency_seconds_bucket{le="0.025"} 99
cryptopulse_bar_latency_seconds_bucket{le="0.05"} 100
cryptopulse_bar_latency_seconds_bucket{le="0.1"} 100
cryptopulse_bar_latency_seconds_bucket{le="+Inf"} 100
cryptopulse_bar_latency_seconds_sum 1.2
cryptopulse_bar_latency_seconds_count 100
cryptopulse_trades_total{partition="0"} 5 1700000000000
"#;

    #[test]
    fn reads_percentiles_from_histogram_buckets() {
        let got = latency(HISTOGRAM, "cryptopulse_bar_latency_seconds").unwrap();
        assert_eq!((got.count, got.source), (100, "histogram"));
        assert!((got.mean - 0.012).abs() < 1e-12);
        // rank 50 lies 40/50 of the way through (0.005, 0.01]
        assert!((got.p50 - 0.009).abs() < 1e-12, "{}", got.p50);
        // rank 99 is the top of (0.01, 0.025]
        assert!((got.p99 - 0.025).abs() < 1e-12, "{}", got.p99);
        assert_eq!(got.max, 0.05);
        assert_eq!(latency(HISTOGRAM, "other_metric"), None);
    }

    #[test]
    fn sums_label_sets_and_reads_summaries() {
        let split = "m_bucket{partition=\"0\",le=\"1\"} 1\nm_bucket{partition=\"1\",le=\"1\"} 3\nm_bucket{partition=\"0\",le=\"+Inf\"} 2\nm_bucket{partition=\"1\",le=\"+Inf\"} 3\nm_sum 8\nm_count{partition=\"0\"} 2\nm_count{partition=\"1\"} 3\n";
        let got = latency(split, "m").unwrap();
        assert_eq!((got.count, got.max, got.p50), (5, f64::INFINITY, 0.625));
        // Past every finite bucket: the highest finite bound, as Prometheus answers.
        assert_eq!(got.p99, 1.0);
        let summary = "m{quantile=\"0.5\"} 0.004\nm{quantile=\"0.99\"} 0.02\nm{quantile=\"1\"} 0.031\nm_sum 0.5\nm_count 100\n";
        let got = latency(summary, "m").unwrap();
        assert_eq!((got.p50, got.p99, got.max, got.source), (0.004, 0.02, 0.031, "summary"));
        assert_eq!(latency("m_count 0\n", "m"), None);
    }
}
