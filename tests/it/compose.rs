//! What `docker compose config` would catch, without a Docker engine:
//! docker-compose.yml parsed as YAML and checked for pinned images,
//! `depends_on` targets that exist, files and volumes that exist, host ports
//! used once and bound to 127.0.0.1 only, Redis behind a password every
//! client sends, and Prometheus scraping each service on the port of its
//! `--metrics-addr`. `promtool` (Debian's prometheus package, installed by
//! `scripts/services install`) validates prometheus/prometheus.yml.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use serde_json::Value;

const COMPOSE: &str = "docker-compose.yml";
const PROMETHEUS_CONFIG: &str = "prometheus/prometheus.yml";

fn yaml(path: &str) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn services(compose: &Value) -> Vec<(&String, &Value)> {
    compose["services"].as_object().map(|m| m.iter().collect()).unwrap_or_default()
}

fn strings(value: &Value) -> Vec<String> {
    match value {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect(),
        _ => Vec::new(),
    }
}

/// `image: name:tag` with a version, not `latest`.
fn image_problems(name: &str, service: &Value) -> Vec<String> {
    let Some(image) = service["image"].as_str() else {
        return vec![format!("{name}: no image (build-only services get a versioned image name too)")];
    };
    match image.rsplit_once(':') {
        Some((_, tag)) if tag != "latest" && tag.chars().any(|c| c.is_ascii_digit()) && !tag.contains('/') => Vec::new(),
        _ => vec![format!("{name}: image {image} is not pinned to a version")],
    }
}

/// `depends_on` (list or map) names services of the file.
fn dependency_problems(name: &str, service: &Value, names: &BTreeSet<&str>) -> Vec<String> {
    let targets: Vec<String> = match &service["depends_on"] {
        Value::Object(map) => map.keys().cloned().collect(),
        other => strings(other),
    };
    targets.into_iter().filter(|t| !names.contains(t.as_str())).map(|t| format!("{name}: depends_on {t}, which is not a service")).collect()
}

/// Bind mounts exist in the repository, named volumes are declared, the build context has a Dockerfile.
fn file_problems(name: &str, service: &Value, compose: &Value, root: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    for volume in strings(&service["volumes"]) {
        let source = volume.split(':').next().unwrap_or_default();
        if source.starts_with("./") || source.starts_with('/') {
            if !root.join(source).exists() {
                problems.push(format!("{name}: mounts {source}, which is not in the repository"));
            }
        } else if compose["volumes"].get(source).is_none() {
            problems.push(format!("{name}: volume {source} is not declared under volumes:"));
        }
    }
    let context = service["build"].as_str().or_else(|| service["build"]["context"].as_str());
    if let Some(context) = context {
        if !root.join(context).join("Dockerfile").exists() {
            problems.push(format!("{name}: build context {context} has no Dockerfile"));
        }
    }
    for file in strings(&service["env_file"]) {
        if !root.join(&file).exists() {
            problems.push(format!("{name}: env_file {file} does not exist"));
        }
    }
    problems
}

/// The host side of `ports:` entries (`"9090:9090"`, `"127.0.0.1:9090:9090"`).
fn host_ports(service: &Value) -> Vec<String> {
    strings(&service["ports"])
        .into_iter()
        .filter_map(|p| {
            let parts: Vec<&str> = p.split(':').collect();
            (parts.len() >= 2).then(|| parts[parts.len() - 2].to_owned())
        })
        .collect()
}

/// Published ports bound to anything but 127.0.0.1 (`"9090:9090"` binds
/// every interface of the host, whatever its firewall says).
fn exposure_problems(name: &str, service: &Value) -> Vec<String> {
    strings(&service["ports"])
        .into_iter()
        .filter(|p| !p.starts_with("127.0.0.1:"))
        .map(|p| format!("{name}: port {p} is published beyond 127.0.0.1"))
        .collect()
}

/// Redis asks for a password, and every service given a Redis URL sends one.
fn redis_password_problems(compose: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let redis = &compose["services"]["redis"];
    let started = strings(&redis["command"]).join(" ") + &strings(&redis["entrypoint"]).join(" ");
    if !started.contains("requirepass") || !started.contains("REDIS_PASSWORD") {
        problems.push("redis: started without requirepass from REDIS_PASSWORD".to_owned());
    }
    for (name, service) in services(compose) {
        if let Some(url) = service["environment"]["CRYPTOPULSE_REDIS_URL"].as_str() {
            if !url.contains(":${REDIS_PASSWORD}@") {
                problems.push(format!("{name}: CRYPTOPULSE_REDIS_URL {url} carries no ${{REDIS_PASSWORD}}"));
            }
        }
    }
    problems
}

