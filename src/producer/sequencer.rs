//! The single loop that puts each symbol's trades in id order without holes,
//! whatever the connections deliver: it drops ids it already passed on
//! (overlaps after a reconnect or a rotation), fetches skipped ids from REST
//! before newer ones, and hands the result to a [`Sink`]: Kafka for the
//! producer, Parquet archives for `record`.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{error, info, warn};

use super::connection::{self, Event, SlotConfig};
use super::rest::{self, Rest, RestLimits};
use crate::binance::{self, Frame};
use crate::error::Result;
use crate::kafka::dead_letter::{capped, MAX_DETAIL_BYTES};
use crate::rejection::{Reject, Rejection};
use crate::telemetry::{self, Heartbeat};
use crate::trade::Trade;

/// Binance serves at most this many streams on one connection.
pub const MAX_STREAMS_PER_CONNECTION: usize = 1024;

/// Frames read but not yet sequenced, over all connections.
const FRAME_QUEUE: usize = 65_536;

/// Where sequenced trades go.
pub trait Sink {
    /// One trade event, in id order for its symbol; `from_rest` when it was
    /// fetched to fill a gap rather than streamed.
    fn trade(&mut self, symbol: &str, event: &[u8], time_ms: i64, from_rest: bool) -> impl Future<Output = Result<()>> + Send;
    /// A frame that is not a usable trade, with why.
    fn dead_letter(&mut self, reason: &str, detail: &str, raw: &[u8]) -> impl Future<Output = Result<()>> + Send;
    /// Ids `from..=to` of `symbol` that cannot be had.
    fn gap(&mut self, symbol: &str, from: i64, to: i64, why: &str) -> impl Future<Output = Result<()>> + Send;
    /// Called about once a second, trades or not (time-based work).
    fn idle(&mut self) -> impl Future<Output = Result<()>> + Send {
        async { Ok(()) }
    }
    /// Running totals for the heartbeat line: trades and dead letters the
    /// sink has taken for good.
    fn progress(&self) -> (u64, u64) {
        (0, 0)
    }
}

/// The live source: endpoints, symbols, and how patient to be.
#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// WebSocket base URL; `/stream` is appended.
    pub ws_url: String,
    /// REST base URL; `/api/v3/historicalTrades` is appended.
    pub rest_url: String,
    pub symbols: Vec<String>,
    /// Streams per connection, at most [`MAX_STREAMS_PER_CONNECTION`].
    pub streams_per_connection: usize,
    /// Reconnect when nothing (data or ping) arrived for this long.
    pub silence_timeout: Duration,
    /// Largest frame accepted; a bigger one is an error and a reconnect.
    pub max_frame_bytes: usize,
    /// Replace a connection after this long (Binance cuts them at 24 h).
    pub connection_lifetime: Duration,
    pub rest_limits: RestLimits,
    /// Most trades fetched over REST for one gap; the rest of a longer gap
    /// is recorded as unfilled.
    pub max_gap_fill: i64,
    /// How far ahead of this machine's clock a trade time may be (SPEC §1).
    pub future_tolerance: Duration,
    /// How often the heartbeat line is logged; never when absent.
    pub heartbeat: Option<Duration>,
}

impl StreamConfig {
    /// The settings a user would start from, against `ws_url` / `rest_url`.
    pub fn new(symbols: Vec<String>, ws_url: &str, rest_url: &str) -> Self {
        StreamConfig {
            ws_url: ws_url.to_owned(),
            rest_url: rest_url.to_owned(),
            symbols,
            streams_per_connection: MAX_STREAMS_PER_CONNECTION,
            silence_timeout: Duration::from_secs(30),
            max_frame_bytes: 1 << 20,
            connection_lifetime: Duration::from_secs(23 * 3600),
            rest_limits: RestLimits::default(),
            max_gap_fill: 1_000_000,
            future_tolerance: binance::DEFAULT_FUTURE_TOLERANCE,
            heartbeat: None,
        }
    }
}

/// What the sequencer saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamCounts {
    /// Trades received again (overlaps) and dropped.
    pub duplicates: u64,
    pub reconnects: u64,
    pub rotations: u64,
    /// Gaps seen in a stream (ids skipped).
    pub gaps_found: u64,
    /// Trade ids that could not be had.
    pub unfilled: u64,
    pub rest_requests: u64,
    /// REST answers 429 or 418 that were waited out.
    pub rest_throttled: u64,
}

