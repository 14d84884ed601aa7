//! `doctor`: is everything the pipeline needs there? Checks the broker
//! (metadata, the raw and dead-letter topics), Redis (PING, version, memory,
//! the layout of its keys) and, when their URLs are given, Grafana (health,
//! the provisioned data sources) and Prometheus (ready, targets up). Each
//! check is one PASS or FAIL line, a failure with what to do about it.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::Value;

use crate::kafka::KafkaArgs;
use crate::secret;
use crate::sink::RedisTarget;
use crate::sink::{Keys, LAYOUT};

/// The data source uids provisioned from `grafana/provisioning/datasources`.
pub const GRAFANA_DATASOURCES: [&str; 2] = ["cryptopulse-redis", "cryptopulse-prometheus"];

/// What to check.
#[derive(Debug, Clone)]
pub struct DoctorConfig {
    pub kafka: KafkaArgs,
    pub redis: RedisTarget,
    pub grafana: Option<Grafana>,
    /// Base URL of Prometheus, e.g. `http://127.0.0.1:9090`.
    pub prometheus_url: Option<String>,
    /// For each connection and request.
    pub timeout: Duration,
}

/// Grafana's base URL and the admin credentials its API needs.
#[derive(Debug, Clone)]
pub struct Grafana {
    pub url: String,
    pub user: String,
    pub password: String,
}

/// The outcome of one check.
#[derive(Debug, Clone)]
pub struct Check {
    /// The system checked: `kafka`, `redis`, `grafana`, `prometheus`.
    pub system: &'static str,
    pub passed: bool,
    /// What was found, or what went wrong.
    pub detail: String,
    /// On failure, what to do.
    pub fix: String,
}

impl Check {
    fn pass(system: &'static str, detail: impl Into<String>) -> Self {
        Check { system, passed: true, detail: detail.into(), fix: String::new() }
    }

    fn fail(system: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Check { system, passed: false, detail: detail.into(), fix: fix.into() }
    }
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verdict = if self.passed { "PASS" } else { "FAIL" };
        write!(f, "{verdict}  {:<10} {}", self.system, self.detail)?;
        if !self.passed {
            write!(f, "\n      -> {}", self.fix)?;
        }
        Ok(())
    }
}

/// The checks as one JSON object: `passed` (all of them), `checks` with
/// each one's `system`, `passed`, `detail` and, on failure, `fix`.
pub fn to_json(checks: &[Check]) -> Value {
    let list: Vec<Value> = checks
        .iter()
        .map(|c| {
            let mut check = serde_json::json!({ "system": c.system, "passed": c.passed, "detail": c.detail });
            if !c.passed {
                check["fix"] = c.fix.clone().into();
            }
            check
        })
        .collect();
    serde_json::json!({ "passed": checks.iter().all(|c| c.passed), "checks": list })
}

/// Runs every configured check, in order: broker, Redis, Grafana, Prometheus.
pub async fn run(config: &DoctorConfig) -> Vec<Check> {
    let kafka = config.kafka.clone();
    let timeout = config.timeout;
    let mut checks = tokio::task::spawn_blocking(move || check_kafka(&kafka, timeout))
        .await
        .unwrap_or_else(|e| vec![Check::fail("kafka", format!("check panicked: {e}"), "report this")]);
    checks.push(check_redis(&config.redis, timeout).await);
    let (grafana, prometheus) = (config.grafana.clone(), config.prometheus_url.clone());
    let http = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        if let Some(grafana) = &grafana {
            out.extend(check_grafana(grafana, timeout));
        }
        if let Some(url) = &prometheus {
            out.extend(check_prometheus(url, timeout));
        }
        out
    });
    checks.extend(http.await.unwrap_or_else(|e| vec![Check::fail("http", format!("check panicked: {e}"), "report this")]));
    checks
}

