//! The Grafana dashboards against the data they show. Every Redis panel
//! query is sent to the real Redis exactly as the redis-datasource plugin
//! (2.2.0) sends it, after the fixtures went through the pipeline, and the
//! answer must have the shape its panel needs. Every Prometheus panel query
//! names only metrics that `src/telemetry.rs` declares. Also static checks of
//! `grafana/` and the compose file: each dashboard on one provisioned data
//! source, the paths Grafana reads are the ones compose mounts, and no
//! secret in the repository.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use redis::aio::ConnectionManager;
use serde_json::Value;

use crate::common::Lane;

/// The key prefix the dashboards are written for; a test lane has its own.
const PREFIX: &str = "cryptopulse";
const DASHBOARDS: &str = "grafana/dashboards";
const DATASOURCE: &str = "grafana/provisioning/datasources/redis.yaml";
const PROMETHEUS_DATASOURCE: &str = "grafana/provisioning/datasources/prometheus.yaml";
const DATASOURCES: &str = "grafana/provisioning/datasources";
const DASHBOARD_PROVIDER: &str = "grafana/provisioning/dashboards/dashboards.yaml";
const COMPOSE: &str = "docker-compose.yml";
/// The placeholders of `.env.example`, the template of `.env`: the
/// documented demo values, to be changed.
const DEMO_VALUES: [&str; 2] = [DEFAULT_PASSWORD, "local-demo-only-change-me"];

/// The only password value allowed in the repository: the documented default,
/// and only as the default of an environment variable.
const DEFAULT_PASSWORD: &str = "cryptopulse123";
/// A dashboard time range (ms) covering the fixture's trades.
const FROM_MS: i64 = 1_723_161_255_000;
const TO_MS: i64 = 1_723_161_602_000;
/// Commands whose query and answer this test knows how the plugin handles.
const KNOWN_COMMANDS: [&str; 2] = ["xrange", "hgetall"];

/// One panel query as the plugin runs it, and what the panel reads from it.
#[derive(Debug, Clone)]
struct PanelQuery {
    panel: String,
    command: String,
    /// The key as written in the dashboard: default prefix, `{$symbol}` in it (SPEC §6 hash tag).
    key: String,
    /// The fields the panel keeps (filterFieldsByName), each needed as a number.
    fields: Vec<String>,
    /// Fields an entry may lack: the plugin fills in 0, which the panel drops
    /// only where another condition says the field was missing.
    optional: Vec<String>,
    /// A candlestick panel's open, high, low and close fields.
    candles: Option<[String; 4]>,
}

fn read(path: impl AsRef<Path>) -> String {
    let path = path.as_ref();
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn dashboards() -> Vec<(PathBuf, Value)> {
    let mut out: Vec<(PathBuf, Value)> = std::fs::read_dir(DASHBOARDS)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "json"))
        .map(|path| {
            let json = serde_json::from_str(&read(&path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            (path, json)
        })
        .collect();
    assert!(!out.is_empty(), "no dashboard in {DASHBOARDS}");
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The values of `key: value` lines of a small YAML file.
fn yaml_values<'a>(text: &'a str, key: &str) -> Vec<&'a str> {
    text.lines()
        .filter_map(|line| {
            let (k, v) = line.trim().trim_start_matches("- ").split_once(':')?;
            (k.trim() == key).then(|| v.trim().trim_matches('"'))
        })
        .collect()
}

fn provisioned_uid() -> String {
    let text = read(DATASOURCE);
    assert_eq!(yaml_values(&text, "type"), ["redis-datasource"]);
    assert_eq!(yaml_values(&text, "url"), ["redis://redis:6379"]);
    let uids = yaml_values(&text, "uid");
    assert_eq!(uids.len(), 1, "one provisioned data source with one uid: {uids:?}");
    uids[0].to_owned()
}

fn prometheus_uid() -> String {
    let text = read(PROMETHEUS_DATASOURCE);
    assert_eq!(yaml_values(&text, "type"), ["prometheus"]);
    assert_eq!(yaml_values(&text, "url"), ["http://prometheus:9090"], "the compose service");
    let uids = yaml_values(&text, "uid");
    assert_eq!(uids.len(), 1, "one provisioned data source with one uid: {uids:?}");
    uids[0].to_owned()
}