impl std::fmt::Display for StreamCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} reconnects, {} rotations, {} gaps found, {} ids unfilled, {} overlaps dropped, {} REST requests ({} throttled)",
            self.reconnects, self.rotations, self.gaps_found, self.unfilled, self.duplicates, self.rest_requests, self.rest_throttled
        )
    }
}

/// Streams `config.symbols` into `sink` until `shutdown` resolves or the
/// sink fails. `last` holds the last trade id already in the sink per
/// symbol: those symbols are first backfilled from REST up to now.
pub async fn stream<S: Sink>(
    config: &StreamConfig,
    last: HashMap<String, i64>,
    sink: &mut S,
    shutdown: impl Future<Output = ()>,
) -> Result<StreamCounts> {
    let mut sequencer = Sequencer {
        sink,
        rest: Rest::new(&config.rest_url, config.rest_limits.clone())?,
        last,
        max_gap_fill: config.max_gap_fill,
        subscribed: config.symbols.iter().cloned().collect(),
        future_tolerance: config.future_tolerance,
        counts: StreamCounts::default(),
        heartbeat: Heartbeat::new(config.heartbeat),
    };
    let (events, mut frames) = mpsc::channel(FRAME_QUEUE);
    let mut slots = JoinSet::new();
    let per_connection = config.streams_per_connection.clamp(1, MAX_STREAMS_PER_CONNECTION);
    for (slot, symbols) in config.symbols.chunks(per_connection).enumerate() {
        let slot_config = SlotConfig {
            ws_url: config.ws_url.clone(),
            symbols: symbols.to_vec(),
            silence_timeout: config.silence_timeout,
            max_frame_bytes: config.max_frame_bytes,
            lifetime: config.connection_lifetime,
        };
        slots.spawn(connection::run(slot, slot_config, events.clone()));
    }
    drop(events);
    tokio::pin!(shutdown);
    let ended = tokio::select! {
        _ = &mut shutdown => Ok(()),
        ended = sequencer.run(&mut frames) => ended,
    };
    slots.abort_all();
    let mut counts = sequencer.counts;
    counts.rest_requests = sequencer.rest.requests;
    counts.rest_throttled = sequencer.rest.throttled;
    ended.map(|()| counts)
}

struct Sequencer<'a, S> {
    sink: &'a mut S,
    rest: Rest,
    /// Last trade id passed to the sink per symbol.
    last: HashMap<String, i64>,
    max_gap_fill: i64,
    /// What it follows: a trade of any other symbol is a dead letter.
    subscribed: HashSet<String>,
    future_tolerance: Duration,
    counts: StreamCounts,
    heartbeat: Heartbeat,
}

