//! `doctor`: is everything the pipeline needs there? Checks the broker
//! (metadata, the raw and dead-letter topics), Redis (PING, version, memory,
//! the layout of its keys) and, when their URLs are given, Grafana (health,
//! the provisioned data sources) and Prometheus (ready, targets up). Each
//! check is one PASS or FAIL line, a failure with what to do about it.

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
    if let Some(grafana) = &config.grafana {
        checks.extend(check_grafana(grafana, timeout).await);
    }
    if let Some(url) = &config.prometheus_url {
        checks.extend(check_prometheus(url, timeout).await);
    }
    checks
}

/// Metadata from the broker, then the two topics.
fn check_kafka(args: &KafkaArgs, timeout: Duration) -> Vec<Check> {
    const START: &str = "start it with scripts/services up (or docker compose up -d kafka), or point --brokers at it";
    // A refused password or certificate is named, not called unreachable.
    if let Err(e) = args.check_reachable() {
        return vec![Check::fail("kafka", format!("broker {} refused this client", args.brokers), e.to_string())];
    }
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
        Ok(Err(e)) => {
            let hint = redis_hint(&e);
            Check::fail("redis", format!("{shown}: {e}"), hint)
        }
        Err(_) => Check::fail(
            "redis",
            format!("{shown}: no answer within {:?}", timeout * 2),
            "is it paused or overloaded? scripts/services status",
        ),
    }
}

/// What to do about a Redis failure, by what it says.
fn redis_hint(error: &str) -> &'static str {
    let text = error.to_ascii_lowercase();
    if ["authentication", "wrongpass", "noauth"].iter().any(|word| text.contains(word)) {
        "check the user in --redis-url and the password: CRYPTOPULSE_REDIS_PASSWORD or the file named by CRYPTOPULSE_REDIS_PASSWORD_FILE"
    } else if text.contains("noperm") {
        "the ACL user needs the keys under --redis-prefix and the commands listed in docs/security.md"
    } else if ["certificate", "tls", "handshake"].iter().any(|word| text.contains(word)) {
        "check CRYPTOPULSE_REDIS_CA_FILE (the CA that signed the server's certificate) and the URL's host"
    } else {
        "start it with scripts/services up (or docker compose up -d redis), or point --redis-url at it"
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
async fn check_grafana(grafana: &Grafana, timeout: Duration) -> Vec<Check> {
    let fix = "start it with docker compose up -d grafana, or point --grafana-url at it";
    let shown = secret::redact_url(&grafana.url);
    let health = match get(&grafana.url, "/api/health", None, timeout).await {
        Ok(r) if r.status == 200 => r.json().map(|j| format!("database {}, version {}", j["database"], j["version"])),
        Ok(r) => Err(format!("HTTP {}", r.status)),
        Err(e) => Err(e),
    };
    let health = match health {
        Ok(detail) => Check::pass("grafana", format!("{shown}/api/health: {}", detail.replace('"', ""))),
        Err(e) => return vec![Check::fail("grafana", format!("{shown}/api/health: {e}"), fix)],
    };
    let auth = (grafana.user.as_str(), grafana.password.as_str());
    let mut checks = vec![health];
    for uid in GRAFANA_DATASOURCES {
        let path = format!("/api/datasources/uid/{uid}");
        checks.push(match get(&grafana.url, &path, Some(auth), timeout).await {
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
async fn check_prometheus(url: &str, timeout: Duration) -> Vec<Check> {
    let fix = "start it with docker compose up -d prometheus, or point --prometheus-url at it";
    let shown = secret::redact_url(url);
    match get(url, "/-/ready", None, timeout).await {
        Ok(r) if r.status == 200 => {}
        Ok(r) => return vec![Check::fail("prometheus", format!("{shown}/-/ready: HTTP {} (still starting?)", r.status), fix)],
        Err(e) => return vec![Check::fail("prometheus", format!("{shown}/-/ready: {e}"), fix)],
    }
    let ready = Check::pass("prometheus", format!("{shown}/-/ready: ready"));
    let targets = get(url, "/api/v1/targets?state=active", None, timeout).await.and_then(|r| r.json());
    let targets = match targets {
        Ok(j) => j["data"]["activeTargets"].as_array().cloned().unwrap_or_default(),
        Err(e) => return vec![ready, Check::fail("prometheus", format!("{shown}/api/v1/targets: {e}"), fix)],
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

/// A GET of `path` under `base` (`http://` or `https://`, a path may
/// follow the host), with basic auth when given (user, password): the
/// status and body. Redirects are not followed.
pub async fn get(base: &str, path: &str, basic_auth: Option<(&str, &str)>, timeout: Duration) -> Result<Response, String> {
    let client = reqwest::Client::builder()
        .connect_timeout(timeout)
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| e.to_string())?;
    let url = format!("{}/{}", base.trim_end_matches('/'), path.trim_start_matches('/'));
    let mut request = client.get(&url).header("Accept", "application/json");
    if let Some((user, password)) = basic_auth {
        request = request.basic_auth(user, Some(password));
    }
    // The callers name the URL; reqwest's errors would repeat it, password and all.
    let response = request.send().await.map_err(|e| describe(&e.without_url()))?;
    let status = response.status().as_u16();
    let body = response.bytes().await.map_err(|e| describe(&e.without_url()))?.to_vec();
    Ok(Response { status, body })
}

/// A reqwest error with its causes: "error sending request" alone says
/// nothing of a refused connection or an untrusted certificate.
fn describe(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}
