//! Writes final bars to Redis (SPEC §6): one Lua script call for the bars
//! of a batch (a few for a large one), in one pipeline. The script makes
//! every write idempotent, so a bar written again after a crash leaves
//! Redis as it was, and checks each symbol's keys before it writes them, so
//! data Redis lost is noticed per symbol.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use clap::Args;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;
use tracing::warn;

use crate::decimal;
use crate::error::{Error, Result};
use crate::secret;
use crate::window::{FinalBar, MetricNames};

pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
pub const DEFAULT_REDIS_PREFIX: &str = "cryptopulse";
pub const DEFAULT_RETENTION_SECS: u64 = 24 * 60 * 60;

/// Where Redis is and the prefix of the keys: all the read-only tools need.
/// Its `Debug` hides the URL's password.
#[derive(Args, Clone)]
pub struct RedisTarget {
    /// Redis URL (`redis+cluster://host:port[,host:port...]` for a Redis
    /// Cluster: consumer, latest, digest). A password goes in
    /// CRYPTOPULSE_REDIS_PASSWORD (or a file named by
    /// CRYPTOPULSE_REDIS_PASSWORD_FILE), or in this URL given through its
    /// environment variable, never as a flag.
    #[arg(id = "redis_url", long = "redis-url", value_name = "URL", env = "CRYPTOPULSE_REDIS_URL", default_value = DEFAULT_REDIS_URL, hide_env_values = true)]
    pub url: String,
    /// Prefix of every key.
    #[arg(id = "redis_prefix", long = "redis-prefix", value_name = "PREFIX", env = "CRYPTOPULSE_REDIS_PREFIX", default_value = DEFAULT_REDIS_PREFIX)]
    pub prefix: String,
}

impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTarget").field("url", &secret::redact_url(&self.url)).field("prefix", &self.prefix).finish()
    }
}

/// Where Redis is, how its keys are named and how writes are kept.
#[derive(Args, Debug, Clone)]
pub struct RedisArgs {
    #[command(flatten)]
    pub target: RedisTarget,
    /// Event time kept in sorted sets and streams, in seconds.
    #[arg(long, env = "CRYPTOPULSE_RETENTION_SECS", default_value_t = DEFAULT_RETENTION_SECS, value_parser = clap::value_parser!(u64).range(1..=10 * 366 * 86_400))]
    pub retention_secs: u64,
    /// How long a write keeps being retried while Redis is away, in seconds.
    #[arg(long, env = "CRYPTOPULSE_REDIS_RETRY_SECS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(0..=7 * 86_400))]
    pub redis_retry_secs: u64,
}

impl RedisArgs {
    pub fn retention_ms(&self) -> i64 {
        i64::try_from(self.retention_secs.saturating_mul(1000)).unwrap_or(i64::MAX)
    }

    pub fn retry_for(&self) -> Duration {
        Duration::from_secs(self.redis_retry_secs)
    }
}

/// The bars of a batch in one call, symbol after symbol. Each symbol's keys
/// are checked first (SPEC §6, loss is noticed per symbol); then, per
/// symbol, the latest hash is replaced only by a newer bar, each bar past
/// the stream's last entry becomes the stream entry `E-0` and one
/// sorted-set member per metric (one `ZADD` per sorted set for all of
/// them), a bar not past it (written before, by a crashed run or a second
/// consumer) replaces any members at its score instead, and a bar older
/// than the retention is left out.
///
/// Retention is kept to whole granules: the cutoff is `newest - retention`
/// rounded down to a multiple of `granule`, and the stream and sorted sets
/// are trimmed only in the call that moves it to a later granule. After
/// every call a symbol's series hold exactly its bars from the cutoff of its
/// newest bar on, whichever calls wrote them: the end state is that of
/// writing the bars one by one and trimming after each, in a fraction of the
/// Redis commands.
///
/// The check: the hash's `window_end` is at least `previous` (the end of
/// the symbol's bar before these, which Redis acknowledged), the stream's
/// last entry is `window_end`, every sorted set of a field each bar has
/// holds one member per stream entry, and the others at most that and at
/// least one when the newest bar has the field; without the hash, no other
/// key of the symbol exists. A symbol that fails it lost data (an evicted
/// key, a flush, a failover, a hand edit): its keys are deleted, and its
/// bars are written on the empty keys if they start its history
/// (`previous` = -1), else left out and the symbol returned, for the
/// consumer to read its history again. Called with no bars, only the check.
///
/// KEYS: per symbol its latest hash, stream and one sorted set per metric.
/// ARGV: retention_ms, granule_ms, n, n field names, s, per sorted set the
/// 1-based index of its field and 1 if every bar has the field (else 0),
/// then per symbol: the symbol, previous, m, and m bars in ascending
/// window_end, each window_end and n values ('' = absent). Returns the
/// number of bars written and the symbols that lost data.
const WRITE_BARS: &str = r#"
local retention = tonumber(ARGV[1])
local granule = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local sets = tonumber(ARGV[4 + n])
local stride = n + 1
local names, set_field, set_required = {}, {}, {}
for i = 1, n do names[i] = ARGV[3 + i] end
for k = 1, sets do
  set_field[k] = tonumber(ARGV[3 + n + 2 * k])
  set_required[k] = ARGV[4 + n + 2 * k] == '1'