impl<S: Sink> Sequencer<'_, S> {
    async fn run(&mut self, frames: &mut mpsc::Receiver<Event>) -> Result<()> {
        let known: Vec<(String, i64)> = self.last.iter().map(|(s, &id)| (s.clone(), id)).collect();
        for (symbol, id) in known {
            self.fill(&symbol, id + 1, None).await?;
        }
        let mut second = tokio::time::interval(Duration::from_secs(1));
        loop {
            let event = tokio::select! {
                event = frames.recv() => event,
                _ = second.tick() => {
                    self.sink.idle().await?;
                    if self.heartbeat.is_due() {
                        self.beat();
                    }
                    continue;
                }
            };
            match event {
                Some(Event::Frame(text)) => self.on_frame(&text).await?,
                Some(Event::Lost { .. }) => {
                    self.counts.reconnects += 1;
                    metrics::counter!(telemetry::WS_RECONNECTS).increment(1);
                }
                Some(Event::Rotated { .. }) => self.counts.rotations += 1,
                None => return Ok(()),
            }
        }
    }

    /// The heartbeat line: what the producer did since the last one.
    fn beat(&mut self) {
        let (published, dead_letters) = self.sink.progress();
        let [trades, letters] = self.heartbeat.beat([published, dead_letters]);
        let c = &self.counts;
        info!(
            trades_per_s = trades,
            dead_letters_per_s = letters,
            reconnects = c.reconnects,
            gaps_found = c.gaps_found,
            unfilled = c.unfilled,
            rest_throttled = self.rest.throttled,
            "heartbeat"
        );
    }

    /// What the decoder cannot know: whether the symbol is one this
    /// producer follows, and whether the trade time is plausible now.
    fn check(&self, trade: &Trade<'_>) -> Result<(), Rejection> {
        if !self.subscribed.contains(trade.symbol.as_ref()) {
            let detail = format!("symbol {:?} is not one this producer subscribed to", trade.symbol);
            return Err(Rejection::new(Reject::UnknownSymbol, detail));
        }
        binance::check_time(trade.time_ms, binance::now_ms(), self.future_tolerance)
    }

    async fn on_frame(&mut self, text: &str) -> Result<()> {
        let decoded = binance::unwrap_frame(text).and_then(|frame| match frame {
            Frame::Trade(bytes) => binance::decode(bytes)
                .and_then(|t| self.check(&t).map(|()| t))
                .map(|t| Some((t.symbol.into_owned(), t.id, t.time_ms, bytes))),
            _ => Ok(None),
        });
        let (symbol, id, time_ms, payload) = match decoded {
            Ok(Some(trade)) => trade,
            Ok(None) => return Ok(()),
            Err(rejection) => {
                let detail = capped(&rejection.detail, MAX_DETAIL_BYTES);
                warn!(reason = %rejection.reason, %detail, "frame is not a usable trade");
                return self.sink.dead_letter(rejection.reason.as_str(), &rejection.detail, text.as_bytes()).await;
            }
        };
        match self.last.get(&symbol) {
            Some(&last) if id <= last => {
                self.counts.duplicates += 1;
                return Ok(());
            }
            Some(&last) if id > last + 1 => {
                self.counts.gaps_found += 1;
                metrics::counter!(telemetry::GAPS_FOUND).increment(1);
                warn!(%symbol, from = last + 1, to = id - 1, "trade ids skipped; filling from REST");
                self.fill(&symbol, last + 1, Some(id)).await?;
            }
            _ => {}
        }
        self.sink.trade(&symbol, payload, time_ms, false).await?;
        self.last.insert(symbol, id);
        Ok(())
    }

    /// Passes on `symbol`'s trades from id `from` up to (not including)
    /// `until`, or up to the newest when `until` is `None`, from REST. What
    /// cannot be had is recorded as a gap.
    async fn fill(&mut self, symbol: &str, from: i64, until: Option<i64>) -> Result<()> {
        let mut next = from;
        let mut fetched = 0;
        loop {
            if until.is_some_and(|until| next >= until) {
                return Ok(());
            }
            if fetched >= self.max_gap_fill {
                if let Some(until) = until {
                    return self.gap(symbol, next, until - 1, "longer than --max-gap-fill").await;
                }
                return Ok(());
            }
            let limit = until.map_or(rest::PAGE, |until| (until - next).min(rest::PAGE));
            let page = match self.rest.trades_from(symbol, next, limit).await {
                Ok(page) => page,
                Err(e) => {
                    error!(%symbol, from = next, error = %e, "cannot fetch missing trades");
                    return match until {
                        Some(until) => self.gap(symbol, next, until - 1, &e.to_string()).await,
                        // At start: the first streamed trade shows the gap again.
                        None => Ok(()),
                    };
                }
            };
            let complete = (page.len() as i64) < limit;
            for (id, time_ms, event) in page {
                if id < next || until.is_some_and(|until| id >= until) {
                    continue;
                }
                if id > next {
                    self.gap(symbol, next, id - 1, "not served by historicalTrades").await?;
                }
                self.sink.trade(symbol, &event, time_ms, true).await?;
                self.last.insert(symbol.to_owned(), id);
                next = id + 1;
                fetched += 1;
            }
            if complete {
                if let Some(until) = until.filter(|&until| next < until) {
                    self.gap(symbol, next, until - 1, "not served by historicalTrades").await?;
                }
                return Ok(());
            }
        }
    }

    async fn gap(&mut self, symbol: &str, from: i64, to: i64, why: &str) -> Result<()> {
        error!(%symbol, from, to, why, "trades cannot be had; recorded as a gap");
        self.counts.unfilled += (to - from + 1) as u64;
        metrics::counter!(telemetry::GAP_TRADES_UNFILLED).increment((to - from + 1) as u64);
        self.sink.gap(symbol, from, to, why).await
    }
}