/// The port of a service's `--metrics-addr` (in `command` or the environment).
fn metrics_port(service: &Value) -> Option<String> {
    let command = strings(&service["command"]);
    let addr = command
        .iter()
        .position(|a| a == "--metrics-addr")
        .and_then(|i| command.get(i + 1).cloned())
        .or_else(|| command.iter().find_map(|a| a.strip_prefix("--metrics-addr=").map(str::to_owned)))
        .or_else(|| service["environment"]["CRYPTOPULSE_METRICS_ADDR"].as_str().map(str::to_owned))?;
    addr.rsplit_once(':').map(|(_, port)| port.to_owned())
}

/// Each scrape target is `service:port` of a service serving metrics on
/// that port, and each service serving metrics is scraped.
fn scrape_problems(compose: &Value, prometheus: &Value) -> Vec<String> {
    let serving: BTreeMap<String, String> =
        services(compose).into_iter().filter_map(|(name, s)| Some((name.clone(), metrics_port(s)?))).collect();
    let mut problems = Vec::new();
    let mut scraped = BTreeSet::new();
    for job in prometheus["scrape_configs"].as_array().into_iter().flatten() {
        for target in job["static_configs"].as_array().into_iter().flatten().flat_map(|c| strings(&c["targets"])) {
            let (host, port) = target.rsplit_once(':').unwrap_or((&target, ""));
            if serving.contains_key(host) {
                scraped.insert(host.to_owned());
            }
            match serving.get(host) {
                Some(served) if served == port => {}
                Some(served) => {
                    problems.push(format!("job {}: scrapes {target}, but {host} serves metrics on port {served}", job["job_name"]))
                }
                None => problems.push(format!("job {}: scrapes {target}, but {host} is no service with --metrics-addr", job["job_name"])),
            }
        }
    }
    for name in serving.keys().filter(|n| !scraped.contains(*n)) {
        problems.push(format!("{name} serves metrics but no scrape job reads them"));
    }
    problems
}

/// The Prometheus service reads the repository's config at its --config.file.
fn prometheus_service_problems(compose: &Value) -> Vec<String> {
    let service = &compose["services"]["prometheus"];
    let config = strings(&service["command"]).iter().find_map(|a| a.strip_prefix("--config.file=").map(str::to_owned));
    let mount = strings(&service["volumes"]).into_iter().find_map(|v| {
        let mut parts = v.split(':');
        (parts.next() == Some(&format!("./{PROMETHEUS_CONFIG}"))).then(|| parts.next().unwrap_or_default().to_owned())
    });
    match (config, mount) {
        (Some(config), Some(mount)) if config == mount => Vec::new(),
        (config, mount) => vec![format!("prometheus: --config.file {config:?} is not where ./{PROMETHEUS_CONFIG} is mounted ({mount:?})")],
    }
}

fn problems(compose: &Value, prometheus: &Value, root: &Path) -> Vec<String> {
    let all = services(compose);
    let names: BTreeSet<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
    let mut problems = Vec::new();
    let mut ports: BTreeMap<String, String> = BTreeMap::new();
    for (name, service) in &all {
        problems.extend(image_problems(name, service));
        problems.extend(dependency_problems(name, service, &names));
        problems.extend(file_problems(name, service, compose, root));
        problems.extend(exposure_problems(name, service));
        for port in host_ports(service) {
            if let Some(other) = ports.insert(port.clone(), (*name).clone()) {
                problems.push(format!("host port {port} is published by {other} and {name}"));
            }
        }
    }
    problems.extend(scrape_problems(compose, prometheus));
    problems.extend(prometheus_service_problems(compose));
    problems.extend(redis_password_problems(compose));
    problems
}