/// The uid of every data source provisioned from any file.
fn all_provisioned_uids() -> BTreeSet<String> {
    files_under(Path::new(DATASOURCES))
        .iter()
        .flat_map(|f| yaml_values(&read(f), "uid").into_iter().map(str::to_owned).collect::<Vec<_>>())
        .collect()
}

/// The data source uids a dashboard's panels, targets and variables use.
fn uids_used(dashboard: &Value) -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    let mut add = |datasource: &Value| {
        used.insert(datasource["uid"].as_str().unwrap_or("(none)").to_owned());
    };
    for panel in panels(&dashboard["panels"]).into_iter().filter(|p| !targets(p).is_empty()) {
        add(&panel["datasource"]);
        targets(panel).iter().for_each(|t| add(&t["datasource"]));
    }
    dashboard["templating"]["list"].as_array().into_iter().flatten().filter(|v| v["type"] == "query").for_each(|v| add(&v["datasource"]));
    used
}

/// The dashboards drawn from Redis.
fn redis_dashboards() -> Vec<(PathBuf, Value)> {
    let uid = provisioned_uid();
    let out: Vec<_> = dashboards().into_iter().filter(|(_, d)| uids_used(d).contains(&uid)).collect();
    assert!(!out.is_empty(), "no Redis dashboard");
    out
}

/// Every panel, the panels of collapsed rows included.
fn panels(list: &Value) -> Vec<&Value> {
    list.as_array().into_iter().flatten().flat_map(|panel| std::iter::once(panel).chain(panels(&panel["panels"]))).collect()
}

fn targets(panel: &Value) -> &[Value] {
    panel["targets"].as_array().map_or(&[], Vec::as_slice)
}

fn title(panel: &Value) -> String {
    panel["title"].as_str().unwrap_or("(untitled)").to_owned()
}

/// The options of the panel's enabled transformations with this id.
fn transformations<'a>(panel: &'a Value, id: &'a str) -> impl Iterator<Item = &'a Value> {
    panel["transformations"].as_array().into_iter().flatten().filter(move |t| t["id"] == id && t["disabled"] != true).map(|t| &t["options"])
}

fn strings(value: &Value) -> Vec<String> {
    value.as_array().into_iter().flatten().filter_map(Value::as_str).map(str::to_owned).collect()
}

/// Panels, targets and variables that do not use the provisioned data source.
fn datasource_problems(dashboard: &Value, uid: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let mut check = |what: String, datasource: &Value| {
        if datasource["uid"] != uid {
            problems.push(format!("{what}: data source {datasource} is not uid {uid}"));
        }
    };
    for panel in panels(&dashboard["panels"]).into_iter().filter(|p| !targets(p).is_empty()) {
        check(format!("panel {:?}", title(panel)), &panel["datasource"]);
        for target in targets(panel) {
            check(format!("panel {:?} target {}", title(panel), target["refId"]), &target["datasource"]);
        }
    }
    for variable in dashboard["templating"]["list"].as_array().into_iter().flatten().filter(|v| v["type"] == "query") {
        check(format!("variable {}", variable["name"]), &variable["datasource"]);
    }
    problems
}