/// Metadata from the broker, then the two topics.
fn check_kafka(args: &KafkaArgs, timeout: Duration) -> Vec<Check> {
    const START: &str = "start it with scripts/services up (or docker compose up -d kafka), or point --brokers at it";
    let client = args
        .config_with(&[("group.id", "cryptopulse-doctor"), ("log_level", "0")])
        .and_then(|config| config.create::<BaseConsumer>().map_err(|e| crate::Error::kafka("create client", e)));
    let metadata = match client.and_then(|c| c.fetch_metadata(None, timeout).map_err(|e| crate::Error::kafka("fetch metadata", e))) {
        Ok(metadata) => metadata,
        Err(e) => return vec![Check::fail("kafka", format!("broker {} unreachable: {e}", args.brokers), START)],
    };
    let mut checks = vec![Check::pass(
        "kafka",
        format!("broker {} answers: {} broker(s), {} topics", args.brokers, metadata.brokers().len(), metadata.topics().len()),
    )];
    let partitions = |name: &str| metadata.topics().iter().find(|t| t.name() == name && t.error().is_none()).map(|t| t.partitions().len());
    let create = "create it with scripts/services up (or scripts/services topic NAME N, or run the producer or replay once)";
    for (topic, expected) in [(&args.topic, args.partitions), (&args.dlq_topic, 1)] {
        checks.push(match partitions(topic) {
            None => Check::fail("kafka", format!("topic {topic} does not exist"), create.replace("NAME N", &format!("{topic} {expected}"))),
            Some(n) if n as i32 != expected => Check::fail(
                "kafka",
                format!("topic {topic} has {n} partitions, expected {expected}"),
                "pass --partitions (CRYPTOPULSE_PARTITIONS) if that is intended, or recreate the topic",
            ),
            Some(n) => Check::pass("kafka", format!("topic {topic}: {n} partition(s)")),
        });
    }
    checks
}

/// PING, version, memory and the layout of the keys under the prefix.
async fn check_redis(target: &RedisTarget, timeout: Duration) -> Check {
    let shown = secret::redact_url(&target.url);
    match tokio::time::timeout(timeout * 2, redis_facts(target, timeout)).await {
        Ok(Ok(detail)) => Check::pass("redis", format!("{shown}: {detail}")),
        Ok(Err(e)) => Check::fail(
            "redis",
            format!("{shown}: {e}"),
            "start it with scripts/services up (or docker compose up -d redis), or point --redis-url at it",
        ),
        Err(_) => Check::fail(
            "redis",
            format!("{shown}: no answer within {:?}", timeout * 2),
            "is it paused or overloaded? scripts/services status",
        ),
    }
}

async fn redis_facts(target: &RedisTarget, timeout: Duration) -> Result<String, String> {
    let client = crate::sink::client(&target.url).map_err(|e| e.to_string())?;
    let config = redis::AsyncConnectionConfig::new().set_connection_timeout(timeout).set_response_timeout(timeout);
    let mut conn = client.get_multiplexed_async_connection_with_config(&config).await.map_err(|e| e.to_string())?;
    let pong: String = redis::cmd("PING").query_async(&mut conn).await.map_err(|e| e.to_string())?;
    let info: String = redis::cmd("INFO").arg("server").arg("memory").query_async(&mut conn).await.map_err(|e| e.to_string())?;
    let field = |name: &str| info.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':')).unwrap_or("?").trim().to_owned();
    let keys = Keys { prefix: target.prefix.clone() };
    let layout: Option<String> = redis::cmd("GET").arg(keys.layout()).query_async(&mut conn).await.map_err(|e| e.to_string())?;
    let earlier: bool = redis::cmd("EXISTS").arg(keys.earlier_marker()).query_async(&mut conn).await.map_err(|e| e.to_string())?;
    let layout = match (layout.as_deref(), earlier) {
        (Some(LAYOUT), false) => format!("layout {} = {LAYOUT}", keys.layout()),
        (Some(other), _) if other != LAYOUT => {
            return Err(format!("layout {} = {other:?}, this build writes {LAYOUT:?}: another layout under this prefix", keys.layout()))
        }
        (_, true) => {
            return Err(format!(
                "{} is there: bars of an earlier build (layout cryptopulse-v1, keys without braces); a consumer of this build writes them again under the new names on its next start, then delete the old keys ({}:latest:S, :ts:S:*, :bars:S) and the marker",
                keys.earlier_marker(),
                target.prefix
            ))
        }
        _ => format!("no layout {} yet (no consumer has written under this prefix)", keys.layout()),
    };
    Ok(format!("{pong}, Redis {}, {} used, {layout}", field("redis_version"), field("used_memory_human")))
}

