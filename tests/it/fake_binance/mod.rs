//! A fake Binance for the producer's tests, on one local port (port 0):
//! WebSocket combined streams at `/stream` (SUBSCRIBE requests) and the REST
//! `GET /api/v3/historicalTrades`. It replays the real frames of the
//! fixtures on a live clock: from the first accepted subscription on, frames
//! are released at a fixed rate, a connection receives the frames released
//! while it is subscribed (so a client that was away misses some), and REST
//! serves every trade already released. Each new connection takes the next
//! scripted [`Behaviour`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::BufRead;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::common::fixture::FRAMES;

/// What one connection does after `after` frames were sent on it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Behaviour {
    /// Streams and stays open.
    Stream,
    /// Closes the TCP connection without a WebSocket close.
    Drop { after: usize },
    /// Stops sending anything, pings included, and stays open.
    Silent { after: usize },
    /// Sends no data for `pings` × 300 ms, only a ping every 300 ms, then
    /// streams on (the frames released meanwhile included).
    Pings { after: usize, pings: usize },
    /// Announces `serverShutdown`, streams on for two seconds, then closes.
    Shutdown { after: usize },
    /// Sends a text frame of `bytes` that is no JSON.
    Oversized { after: usize, bytes: usize },
    /// Sends the next trade's frame early, padded with an unknown key to
    /// `bytes`: a valid trade, too large for a Kafka record.
    Padded { after: usize, bytes: usize },
    /// Sends a frame that is not JSON, then streams on.
    Malformed { after: usize },
    /// Answers the SUBSCRIBE request with an error and sends nothing else.
    RefuseSubscribe,
}

/// A frame of the fixtures and what REST says about the same trade.
struct Recorded {
    stream: String,
    symbol: String,
    id: i64,
    text: String,
    rest: String,
}

/// What the fake saw, for the tests' assertions.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    pub connections: usize,
    pub subscriptions: usize,
    /// Pongs answering the pings of [`Behaviour::Pings`].
    pub pongs: usize,
    pub rest_throttled: usize,
    /// When each connection's client sent each of its text messages.
    pub requests: HashMap<usize, Vec<std::time::Instant>>,
    /// The trades sent padded ([`Behaviour::Padded`]): symbol, id and the
    /// event (the frame's `data`) as sent.
    pub padded: Vec<(String, i64, String)>,
    /// The streams of each first SUBSCRIBE request, as named.
    pub streams: Vec<String>,
}

struct Shared {
    frames: Vec<Recorded>,
    released: watch::Sender<usize>,
    per_second: usize,
    script: Mutex<VecDeque<Behaviour>>,
    throttle: AtomicUsize,
    /// REST answers 503 to everything.
    rest_down: std::sync::atomic::AtomicBool,
    /// REST answers 418 with an hour's `Retry-After` to everything.
    rest_banned: std::sync::atomic::AtomicBool,
    seen: Mutex<Seen>,
}

/// A running fake; it stops with the test's runtime.
#[derive(Clone)]
pub struct FakeBinance {
    pub ws_url: String,
    pub rest_url: String,
    shared: Arc<Shared>,
}

/// Payload of the pings the fake sends on its own (not counted in `pongs`).
const KEEPALIVE: &str = "keepalive";

/// The frame [`Behaviour::Malformed`] sends.
pub const MALFORMED: &str = r#"{"stream":"btcusdt@trade","data":{"e":"trade","s":"BTC"#;

impl FakeBinance {
    /// Serves the fixtures at `per_second` frames a second; connections
    /// follow `script` in order, then [`Behaviour::Stream`]. The first
    /// `throttle` REST requests are answered 429 with `Retry-After: 1`.
    pub async fn start(per_second: usize, script: &[Behaviour], throttle: usize) -> Self {
        Self::serving(recorded(), per_second, script, throttle).await
    }

    /// Serves `frames` (combined-stream frames, `{"stream":...,"data":...}`)
    /// instead of the fixtures'.
    pub async fn start_with(frames: &[String], per_second: usize) -> Self {
        Self::serving(frames.iter().map(|text| parse(text.clone())).collect(), per_second, &[], 0).await
    }