end
-- unpack() takes at most a few thousand values: long lists go in chunks.
-- The first `count` values of `list`.
local CHUNK = 2000
local function call_chunked(command, key, list, count)
  for from = 1, count, CHUNK do
    redis.call(command, key, unpack(list, from, math.min(count, from + CHUNK - 1)))
  end
end
local function cutoff_of(newest)
  local c = newest - retention
  return c - (c % granule)
end
-- Whether the keys from KEYS[key] on hold what the writes leave (see the
-- doc comment); `old` is the hash's window_end as Redis gave it, or false.
local function intact(key, old)
  if not old then
    return redis.call('EXISTS', unpack(KEYS, key + 1, key + 1 + sets)) == 0
  end
  local top = redis.call('XREVRANGE', KEYS[key + 1], '+', '-', 'COUNT', 1)
  if #top == 0 or top[1][1] ~= old .. '-0' then return false end
  local len = redis.call('XLEN', KEYS[key + 1])
  for k = 1, sets do
    local card = redis.call('ZCARD', KEYS[key + 1 + k])
    if card > len or (set_required[k] and card < len) then return false end
    if card == 0 and redis.call('HEXISTS', KEYS[key], names[set_field[k]]) == 1 then return false end
  end
  return true
end
-- The field-value pairs of the bar at `at` into `kv`; returns their count.
-- `kv_of` is the bar `kv` holds: the newest bar's pairs serve the hash and
-- the stream without being gathered twice.
local kv, kv_of, kv_count = {}, nil, 0
local function fields(at)
  if kv_of == at then return kv_count end
  local count = 0
  for i = 1, n do
    local value = ARGV[at + i]
    if value ~= '' then
      kv[count + 1] = names[i]
      kv[count + 2] = value
      count = count + 2
    end
  end
  kv_of, kv_count = at, count
  return count
