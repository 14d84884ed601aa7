//! A canonical dump of everything under a key prefix and its SHA-256, so two
//! runs (or a crashed and an uncrashed one) can be compared byte for byte.
//! Key names are written without the prefix: runs under different prefixes
//! compare equal when their contents are.

use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};
use crate::sink::RedisConn;

/// The canonical dump and its SHA-256 in hex.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digest {
    pub dump: String,
    pub sha256: String,
    pub keys: usize,
}

/// Dumps every key under `prefix:` in a fixed text form: keys sorted, one
/// header line `<type> <key>` each, then its contents one item a line
/// (hash fields and set members sorted, sorted sets and streams in order).
/// Strings are JSON-quoted so any byte sequence has one spelling.
pub async fn digest(conn: &mut ConnectionManager, prefix: &str) -> Result<Digest> {
    digest_any(&mut RedisConn::Single(conn.clone()), prefix).await
}

/// [`digest`] of one Redis or of a Redis Cluster (every primary scanned).
pub async fn digest_any(conn: &mut RedisConn, prefix: &str) -> Result<Digest> {
    let mut keys = conn.keys_matching(&format!("{}:*", glob_escape(prefix))).await?;
    keys.sort();
    keys.dedup();
    let mut dump = String::new();
    for key in &keys {
        dump_key(conn, key, &key[prefix.len() + 1..], &mut dump).await.map_err(|e| Error::redis(format!("dump {key}"), e))?;
    }
    let sha256 = Sha256::digest(dump.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    Ok(Digest { dump, sha256, keys: keys.len() })
}

async fn dump_key(conn: &mut RedisConn, key: &str, name: &str, out: &mut String) -> redis::RedisResult<()> {
    let kind: String = redis::cmd("TYPE").arg(key).query_async(conn).await?;
    out.push_str(&format!("{kind} {}\n", quote(name)));
    let lines: Vec<String> = match kind.as_str() {
        "string" => vec![quote(&conn.get::<_, String>(key).await?)],
        "list" => conn.lrange::<_, Vec<String>>(key, 0, -1).await?.iter().map(|v| quote(v)).collect(),
        "set" => sorted(conn.smembers::<_, Vec<String>>(key).await?.iter().map(|v| quote(v)).collect()),
        "hash" => {
            sorted(conn.hgetall::<_, Vec<(String, String)>>(key).await?.iter().map(|(f, v)| format!("{} {}", quote(f), quote(v))).collect())
        }
        "zset" => {
            conn.zrange_withscores::<_, Vec<(String, String)>>(key, 0, -1).await?.iter().map(|(m, s)| format!("{s} {}", quote(m))).collect()
        }
        "stream" => {
            let reply: redis::streams::StreamRangeReply = conn.xrange_all(key).await?;
            reply.ids.iter().map(stream_entry).collect()
        }
        other => vec![format!("<unsupported type {other}>")],
    };
    for line in lines {
        out.push_str("  ");
        out.push_str(&line);
        out.push('\n');
    }
    Ok(())
}

fn stream_entry(entry: &redis::streams::StreamId) -> String {
    let mut fields: Vec<(&String, String)> =
        entry.map.iter().map(|(f, v)| (f, redis::from_redis_value::<String>(v).unwrap_or_else(|_| format!("{v:?}")))).collect();
    // The reply is a map; the stored order is not kept by it, so sort.
    fields.sort();
    let body: Vec<String> = fields.iter().map(|(f, v)| format!("{}={}", quote(f), quote(v))).collect();
    format!("{} {}", entry.id, body.join(" "))
}

fn sorted(mut lines: Vec<String>) -> Vec<String> {
    lines.sort();
    lines
}

fn quote(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_default()
}

/// Escapes glob characters so a prefix matches only itself in SCAN MATCH.
fn glob_escape(prefix: &str) -> String {
    let mut out = String::with_capacity(prefix.len());
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_glob_characters() {
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
        assert_eq!(quote("x\"y"), "\"x\\\"y\"");
    }
}