/// The queries of every panel, and in `problems` whatever the test cannot
/// reproduce or the panel would not draw as numbers.
fn panel_queries(dashboard: &Value, problems: &mut Vec<String>) -> Vec<PanelQuery> {
    let mut out = Vec::new();
    for panel in panels(&dashboard["panels"]).into_iter().filter(|p| !targets(p).is_empty()) {
        let name = title(panel);
        let kept: Vec<String> = transformations(panel, "filterFieldsByName").flat_map(|o| strings(&o["include"]["names"])).collect();
        // `$time` and `$streamId` are what the plugin makes of a stream entry's id.
        let fields: Vec<String> = kept.iter().filter(|f| !f.starts_with('$')).cloned().collect();
        if fields.is_empty() {
            problems.push(format!("{name}: no filterFieldsByName with the fields it draws"));
        }
        let numeric: BTreeSet<String> = transformations(panel, "convertFieldType")
            .flat_map(|o| o["conversions"].as_array().cloned().unwrap_or_default())
            .filter(|c| c["destinationType"] == "number")
            .filter_map(|c| c["targetField"].as_str().map(str::to_owned))
            .collect();
        for field in fields.iter().filter(|f| !numeric.contains(*f)) {
            problems.push(format!("{name}: {field} is not converted to a number"));
        }
        let mut optional: Vec<String> = Vec::new();
        for o in transformations(panel, "filterByValue").filter(|o| o["type"] == "exclude") {
            let filters = o["filters"].as_array().cloned().unwrap_or_default();
            let zero: Vec<String> = filters
                .iter()
                .filter(|f| f["config"]["id"] == "equal" && f["config"]["options"]["value"] == 0)
                .filter_map(|f| f["fieldName"].as_str().map(str::to_owned))
                .collect();
            // Dropping every 0 hides a real 0 too: another condition must narrow it (match all).
            if !zero.is_empty() && (o["match"] != "all" || filters.len() < 2) {
                problems.push(format!("{name}: drops every 0 of {zero:?}, a real 0 too"));
            }
            optional.extend(zero);
        }
        // A candlestick panel draws the fields its options map to open, high, low and close (and volume).
        let candles = (panel["type"] == "candlestick")
            .then(|| ["open", "high", "low", "close"].map(|role| panel["options"]["fields"][role].as_str().unwrap_or_default().to_owned()));
        if let Some(mapped) = &candles {
            let volume = panel["options"]["fields"]["volume"].as_str().filter(|_| panel["options"]["mode"] != "candles");
            let roles = ["open", "high", "low", "close", "volume"].into_iter();
            for (role, field) in roles.zip(mapped.iter().map(String::as_str).chain(volume)) {
                if !fields.iter().any(|f| f == field) {
                    problems.push(format!("{name}: candlestick {role} is {field:?}, not a field the panel keeps"));
                }
            }
        }
        for target in targets(panel) {
            let command = target["command"].as_str().unwrap_or_default().to_owned();
            let key = target["keyName"].as_str().unwrap_or_default().to_owned();
            let at = format!("{name} target {}", target["refId"]);
            if target["type"] != "command" {
                problems.push(format!("{at}: type {} is not \"command\"", target["type"]));
            }
            // The plugin runs a non-empty `query` as a raw command and ignores `command`.
            if target["query"].as_str().is_some_and(|q| !q.is_empty()) {
                problems.push(format!("{at}: has a raw query {}", target["query"]));
            }
            if !KNOWN_COMMANDS.contains(&command.as_str()) {
                problems.push(format!("{at}: command {command:?}: this test does not know how the plugin runs it"));
            }
            if command == "xrange" && !(kept.iter().any(|f| f == "$time") && target["start"].as_str().unwrap_or("").is_empty()) {
                problems.push(format!("{at}: a time series needs $time and the dashboard's time range (empty start/end)"));
            }
            // SPEC §6: a symbol's keys carry it in braces, a Redis Cluster hash tag.
            let expected = if command == "xrange" { format!("{PREFIX}:bars:{{$symbol}}") } else { format!("{PREFIX}:latest:{{$symbol}}") };
            if key != expected {
                problems.push(format!("{at}: key {key:?} is not {expected:?}"));
            }
            out.push(PanelQuery {
                panel: name.clone(),
                command,
                key,
                fields: fields.clone(),
                optional: optional.clone(),
                candles: candles.clone(),
            });
        }
    }
    out
}

/// The `symbol` variable: its query and its default value.
fn symbol_variable(dashboard: &Value) -> (String, String) {
    let list = dashboard["templating"]["list"].as_array().expect("templating");
    let variable = list.iter().find(|v| v["name"] == "symbol").expect("a `symbol` variable");
    let query = variable["query"].as_str().or_else(|| variable["query"]["query"].as_str()).expect("a query");
    (query.to_owned(), variable["current"]["value"].as_str().unwrap_or_default().to_owned())
}

/// A dashboard key for this prefix and symbol.
fn resolve(key: &str, prefix: &str, symbol: &str) -> String {
    let rest = key.strip_prefix(PREFIX).unwrap_or(key);
    format!("{prefix}{}", rest.replace("${symbol}", symbol).replace("$symbol", symbol))
}