end
local written, lost = 0, {}
-- Per sorted set, its new members (score, member pairs) for this symbol:
-- the tables are reused from symbol to symbol, `counts` says how much of
-- each is this symbol's.
local members, counts = {}, {}
for k = 1, sets do members[k] = {} end
local at, key = 5 + n + 2 * sets, 1
while at <= #ARGV do
  local previous, m = tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2])
  local latest, stream = KEYS[key], KEYS[key + 1]
  local first = at + 3
  local last = first + (m - 1) * stride
  local old_text = redis.call('HGET', latest, 'window_end')
  local old = tonumber(old_text or '-1')
  local whole = old >= previous and intact(key, old_text)
  if not whole then
    redis.call('DEL', unpack(KEYS, key, key + 1 + sets))
    old = -1
    if previous >= 0 then lost[#lost + 1] = ARGV[at] end
  end
  if m > 0 and (whole or previous < 0) then
    local newest = math.max(old, tonumber(ARGV[last]))
    local cutoff = cutoff_of(newest)
    if newest > old then
      local count = fields(last)
      if old >= 0 and count < 2 * n then
        redis.call('DEL', latest)
      end
      redis.call('HSET', latest, 'window_end', ARGV[last], unpack(kv, 1, count))
    end
    for k = 1, sets do counts[k] = 0 end
    for bar = first, last, stride do
      local e = tonumber(ARGV[bar])
      if e >= cutoff then
        if e > old then
          redis.call('XADD', stream, ARGV[bar] .. '-0', unpack(kv, 1, fields(bar)))
        end
        for k = 1, sets do
          local value = ARGV[bar + set_field[k]]
          if e <= old then
            redis.call('ZREMRANGEBYSCORE', KEYS[key + 1 + k], ARGV[bar], ARGV[bar])
            if value ~= '' then
              redis.call('ZADD', KEYS[key + 1 + k], ARGV[bar], ARGV[bar] .. ':' .. value)
            end
          elseif value ~= '' then
            -- The score as its string: a Lua number would be printed again.
            local list, c = members[k], counts[k]
            list[c + 1] = ARGV[bar]
            list[c + 2] = ARGV[bar] .. ':' .. value
            counts[k] = c + 2
          end
        end
        written = written + 1
      end
    end
    for k = 1, sets do
      call_chunked('ZADD', KEYS[key + 1 + k], members[k], counts[k])
    end
    if old >= 0 and cutoff > 0 and cutoff > cutoff_of(old) then
      local text = string.format('%d', cutoff)
      redis.call('XTRIM', stream, 'MINID', text)
      for k = 1, sets do
        redis.call('ZREMRANGEBYSCORE', KEYS[key + 1 + k], '-inf', '(' .. text)
      end
    end
  end
  at, key = first + m * stride, key + 2 + sets
end
return {written, lost}
"#;

/// Fields of a bar that also have a sorted set (0-based, in [`fields_of`]
/// order): close, volume, vwap_1s, vwap_5s, rsi_14; and whether every bar
/// has the field (RSI comes only once its period is seeded).
const SERIES: [(usize, bool); 5] = [(3, true), (4, true), (8, true), (9, true), (10, false)];

/// Fields of a bar in the latest hash and the stream.
const FIELDS: usize = 11;

/// The Redis side of the consumer.
pub struct RedisSink {
    conn: RedisConn,
    /// Time of each pipelined write that Redis answered.
    write_seconds: metrics::Histogram,
    retries: metrics::Counter,
    errors: metrics::Counter,
    script: Script,
    keys: Keys,
    names: MetricNames,
    retention_ms: i64,
    retry_for: Duration,
}

/// Key names under a prefix (SPEC §6). A symbol's keys carry it in braces,
/// a Redis Cluster hash tag: all of them live in one slot.
#[derive(Debug, Clone)]
pub struct Keys {
    pub prefix: String,
}

impl Keys {
    pub fn symbols(&self) -> String {
        format!("{}:symbols", self.prefix)
    }
    pub fn latest(&self, symbol: &str) -> String {
        self.key(&["latest", symbol])
    }
    pub fn series(&self, symbol: &str, metric: &str) -> String {
        self.key(&["ts", symbol, metric])
    }
    pub fn bars(&self, symbol: &str) -> String {
        self.key(&["bars", symbol])
    }
    /// [`Keys::latest`] into `out`, replacing what it held.
    pub fn write_latest(&self, out: &mut String, symbol: &str) {
        self.write(out, &["latest", symbol]);
    }
    /// [`Keys::series`] into `out`, replacing what it held.
    pub fn write_series(&self, out: &mut String, symbol: &str, metric: &str) {
        self.write(out, &["ts", symbol, metric]);
    }
    /// [`Keys::bars`] into `out`, replacing what it held.
    pub fn write_bars(&self, out: &mut String, symbol: &str) {
        self.write(out, &["bars", symbol]);
    }
    fn key(&self, parts: &[&str]) -> String {
        let mut key = String::new();
        self.write(&mut key, parts);
        key
    }
    /// `prefix:kind:{symbol}` and any more parts after it.
    fn write(&self, out: &mut String, parts: &[&str]) {
        out.clear();
        out.push_str(&self.prefix);
        for (i, part) in parts.iter().enumerate() {
            out.push(':');
            if i == 1 {
                out.push('{');
                out.push_str(part);
                out.push('}');
            } else {
                out.push_str(part);
            }
        }
    }
    /// Names the layout the keys under the prefix follow ([`LAYOUT`]).
    pub fn layout(&self) -> String {
        format!("{}:layout", self.prefix)
    }
    /// The key by which builds before the hash-tagged layout marked their data.
    pub fn earlier_marker(&self) -> String {
        format!("{}:marker", self.prefix)
    }
}

/// The layout of the keys this build writes: hash-tagged symbol keys with
/// open, high and low (SPEC §6). The earlier layout was `cryptopulse-v1`.
pub const LAYOUT: &str = "cryptopulse-v2";

/// A client for `url`, with the password from CRYPTOPULSE_REDIS_PASSWORD
/// (or its `_FILE`) when the URL carries none. `rediss://` is TLS: the
/// server's certificate is checked against the system's roots, or the CA
/// in CRYPTOPULSE_REDIS_CA_FILE; CRYPTOPULSE_REDIS_CERT_FILE and
/// CRYPTOPULSE_REDIS_KEY_FILE give a client certificate.
pub fn client(url: &str) -> Result<redis::Client> {
    if url.starts_with(CLUSTER_SCHEME) {
        return Err(Error::Config(format!(
            "{} is a Redis Cluster's URL; this talks to one Redis: give it redis://HOST:PORT of a node",
            secret::redact_url(url)
        )));
    }
    let mut info: redis::ConnectionInfo = url.parse().map_err(|e| Error::redis(format!("parse url {}", secret::redact_url(url)), e))?;
    if info.redis.password.is_none() {
        info.redis.password = secret::from_env(secret::REDIS_PASSWORD_ENV)?;
    }
    let tls = matches!(info.addr, redis::ConnectionAddr::TcpTls { .. });
    let read = |var: &str| -> Result<Option<Vec<u8>>> {
        let Some(path) = std::env::var_os(var) else { return Ok(None) };
        std::fs::read(&path)
            .map(Some)
            .map_err(|e| Error::Config(format!("{var}: cannot read {}: {e}", std::path::Path::new(&path).display())))
    };
    let (ca, cert, key) = (read(secret::REDIS_CA_FILE_ENV)?, read(secret::REDIS_CERT_FILE_ENV)?, read(secret::REDIS_KEY_FILE_ENV)?);
    if !tls {
        return redis::Client::open(info).map_err(|e| Error::redis("open client", e));
    }
    // rustls needs one crypto provider per process; a second install is a no-op.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client_tls = match (cert, key) {
        (Some(client_cert), Some(client_key)) => Some(redis::ClientTlsConfig { client_cert, client_key }),
        (None, None) => None,
        _ => {
            return Err(Error::Config(format!(
                "a client certificate needs both {} and {}",
                secret::REDIS_CERT_FILE_ENV,
                secret::REDIS_KEY_FILE_ENV
            )))
        }
    };
    redis::Client::build_with_tls(info, redis::TlsCertificates { client_tls, root_cert: ca })
        .map_err(|e| Error::Config(format!("redis TLS settings ({}, {}): {e}", secret::REDIS_CA_FILE_ENV, secret::REDIS_CERT_FILE_ENV)))
}

