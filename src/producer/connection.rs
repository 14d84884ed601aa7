//! One connection slot: a set of at most 1024 streams kept subscribed on one
//! WebSocket through drops, silence, oversized frames, refused
//! subscriptions, `serverShutdown` and Binance's 24-hour limit. Frames go to
//! the producer's single sequencing loop over a bounded channel, so a slow
//! broker slows reading down instead of growing memory.
//!
//! Rotation (lifetime reached, or the server announces its shutdown) opens
//! the next connection first and keeps reading the old one until it has
//! delivered a trade the new one already sent, so the two overlap and no
//! trade falls between them; the sequencer drops the overlap by id. Until
//! the old connection is gone, the new one's frames are held back: both
//! carry the same trades at nearly the same moment, and a newer trade from
//! the new connection reaching the sequencer before an older one from the
//! old would look like a gap (and cost a REST request).

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tracing::{debug, error, info, warn};

use crate::binance::{self, Frame};
use crate::error::{Error, Result};

/// Binance allows five messages per second from a client per connection,
/// pongs included; subscriptions are sent at most four a second.
const SEND_INTERVAL: Duration = Duration::from_millis(250);

/// Streams named in one SUBSCRIBE request.
const STREAMS_PER_REQUEST: usize = 200;

/// How long a retiring connection is kept at most while waiting for the
/// overlap with its successor.
const OVERLAP_GRACE: Duration = Duration::from_secs(10);

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What one slot subscribes to and how patient it is.
#[derive(Debug, Clone)]
pub struct SlotConfig {
    /// Base URL; the slot connects to `<ws_url>/stream` and subscribes.
    pub ws_url: String,
    pub symbols: Vec<String>,
    pub silence_timeout: Duration,
    pub max_frame_bytes: usize,
    pub lifetime: Duration,
}

/// What a slot tells the sequencing loop.
#[derive(Debug)]
pub enum Event {
    /// A frame that carries a trade, or that could not be understood (the
    /// sequencer dead-letters it).
    Frame(String),
    /// A connection failed and a new one will be opened.
    Lost { slot: usize, reason: String },
    /// A connection was replaced ahead of the 24-hour limit or a shutdown.
    Rotated { slot: usize },
}

/// Why a connection ended.
enum End {
    /// The receiving side is gone: the producer is stopping.
    Stopped,
    Lost(Error),
}

/// Keeps the slot's streams flowing until the producer stops listening.
pub async fn run(slot: usize, config: SlotConfig, events: mpsc::Sender<Event>) {
    let mut failures: u32 = 0;
    loop {
        let delivered = match open(&config).await {
            Ok(socket) => match serve(slot, &config, socket, &events).await {
                (End::Stopped, _) => return,
                (End::Lost(e), delivered) => {
                    warn!(slot, error = %e, "websocket connection lost");
                    if events.send(Event::Lost { slot, reason: e.to_string() }).await.is_err() {
                        return;
                    }
                    delivered
                }
            },
            Err(e) => {
                warn!(slot, error = %e, "cannot open websocket connection");
                if events.send(Event::Lost { slot, reason: e.to_string() }).await.is_err() {
                    return;
                }
                false
            }
        };
        failures = if delivered { 1 } else { failures + 1 };
        let wait = backoff(failures);
        info!(slot, wait_ms = wait.as_millis() as u64, "reconnecting");
        tokio::time::sleep(wait).await;
    }
}

/// Capped exponential backoff with jitter: 250 ms, 500 ms, ... 30 s, each
/// plus up to half again, so many producers do not reconnect in step.
pub(super) fn backoff(failures: u32) -> Duration {
    let base = Duration::from_millis(250u64 << failures.saturating_sub(1).min(7)).min(Duration::from_secs(30));
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u32(failures);
    base + base.mul_f64((hasher.finish() % 1000) as f64 / 2000.0)
}

