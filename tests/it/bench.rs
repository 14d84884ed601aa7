//! The benchmark tool end to end on a tiny input against the real broker
//! and Redis: every measured process handles every trade, and the run's
//! topics, keys and state directories are gone afterwards. Counts only;
//! speeds are never asserted.

use std::path::PathBuf;
use std::time::Duration;

use cryptopulse::tooling::bench::{self, BenchConfig, Bins, LatencyConfig};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

use crate::common::{fixture, wait_for, Lane};

/// Bounds of a measured process's peak RSS: a process that has loaded
/// librdkafka and a tokio runtime holds more than the lower one, and the
/// README's goal keeps the consumer under the upper one at 10,000 symbols.
const RSS_MIB: std::ops::Range<f64> = 5.0..200.0;

#[tokio::test(flavor = "multi_thread")]
async fn a_tiny_run_measures_every_process_and_cleans_up() {
    let lane = Lane::new("bench");
    let out = tempfile::tempdir().unwrap();
    let classpath = std::process::Command::new("scripts/services").arg("java-cp").output().unwrap();
    let config = BenchConfig {
        kafka: lane.kafka.clone(),
        redis_url: lane.redis.target.url.clone(),
        trades: 2_000,
        symbols: vec![3, 30],
        repeats: 2,
        source: PathBuf::from(fixture::ARCHIVE),
        out_dir: out.path().to_owned(),
        bins: Bins {
            consumer: env!("CARGO_BIN_EXE_consumer").into(),
            replay: env!("CARGO_BIN_EXE_replay").into(),
            noop: env!("CARGO_BIN_EXE_bench").into(),
        },
        consumer_args: vec!["--batch-rows".into(), "500".into()],
        kafka_classpath: Some(String::from_utf8(classpath.stdout).unwrap().trim().to_owned()),
        latency: Some(LatencyConfig { symbols: 10, seconds: 3 }),
        progress: false,
    };
    let report = bench::run(&config).await.unwrap();

    assert_eq!(report.points.iter().map(|p| p.symbols).collect::<Vec<_>>(), vec![3, 30]);
    let cores = std::thread::available_parallelism().unwrap().get();
    for point in &report.points {
        for series in [&point.noop, &point.consumer] {
            assert_eq!(series.samples.len(), 2, "{}", series.name);
            for sample in &series.samples {
                assert_eq!(sample.trades, 2_000, "{}", series.name);
                assert!(RSS_MIB.contains(&sample.peak_rss_mib), "{}: peak RSS {} MiB", series.name, sample.peak_rss_mib);
            }
        }
        // The same input makes the same bars in every repeat, and Redis did
        // work for them: more than nothing, and no more than all cores for
        // the consumer's run and the INFO round trips around it.
        let bars: Vec<Option<u64>> = point.consumer.samples.iter().map(|s| s.bars).collect();
        assert!(bars[0].is_some_and(|b| b > 0) && bars.iter().all(|b| *b == bars[0]), "{bars:?}");
        for sample in &point.consumer.samples {
            let redis = sample.redis_cpu_s.expect("Redis CPU measured over a consumer run");
            assert!(redis > 0.0 && redis <= cores as f64 * (sample.wall_s + 1.0), "Redis CPU {redis} s over {} s", sample.wall_s);
        }
        assert_eq!(point.bar_cost.bars_per_million, bars[0].unwrap() as f64 / 2_000.0 * 1e6);
        // The cores' bound: this machine's cores over each process's CPU per
        // trade plus Redis's, as measured in these repeats.
        let (bound, redis) = (point.cpu_bound, point.bar_cost.redis_cpu_s_per_million.median);
        let expected = cores as f64 / (point.consumer.cpu_s_per_million.median + redis) * 1e6;
        assert!(bound.cpus == cores && (bound.consumer_and_redis_per_s - expected).abs() < 1e-6 * expected, "{bound:?}");
        assert!(bound.fetch_and_redis_per_s > 0.0 && bound.fetch_and_redis_ratio.is_finite(), "{bound:?}");
    }
    let producer = report.producer.as_ref().unwrap();
    assert!(producer.record_bytes > 100 && producer.record_bytes < 200, "{}", producer.record_bytes);
    assert_eq!(producer.replay.samples.len() + producer.perf_test.samples.len(), 4);
    let latency = report.latency.as_ref().unwrap();
    match (&latency.latency, &latency.unavailable) {
        (Some(l), _) => assert!(l.count > 0 && latency.trades > 0),
        (None, Some(reason)) => assert!(reason.contains("--metrics-addr"), "{reason}"),
        (None, None) => panic!("latency neither measured nor explained"),
    }
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["points"][1]["consumer"]["samples"][0]["trades"], 2_000);
    assert!(report.svg().contains("<polyline"));

    // Nothing of the run is left behind: topics, keys, state directories.
    let consumer: BaseConsumer = ClientConfig::new().set("bootstrap.servers", &lane.kafka.brokers).create().unwrap();
    wait_for(|| {
        let metadata = consumer.fetch_metadata(None, Duration::from_secs(10)).unwrap();
        let left = metadata.topics().iter().filter(|t| t.name().starts_with(&report.run)).count();
        async move { left == 0 }
    })
    .await;
    let mut redis = lane.redis().await;
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{}*", report.run)).query_async(&mut redis).await.unwrap();
    assert!(keys.is_empty(), "{keys:?}");
    assert_eq!(std::fs::read_dir(out.path().join("state")).unwrap().count(), 0);
}