/// One plain connection and a PING first: credentials Redis refuses (a
/// wrong password, none given, an unknown user) are said at once, naming
/// where the password comes from, instead of being retried for minutes.
/// Any other failure is left to the connection manager's retries.
async fn refused_credentials(client: &redis::Client, url: &str) -> Result<()> {
    let config =
        redis::AsyncConnectionConfig::new().set_connection_timeout(Duration::from_secs(5)).set_response_timeout(Duration::from_secs(10));
    let answer = match client.get_multiplexed_async_connection_with_config(&config).await {
        Ok(mut conn) => redis::cmd("PING").query_async::<()>(&mut conn).await,
        Err(e) => Err(e),
    };
    let shown = secret::redact_url(url);
    match answer {
        Err(e) if e.kind() == redis::ErrorKind::AuthenticationFailed || matches!(e.code(), Some("NOAUTH" | "WRONGPASS")) => {
            Err(Error::Config(format!(
                "redis at {shown} refused the credentials ({e}); the password comes from the URL, {} or the file named by {}_FILE",
                secret::REDIS_PASSWORD_ENV,
                secret::REDIS_PASSWORD_ENV
            )))
        }
        Err(e) if is_tls_failure(&e) => Err(Error::Config(format!(
            "redis at {shown}: TLS failed ({e}); the server's certificate must be signed by the CA in {} (or the system's), \
             and its name must match the URL's host",
            secret::REDIS_CA_FILE_ENV
        ))),
        // Connected, then dropped: not a Redis speaking the same protocol
        // (plain text to a TLS port, or the reverse).
        Err(e) if e.is_io_error() && !e.is_connection_refusal() && !e.is_timeout() => Err(Error::Config(format!(
            "redis at {shown} took the connection and closed it ({e}); a TLS port needs rediss://, a plain one redis://"
        ))),
        _ => Ok(()),
    }
}

/// Whether `error` is a TLS handshake refused: an unknown or invalid
/// certificate, or a name that does not match.
fn is_tls_failure(error: &redis::RedisError) -> bool {
    let text = error.to_string().to_ascii_lowercase();
    ["certificate", "tls", "handshake", "unknownissuer", "notvalidforname"].iter().any(|word| text.contains(word))
}

/// The scheme suffix that makes a URL a Redis Cluster's:
/// `redis+cluster://host:port[,host:port...]`, any node of it a seed.
pub const CLUSTER_SCHEME: &str = "redis+cluster://";

/// A connection to one Redis, or to a Redis Cluster (SPEC §6: a symbol's
/// keys share its hash tag, so each symbol lives in one slot).
#[derive(Clone)]
pub enum RedisConn {
    Single(ConnectionManager),
    Cluster { conn: redis::cluster_async::ClusterConnection, credentials: Credentials },
}

/// What a connection to one node of a cluster needs besides its address.
#[derive(Clone, Default)]
pub struct Credentials {
    username: Option<String>,
    password: Option<String>,
}

impl redis::aio::ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            RedisConn::Single(conn) => conn.req_packed_command(cmd),
            RedisConn::Cluster { conn, .. } => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            RedisConn::Single(conn) => conn.req_packed_commands(cmd, offset, count),
            RedisConn::Cluster { conn, .. } => conn.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(conn) => conn.get_db(),
            RedisConn::Cluster { conn, .. } => conn.get_db(),
        }
    }
}