/// Connects to `<ws_url>/stream` and subscribes to the slot's streams,
/// pacing the requests.
async fn open(config: &SlotConfig) -> Result<Socket> {
    let url = format!("{}/stream", config.ws_url.trim_end_matches('/'));
    let ws_config = WebSocketConfig::default().max_message_size(Some(config.max_frame_bytes)).max_frame_size(Some(config.max_frame_bytes));
    let connect = tokio_tungstenite::connect_async_with_config(&url, Some(ws_config), false);
    let (mut socket, _) = tokio::time::timeout(config.silence_timeout, connect)
        .await
        .map_err(|_| Error::binance(format!("connect {url}"), "timed out"))?
        .map_err(|e| Error::binance(format!("connect {url}"), e))?;
    let streams: Vec<String> = config.symbols.iter().map(|s| format!("{}@trade", s.to_lowercase())).collect();
    for (i, chunk) in streams.chunks(STREAMS_PER_REQUEST).enumerate() {
        if i > 0 {
            tokio::time::sleep(SEND_INTERVAL).await;
        }
        let request = serde_json::json!({ "method": "SUBSCRIBE", "params": chunk, "id": i + 1 });
        socket.send(Message::text(request.to_string())).await.map_err(|e| Error::binance("send SUBSCRIBE", e))?;
    }
    info!(%url, streams = streams.len(), "connected and subscribed");
    Ok(socket)
}

/// A connection being read.
struct Live {
    socket: Socket,
    opened: Instant,
    heard: Instant,
}

impl Live {
    fn new(socket: Socket) -> Self {
        let now = Instant::now();
        Live { socket, opened: now, heard: now }
    }
}

/// What a frame means to the slot.
enum Read {
    /// Forward the frame; whether it carries a trade.
    Forward(String, bool),
    /// The server will shut this connection down soon.
    ShutdownNotice,
    /// Nothing to do (a subscription reply, a ping).
    Nothing,
}

/// Reads one connection (and, while rotating, its successor) until it ends.
/// Also says whether any trade came through, to reset the backoff.
async fn serve(slot: usize, config: &SlotConfig, socket: Socket, events: &mpsc::Sender<Event>) -> (End, bool) {
    let mut primary = Live::new(socket);
    // The connection being replaced, and the first trade its successor sent.
    let mut retiring: Retiring = None;
    let mut rotate_at = Instant::now() + config.lifetime;
    let mut delivered = false;
    // The new connection's frames while the old one is still being read.
    let mut held: Vec<String> = Vec::new();
    let mut tick = tokio::time::interval((config.silence_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1)));
    loop {
        tokio::select! {
            message = primary.socket.next() => {
                primary.heard = Instant::now();
                match read(message) {
                    Err(e) => {
                        let _ = release(&mut held, events).await;
                        return (End::Lost(e), delivered);
                    }
                    Ok(Read::Forward(text, trade)) => {
                        delivered |= trade;
                        if let Some((_, first, _)) = &mut retiring {
                            // Only while rotating is a trade's key needed.
                            if trade && first.is_none() {
                                *first = trade_key(&text);
                            }
                            held.push(text);
                        } else if events.send(Event::Frame(text)).await.is_err() {
                            return (End::Stopped, delivered);
                        }
                    }
                    Ok(Read::ShutdownNotice) => {
                        info!(slot, "server announced its shutdown; opening the next connection");
                        rotate_at = Instant::now();
                    }
                    Ok(Read::Nothing) => {}
                }
            }
            message = next_of(&mut retiring) => {
                let Some((old, first_new, _)) = &mut retiring else { continue };
                old.heard = Instant::now();
                match read(message) {
                    Ok(Read::Forward(text, trade)) => {
                        let overlap = trade
                            && first_new.as_ref().is_some_and(|(s, first)| trade_key(&text).is_some_and(|(symbol, id)| *s == symbol && id >= *first));
                        if events.send(Event::Frame(text)).await.is_err() {
                            return (End::Stopped, delivered);
                        }
                        if overlap {
                            debug!(slot, "old and new connection overlap; closing the old one");
                            let _ = old.socket.close(None).await;
                            retiring = None;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        debug!(slot, error = %e, "retiring connection ended");
                        retiring = None;
                    }
                }
            }
            _ = tick.tick() => {
                let now = Instant::now();
                if now.duration_since(primary.heard) > config.silence_timeout {
                    let _ = release(&mut held, events).await;
                    let silent = Error::binance("websocket", format!("no data or ping for {:?}", config.silence_timeout));
                    return (End::Lost(silent), delivered);
                }
                let expired = |(old, _, since): &(Live, Option<(String, i64)>, Instant)| {
                    now.duration_since(*since) > OVERLAP_GRACE || now.duration_since(old.heard) > config.silence_timeout
                };
                if retiring.as_ref().is_some_and(expired) {
                    debug!(slot, "retiring connection closed after its grace period");
                    retiring = None;
                }
                if now >= rotate_at && retiring.is_none() {
                    match open(config).await {
                        Ok(socket) => {
                            info!(slot, age_s = primary.opened.elapsed().as_secs(), "rotated to a new connection");
                            let old = std::mem::replace(&mut primary, Live::new(socket));
                            retiring = Some((old, None, Instant::now()));
                            rotate_at = Instant::now() + config.lifetime;
                            if events.send(Event::Rotated { slot }).await.is_err() {
                                return (End::Stopped, delivered);
                            }
                        }
                        Err(e) => {
                            warn!(slot, error = %e, "cannot open the next connection; keeping the current one and trying again");
                            rotate_at = Instant::now() + Duration::from_secs(5);
                        }
                    }
                }
            }
        }
        if retiring.is_none() && !held.is_empty() && !release(&mut held, events).await {
            return (End::Stopped, delivered);
        }
    }
}