    async fn serving(frames: Vec<Recorded>, per_second: usize, script: &[Behaviour], throttle: usize) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            frames,
            released: watch::Sender::new(0),
            per_second,
            script: Mutex::new(script.iter().copied().collect()),
            throttle: AtomicUsize::new(throttle),
            rest_down: std::sync::atomic::AtomicBool::new(false),
            rest_banned: std::sync::atomic::AtomicBool::new(false),
            seen: Mutex::new(Seen::default()),
        });
        let accepting = shared.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(accepting.clone(), stream));
            }
        });
        FakeBinance { ws_url: format!("ws://{address}"), rest_url: format!("http://{address}"), shared }
    }

    /// From now on REST answers every request with 503.
    pub fn break_rest(&self) {
        self.shared.rest_down.store(true, Ordering::SeqCst);
    }

    /// From now on REST answers every request with 418: banned for an hour.
    pub fn ban_rest(&self) {
        self.shared.rest_banned.store(true, Ordering::SeqCst);
    }

    pub fn seen(&self) -> Seen {
        self.shared.seen.lock().unwrap().clone()
    }

    pub fn total(&self) -> usize {
        self.shared.frames.len()
    }

    /// Whether every frame has been released.
    pub fn all_released(&self) -> bool {
        *self.shared.released.borrow() == self.shared.frames.len()
    }

    /// Every trade id per symbol, in order.
    pub fn ids(&self) -> HashMap<String, Vec<i64>> {
        let mut ids: HashMap<String, Vec<i64>> = HashMap::new();
        for frame in &self.shared.frames {
            ids.entry(frame.symbol.clone()).or_default().push(frame.id);
        }
        ids
    }

    pub fn symbols(&self) -> Vec<String> {
        let mut symbols: Vec<String> = self.ids().into_keys().collect();
        symbols.sort();
        symbols
    }
}

fn recorded() -> Vec<Recorded> {
    let file = std::fs::File::open(FRAMES).unwrap();
    std::io::BufReader::new(flate2::read::MultiGzDecoder::new(file))
        .lines()
        .map(|line| parse(line.unwrap().split_once(' ').unwrap().1.to_owned()))
        .collect()
}

/// A combined-stream frame, and what REST says about its trade.
fn parse(text: String) -> Recorded {
    let frame: serde_json::Value = serde_json::from_str(&text).unwrap();
    let data = &frame["data"];
    let rest = serde_json::json!({
        "id": data["t"], "price": data["p"], "qty": data["q"], "quoteQty": "0",
        "time": data["T"], "isBuyerMaker": data["m"], "isBestMatch": true,
    });
    Recorded {
        stream: frame["stream"].as_str().unwrap().to_owned(),
        symbol: data["s"].as_str().unwrap().to_owned(),
        id: data["t"].as_i64().unwrap(),
        text,
        rest: rest.to_string(),
    }
}

/// Starts the clock shortly after the first subscription.
fn start_clock(shared: &Arc<Shared>) {
    if shared.seen.lock().unwrap().subscriptions != 1 {
        return;
    }
    let shared = shared.clone();
    tokio::spawn(async move {
        // A moment for the other connections of the same client to subscribe.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let step = (shared.per_second / 100).max(1);
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        loop {
            tick.tick().await;
            let total = shared.frames.len();
            let now = (*shared.released.borrow() + step).min(total);
            shared.released.send_replace(now);
            if now == total {
                return;
            }
        }
    });
}