impl RedisConn {
    /// Every key matching `pattern`: SCAN on the one Redis, or on each
    /// primary of the cluster (a cluster's SCAN sees one node).
    pub async fn keys_matching(&mut self, pattern: &str) -> Result<Vec<String>> {
        match self {
            RedisConn::Single(conn) => scan(conn, pattern).await,
            RedisConn::Cluster { conn, credentials } => {
                let mut keys = Vec::new();
                for (host, port) in primaries(conn).await? {
                    let info = redis::ConnectionInfo {
                        addr: redis::ConnectionAddr::Tcp(host, port),
                        redis: redis::RedisConnectionInfo {
                            username: credentials.username.clone(),
                            password: credentials.password.clone(),
                            ..Default::default()
                        },
                    };
                    let client = redis::Client::open(info).map_err(|e| Error::redis("open a cluster node", e))?;
                    let mut node =
                        client.get_multiplexed_async_connection().await.map_err(|e| Error::redis("connect to a cluster node", e))?;
                    keys.extend(scan(&mut node, pattern).await?);
                }
                Ok(keys)
            }
        }
    }
}

async fn scan<C: redis::aio::ConnectionLike + Send + Sync>(conn: &mut C, pattern: &str) -> Result<Vec<String>> {
    use redis::AsyncCommands;
    let mut iter = conn.scan_match::<_, String>(pattern).await.map_err(|e| Error::redis("scan", e))?;
    let mut keys = Vec::new();
    while let Some(key) = futures::StreamExt::next(&mut iter).await {
        keys.push(key);
    }
    Ok(keys)
}

/// The primaries of a cluster, from CLUSTER SLOTS.
async fn primaries(conn: &mut redis::cluster_async::ClusterConnection) -> Result<Vec<(String, u16)>> {
    let slots: Vec<redis::Value> =
        redis::cmd("CLUSTER").arg("SLOTS").query_async(conn).await.map_err(|e| Error::redis("cluster slots", e))?;
    let mut out = Vec::new();
    for range in slots {
        let redis::Value::Array(range) = range else { continue };
        let Some(redis::Value::Array(node)) = range.get(2) else { continue };
        let host = match node.first() {
            Some(redis::Value::BulkString(host)) => String::from_utf8_lossy(host).into_owned(),
            Some(redis::Value::SimpleString(host)) => host.clone(),
            _ => continue,
        };
        let Some(redis::Value::Int(port)) = node.get(1) else { continue };
        if !out.contains(&(host.clone(), *port as u16)) {
            out.push((host, *port as u16));
        }
    }
    Ok(out)
}

/// The Redis Cluster slot of `key`: CRC16 (XMODEM) of its hash tag (the
/// part between the first `{` and the next `}`, when not empty) or of the
/// whole key, modulo 16384.
pub fn slot_of(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let close = key[open + 1..].iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &key[open + 1..open + 1 + close])
    });
    let mut crc: u16 = 0;
    for &byte in tagged.unwrap_or(key) {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc % 16384
}

/// Connects to the Redis or the Redis Cluster of `url` (see [`CLUSTER_SCHEME`]).
pub async fn connect_any(url: &str) -> Result<RedisConn> {
    if url.starts_with("rediss+cluster://") {
        return Err(Error::Config(format!(
            "{}: TLS to a Redis Cluster is not supported yet; use redis+cluster:// on a trusted network, or one Redis over rediss://",
            secret::redact_url(url)
        )));
    }
    let Some(nodes) = url.strip_prefix(CLUSTER_SCHEME) else { return Ok(RedisConn::Single(connect(url).await?)) };
    let (userinfo, nodes) = nodes.rsplit_once('@').map_or((None, nodes), |(user, nodes)| (Some(user), nodes));
    let (username, url_password) = match userinfo.map(|u| u.split_once(':').unwrap_or((u, ""))) {
        Some((user, password)) => ((!user.is_empty()).then(|| user.to_owned()), (!password.is_empty()).then(|| password.to_owned())),
        None => (None, None),
    };
    let password = match url_password {
        Some(password) => Some(password),
        None => secret::from_env(secret::REDIS_PASSWORD_ENV)?,
    };
    let seeds: Vec<String> = nodes.trim_end_matches('/').split(',').map(|node| format!("redis://{node}")).collect();
    let mut builder =
        redis::cluster::ClusterClient::builder(seeds).connection_timeout(Duration::from_secs(5)).response_timeout(Duration::from_secs(10));
    if let Some(username) = &username {
        builder = builder.username(username.clone());
    }
    if let Some(password) = &password {
        builder = builder.password(password.clone());
    }
    let shown = secret::redact_url(url);
    let client = builder.build().map_err(|e| Error::Config(format!("redis cluster {shown}: {e}")))?;
    let conn = client.get_async_connection().await.map_err(|e| Error::redis(format!("connect to the cluster {shown}"), e))?;
    Ok(RedisConn::Cluster { conn, credentials: Credentials { username, password } })
}