/// Sends the frames held back during a rotation; false if the receiver is gone.
async fn release(held: &mut Vec<String>, events: &mpsc::Sender<Event>) -> bool {
    for text in held.drain(..) {
        if events.send(Event::Frame(text)).await.is_err() {
            return false;
        }
    }
    true
}

type Retiring = Option<(Live, Option<(String, i64)>, Instant)>;

async fn next_of(retiring: &mut Retiring) -> Option<std::result::Result<Message, tokio_tungstenite::tungstenite::Error>> {
    match retiring {
        Some((old, _, _)) => old.socket.next().await,
        None => std::future::pending().await,
    }
}

fn read(message: Option<std::result::Result<Message, tokio_tungstenite::tungstenite::Error>>) -> Result<Read> {
    match message {
        None => Err(Error::binance("websocket", "connection closed")),
        Some(Err(e)) => Err(Error::binance("websocket", e)),
        Some(Ok(Message::Close(frame))) => Err(Error::binance("websocket", format!("server closed the connection ({frame:?})"))),
        Some(Ok(Message::Text(text))) => classify(text.to_string()),
        Some(Ok(_)) => Ok(Read::Nothing),
    }
}

fn classify(text: String) -> Result<Read> {
    if binance::is_server_shutdown(&text) {
        return Ok(Read::ShutdownNotice);
    }
    // `Some(is_trade)` to forward (what is not a trade the sequencer will
    // dead-letter), `None` to skip.
    let forward = match binance::unwrap_frame(&text) {
        Ok(Frame::Trade(_)) => Some(true),
        Ok(Frame::Other(other)) => {
            debug!(frame = other, "reply or other event");
            None
        }
        Ok(Frame::Error { code, msg }) => {
            error!(code, %msg, "binance refused a request");
            return Err(Error::binance("subscribe", format!("error reply {code}: {msg}")));
        }
        Err(_) => Some(false),
    };
    Ok(match forward {
        Some(trade) => Read::Forward(text, trade),
        None => Read::Nothing,
    })
}

/// The symbol and id of the trade a frame carries.
fn trade_key(text: &str) -> Option<(String, i64)> {
    match binance::unwrap_frame(text).ok()? {
        Frame::Trade(bytes) => binance::decode(bytes).ok().map(|t| (t.symbol.into_owned(), t.id)),
        _ => None,
    }
}