/// `/api/health`, then each provisioned data source through the API.
fn check_grafana(grafana: &Grafana, timeout: Duration) -> Vec<Check> {
    let fix = "start it with docker compose up -d grafana, or point --grafana-url at it";
    let health = match get(&grafana.url, "/api/health", None, timeout) {
        Ok(r) if r.status == 200 => r.json().map(|j| format!("database {}, version {}", j["database"], j["version"])),
        Ok(r) => Err(format!("HTTP {}", r.status)),
        Err(e) => Err(e),
    };
    let health = match health {
        Ok(detail) => Check::pass("grafana", format!("{}/api/health: {}", grafana.url, detail.replace('"', ""))),
        Err(e) => return vec![Check::fail("grafana", format!("{}/api/health: {e}", grafana.url), fix)],
    };
    let auth = basic_auth(&grafana.user, &grafana.password);
    let mut checks = vec![health];
    for uid in GRAFANA_DATASOURCES {
        let path = format!("/api/datasources/uid/{uid}");
        checks.push(match get(&grafana.url, &path, Some(&auth), timeout) {
            Ok(r) if r.status == 200 => {
                let j = r.json().unwrap_or_default();
                Check::pass(
                    "grafana",
                    format!("data source {uid}: {} ({})", j["name"].as_str().unwrap_or("?"), j["type"].as_str().unwrap_or("?")),
                )
            }
            Ok(r) if r.status == 401 || r.status == 403 => Check::fail(
                "grafana",
                format!("data source {uid}: HTTP {} for user {}", r.status, grafana.user),
                "set GRAFANA_ADMIN_USER / GRAFANA_ADMIN_PASSWORD to Grafana's admin credentials",
            ),
            Ok(r) => Check::fail(
                "grafana",
                format!("data source {uid}: HTTP {}", r.status),
                "mount grafana/provisioning at /etc/grafana/provisioning (docker-compose.yml does) and restart Grafana",
            ),
            Err(e) => Check::fail("grafana", format!("data source {uid}: {e}"), fix),
        });
    }
    checks
}

/// `/-/ready`, then every active scrape target healthy.
fn check_prometheus(url: &str, timeout: Duration) -> Vec<Check> {
    let fix = "start it with docker compose up -d prometheus, or point --prometheus-url at it";
    match get(url, "/-/ready", None, timeout) {
        Ok(r) if r.status == 200 => {}
        Ok(r) => return vec![Check::fail("prometheus", format!("{url}/-/ready: HTTP {} (still starting?)", r.status), fix)],
        Err(e) => return vec![Check::fail("prometheus", format!("{url}/-/ready: {e}"), fix)],
    }
    let ready = Check::pass("prometheus", format!("{url}/-/ready: ready"));
    let targets = get(url, "/api/v1/targets?state=active", None, timeout).and_then(|r| r.json());
    let targets = match targets {
        Ok(j) => j["data"]["activeTargets"].as_array().cloned().unwrap_or_default(),
        Err(e) => return vec![ready, Check::fail("prometheus", format!("{url}/api/v1/targets: {e}"), fix)],
    };
    let describe = |t: &Value| format!("{} {}", t["labels"]["job"].as_str().unwrap_or("?"), t["scrapeUrl"].as_str().unwrap_or("?"));
    let down: Vec<String> = targets
        .iter()
        .filter(|t| t["health"] != "up")
        .map(|t| match (t["health"].as_str().unwrap_or("?"), t["lastError"].as_str().unwrap_or("")) {
            ("unknown", _) => format!("{} not scraped yet", describe(t)),
            (health, "") => format!("{} is {health}", describe(t)),
            (health, error) => format!("{} is {health} ({error})", describe(t)),
        })
        .collect();
    let check = if targets.is_empty() {
        Check::fail(
            "prometheus",
            "no scrape targets",
            "load the repository's prometheus/prometheus.yml (right after a start, try again in a few seconds)",
        )
    } else if down.is_empty() {
        let up: Vec<String> = targets.iter().map(describe).collect();
        Check::pass("prometheus", format!("{} target(s) up: {}", targets.len(), up.join(", ")))
    } else {
        Check::fail(
            "prometheus",
            format!("{} of {} target(s) not up: {}", down.len(), targets.len(), down.join("; ")),
            "start the services it scrapes with --metrics-addr (docker compose up -d producer consumer); a new target needs one scrape interval",
        )
    };
    vec![ready, check]
}

