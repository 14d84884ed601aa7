//! A real Prometheus (Debian's, installed by `scripts/services install`) on
//! a free loopback port with a generated config, killed when dropped; and
//! the children it scrapes, killed when dropped too.

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cryptopulse::tooling::doctor;
use serde_json::Value;

/// A port nothing listens on (bound, then released).
pub fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port")
}

/// The Prometheus binary: `CRYPTOPULSE_PROMETHEUS_BIN` (set by `scripts/services env`),
/// else `prometheus` on the PATH.
fn binary() -> String {
    std::env::var("CRYPTOPULSE_PROMETHEUS_BIN").unwrap_or_else(|_| "prometheus".to_owned())
}

/// A child process killed (and reaped) on drop.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The consumer binary on `lane` (not `--exit-at-end`), serving metrics on
/// `addr`, until dropped.
pub fn spawn_consumer(lane: &super::Lane, state: &std::path::Path, addr: SocketAddr) -> Killed {
    let child = Command::new(env!("CARGO_BIN_EXE_consumer"))
        .args(["--brokers", &lane.kafka.brokers, "--topic", &lane.kafka.topic, "--dlq-topic", &lane.kafka.dlq_topic])
        .args(["--redis-url", &lane.redis.target.url, "--redis-prefix", &lane.redis.target.prefix])
        .args(["--checkpoint-ms", "200", "--batch-rows", "4096"])
        .arg("--state-dir")
        .arg(state)
        .args(["--metrics-addr", &addr.to_string()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("consumer binary");
    Killed(child)
}

/// A running Prometheus scraping the given jobs every second.
pub struct Prometheus {
    pub url: String,
    _child: Killed,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts it and waits until `/-/ready` answers 200.
    pub fn start(jobs: &[(&str, SocketAddr)]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = String::from("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n");
        for (job, addr) in jobs {
            config.push_str(&format!("  - job_name: {job}\n    static_configs:\n      - targets: ['{addr}']\n"));
        }
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write prometheus.yml");
        let addr = free_addr();
        let child = Command::new(binary())
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e} (scripts/services install installs Debian's prometheus)", binary()));
        let prometheus = Prometheus { url: format!("http://{addr}"), _child: Killed(child), _dir: dir };
        for _ in 0..300 {
            if blocking_get(&prometheus.url, "/-/ready", Duration::from_secs(2)).is_ok_and(|r| r.status == 200) {
                return prometheus;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("prometheus on {addr} not ready within 30 s");
    }

    /// An instant query through `/api/v1/query`: each result's labels and value.
    pub fn query(&self, promql: &str) -> Vec<(Value, f64)> {
        let path = format!("/api/v1/query?query={}", percent_encode(promql));
        let response = blocking_get(&self.url, &path, Duration::from_secs(10)).unwrap_or_else(|e| panic!("{promql}: {e}"));
        let json = response.json().unwrap_or_else(|e| panic!("{promql}: {e}"));
        assert_eq!(json["status"], "success", "{promql}: {json}");
        json["data"]["result"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| (r["metric"].clone(), r["value"][1].as_str().and_then(|v| v.parse().ok()).unwrap_or(f64::NAN)))
            .collect()
    }

    /// The single value of a query that must have exactly one result.
    pub fn value(&self, promql: &str) -> f64 {
        let results = self.query(promql);
        assert_eq!(results.len(), 1, "{promql}: {results:?}");
        results[0].1
    }
}

/// doctor's GET, waited for on this thread: the tests that use Prometheus
/// run on the multi-threaded runtime, which lets a worker block.
fn blocking_get(base: &str, path: &str, timeout: Duration) -> Result<doctor::Response, String> {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(doctor::get(base, path, None, timeout)))
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