/// Opens a connection manager that reconnects by itself and gives up on a
/// single request after a while, so a paused Redis surfaces as an error.
pub async fn connect(url: &str) -> Result<ConnectionManager> {
    let client = client(url)?;
    refused_credentials(&client, url).await?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Duration::from_secs(5))
        .set_response_timeout(Duration::from_secs(10))
        .set_number_of_retries(2);
    ConnectionManager::new_with_config(client, config).await.map_err(|e| Error::redis("connect", e))
}

impl RedisSink {
    pub async fn connect(url: &str, prefix: &str, names: MetricNames, retention_ms: i64, retry_for: Duration) -> Result<Self> {
        let conn = connect_any(url).await?;
        let write_seconds = metrics::histogram!(crate::telemetry::REDIS_WRITE_SECONDS);
        let (retries, errors) =
            (metrics::counter!(crate::telemetry::REDIS_WRITE_RETRIES), metrics::counter!(crate::telemetry::REDIS_WRITE_ERRORS));
        // At zero from the start: a rate needs the series before the first increment.
        retries.increment(0);
        errors.increment(0);
        Ok(RedisSink {
            conn,
            write_seconds,
            retries,
            errors,
            script: write_script(),
            keys: Keys { prefix: prefix.to_owned() },
            names,
            retention_ms,
            retry_for,
        })
    }

    /// Names the layout of the keys under the prefix.
    pub async fn set_layout(&mut self) -> Result<()> {
        redis::cmd("SET")
            .arg(self.keys.layout())
            .arg(LAYOUT)
            .query_async::<()>(&mut self.conn)
            .await
            .map_err(|e| Error::redis("set layout", e))
    }

    /// Checks that Redis still holds every symbol's bars up to `written`
    /// (symbol, end of its newest bar written before), as each write does
    /// for its symbols: a symbol that went quiet is otherwise checked only
    /// when it trades again.
    pub async fn check(&mut self, written: &[(&str, i64)]) -> Result<()> {
        let lost = self.lost_of(written).await?;
        self.lost(lost)
    }

    /// The symbols of `written` whose bars Redis lost (see [`check`](Self::check));
    /// their keys are deleted.
    pub async fn lost_of(&mut self, written: &[(&str, i64)]) -> Result<Vec<String>> {
        let groups: Vec<Group<'_>> = written.iter().map(|&(symbol, previous)| Group { symbol, previous, bars: Vec::new() }).collect();
        let mut lost = Vec::new();
        for slot in self.by_slot(groups) {
            for chunk in slot.chunks(CHECKS_PER_CALL) {
                let pipe = calls(&self.script, &self.keys, &field_names(&self.names), self.retention_ms, chunk);
                lost.extend(self.run(&pipe).await?);
            }
        }
        Ok(lost)
    }

    /// Writes bars, retrying with backoff while Redis is unreachable, up to
    /// the configured time; only then is the error returned.
    pub async fn write(&mut self, bars: &[FinalBar]) -> Result<()> {
        if bars.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let mut backoff = Duration::from_millis(100);
        loop {
            let attempt = Instant::now();
            match self.write_once(bars).await {
                Ok(()) => {
                    self.write_seconds.record(attempt.elapsed().as_secs_f64());
                    return Ok(());
                }
                Err(e) if e.is_retryable() && started.elapsed() < self.retry_for => {
                    self.retries.increment(1);
                    warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "redis write failed, retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                // Lost data is no failure of the write: the consumer repairs it.
                Err(e @ Error::RedisDataLost { .. }) => return Err(e),
                Err(e) => {
                    self.errors.increment(1);
                    return Err(e);
                }
            }
        }
    }

    /// One pipeline of script calls, each symbol's bars in order; on a
    /// cluster one per slot (a pipeline goes to one node), then the
    /// symbols set.
    async fn write_once(&mut self, bars: &[FinalBar]) -> Result<()> {
        if matches!(self.conn, RedisConn::Single(_)) {
            let pipe = bars_pipeline(&self.script, &self.keys, &self.names, self.retention_ms, bars);
            let lost = self.run(&pipe).await?;
            return self.lost(lost);
        }
        let groups = by_symbol(bars);
        let symbols: Vec<&str> = groups.iter().map(|g| g.symbol).collect();
        let names = field_names(&self.names);
        let pipes: Vec<redis::Pipeline> =
            self.by_slot(groups).iter().map(|slot| calls(&self.script, &self.keys, &names, self.retention_ms, slot)).collect();
        let mut lost = Vec::new();
        for pipe in &pipes {
            lost.extend(self.run(pipe).await?);
        }
        for chunk in symbols.chunks(BARS_PER_CALL) {
            redis::cmd("SADD")
                .arg(self.keys.symbols())
                .arg(chunk)
                .query_async::<()>(&mut self.conn)
                .await
                .map_err(|e| Error::redis("add symbols", e))?;
        }
        self.lost(lost)
    }

    /// `groups` as one run (one Redis), or split by their symbols' slots
    /// (a cluster), each in its first order.
    fn by_slot<'a>(&self, groups: Vec<Group<'a>>) -> Vec<Vec<Group<'a>>> {
        if matches!(self.conn, RedisConn::Single(_)) {
            return vec![groups];
        }
        let mut slots: Vec<(u16, Vec<Group<'a>>)> = Vec::new();
        for group in groups {
            let slot = slot_of(self.keys.latest(group.symbol).as_bytes());
            match slots.iter_mut().find(|(s, _)| *s == slot) {
                Some((_, groups)) => groups.push(group),
                None => slots.push((slot, vec![group])),
            }
        }
        slots.into_iter().map(|(_, groups)| groups).collect()
    }

