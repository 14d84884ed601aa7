//! Writes final bars to Redis (SPEC §6): one Lua script call for the bars
//! of a batch (a few for a large one), in one pipeline. The script makes every write idempotent,
//! so a bar written again after a crash leaves Redis as it was.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use clap::Args;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;
use tracing::warn;

use crate::decimal;
use crate::error::{Error, Result};
use crate::window::{FinalBar, MetricNames};

pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
pub const DEFAULT_REDIS_PREFIX: &str = "cryptopulse";
pub const DEFAULT_RETENTION_SECS: u64 = 24 * 60 * 60;

/// Where Redis is and the prefix of the keys: all the read-only tools need.
#[derive(Args, Debug, Clone)]
pub struct RedisTarget {
    /// Redis URL; put a password here only through the environment.
    #[arg(id = "redis_url", long = "redis-url", value_name = "URL", env = "CRYPTOPULSE_REDIS_URL", default_value = DEFAULT_REDIS_URL, hide_env_values = true)]
    pub url: String,
    /// Prefix of every key.
    #[arg(id = "redis_prefix", long = "redis-prefix", value_name = "PREFIX", env = "CRYPTOPULSE_REDIS_PREFIX", default_value = DEFAULT_REDIS_PREFIX)]
    pub prefix: String,
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

/// The bars of a batch in one call, symbol after symbol: the marker is
/// checked and the symbols set extended once; per symbol, the latest hash
/// is replaced only by a newer bar, each bar past the stream's last entry
/// becomes the stream entry `E-0` and one sorted-set member per metric (one
/// `ZADD` per sorted set for all of them), a bar not past it (written
/// before, by a crashed run or a second consumer) replaces any members at
/// its score instead, and a bar older than the retention is left out.
///
/// Retention is kept to whole granules: the cutoff is `newest - retention`
/// rounded down to a multiple of `granule`, and the stream and sorted sets
/// are trimmed only in the call that moves it to a later granule. After
/// every call a symbol's series hold exactly its bars from the cutoff of its
/// newest bar on, whichever calls wrote them: the end state is that of
/// writing the bars one by one and trimming after each, in a fraction of the
/// Redis commands.
///
/// The stream's last entry is the latest hash's `window_end`: both take the
/// newest bar in the same call, and trimming never reaches it.
///
/// Nothing is written, and -1 returned, when the marker is gone: Redis lost
/// the data, and writing newer bars into the gap would block the rebuild
/// (a stream only takes entries newer than its last).
///
/// KEYS: symbols, marker, then per symbol its latest hash, stream and one
/// sorted set per metric. ARGV: retention_ms, granule_ms, n, n field names,
/// s, per sorted set the 1-based index of its field, then per symbol: the
/// symbol, m, and m bars in ascending window_end, each window_end and n
/// values ('' = absent). Returns the number of bars.
const WRITE_BARS: &str = r#"
if redis.call('EXISTS', KEYS[2]) == 0 then
  return -1
end
local retention = tonumber(ARGV[1])
local granule = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local sets = tonumber(ARGV[4 + n])
local stride = n + 1
local names, set_field = {}, {}
for i = 1, n do names[i] = ARGV[3 + i] end
for k = 1, sets do set_field[k] = tonumber(ARGV[4 + n + k]) end
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
local symbols, written = {}, 0
-- Per sorted set, its new members (score, member pairs) for this symbol:
-- the tables are reused from symbol to symbol, `counts` says how much of
-- each is this symbol's.
local members, counts = {}, {}
for k = 1, sets do members[k] = {} end
local at, key = 5 + n + sets, 3
while at <= #ARGV do
  local m = tonumber(ARGV[at + 1])
  symbols[#symbols + 1] = ARGV[at]
  local latest, stream = KEYS[key], KEYS[key + 1]
  local first, last = at + 2, at + 2 + (m - 1) * stride
  local old = tonumber(redis.call('HGET', latest, 'window_end') or '-1')
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
  at, key = last + stride, key + 2 + sets
end
call_chunked('SADD', KEYS[1], symbols, #symbols)
return written
"#;

/// Fields of a bar that also have a sorted set (0-based, in [`fields_of`]
/// order): close, volume, vwap_1s, vwap_5s, rsi_14.
const SERIES: [usize; 5] = [0, 1, 5, 6, 7];

/// The Redis side of the consumer.
pub struct RedisSink {
    conn: ConnectionManager,
    /// Time of each pipelined write that Redis answered.
    write_seconds: metrics::Histogram,
    script: Script,
    keys: Keys,
    names: MetricNames,
    retention_ms: i64,
    retry_for: Duration,
}

/// Key names under a prefix (SPEC §6).
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
    fn write(&self, out: &mut String, parts: &[&str]) {
        out.clear();
        out.push_str(&self.prefix);
        for part in parts {
            out.push(':');
            out.push_str(part);
        }
    }
    /// Kept next to the data: if it is gone, so is the data.
    pub fn marker(&self) -> String {
        format!("{}:marker", self.prefix)
    }
}

/// The marker's value: the version of the Redis layout.
pub const MARKER_VALUE: &str = "cryptopulse-v1";

/// Opens a connection manager that reconnects by itself and gives up on a
/// single request after a while, so a paused Redis surfaces as an error.
pub async fn connect(url: &str) -> Result<ConnectionManager> {
    let client = redis::Client::open(url).map_err(|e| Error::redis("parse url", e))?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Duration::from_secs(5))
        .set_response_timeout(Duration::from_secs(10))
        .set_number_of_retries(2);
    ConnectionManager::new_with_config(client, config).await.map_err(|e| Error::redis("connect", e))
}

impl RedisSink {
    pub async fn connect(url: &str, prefix: &str, names: MetricNames, retention_ms: i64, retry_for: Duration) -> Result<Self> {
        let conn = connect(url).await?;
        let write_seconds = metrics::histogram!(crate::telemetry::REDIS_WRITE_SECONDS);
        Ok(RedisSink {
            conn,
            write_seconds,
            script: write_script(),
            keys: Keys { prefix: prefix.to_owned() },
            names,
            retention_ms,
            retry_for,
        })
    }

