//! The producer against a local WebSocket server on port 0 that replays the
//! real frames of the fixtures (no internet here): every trade reaches Kafka
//! once and in order, and the consumer's Redis output equals a replay's.

mod common;

use std::io::BufRead;
use std::time::Duration;

use common::{wait_for, Lane};
use cryptopulse::producer::{self, ProducerConfig};
use futures::SinkExt;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

const FRAMES: &str = "fixtures/binance-spot-trades-2024-08-08.txt.gz";

/// The combined-stream frames of the fixtures, as Binance sent them.
fn frames() -> Vec<String> {
    let file = std::fs::File::open(FRAMES).unwrap();
    std::io::BufReader::new(flate2::read::MultiGzDecoder::new(file))
        .lines()
        .map(|line| line.unwrap().split_once(' ').unwrap().1.to_owned())
        .collect()
}

/// Serves one connection with `frames`, then closes it; later connections
/// get nothing (as a quiet market would).
async fn serve(frames: Vec<String>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut frames = Some(frames);
        while let Ok((stream, _)) = listener.accept().await {
            let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
            if let Some(frames) = frames.take() {
                for frame in frames {
                    ws.send(Message::text(frame)).await.unwrap();
                }
                let _ = ws.close(None).await;
            } else {
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    drop(ws);
                });
            }
        }
    });
    format!("ws://{address}")
}

fn records_in(lane: &Lane, topic: &str) -> i64 {
    let consumer: BaseConsumer = ClientConfig::new().set("bootstrap.servers", &lane.kafka.brokers).create().unwrap();
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
    let partitions: Vec<i32> = metadata.topics().iter().flat_map(|t| t.partitions().iter().map(|p| p.id())).collect();
    partitions
        .iter()
        .map(|&p| consumer.fetch_watermarks(topic, p, Duration::from_secs(10)).map(|(low, high)| high - low).unwrap_or(0))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_from_a_local_server_reach_kafka_once_and_redis_as_from_a_replay() {
    let want = Lane::undisturbed("replayed").await;
    let lane = Lane::new("live");
    let mut frames = frames();
    let trades = frames.len() as i64;
    // A frame that is not a trade, and a subscription reply, in the middle.
    frames.insert(100, r#"{"stream":"btcusdt@trade","data":{"e":"trade","s":"BTCUSDT","t":1,"p":"abc"}}"#.to_owned());
    frames.insert(200, r#"{"result":null,"id":1}"#.to_owned());
    let url = serve(frames).await;
    let config = ProducerConfig {
        kafka: lane.kafka.clone(),
        ws_url: url,
        symbols: vec!["BTCUSDT".into(), "ETHUSDT".into()],
        silence_timeout: Duration::from_secs(30),
        max_frame_bytes: 1 << 20,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(producer::run(config, async move {
        let _ = stopped.await;
    }));
    let (raw, dlq) = (lane.kafka.topic.clone(), lane.kafka.dlq_topic.clone());
    wait_for(|| {
        let (lane, raw) = (lane.clone(), raw.clone());
        async move { tokio::task::spawn_blocking(move || records_in(&lane, &raw)).await.unwrap() >= trades }
    })
    .await;
    let _ = stop.send(());
    let summary = running.await.unwrap().expect("producer");
    assert_eq!((summary.published, summary.dead_letters), (trades as u64, 1));
    let lane2 = lane.clone();
    assert_eq!(tokio::task::spawn_blocking(move || (records_in(&lane2, &raw), records_in(&lane2, &dlq))).await.unwrap(), (trades, 1));

    let consumed = lane.consume(tempfile::tempdir().unwrap().path()).await;
    assert_eq!((consumed.counts.applied, consumed.counts.duplicates, consumed.counts.late), (trades as u64, 0, 0));
    assert_eq!(lane.digest().await.dump, want.dump);
}