    /// Sends a pipeline of script calls; the symbols that lost data.
    async fn run(&mut self, pipe: &redis::Pipeline) -> Result<Vec<String>> {
        let replies: Vec<(u64, Vec<String>)> = match pipe.query_async(&mut self.conn).await {
            Err(e) if e.kind() == redis::ErrorKind::NoScriptError => {
                // Redis restarted or flushed its scripts: load and go again.
                self.script.prepare_invoke().load_async(&mut self.conn).await.map_err(|e| Error::redis("load script", e))?;
                pipe.query_async(&mut self.conn).await.map_err(|e| Error::redis("write bars", e))?
            }
            other => other.map_err(|e| Error::redis("write bars", e))?,
        };
        Ok(replies.into_iter().flat_map(|(_, lost)| lost).collect())
    }

    fn lost(&self, symbols: Vec<String>) -> Result<()> {
        if symbols.is_empty() {
            return Ok(());
        }
        Err(Error::RedisDataLost { prefix: self.keys.prefix.clone(), symbols })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }
}

/// The script that writes bars (what [`RedisSink`] invokes).
pub fn write_script() -> Script {
    Script::new(WRITE_BARS)
}

/// Bars per script call, at most (a symbol's bars are never split): Redis
/// runs a script without serving anyone else, so a call stays a few
/// milliseconds long.
const BARS_PER_CALL: usize = 4096;

/// How finely the retention cutoff moves (see [`WRITE_BARS`]): a hundredth
/// of the retention, at most a minute, at least a millisecond.
pub fn granule_ms(retention_ms: i64) -> i64 {
    (retention_ms / 100).clamp(1, 60_000)
}

/// Symbols checked per script call when no bars come with them.
const CHECKS_PER_CALL: usize = 1024;

/// The pipeline that writes `bars`: calls of `script` with whole symbols'
/// bars, the symbols in the order they first appear, each symbol's bars in
/// window order; then the symbols set.
pub fn bars_pipeline(script: &Script, keys: &Keys, names: &MetricNames, retention_ms: i64, bars: &[FinalBar]) -> redis::Pipeline {
    let groups = by_symbol(bars);
    let mut pipe = calls(script, keys, &field_names(names), retention_ms, &groups);
    let symbols: Vec<&str> = groups.iter().map(|g| g.symbol).collect();
    for chunk in symbols.chunks(BARS_PER_CALL) {
        pipe.cmd("SADD").arg(keys.symbols()).arg(chunk).ignore();
    }
    pipe
}

/// Script calls for `groups`, as many whole groups in each as fit.
fn calls(script: &Script, keys: &Keys, field_names: &[String; FIELDS], retention_ms: i64, groups: &[Group<'_>]) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    let mut rest = groups;
    while !rest.is_empty() {
        let mut take = 1;
        let mut in_call = rest[0].bars.len();
        while take < rest.len() && in_call + rest[take].bars.len() <= BARS_PER_CALL && take < CHECKS_PER_CALL {
            in_call += rest[take].bars.len();
            take += 1;
        }
        let (call, later) = rest.split_at(take);
        pipe.add_command(script_call(script, keys, field_names, retention_ms, call));
        rest = later;
    }
    pipe
}

/// A symbol, the end of its bar written before these (-1 if none), and its
/// bars, in window order.
struct Group<'a> {
    symbol: &'a str,
    previous: i64,
    bars: Vec<&'a FinalBar>,
}

fn by_symbol(bars: &[FinalBar]) -> Vec<Group<'_>> {
    let mut groups: Vec<Group<'_>> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    for bar in bars {
        let at = *index.entry(bar.symbol.as_str()).or_insert_with(|| {
            groups.push(Group { symbol: bar.symbol.as_str(), previous: -1, bars: Vec::new() });
            groups.len() - 1
        });
        groups[at].bars.push(bar);
    }
    for group in &mut groups {
        group.bars.sort_by_key(|bar| bar.end);
        group.previous = group.bars[0].previous.unwrap_or(-1);
    }
    groups
}