async fn serve(shared: Arc<Shared>, stream: TcpStream) {
    let mut head = [0u8; 64];
    let n = loop {
        match stream.peek(&mut head).await {
            Ok(n) if n >= 8 || n == 0 => break n,
            Ok(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            Err(_) => return,
        }
    };
    if head[..n].starts_with(b"GET /api/v3/historicalTrades") {
        rest(shared, stream).await;
    } else {
        websocket(shared, stream).await;
    }
}

async fn rest(shared: Arc<Shared>, mut stream: TcpStream) {
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let line = String::from_utf8_lossy(&request).lines().next().unwrap_or_default().to_owned();
    let query = line.split_whitespace().nth(1).and_then(|path| path.split_once('?')).map(|(_, q)| q.to_owned()).unwrap_or_default();
    let params: HashMap<&str, &str> = query.split('&').filter_map(|pair| pair.split_once('=')).collect();
    let throttled = shared.throttle.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
    let response = if shared.rest_down.load(Ordering::SeqCst) {
        "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_owned()
    } else if shared.rest_banned.load(Ordering::SeqCst) {
        "HTTP/1.1 418 I'm a teapot\r\nRetry-After: 3600\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_owned()
    } else if throttled {
        shared.seen.lock().unwrap().rest_throttled += 1;
        "HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_owned()
    } else {
        let symbol = params.get("symbol").copied().unwrap_or_default();
        let from: i64 = params.get("fromId").and_then(|v| v.parse().ok()).unwrap_or(0);
        let limit: usize = params.get("limit").and_then(|v| v.parse().ok()).unwrap_or(500);
        let released = *shared.released.borrow();
        let trades: Vec<&str> =
            shared.frames[..released].iter().filter(|f| f.symbol == symbol && f.id >= from).take(limit).map(|f| f.rest.as_str()).collect();
        let body = format!("[{}]", trades.join(","));
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-MBX-USED-WEIGHT-1M: 25\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

async fn websocket(shared: Arc<Shared>, stream: TcpStream) {
    let Ok(ws) = tokio_tungstenite::accept_async(stream).await else { return };
    let behaviour = shared.script.lock().unwrap().pop_front().unwrap_or(Behaviour::Stream);
    let connection = {
        let mut seen = shared.seen.lock().unwrap();
        seen.connections += 1;
        seen.connections
    };
    let heard = move |shared: &Shared| shared.seen.lock().unwrap().requests.entry(connection).or_default().push(std::time::Instant::now());
    let (mut sink, mut source) = ws.split();
    // The first message must be the SUBSCRIBE request.
    let streams: Arc<Mutex<HashSet<String>>> = loop {
        match source.next().await {
            Some(Ok(Message::Text(text))) => {
                heard(&shared);
                let request: serde_json::Value = serde_json::from_str(text.as_str()).unwrap();
                assert_eq!(request["method"], "SUBSCRIBE", "{text}");
                let id = request["id"].clone();
                if behaviour == Behaviour::RefuseSubscribe {
                    let reply = serde_json::json!({ "code": 2, "msg": "Invalid request: refused by the test", "id": id });
                    let _ = sink.send(Message::text(reply.to_string())).await;
                    // Binance keeps such a connection open; so does the fake.
                    while source.next().await.is_some() {}
                    return;
                }
                let _ = sink.send(Message::text(serde_json::json!({ "result": null, "id": id }).to_string())).await;
                break Arc::new(Mutex::new(request["params"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_owned()).collect()));
            }
            Some(Ok(_)) => continue,
            _ => return,
        }
    };
    {
        let mut seen = shared.seen.lock().unwrap();
        seen.subscriptions += 1;
        seen.streams.extend(streams.lock().unwrap().iter().cloned());
    }
    start_clock(&shared);
    // Pongs, further SUBSCRIBE requests and the client's close are read
    // beside the sending.
    let (counting, subscribed) = (shared.clone(), streams.clone());
    let reader = tokio::spawn(async move {
        while let Some(Ok(message)) = source.next().await {
            if let Message::Text(text) = &message {
                heard(&counting);
                let request: serde_json::Value = serde_json::from_str(text.as_str()).unwrap();
                subscribed.lock().unwrap().extend(request["params"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_owned()));
            }
            if message.is_pong() && message.clone().into_data().as_ref() != KEEPALIVE.as_bytes() {
                counting.seen.lock().unwrap().pongs += 1;
            }
        }
    });
    let mut released = shared.released.subscribe();
    let mut next = *released.borrow();
    let mut sent = 0usize;
    let mut acted = false;
    let mut close_at = None;
    let mut keepalive = tokio::time::interval(Duration::from_millis(500));
    loop {
        let upto = *released.borrow_and_update();
        while next < upto {
            let frame = &shared.frames[next];
            next += 1;
            if !streams.lock().unwrap().contains(&frame.stream) {
                continue;
            }
            if sink.send(Message::text(frame.text.clone())).await.is_err() {
                return;
            }
            sent += 1;
            if acted {
                continue;
            }
            acted = match behaviour {
                Behaviour::Drop { after } if sent == after => {
                    reader.abort();
                    return; // dropping the socket closes TCP without a close frame
                }
                Behaviour::Silent { after } if sent == after => {
                    let _ = reader.await;
                    return;
                }
                Behaviour::Pings { after, pings } if sent == after => {
                    for i in 0..pings {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        if sink.send(Message::Ping(format!("ping {i}").into_bytes().into())).await.is_err() {
                            return;
                        }
                    }
                    true
                }
                Behaviour::Shutdown { after } if sent == after => {
                    let notice = serde_json::json!({ "e": "serverShutdown", "E": 1723161255343i64 });
                    let _ = sink.send(Message::text(notice.to_string())).await;
                    close_at = Some(tokio::time::Instant::now() + Duration::from_secs(2));
                    true
                }
                Behaviour::Oversized { after, bytes } if sent == after => {
                    let _ = sink.send(Message::text("x".repeat(bytes))).await;
                    true
                }
                Behaviour::Padded { after, bytes } if sent == after => {
                    let subscribed = streams.lock().unwrap().clone();
                    if let Some(frame) = shared.frames[next..].iter().find(|f| subscribed.contains(&f.stream)) {
                        let mut value: serde_json::Value = serde_json::from_str(&frame.text).unwrap();
                        value["data"]["pad"] = serde_json::Value::from("x".repeat(bytes.saturating_sub(frame.text.len() + 10)));
                        let event = value["data"].to_string();
                        shared.seen.lock().unwrap().padded.push((frame.symbol.clone(), frame.id, event));
                        let _ = sink.send(Message::text(value.to_string())).await;
                    }
                    true
                }
                Behaviour::Malformed { after } if sent == after => {
                    let _ = sink.send(Message::text(MALFORMED)).await;
                    true
                }
                _ => false,
            };
        }
        // Like Binance, pings every connection now and then (more often, for
        // short tests), whether it carries trades or not.
        let closing = async {
            match close_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = released.changed() => if changed.is_err() { return },
            _ = closing => {
                let _ = sink.close().await;
                return;
            }
            _ = keepalive.tick() => {
                if sink.send(Message::Ping(KEEPALIVE.as_bytes().to_vec().into())).await.is_err() {
                    return;
                }
            }
        }
    }
}