/// A variable query as the plugin runs it: command, key, further arguments.
async fn run_variable(conn: &mut ConnectionManager, query: &str, prefix: &str) -> Vec<String> {
    let words: Vec<&str> = query.split_whitespace().collect();
    let (command, key, rest) = match words.as_slice() {
        [command, key, rest @ ..] => (command, resolve(key, prefix, ""), rest),
        _ => panic!("variable query {query:?} is not COMMAND KEY ..."),
    };
    redis::cmd(command).arg(key).arg(rest).query_async(conn).await.unwrap_or_else(|e| panic!("{query}: {e}"))
}

fn is_number(text: &str) -> bool {
    text.parse::<f64>().is_ok_and(f64::is_finite)
}

fn lookup<'a>(flat: &'a [String], field: &str) -> Option<&'a str> {
    flat.chunks_exact(2).find(|pair| pair[0] == field).map(|pair| pair[1].as_str())
}

fn number(flat: &[String], field: &str) -> Option<f64> {
    lookup(flat, field).and_then(|v| v.parse().ok())
}

/// What the panel finds in the answer to its query, for one symbol.
async fn shape_problems(conn: &mut ConnectionManager, query: &PanelQuery, prefix: &str, symbol: &str) -> Vec<String> {
    let key = resolve(&query.key, prefix, symbol);
    let at = format!("{} [{} {key}]", query.panel, query.command);
    match query.command.as_str() {
        // Empty start and end: the plugin sends the dashboard's range as `<from>-0 <to>-0`.
        "xrange" => {
            let entries: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
                .arg(&key)
                .arg(format!("{FROM_MS}-0"))
                .arg(format!("{TO_MS}-0"))
                .query_async(conn)
                .await
                .unwrap_or_else(|e| panic!("{at}: {e}"));
            stream_problems(&at, query, &entries)
        }
        "hgetall" => {
            let flat: Vec<String> = redis::cmd("HGETALL").arg(&key).query_async(conn).await.unwrap_or_else(|e| panic!("{at}: {e}"));
            let entries = if flat.is_empty() { Vec::new() } else { vec![("hash".to_owned(), flat)] };
            stream_problems(&at, query, &entries)
        }
        other => vec![format!("{at}: unknown command {other}")],
    }
}

/// Entries (id, flat field/value list): each id a time within the range, each
/// field the panel uses a number; a hash is one entry without a time.
fn stream_problems(at: &str, query: &PanelQuery, entries: &[(String, Vec<String>)]) -> Vec<String> {
    if entries.is_empty() {
        return vec![format!("{at}: empty answer")];
    }
    let mut problems = Vec::new();
    if query.command == "xrange" {
        // The plugin takes an entry's time from the ms part of its id.
        let in_range =
            |id: &String| id.split_once('-').and_then(|(ms, _)| ms.parse::<i64>().ok()).is_some_and(|ms| (FROM_MS..=TO_MS).contains(&ms));
        if let Some(id) = entries.iter().map(|(id, _)| id).find(|id| !in_range(id)) {
            problems.push(format!("{at}: entry id {id} is not <ms>-<seq> within {FROM_MS}..{TO_MS}"));
        }
    }
    for field in &query.fields {
        let values: Vec<Option<&str>> = entries.iter().map(|(_, flat)| lookup(flat, field)).collect();
        let missing = values.iter().filter(|v| v.is_none()).count();
        if missing == entries.len() {
            problems.push(format!("{at}: no entry has {field}"));
        } else if missing > 0 && !query.optional.contains(field) {
            problems.push(format!("{at}: {missing} of {} entries lack {field}", entries.len()));
        }
        let bad: Vec<&str> = values.iter().flatten().copied().filter(|v| !is_number(v)).collect();
        if let Some(value) = bad.first() {
            problems.push(format!("{at}: {field} = {value:?} is not a number ({} entries)", bad.len()));
        }
    }
    // A candle: low <= open, close <= high (a missing or non-numeric value is reported above).
    if let Some([open, high, low, close]) = &query.candles {
        let bad = entries
            .iter()
            .filter(|(_, flat)| match (number(flat, open), number(flat, high), number(flat, low), number(flat, close)) {
                (Some(o), Some(h), Some(l), Some(c)) => !(l <= o.min(c) && o.max(c) <= h),
                _ => false,
            })
            .count();
        if bad > 0 {
            problems.push(format!("{at}: {bad} of {} entries are not low <= open, close <= high", entries.len()));
        }
    }
    problems
}