    /// Checks that Redis still holds this consumer's data. `has_written`:
    /// the checkpoint says bars were written before. Sets the marker on a
    /// first start; without it after bars were written the data is lost.
    pub async fn check_marker(&mut self, has_written: bool) -> Result<()> {
        let marker = self.keys.marker();
        let present: bool =
            redis::cmd("EXISTS").arg(&marker).query_async(&mut self.conn).await.map_err(|e| Error::redis("check marker", e))?;
        match (present, has_written) {
            (true, _) => Ok(()),
            (false, true) => Err(Error::RedisDataLost { prefix: self.keys.prefix.clone() }),
            (false, false) => redis::cmd("SET")
                .arg(&marker)
                .arg(MARKER_VALUE)
                .query_async(&mut self.conn)
                .await
                .map_err(|e| Error::redis("set marker", e)),
        }
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
                    warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "redis write failed, retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One pipeline of script calls, each symbol's bars in order.
    async fn write_once(&mut self, bars: &[FinalBar]) -> Result<()> {
        let pipe = bars_pipeline(&self.script, &self.keys, &self.names, self.retention_ms, bars);
        let replies: Vec<i64> = match pipe.query_async(&mut self.conn).await {
            Err(e) if e.kind() == redis::ErrorKind::NoScriptError => {
                // Redis restarted or flushed its scripts: load and go again.
                self.script.prepare_invoke().load_async(&mut self.conn).await.map_err(|e| Error::redis("load script", e))?;
                pipe.query_async(&mut self.conn).await.map_err(|e| Error::redis("write bars", e))?
            }
            other => other.map_err(|e| Error::redis("write bars", e))?,
        };
        if replies.contains(&-1) {
            return Err(Error::RedisDataLost { prefix: self.keys.prefix.clone() });
        }
        Ok(())
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

/// The pipeline that writes `bars`: calls of `script` with whole symbols'
/// bars, the symbols in the order they first appear, each symbol's bars in
/// window order.
pub fn bars_pipeline(script: &Script, keys: &Keys, names: &MetricNames, retention_ms: i64, bars: &[FinalBar]) -> redis::Pipeline {
    let mut groups = by_symbol(bars);
    let field_names = field_names(names);
    let mut pipe = redis::pipe();
    let mut rest = groups.as_mut_slice();
    while !rest.is_empty() {
        let mut take = 1;
        let mut in_call = rest[0].1.len();
        while take < rest.len() && in_call + rest[take].1.len() <= BARS_PER_CALL {
            in_call += rest[take].1.len();
            take += 1;
        }
        let (call, later) = rest.split_at_mut(take);
        pipe.add_command(script_call(script, keys, &field_names, retention_ms, call));
        rest = later;
    }
    pipe
}

/// A symbol and its bars, in window order.
type SymbolBars<'a> = (&'a str, Vec<&'a FinalBar>);

fn by_symbol(bars: &[FinalBar]) -> Vec<SymbolBars<'_>> {
    let mut groups: Vec<SymbolBars<'_>> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    for bar in bars {
        let at = *index.entry(bar.symbol.as_str()).or_insert_with(|| {
            groups.push((bar.symbol.as_str(), Vec::new()));
            groups.len() - 1
        });
        groups[at].1.push(bar);
    }
    for (_, group) in &mut groups {
        group.sort_by_key(|bar| bar.end);
    }
    groups
}

/// One `EVALSHA` of [`WRITE_BARS`] for `groups`, built as a plain command:
/// a script invocation keeps every key and argument in a vector of its own,
/// and with thousands of symbols a batch has two dozen of them per bar.
/// Keys and values are formatted into one reused buffer.
fn script_call(script: &Script, keys: &Keys, field_names: &[String; 8], retention_ms: i64, groups: &[SymbolBars<'_>]) -> redis::Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash()).arg(2 + groups.len() * (2 + SERIES.len()));
    let mut buf = String::with_capacity(64);
    cmd.arg(keys.symbols()).arg(keys.marker());
    for (symbol, _) in groups {
        keys.write_latest(&mut buf, symbol);
        cmd.arg(buf.as_str());
        keys.write_bars(&mut buf, symbol);
        cmd.arg(buf.as_str());
        for &i in &SERIES {
            keys.write_series(&mut buf, symbol, &field_names[i]);
            cmd.arg(buf.as_str());
        }
    }
    cmd.arg(retention_ms).arg(granule_ms(retention_ms)).arg(field_names.len());
    for name in field_names {
        cmd.arg(name.as_str());
    }
    cmd.arg(SERIES.len());
    for &i in &SERIES {
        cmd.arg(i + 1);
    }
    for (symbol, group) in groups {
        cmd.arg(*symbol).arg(group.len());
        for bar in group {
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
/// close, volume, trades, buy_volume, sell_volume, vwap_1s, vwap_5s, rsi_14.
/// Decimal values keep all eight places; floats are printed in their
/// shortest exact form, so the same bar always gives the same bytes.
pub fn fields_of(bar: &FinalBar, names: &MetricNames) -> Vec<(String, Option<String>)> {
    field_names(names).into_iter().zip(field_values(bar)).collect()
}

/// The names of [`fields_of`].
pub fn field_names(names: &MetricNames) -> [String; 8] {
    [
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
pub fn field_values(bar: &FinalBar) -> [Option<String>; 8] {
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
        0 => fixed(out, bar.bar.close),
        1 => fixed(out, bar.bar.volume),
        2 => write!(out, "{}", bar.bar.trades),
        3 => fixed(out, bar.bar.buy_volume),
        4 => fixed(out, bar.bar.sell_volume()),
        5 => write!(out, "{}", bar.vwap_bar),
        6 => write!(out, "{}", bar.vwap_long),
        _ => match bar.rsi {
            Some(rsi) => write!(out, "{rsi}"),
            None => return false,
        },
    };
    true
}
