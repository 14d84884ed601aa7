//! Writes final bars to Redis (SPEC §6): one Lua script call per symbol
//! with its bars, all symbols of a batch in one pipeline. The script makes every write idempotent,
//! so a bar written again after a crash leaves Redis as it was.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;
use tracing::warn;

use crate::decimal;
use crate::error::{Error, Result};
use crate::window::{FinalBar, MetricNames};

/// The bars of one symbol in one call: the symbols set; the latest hash,
/// replaced only by a newer bar; per bar the stream entry `E-0` (only past
/// the stream's last entry) and one sorted-set member per metric (for a bar
/// not past it, replacing any member at the same score); then trimming by
/// event time relative to the newest bar of the symbol, once. The end state is that of writing the
/// bars one by one, in fewer Redis commands.
///
/// Nothing is written, and -1 returned, when the marker is gone: Redis lost
/// the data, and writing newer bars into the gap would block the rebuild
/// (a stream only takes entries newer than its last).
///
/// KEYS: symbols, latest, stream, marker, then one sorted set per metric.
/// ARGV: symbol, retention_ms, n, m, n field names, per sorted set the
/// 1-based index of its field, then m bars of window_end and n values ('' =
/// absent).
const WRITE_BARS: &str = r#"
if redis.call('EXISTS', KEYS[4]) == 0 then
  return -1
end
local n = tonumber(ARGV[3])
local m = tonumber(ARGV[4])
local sets = #KEYS - 4
local base = 4 + n + sets
local stride = n + 1
local function fields_of(at)
  local fields = {}
  for i = 1, n do
    local value = ARGV[at + i]
    if value ~= '' then
      table.insert(fields, ARGV[4 + i])
      table.insert(fields, value)
    end
  end
  return fields
end
redis.call('SADD', KEYS[1], ARGV[1])
local newest = tonumber(redis.call('HGET', KEYS[2], 'window_end') or '-1')
local latest = nil
for b = 0, m - 1 do
  local at = base + 1 + b * stride
  local e = tonumber(ARGV[at])
  if e > newest then
    newest = e
    latest = at
  end
end
if latest ~= nil then
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[2], 'window_end', ARGV[latest], unpack(fields_of(latest)))
end
local cutoff = newest - tonumber(ARGV[2])
local top = -1
local last = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)
if #last > 0 then
  top = tonumber(string.match(last[1][1], '^(%d+)'))
end
for b = 0, m - 1 do
  local at = base + 1 + b * stride
  local e = tonumber(ARGV[at])
  if e >= cutoff then
    -- Stream and sorted sets are written and trimmed together, so a bar
    -- past the stream's last entry is in none of them yet; only a bar
    -- written before may have members to replace.
    local rewrite = e <= top
    if not rewrite then
      redis.call('XADD', KEYS[3], ARGV[at] .. '-0', unpack(fields_of(at)))
      top = e
    end
    for k = 1, sets do
      local value = ARGV[at + tonumber(ARGV[4 + n + k])]
      if rewrite then
        redis.call('ZREMRANGEBYSCORE', KEYS[4 + k], e, e)
      end
      if value ~= '' then
        redis.call('ZADD', KEYS[4 + k], e, ARGV[at] .. ':' .. value)
      end
    end
  end
end
local cutoff_text = string.format('%d', cutoff)
redis.call('XTRIM', KEYS[3], 'MINID', cutoff_text)
for k = 1, sets do
  redis.call('ZREMRANGEBYSCORE', KEYS[4 + k], '-inf', '(' .. cutoff_text)
end
return m
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
        format!("{}:latest:{symbol}", self.prefix)
    }
    pub fn series(&self, symbol: &str, metric: &str) -> String {
        format!("{}:ts:{symbol}:{metric}", self.prefix)
    }
    pub fn bars(&self, symbol: &str) -> String {
        format!("{}:bars:{symbol}", self.prefix)
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
        let write_seconds = metrics::histogram!(crate::metrics::REDIS_WRITE_SECONDS);
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

    /// One pipeline of one script call per symbol, its bars in order.
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

/// The pipeline that writes `bars`: one call of `script` per symbol with
/// its bars in order, the symbols in the order they first appear.
pub fn bars_pipeline(script: &Script, keys: &Keys, names: &MetricNames, retention_ms: i64, bars: &[FinalBar]) -> redis::Pipeline {
    let mut by_symbol: Vec<(&str, Vec<&FinalBar>)> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    for bar in bars {
        let at = *index.entry(bar.symbol.as_str()).or_insert_with(|| {
            by_symbol.push((bar.symbol.as_str(), Vec::new()));
            by_symbol.len() - 1
        });
        by_symbol[at].1.push(bar);
    }
    let field_names = field_names(names);
    let mut pipe = redis::pipe();
    for (symbol, group) in &by_symbol {
        let mut invocation = script.prepare_invoke();
        invocation.key(keys.symbols()).key(keys.latest(symbol)).key(keys.bars(symbol)).key(keys.marker());
        for &i in &SERIES {
            invocation.key(keys.series(symbol, &field_names[i]));
        }
        invocation.arg(*symbol).arg(retention_ms).arg(field_names.len()).arg(group.len());
        for name in &field_names {
            invocation.arg(name);
        }
        for &i in &SERIES {
            invocation.arg(i + 1);
        }
        for bar in group {
            invocation.arg(bar.end);
            for value in field_values(bar) {
                invocation.arg(value.as_deref().unwrap_or(""));
            }
        }
        pipe.invoke_script(&invocation);
    }
    pipe
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
    let fixed = |units: i128| Some(decimal::format(units, decimal::SCALE as u32));
    [
        fixed(bar.bar.close),
        fixed(bar.bar.volume),
        Some(bar.bar.trades.to_string()),
        fixed(bar.bar.buy_volume),
        fixed(bar.bar.sell_volume()),
        Some(bar.vwap_bar.to_string()),
        Some(bar.vwap_long.to_string()),
        bar.rsi.map(|v| v.to_string()),
    ]
}