/// An HTTP answer: status and body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(&self) -> Result<Value, String> {
        serde_json::from_slice(&self.body).map_err(|e| format!("not JSON: {e}"))
    }
}

/// A blocking HTTP/1.1 GET over plain TCP: enough for local health checks
/// (no TLS, no redirects). `base` is `http://host:port`, a path may follow.
pub fn get(base: &str, path: &str, authorization: Option<&str>, timeout: Duration) -> Result<Response, String> {
    let rest = base.strip_prefix("http://").ok_or_else(|| format!("{base}: only http:// URLs are supported"))?;
    let (host, prefix) = rest.split_once('/').map_or((rest, ""), |(h, p)| (h, p));
    let addr = host.to_socket_addrs().map_err(|e| format!("{host}: {e}"))?.next().ok_or_else(|| format!("{host}: no address"))?;
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("cannot connect to {host}: {e}"))?;
    stream.set_read_timeout(Some(timeout)).and_then(|()| stream.set_write_timeout(Some(timeout))).map_err(|e| e.to_string())?;
    let path = format!("/{}{path}", prefix.trim_end_matches('/')).replace("//", "/");
    let auth = authorization.map(|a| format!("Authorization: {a}\r\n")).unwrap_or_default();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: application/json\r\n{auth}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).map_err(|e| format!("send to {host}: {e}"))?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(|e| format!("read from {host}: {e}"))?;
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> Result<Response, String> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or("no complete HTTP header")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|s| s.parse().ok()).ok_or("no HTTP status line")?;
    let chunked = lines.any(|l| l.to_ascii_lowercase().replace(' ', "") == "transfer-encoding:chunked");
    let body = &raw[split + 4..];
    Ok(Response { status, body: if chunked { dechunk(body)? } else { body.to_vec() } })
}

/// The body of a `Transfer-Encoding: chunked` answer.
fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let end = data.windows(2).position(|w| w == b"\r\n").ok_or("chunk size line cut short")?;
        let size_text = String::from_utf8_lossy(&data[..end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        if size == 0 {
            return Ok(body);
        }
        let chunk = data.get(end + 2..end + 2 + size).ok_or("chunk cut short")?;
        body.extend_from_slice(chunk);
        data = data.get(end + 4 + size..).ok_or("chunk end cut short")?;
    }
}

/// `Basic <base64(user:password)>`.
fn basic_auth(user: &str, password: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let input = format!("{user}:{password}").into_bytes();
    let mut out = String::from("Basic ");
    for group in input.chunks(3) {
        let n = group.iter().enumerate().fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            out.push(if i <= group.len() { ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char } else { '=' });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_basic_auth_as_rfc_4648_base64() {
        for (user, password, encoded) in [
            ("admin", "cryptopulse123", "YWRtaW46Y3J5cHRvcHVsc2UxMjM="),
            ("a", "b", "YTpi"),
            ("ab", "", "YWI6"),
            ("Aladdin", "open sesame", "QWxhZGRpbjpvcGVuIHNlc2FtZQ=="),
        ] {
            assert_eq!(basic_auth(user, password), format!("Basic {encoded}"));
        }
    }

    #[test]
    fn parses_plain_and_chunked_answers() {
        let plain = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}").unwrap();
        assert_eq!((plain.status, plain.body.as_slice()), (200, b"{}".as_slice()));
        let chunked = parse_response(
            b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nnot \r\n5;x=y\r\nready\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((chunked.status, chunked.body.as_slice()), (503, b"not ready".as_slice()));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200").is_err());
    }
}