/// Lines that give a password or a secret a value other than an environment
/// variable (whose default may be the documented one), and URLs with a
/// password in them. Comments are skipped. A `${NAME}` reference without a
/// default stands for a value kept out of the repository wherever it is (a
/// URL's password, `redis://:${REDIS_PASSWORD}@redis:6379`), so it is taken
/// out of the line before the search.
pub(crate) fn secret_values(text: &str) -> Vec<String> {
    text.lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .filter(|line| {
            let plain = without_env_references(line);
            let lower = plain.to_ascii_lowercase();
            let value = ["password", "secret"].iter().filter_map(|word| lower.find(word)).min().and_then(|at| {
                // The rest of the name (`_FILE`, `"`), then `:` or `=`: an
                // assignment, not a word in a sentence.
                let rest = plain[at..].trim_start_matches(|c: char| c.is_ascii_alphanumeric() || "_.\"'".contains(c)).trim_start();
                let value = rest.strip_prefix([':', '='])?;
                Some(value.trim().trim_end_matches(',').trim().trim_matches(['"', '\'']))
            });
            value.is_some_and(|value| !is_allowed_secret(value)) || has_url_password(&plain)
        })
        .map(|line| line.trim().to_owned())
        .collect()
}

/// `line` without its `${NAME}` references (environment variables without a default).
fn without_env_references(line: &str) -> String {
    let mut out = String::new();
    let mut rest = line;
    while let Some(at) = rest.find("${") {
        out.push_str(&rest[..at]);
        let after = &rest[at + 2..];
        match after.find('}').filter(|&end| is_env_name(&after[..end])) {
            Some(end) => rest = &after[end + 1..],
            None => {
                out.push_str("${");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// A URL in `line` with a password (`scheme://user:password@host`).
fn has_url_password(line: &str) -> bool {
    line.split("://").skip(1).any(|rest| {
        let authority = rest.split(['/', '?', '#', ' ', '"', '\'']).next().unwrap_or_default();
        authority.rsplit_once('@').and_then(|(userinfo, _)| userinfo.split_once(':')).is_some_and(|(_, password)| !password.is_empty())
    })
}

fn is_env_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn is_allowed_secret(value: &str) -> bool {
    // A shell variable (`$pw`, compose's escaped `$$REDIS_PASSWORD`) holds
    // a value from elsewhere; `${...}` is judged below.
    let shell_variable = value
        .strip_prefix("$$")
        .or_else(|| value.strip_prefix('$'))
        .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_'));
    if value.is_empty() || shell_variable || DEMO_VALUES.contains(&value) {
        return true;
    }
    let Some(inner) = value.strip_prefix("${").and_then(|v| v.strip_suffix('}')) else { return false };
    match inner.split_once(":-").or_else(|| inner.split_once('-')) {
        Some((name, default)) => is_env_name(name) && default == DEFAULT_PASSWORD,
        None => is_env_name(inner),
    }
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[test]
fn every_panel_uses_the_provisioned_data_source_and_queries_this_test_can_replay() {
    let uid = provisioned_uid();
    for (path, dashboard) in redis_dashboards() {
        let mut problems = datasource_problems(&dashboard, &uid);
        let queries = panel_queries(&dashboard, &mut problems);
        assert!(problems.is_empty(), "{}:\n{}", path.display(), problems.join("\n"));
        assert!(!queries.is_empty(), "{}: no panel queries", path.display());
        let (query, default) = symbol_variable(&dashboard);
        assert_eq!(query.to_ascii_uppercase().split_whitespace().next(), Some("SMEMBERS"), "{query}");
        assert_eq!(query.split_whitespace().nth(1), Some(format!("{PREFIX}:symbols").as_str()));
        assert_eq!(default, "BTCUSDT");
    }
    let live = dashboards().into_iter().map(|(_, d)| d).find(|d| d["title"] == "CryptoPulse Live").expect("CryptoPulse Live");
    assert_eq!(live["uid"], "cryptopulse-live");

    // The checks fail on a panel of another data source or a raw query.
    let mut broken = live.clone();
    broken["panels"][0]["targets"][0]["datasource"]["uid"] = "elsewhere".into();
    broken["panels"][0]["targets"][0]["query"] = "KEYS *".into();
    let mut problems = datasource_problems(&broken, &uid);
    panel_queries(&broken, &mut problems);
    assert_eq!(problems.len(), 2, "{problems:?}");

    // And on a key without the hash tag, a candle field the panel does not keep, and a filter that drops every 0.
    let mut broken = live;
    broken["panels"][0]["targets"][0]["keyName"] = format!("{PREFIX}:latest:$symbol").into();
    let list = broken["panels"].as_array_mut().unwrap();
    let candlestick = list.iter_mut().find(|p| p["type"] == "candlestick").expect("a candlestick panel");
    candlestick["options"]["fields"]["high"] = "max".into();
    let rsi = list.iter_mut().find(|p| p["type"] == "timeseries" && p["title"] == "RSI 14").expect("the RSI 14 time series");
    let filter = rsi["transformations"].as_array_mut().unwrap().iter_mut().find(|t| t["id"] == "filterByValue").unwrap();
    filter["options"]["filters"].as_array_mut().unwrap().truncate(1);
    let mut problems = Vec::new();
    panel_queries(&broken, &mut problems);
    assert_eq!(problems.len(), 3, "{problems:?}");
}

#[test]
fn grafana_reads_what_compose_mounts_and_no_secret_is_in_the_repository() {
    let compose = read(COMPOSE);
    let mount = |source: &str| {
        compose
            .lines()
            .find_map(|line| line.trim().strip_prefix(&format!("- {source}:")).map(|target| target.trim_end_matches(":ro").to_owned()))
            .unwrap_or_else(|| panic!("{COMPOSE} does not mount {source}"))
    };
    assert_eq!(yaml_values(&read(DASHBOARD_PROVIDER), "path"), [mount("./grafana/dashboards").as_str()]);
    assert_eq!(mount("./grafana/provisioning"), "/etc/grafana/provisioning");

    let mut files = files_under(Path::new("grafana"));
    files.extend(files_under(Path::new("prometheus")));
    files.extend([COMPOSE, "Dockerfile", ".dockerignore"].map(PathBuf::from));
    for file in files {
        let found = secret_values(&read(&file));
        assert!(found.is_empty(), "{}: secret values in the repository:\n{}", file.display(), found.join("\n"));
    }

    let planted = "GF_SECURITY_ADMIN_PASSWORD: hunter2\n\"secureJsonData\": {\"password\": \"s3cret\"},\n\
                   GF_SECURITY_ADMIN_PASSWORD: ${GRAFANA_ADMIN_PASSWORD:-cryptopulse123}\nCLIENT_SECRET=${OTHER:-letmein}\n# password: a comment\n\
                   REDIS_PASSWORD: ${REDIS_PASSWORD}\nCRYPTOPULSE_REDIS_URL: redis://:${REDIS_PASSWORD}@redis:6379\n\
                   url: redis://:hunter2@redis:6379\nsasl.password=$pw\nADMIN_PASSWORD: ${PW:-letmein}\nlog \"passwords were missing: again\"";
    assert_eq!(secret_values(planted).len(), 5, "{:?}", secret_values(planted));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_panel_query_finds_numbers_in_the_replayed_fixtures() {
    let lane = Lane::new("dash");
    let state = tempfile::tempdir().unwrap();
    assert!(lane.replay(None, None).await.trades > 0);
    assert!(lane.consume(state.path()).await.counts.bars > 0);
    let mut conn = lane.redis().await;
    let prefix = &lane.redis.target.prefix;

    for (path, dashboard) in redis_dashboards() {
        let mut problems = Vec::new();
        let queries = panel_queries(&dashboard, &mut problems);
        let (variable, default) = symbol_variable(&dashboard);
        let symbols = run_variable(&mut conn, &variable, prefix).await;
        assert!(symbols.contains(&default), "{variable} gives {symbols:?}, without the default {default}");
        for symbol in &symbols {
            for query in &queries {
                problems.extend(shape_problems(&mut conn, query, prefix, symbol).await);
            }
        }
        assert!(problems.is_empty(), "{}:\n{}", path.display(), problems.join("\n"));

        // The check fails on a panel that reads a field Redis does not have.
        for query in &queries {
            let mut broken = query.clone();
            broken.fields.push("vwap_5m".to_owned());
            let found = shape_problems(&mut conn, &broken, prefix, &default).await;
            assert_eq!(found.len(), 1, "{found:?}");
        }
    }
}

/// PromQL functions and keywords the Pipeline dashboard may use.
const PROMQL_WORDS: [&str; 11] = ["sum", "rate", "increase", "histogram_quantile", "by", "without", "max", "min", "avg", "le", "time"];

/// Metric names in a PromQL expression that `src/telemetry.rs` does not
/// declare (a histogram's `_bucket`, `_count` and `_sum` series count as
/// declared), and words that are neither a known function nor a metric.
fn undeclared_metrics(expr: &str) -> Vec<String> {
    // Label matchers, ranges and strings hold label names and values, not metrics.
    let mut plain = String::new();
    let mut depth = 0;
    for c in expr.chars() {
        match c {
            '{' | '[' => depth += 1,
            '}' | ']' => depth -= 1,
            _ if depth > 0 => {}
            _ => plain.push(c),
        }
    }
    let plain = plain.replace(['"', '\''], " ");
    // `by (partition)`: label names, not metrics.
    let mut words: Vec<&str> = Vec::new();
    let mut skip_group = false;
    for word in plain
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':' || c == '(' || c == ')'))
        .flat_map(|w| w.split_inclusive(['(', ')']))
    {
        let name = word.trim_matches(['(', ')']);
        if skip_group {
            skip_group = !word.contains(')');
            continue;
        }
        if name == "by" || name == "without" {
            skip_group = !word.contains(')');
            continue;
        }
        if !name.is_empty() && !name.starts_with(|c: char| c.is_ascii_digit() || c == '.') {
            words.push(name);
        }
    }
    let declared = |name: &str| {
        cryptopulse::telemetry::ALL.contains(&name)
            || ["_bucket", "_count", "_sum"].iter().any(|suffix| {
                name.strip_suffix(suffix).is_some_and(|base| base.ends_with("_seconds") && cryptopulse::telemetry::ALL.contains(&base))
            })
    };
    words.into_iter().filter(|w| !PROMQL_WORDS.contains(w) && !declared(w)).map(str::to_owned).collect()
}

/// The PromQL of every target of a dashboard.
fn expressions(dashboard: &Value) -> Vec<(String, String)> {
    panels(&dashboard["panels"])
        .into_iter()
        .flat_map(|panel| targets(panel).iter().map(move |t| (title(panel), t["expr"].as_str().unwrap_or_default().to_owned())))
        .collect()
}

#[test]
fn every_dashboard_uses_one_provisioned_data_source() {
    let provisioned = all_provisioned_uids();
    assert_eq!(provisioned, BTreeSet::from([provisioned_uid(), prometheus_uid()]), "the data sources of {DATASOURCES}");
    for (path, dashboard) in dashboards() {
        let used = uids_used(&dashboard);
        assert_eq!(used.len(), 1, "{}: one data source per dashboard, not {used:?}", path.display());
        assert!(used.is_subset(&provisioned), "{}: {used:?} is not provisioned ({provisioned:?})", path.display());
    }
    let pipeline = dashboards().into_iter().map(|(_, d)| d).find(|d| d["uid"] == "cryptopulse-pipeline").expect("the Pipeline dashboard");
    assert_eq!(pipeline["title"], "CryptoPulse Pipeline");
    assert_eq!(uids_used(&pipeline), BTreeSet::from([prometheus_uid()]));
    assert!(datasource_problems(&pipeline, &prometheus_uid()).is_empty());

    // The check fails on a target of a data source nobody provisioned.
    let mut broken = pipeline;
    broken["panels"][1]["targets"][0]["datasource"]["uid"] = "elsewhere".into();
    assert!(!uids_used(&broken).is_subset(&provisioned));
    assert_eq!(datasource_problems(&broken, &prometheus_uid()).len(), 1);
}

#[test]
fn the_pipeline_dashboard_queries_every_declared_metric_and_nothing_else() {
    let pipeline = dashboards().into_iter().map(|(_, d)| d).find(|d| d["uid"] == "cryptopulse-pipeline").expect("the Pipeline dashboard");
    let exprs = expressions(&pipeline);
    assert!(!exprs.is_empty());
    for (panel, expr) in &exprs {
        assert!(expr.contains("cryptopulse_"), "{panel}: {expr:?} reads no cryptopulse metric");
        let unknown = undeclared_metrics(expr);
        assert!(unknown.is_empty(), "{panel}: {expr} names {unknown:?}, which src/telemetry.rs does not declare");
    }
    // Every series the services export has a panel.
    for name in cryptopulse::telemetry::ALL {
        assert!(exprs.iter().any(|(_, e)| e.contains(name)), "no panel shows {name}");
    }
    // Histograms are read as quantiles over their buckets, not as summaries.
    for name in cryptopulse::telemetry::ALL.iter().filter(|n| n.ends_with("_seconds") && !n.ends_with("_timestamp_seconds")) {
        assert!(exprs.iter().any(|(_, e)| e.starts_with("histogram_quantile(") && e.contains(&format!("{name}_bucket"))), "{name}");
    }

    // The check fails on a misspelt metric, one the code does not export, and an unknown function.
    assert_eq!(undeclared_metrics("sum(rate(cryptopulse_bars_writen_total[1m]))"), ["cryptopulse_bars_writen_total"]);
    assert_eq!(undeclared_metrics(r#"up{job="consumer"}"#), ["up"]);
    assert_eq!(undeclared_metrics("sum by (partition) (deriv(cryptopulse_consumer_lag[5m]))"), ["deriv"]);
    assert!(undeclared_metrics("histogram_quantile(0.99, sum by (le) (rate(cryptopulse_bar_latency_seconds_bucket[1m])))").is_empty());
    assert_eq!(undeclared_metrics("cryptopulse_bars_written_total_bucket"), ["cryptopulse_bars_written_total_bucket"]);
}

#[test]
fn the_alert_rules_name_only_declared_metrics() {
    let rules: serde_json::Value = serde_yaml_ng::from_str(&read("prometheus/alerts.yml")).expect("alerts.yml");
    let exprs: Vec<(String, String)> = rules["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|group| group["rules"].as_array().cloned().unwrap_or_default())
        .map(|rule| (rule["alert"].as_str().unwrap_or_default().to_owned(), rule["expr"].as_str().unwrap_or_default().to_owned()))
        .collect();
    assert!(exprs.len() >= 6, "{exprs:?}");
    // PromQL beyond what the dashboards use, and Prometheus's own `up`.
    let more = ["resets", "deriv", "and", "or", "unless", "ignoring", "group_left", "on", "reason", "up"];
    let mut named: BTreeSet<&str> = BTreeSet::new();
    for (alert, expr) in &exprs {
        let unknown: Vec<String> = undeclared_metrics(expr).into_iter().filter(|w| !more.contains(&w.as_str())).collect();
        assert!(unknown.is_empty(), "{alert}: {expr} names {unknown:?}, which src/telemetry.rs does not declare");
        named.extend(cryptopulse::telemetry::ALL.iter().copied().filter(|name| expr.contains(name)));
    }
    // The series the alerts were written for are all there.
    for name in [
        cryptopulse::telemetry::CONSUMER_LAG,
        cryptopulse::telemetry::LAST_BAR_WRITTEN,
        cryptopulse::telemetry::REDIS_WRITE_RETRIES,
        cryptopulse::telemetry::REDIS_WRITE_ERRORS,
        cryptopulse::telemetry::DEAD_LETTERS,
        cryptopulse::telemetry::GAP_TRADES_UNFILLED,
    ] {
        assert!(named.contains(&name), "no alert on {name}");
    }
    assert_eq!(undeclared_metrics("increase(cryptopulse_redis_write_retrys_total[1m]) > 0"), ["cryptopulse_redis_write_retrys_total"]);
}