#[test]
fn compose_file_is_consistent_with_the_repository() {
    let (compose, prometheus) = (yaml(COMPOSE), yaml(PROMETHEUS_CONFIG));
    let root = Path::new(".");
    let names: BTreeSet<&str> = services(&compose).iter().map(|(name, _)| name.as_str()).collect();
    let want = ["consumer", "grafana", "kafka", "kafka-init", "producer", "prometheus", "redis", "replay"];
    assert_eq!(names, BTreeSet::from(want), "the services of {COMPOSE}");
    let found = problems(&compose, &prometheus, root);
    assert!(found.is_empty(), "{COMPOSE}:\n{}", found.join("\n"));
    assert_eq!(metrics_port(&compose["services"]["producer"]).as_deref(), Some("9464"));
    assert_eq!(metrics_port(&compose["services"]["consumer"]).as_deref(), Some("9465"));

    // Each check fails on what it is for.
    let broken = |change: &dyn Fn(&mut Value, &mut Value)| {
        let (mut compose, mut prometheus) = (compose.clone(), prometheus.clone());
        change(&mut compose, &mut prometheus);
        problems(&compose, &prometheus, root)
    };
    assert_eq!(broken(&|c, _| c["services"]["redis"]["image"] = "redis:latest".into()).len(), 1);
    assert_eq!(broken(&|c, _| c["services"]["redis"]["image"] = "redis".into()).len(), 1);
    assert_eq!(broken(&|c, _| c["services"]["grafana"]["depends_on"]["postgres"] = Value::Null).len(), 1);
    assert_eq!(
        broken(&|c, _| c["services"]["grafana"]["volumes"][0] = "./grafana/provisoning:/etc/grafana/provisioning:ro".into()).len(),
        1
    );
    assert_eq!(broken(&|c, _| c["services"]["redis"]["volumes"][0] = "redis-dat:/data".into()).len(), 1);
    assert_eq!(broken(&|c, _| c["services"]["grafana"]["ports"][0] = "127.0.0.1:9090:3000".into()).len(), 1);
    assert_eq!(broken(&|c, _| c["services"]["grafana"]["ports"][0] = "3000:3000".into()).len(), 1);
    assert_eq!(broken(&|c, _| c["services"]["redis"]["ports"][0] = "0.0.0.0:6379:6379".into()).len(), 1);
    assert_eq!(broken(&|c, _| c["services"]["redis"]["command"] = Value::Array(vec!["redis-server".into()])).len(), 1);
    assert_eq!(broken(&|c, _| c["services"]["consumer"]["environment"]["CRYPTOPULSE_REDIS_URL"] = "redis://redis:6379".into()).len(), 1);
    assert_eq!(broken(&|c, _| c["services"]["consumer"]["command"][2] = "0.0.0.0:9466".into()).len(), 1);
    assert_eq!(broken(&|_, p| p["scrape_configs"][0]["static_configs"][0]["targets"][0] = "producer:9465".into()).len(), 1);
    assert_eq!(broken(&|_, p| p["scrape_configs"][1]["static_configs"][0]["targets"][0] = "consumers:9465".into()).len(), 2);
    assert_eq!(broken(&|c, _| c["services"]["prometheus"]["command"][0] = "--config.file=/etc/prometheus.yml".into()).len(), 1);
}

#[test]
fn promtool_accepts_the_prometheus_config() {
    let promtool = std::env::var("CRYPTOPULSE_PROMETHEUS_BIN")
        .ok()
        .and_then(|bin| Path::new(&bin).parent().map(|dir| dir.join("promtool")))
        .filter(|path| path.exists())
        .map_or_else(|| "promtool".into(), |p| p.display().to_string());
    let output = Command::new(&promtool)
        .args(["check", "config", PROMETHEUS_CONFIG])
        .output()
        .unwrap_or_else(|e| panic!("{promtool}: {e} (scripts/services install installs Debian's prometheus, which has it)"));
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success() && text.contains("SUCCESS"), "{text}");

    // And refuses a broken one.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("prometheus.yml");
    std::fs::write(&bad, "scrape_configs:\n  - job_name: consumer\n    scrape_interval: often\n").unwrap();
    let output = Command::new(&promtool).args(["check", "config"]).arg(&bad).output().unwrap();
    assert!(!output.status.success());
}

/// No tracked file outside the code, its tests and the prose gives a
/// password or secret a value (other than the documented demo default) or
/// carries a URL with a password: `git ls-files`, so a new file is
/// checked the day it is added. The code and tests are left out (they name
/// secrets' settings, and the tests plant sentinels), and so are the
/// binary fixtures.
#[test]
fn no_tracked_file_holds_a_secret() {
    let listed = std::process::Command::new("git").args(["ls-files", "-z"]).output().expect("git");
    assert!(listed.status.success(), "git ls-files: {}", String::from_utf8_lossy(&listed.stderr));
    let files: Vec<String> = String::from_utf8(listed.stdout)
        .unwrap()
        .split('\0')
        .filter(|f| !f.is_empty())
        .filter(|f| !["src/", "tests/", "benches/", "tools/", "fixtures/"].iter().any(|dir| f.starts_with(dir)))
        .filter(|f| !f.ends_with(".md") && !f.ends_with(".rs"))
        .map(str::to_owned)
        .collect();
    assert!(files.iter().any(|f| f == "docker-compose.yml") && files.iter().any(|f| f == "scripts/secure-kafka"), "{files:?}");
    let mut found = Vec::new();
    for file in &files {
        let Ok(text) = std::fs::read_to_string(file) else { continue };
        found.extend(crate::dashboard::secret_values(&text).into_iter().map(|line| format!("{file}: {line}")));
    }
    assert!(found.is_empty(), "secret values in tracked files:\n{}", found.join("\n"));
}