/// One `EVALSHA` of [`WRITE_BARS`] for `groups`, built as a plain command:
/// a script invocation keeps every key and argument in a vector of its own,
/// and with thousands of symbols a batch has two dozen of them per bar.
/// Keys and values are formatted into one reused buffer.
fn script_call(script: &Script, keys: &Keys, field_names: &[String; FIELDS], retention_ms: i64, groups: &[Group<'_>]) -> redis::Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash()).arg(groups.len() * (2 + SERIES.len()));
    let mut buf = String::with_capacity(64);
    for group in groups {
        keys.write_latest(&mut buf, group.symbol);
        cmd.arg(buf.as_str());
        keys.write_bars(&mut buf, group.symbol);
        cmd.arg(buf.as_str());
        for &(i, _) in &SERIES {
            keys.write_series(&mut buf, group.symbol, &field_names[i]);
            cmd.arg(buf.as_str());
        }
    }
    cmd.arg(retention_ms).arg(granule_ms(retention_ms)).arg(field_names.len());
    for name in field_names {
        cmd.arg(name.as_str());
    }
    cmd.arg(SERIES.len());
    for &(i, every_bar) in &SERIES {
        cmd.arg(i + 1).arg(u8::from(every_bar));
    }
    for group in groups {
        cmd.arg(group.symbol).arg(group.previous).arg(group.bars.len());
        for bar in &group.bars {
            cmd.arg(bar.end);
            for field in 0..field_names.len() {
                buf.clear();
                write_field(bar, field, &mut buf);
                cmd.arg(buf.as_str());
            }
        }
    }
    cmd
}

/// The fields of a bar in the latest hash and the stream, in a fixed order:
/// open, high, low, close, volume, trades, buy_volume, sell_volume,
/// vwap_1s, vwap_5s, rsi_14.
/// Decimal values keep all eight places; floats are printed in their
/// shortest exact form, so the same bar always gives the same bytes.
pub fn fields_of(bar: &FinalBar, names: &MetricNames) -> Vec<(String, Option<String>)> {
    field_names(names).into_iter().zip(field_values(bar)).collect()
}

/// The names of [`fields_of`].
pub fn field_names(names: &MetricNames) -> [String; FIELDS] {
    [
        "open".into(),
        "high".into(),
        "low".into(),
        "close".into(),
        "volume".into(),
        "trades".into(),
        "buy_volume".into(),
        "sell_volume".into(),
        names.vwap_bar.clone(),
        names.vwap_long.clone(),
        names.rsi.clone(),
    ]
}

/// The values of [`fields_of`], `None` where a value is absent.
pub fn field_values(bar: &FinalBar) -> [Option<String>; FIELDS] {
    std::array::from_fn(|field| {
        let mut value = String::new();
        write_field(bar, field, &mut value).then_some(value)
    })
}

/// Appends field `field` (in [`fields_of`] order) of `bar` to `out`; false,
/// and nothing appended, when the value is absent.
fn write_field(bar: &FinalBar, field: usize, out: &mut String) -> bool {
    use std::fmt::Write;
    let fixed = |out: &mut String, units: i128| decimal::write(out, units, decimal::SCALE as u32);
    let _ = match field {
        0 => fixed(out, bar.bar.open),
        1 => fixed(out, bar.bar.high),
        2 => fixed(out, bar.bar.low),
        3 => fixed(out, bar.bar.close),
        4 => fixed(out, bar.bar.volume),
        5 => write!(out, "{}", bar.bar.trades),
        6 => fixed(out, bar.bar.buy_volume),
        7 => fixed(out, bar.bar.sell_volume()),
        8 => write!(out, "{}", bar.vwap_bar),
        9 => write!(out, "{}", bar.vwap_long),
        _ => match bar.rsi {
            Some(rsi) => write!(out, "{rsi}"),
            None => return false,
        },
    };
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_those_redis_cluster_gives() {
        // What CLUSTER KEYSLOT answers on redis-server 7.0.15.
        for (key, slot) in [("foo", 12182), ("123456789", 12739), ("cryptopulse:latest:{BTCUSDT}", 8473), ("a{}b{c}", 7353)] {
            assert_eq!(slot_of(key.as_bytes()), slot, "{key}");
        }
        // A hash tag decides, so a symbol's keys share a slot; an empty one does not.
        assert_eq!(slot_of(b"x:bars:{BTCUSDT}"), slot_of(b"cryptopulse:ts:{BTCUSDT}:close"));
        assert_eq!(slot_of(b"BTCUSDT"), 8473);
        assert_ne!(slot_of(b"a{}b{c}"), slot_of(b"c"));
    }
}
