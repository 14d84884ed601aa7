//! Binance's REST endpoint for old trades, `GET /api/v3/historicalTrades`,
//! used to fill the ids a stream skipped. It keeps within the request weight
//! Binance allows per minute, waits as told on 429 (too many requests) up
//! to [`RestLimits::max_wait`], and on 418 (banned for a while) sends
//! nothing until the ban is over: a gap asked for meanwhile is an error at
//! once, which the sequencer records as unfilled, so a ban never stalls the
//! stream of every other symbol. Answers are read up to
//! [`RestLimits::max_body_bytes`].

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use reqwest::StatusCode;
use tracing::{debug, error, warn};

use super::connection::backoff;
use crate::binance;
use crate::error::{Error, Result};

/// Binance's public REST base URL.
pub const DEFAULT_REST_URL: &str = "https://api.binance.com";

/// Most trades one request returns.
pub const PAGE: i64 = 1000;

/// Weight Binance charges for one `historicalTrades` request.
const REQUEST_WEIGHT: u32 = 25;

/// How the client paces itself.
#[derive(Debug, Clone)]
pub struct RestLimits {
    /// Request weight to spend per minute at most (Binance allows 6000 per IP).
    pub weight_per_minute: u32,
    /// Attempts for one page when the server fails or cannot be reached.
    pub attempts: u32,
    /// Longest wait for one answer.
    pub timeout: Duration,
    /// Longest a 429's `Retry-After` is waited out; a longer one fails the
    /// request (the gap is then recorded as unfilled).
    pub max_wait: Duration,
    /// Largest answer read: a page of 1,000 trades is about 150 KB.
    pub max_body_bytes: usize,
}

impl Default for RestLimits {
    fn default() -> Self {
        RestLimits {
            weight_per_minute: 5000,
            attempts: 8,
            timeout: Duration::from_secs(10),
            max_wait: Duration::from_secs(60),
            max_body_bytes: 4 << 20,
        }
    }
}

/// A client of one Binance REST base URL, counting its own requests.
pub struct Rest {
    http: reqwest::Client,
    base: String,
    limits: RestLimits,
    /// Weight used in the current minute, as Binance last reported it.
    used_weight: u32,
    minute: u64,
    /// Binance banned this address (418) until then: no request before it.
    banned_until: Option<Instant>,
    /// Requests sent, and how many were answered 429 / 418.
    pub requests: u64,
    pub throttled: u64,
}

impl Rest {
    pub fn new(base: &str, limits: RestLimits) -> Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(limits.timeout)
            .user_agent(concat!("cryptopulse/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::binance("rest client", e))?;
        let base = base.trim_end_matches('/').to_owned();
        Ok(Rest { http, base, limits, used_weight: 0, minute: 0, banned_until: None, requests: 0, throttled: 0 })
    }

    /// Trades of `symbol` from id `from` on, at most `limit` (up to
    /// [`PAGE`]), each encoded as the stream event Binance would have sent
    /// (without the event time `E`, which REST does not give).
    pub async fn trades_from(&mut self, symbol: &str, from: i64, limit: i64) -> Result<Vec<(i64, i64, Vec<u8>)>> {
        let url = format!("{}/api/v3/historicalTrades", self.base);
        let query = [("symbol", symbol.to_owned()), ("fromId", from.to_string()), ("limit", limit.clamp(1, PAGE).to_string())];
        let what = || format!("GET {url} {symbol} from {from}");
        let mut failures = 0;
        loop {
            if let Some(left) =
                self.banned_until.map(|until| until.saturating_duration_since(Instant::now())).filter(|left| !left.is_zero())
            {
                return Err(Error::binance(what(), format!("banned by Binance (418) for another {} s; not asked", left.as_secs())));
            }
            self.pace().await;
            self.requests += 1;
            let answer = self.http.get(&url).query(&query).send().await;
            let response = match answer {
                Ok(response) => response,
                Err(e) => {
                    failures += 1;
                    if failures >= self.limits.attempts {
                        return Err(Error::binance(format!("GET {url} {symbol} from {from}"), e));
                    }
                    warn!(error = %e, failures, "historicalTrades request failed; trying again");
                    tokio::time::sleep(backoff(failures)).await;
                    continue;
                }
            };
            self.note_weight(&response);
            let status = response.status();
            if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::IM_A_TEAPOT {
                self.throttled += 1;
                failures += 1;
                let wait = retry_after(&response).unwrap_or(Duration::from_secs(60));
                if status == StatusCode::IM_A_TEAPOT {
                    self.banned_until = Some(Instant::now() + wait);
                    error!(
                        wait_s = wait.as_secs(),
                        "binance banned this address (418); no REST request until the ban is over, gaps meanwhile are recorded unfilled"
                    );
                    return Err(Error::binance(what(), format!("418 banned for {} s", wait.as_secs())));
                }
                if wait > self.limits.max_wait || failures >= self.limits.attempts {
                    return Err(Error::binance(
                        what(),
                        format!("429 asks to wait {} s (at most {} s, attempt {failures})", wait.as_secs(), self.limits.max_wait.as_secs()),
                    ));
                }
                warn!(%status, wait_s = wait.as_secs_f64(), "binance asks to slow down; waiting as told");
                tokio::time::sleep(wait).await;
                continue;
            }
            let body = read_body(response, self.limits.max_body_bytes).await.map_err(|e| Error::binance(what(), e))?;
            if status.is_server_error() {
                failures += 1;
                if failures >= self.limits.attempts {
                    return Err(Error::binance(format!("GET {url} {symbol} from {from}"), format!("{status}")));
                }
                warn!(%status, failures, "historicalTrades failed on the server; trying again");
                tokio::time::sleep(backoff(failures)).await;
                continue;
            }
            if !status.is_success() {
                return Err(Error::binance(
                    format!("GET {url} {symbol} from {from}"),
                    format!("{status}: {}", String::from_utf8_lossy(&body)),
                ));
            }
            return binance::rest::historical_trades(symbol, &body);
        }
    }

    /// Waits for the next minute when one more request would spend more
    /// weight than allowed.
    async fn pace(&mut self) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        if now.as_secs() / 60 != self.minute {
            self.minute = now.as_secs() / 60;
            self.used_weight = 0;
        }
        if self.used_weight + REQUEST_WEIGHT > self.limits.weight_per_minute {
            let wait = Duration::from_secs(60 - now.as_secs() % 60);
            debug!(used = self.used_weight, wait_s = wait.as_secs(), "request weight spent for this minute");
            tokio::time::sleep(wait).await;
            self.minute += 1;
            self.used_weight = 0;
        }
        self.used_weight += REQUEST_WEIGHT;
    }

    fn note_weight(&mut self, response: &reqwest::Response) {
        if let Some(used) = response.headers().get("x-mbx-used-weight-1m").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()) {
            self.used_weight = used;
        }
    }
}

/// The body of an answer, refused past `max` bytes (announced or read).
async fn read_body(mut response: reqwest::Response, max: usize) -> std::result::Result<Vec<u8>, String> {
    let too_large = || format!("answer larger than {max} bytes");
    if response.content_length().is_some_and(|length| length > max as u64) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
        if body.len() + chunk.len() > max {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    let seconds: u64 = response.headers().get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(seconds))
}
