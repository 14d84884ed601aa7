//! The producer against a fake Binance on a local port (no internet here):
//! the real frames of the fixtures, streamed on a live clock, with REST for
//! the trades a client missed. Each misbehaviour of the server is its own
//! test, and each ends with the same check: every trade of the input is in
//! the topic exactly once, in id order per symbol, in the partition Kafka's
//! default partitioner gives its symbol.

use std::collections::HashMap;
use std::time::Duration;

use cryptopulse::producer::tail::partition_for;
use cryptopulse::producer::{self, ProducerConfig, ProducerSummary, StreamConfig};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

use crate::common::prometheus::{free_addr, Killed};
use crate::common::{wait_for, Lane};
use crate::fake_binance::{Behaviour, FakeBinance, MALFORMED};

/// Frames released per second: the fixtures' 15,863 frames in about 3 s.
const RATE: usize = 5000;

pub(crate) fn config(fake: &FakeBinance, lane: &Lane) -> ProducerConfig {
    let mut stream = StreamConfig::new(fake.symbols(), &fake.ws_url, &fake.rest_url);
    stream.silence_timeout = Duration::from_secs(2);
    let mut config = ProducerConfig::new(lane.kafka.clone(), stream);
    config.gaps_topic = lane.topic("gaps");
    config
}

/// Runs the producer until every frame was released and the topic holds
/// as many trades as the input, then stops it.
pub(crate) async fn run(fake: &FakeBinance, lane: &Lane, config: ProducerConfig) -> ProducerSummary {
    run_short(fake, lane, config, 0).await
}

/// [`run`], for an input of which `missing` trades are not to reach the topic.
async fn run_short(fake: &FakeBinance, lane: &Lane, config: ProducerConfig, missing: i64) -> ProducerSummary {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(producer::run(config, async move {
        let _ = stopped.await;
    }));
    let total = fake.total() as i64 - missing;
    wait_for(|| {
        let (lane, released) = (lane.clone(), fake.all_released());
        async move {
            released && tokio::task::spawn_blocking(move || trades_in(&lane.kafka.brokers, &lane.kafka.topic)).await.unwrap() >= total
        }
    })
    .await;
    let _ = stop.send(());
    running.await.unwrap().expect("producer")
}

/// Records in all partitions of `topic`.
fn records_in(brokers: &str, topic: &str) -> i64 {
    let consumer: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers).create().unwrap();
    watermarks(&consumer, topic).map(|(_, ends)| ends.iter().map(|(low, high)| high - low).sum()).unwrap_or(0)
}

/// The trade ids of each symbol in the topic, partition by partition in
/// offset order, and the records that sit in the wrong partition.
pub fn topic_ids(brokers: &str, topic: &str) -> (HashMap<String, Vec<i64>>, usize) {
    let consumer: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", brokers).set("group.id", "producer-test-reader").create().unwrap();
    // A topic just created may have no leaders for a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let (partitions, ends) = loop {
        match watermarks(&consumer, topic) {
            Ok(found) => break found,
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("{topic}: {e}; trying again");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("{topic}: {e}"),
        }
    };
    let mut ids: HashMap<String, Vec<i64>> = HashMap::new();
    let mut misplaced = 0;
    for (&partition, &(low, high)) in partitions.iter().zip(&ends) {
        if high == low {
            continue;
        }
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(topic, partition, Offset::Offset(low)).unwrap();
        consumer.assign(&list).unwrap();
        let mut next = low;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while next < high {
            assert!(std::time::Instant::now() < deadline, "{topic}/{partition}: records {next}..{high} not read within 30 s");
            // `None` is a timeout or an event that was not a record.
            let Some(message) = consumer.poll(Duration::from_millis(500)) else { continue };
            let message = message.unwrap();
            next = message.offset() + 1;
            if cryptopulse::kafka::is_clock(&message) {
                continue;
            }
            let trade = cryptopulse::binance::decode(message.payload().unwrap()).expect("a valid trade event");
            assert_eq!(message.key(), Some(trade.symbol.as_bytes()), "keyed by symbol");
            assert_eq!(message.timestamp().to_millis(), Some(trade.time_ms), "timestamped with the trade time");
            if partition_for(trade.symbol.as_bytes(), partitions.len() as i32) != partition {
                misplaced += 1;
            }
            ids.entry(trade.symbol.into_owned()).or_default().push(trade.id);
        }
    }
    (ids, misplaced)
}

/// Trades in `topic`: its records without the producer's clock records.
fn trades_in(brokers: &str, topic: &str) -> i64 {
    if records_in(brokers, topic) == 0 {
        return 0;
    }
    topic_ids(brokers, topic).0.values().map(|ids| ids.len() as i64).sum()
}

/// The partitions of `topic` and the low and high watermark of each.
#[allow(clippy::type_complexity)]
fn watermarks(consumer: &BaseConsumer, topic: &str) -> Result<(Vec<i32>, Vec<(i64, i64)>), rdkafka::error::KafkaError> {
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let partitions: Vec<i32> = metadata.topics().iter().flat_map(|t| t.partitions().iter().map(|p| p.id())).collect();
    if partitions.is_empty() {
        return Err(rdkafka::error::KafkaError::MetadataFetch(rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition));
    }
    let ends = partitions.iter().map(|&p| consumer.fetch_watermarks(topic, p, Duration::from_secs(10))).collect::<Result<_, _>>()?;
    Ok((partitions, ends))
}

/// Every trade of the input once, in id order per symbol, where Kafka's
/// default partitioner puts it.
fn assert_once_in_order(fake: &FakeBinance, lane: &Lane) {
    let (ids, misplaced) = topic_ids(&lane.kafka.brokers, &lane.kafka.topic);
    let want = fake.ids();
    for (symbol, want) in &want {
        let got = ids.get(symbol).cloned().unwrap_or_default();
        assert_eq!(got.len(), want.len(), "{symbol}: trades in the topic");
        let first_wrong = got.iter().zip(want).position(|(g, w)| g != w);
        assert_eq!(first_wrong, None, "{symbol}: ids differ from the input from position {first_wrong:?}");
    }
    assert_eq!(ids.len(), want.len(), "symbols in the topic");
    assert_eq!(misplaced, 0, "records in another partition than murmur2(symbol) gives");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_normal_run_publishes_every_trade_once_in_order_and_redis_matches_a_replay() {
    let want = Lane::undisturbed("replayed").await;
    let fake = FakeBinance::start(RATE, &[], 0).await;
    let lane = Lane::new("live");
    let summary = run(&fake, &lane, config(&fake, &lane)).await;
    assert_eq!(
        (summary.published, summary.from_rest, summary.stream.duplicates, summary.dead_letters, summary.stream.reconnects),
        (fake.total() as u64, 0, 0, 0, 0)
    );
    assert_once_in_order(&fake, &lane);
    let consumed = lane.consume(tempfile::tempdir().unwrap().path()).await;
    assert_eq!((consumed.counts.applied, consumed.counts.duplicates, consumed.counts.late), (fake.total() as u64, 0, 0));
    assert_eq!(lane.digest().await.dump, want.dump);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_is_reopened_and_the_gap_filled_from_rest() {
    let fake = FakeBinance::start(RATE, &[Behaviour::Drop { after: 3000 }], 0).await;
    let lane = Lane::new("drop");
    let summary = run(&fake, &lane, config(&fake, &lane)).await;
    assert_eq!(summary.stream.reconnects, 1);
    assert!(summary.stream.gaps_found >= 1 && summary.from_rest >= 1, "{summary:?}");
    assert_eq!(summary.stream.unfilled, 0);
    assert_once_in_order(&fake, &lane);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_server_is_left_after_the_deadline() {
    let fake = FakeBinance::start(RATE, &[Behaviour::Silent { after: 3000 }], 0).await;
    let lane = Lane::new("silent");
    let mut config = config(&fake, &lane);
    config.stream.silence_timeout = Duration::from_secs(1);
    let summary = run(&fake, &lane, config).await;
    assert_eq!(summary.stream.reconnects, 1, "{summary:?}");
    assert!(summary.from_rest >= 1, "{summary:?}");
    assert_once_in_order(&fake, &lane);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_are_answered_and_count_as_life() {
    // Ten pings 300 ms apart and no data for 3 s, against a 1 s deadline:
    // the producer must answer each and must not reconnect.
    let fake = FakeBinance::start(RATE, &[Behaviour::Pings { after: 3000, pings: 10 }], 0).await;
    let lane = Lane::new("pings");
    let mut config = config(&fake, &lane);
    config.stream.silence_timeout = Duration::from_secs(1);
    let summary = run(&fake, &lane, config).await;
    assert_eq!((summary.stream.reconnects, summary.from_rest), (0, 0), "{summary:?}");
    assert_eq!(fake.seen().pongs, 10);
    assert_once_in_order(&fake, &lane);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_shutdown_opens_the_next_connection_before_the_old_one_closes() {
    let fake = FakeBinance::start(RATE, &[Behaviour::Shutdown { after: 3000 }], 0).await;
    let lane = Lane::new("shutdown");
    let summary = run(&fake, &lane, config(&fake, &lane)).await;
    assert_eq!((summary.stream.rotations, summary.stream.reconnects, summary.stream.rest_requests), (1, 0, 0), "{summary:?}");
    assert!(summary.stream.duplicates >= 1, "the two connections overlap: {summary:?}");
    assert_once_in_order(&fake, &lane);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5_mb_frame_is_a_reconnect_and_a_trade_too_large_for_kafka_a_dead_letter() {
    // A 5 MB frame past --max-frame-bytes, then on the next connection a
    // valid trade padded to 1.02 MB: within the frame limit, beyond what a
    // record of the raw topic may carry.
    let script = [Behaviour::Oversized { after: 2000, bytes: 5_000_000 }, Behaviour::Padded { after: 2000, bytes: 1_020_000 }];
    let fake = FakeBinance::start(RATE, &script, 0).await;
    let lane = Lane::new("too-large");
    // The padded trade comes before its real frame, which is then a duplicate.
    let summary = run_short(&fake, &lane, config(&fake, &lane), 1).await;
    let padded = fake.seen().padded;
    assert_eq!(padded.len(), 1, "the fake sent one padded trade");
    let (symbol, id, event) = &padded[0];
    assert!(event.len() > 1_000_000 && event.len() < 1_048_576, "{} bytes", event.len());
    assert_eq!((summary.stream.reconnects, summary.dead_letters), (1, 1), "{summary:?}");

    let letters = lane.dead_letters(1);
    assert_eq!(letters.len(), 1);
    let header = |key: &str| letters[0].0.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
    assert_eq!(header("reason").as_deref(), Some("too_large"));
    assert_eq!(header(cryptopulse::kafka::dead_letter::PAYLOAD_LENGTH_HEADER), Some(event.len().to_string()));
    assert!(letters[0].1.len() < 1_000_000 && event.as_bytes().starts_with(&letters[0].1));

    // Every other trade once, in order.
    let (ids, misplaced) = topic_ids(&lane.kafka.brokers, &lane.kafka.topic);
    let mut want = fake.ids();
    want.get_mut(symbol).expect("symbol").retain(|i| i != id);
    assert_eq!((ids, misplaced), (want, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_frame_is_an_error_and_a_reconnect() {
    let fake = FakeBinance::start(RATE, &[Behaviour::Oversized { after: 3000, bytes: 2 << 20 }], 0).await;
    let lane = Lane::new("oversized");
    let summary = run(&fake, &lane, config(&fake, &lane)).await;
    assert_eq!(summary.stream.reconnects, 1, "{summary:?}");
    assert_eq!(summary.dead_letters, 0);
    assert_once_in_order(&fake, &lane);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_goes_to_the_dead_letter_topic_with_its_raw_bytes() {
    let fake = FakeBinance::start(RATE, &[Behaviour::Malformed { after: 3000 }], 0).await;
    let lane = Lane::new("malformed");
    let summary = run(&fake, &lane, config(&fake, &lane)).await;
    assert_eq!((summary.dead_letters, summary.stream.reconnects), (1, 0), "{summary:?}");
    let letters = lane.dead_letters(1);
    assert_eq!(letters.len(), 1);
    let (headers, payload) = &letters[0];
    assert_eq!(payload.as_slice(), MALFORMED.as_bytes());
    assert!(headers.contains(&("reason".to_owned(), "malformed_json".to_owned())), "{headers:?}");
    assert_once_in_order(&fake, &lane);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_reply_to_subscribe_is_a_reconnect() {
    let fake = FakeBinance::start(RATE, &[Behaviour::RefuseSubscribe], 0).await;
    let lane = Lane::new("refused");
    let summary = run(&fake, &lane, config(&fake, &lane)).await;
    assert_eq!(summary.stream.reconnects, 1, "{summary:?}");
    assert_eq!(fake.seen().connections, 2);
    assert_once_in_order(&fake, &lane);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_answering_429_is_waited_out_then_the_gap_is_filled() {
    let fake = FakeBinance::start(RATE, &[Behaviour::Drop { after: 3000 }], 2).await;
    let lane = Lane::new("throttled");
    let summary = run(&fake, &lane, config(&fake, &lane)).await;
    assert_eq!((summary.stream.rest_throttled, fake.seen().rest_throttled), (2, 2), "{summary:?}");
    assert!(summary.from_rest >= 1 && summary.stream.unfilled == 0, "{summary:?}");
    assert_once_in_order(&fake, &lane);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_rest_cannot_fill_is_recorded_on_the_gaps_topic_with_its_id_range() {
    let fake = FakeBinance::start(RATE, &[Behaviour::Drop { after: 3000 }], 0).await;
    fake.break_rest();
    gaps_recorded_and_the_rest_streamed(&fake, Lane::new("unfillable"), "503").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rest_ban_is_honoured_without_stalling_the_streams() {
    // 418 with an hour's Retry-After: waiting it out would hold every
    // symbol's stream for an hour (the test's 60 s would run out first).
    let fake = FakeBinance::start(RATE, &[Behaviour::Drop { after: 3000 }], 0).await;
    fake.ban_rest();
    gaps_recorded_and_the_rest_streamed(&fake, Lane::new("banned"), "418").await;
}

/// Runs the producer against a REST that cannot fill gaps until every
/// frame was released and a gap is recorded: the topic's ids plus the
/// recorded ranges (each for `reason`) are the input, in order.
async fn gaps_recorded_and_the_rest_streamed(fake: &FakeBinance, lane: Lane, reason: &str) {
    let mut config = config(fake, &lane);
    config.stream.rest_limits.attempts = 2;
    let gaps_topic = config.gaps_topic.clone();
    // The run helper waits for every trade; here some never come.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(producer::run(config, async move {
        let _ = stopped.await;
    }));
    wait_for(|| {
        let (brokers, topic) = (lane.kafka.brokers.clone(), gaps_topic.clone());
        let released = fake.all_released();
        async move { released && tokio::task::spawn_blocking(move || records_in(&brokers, &topic)).await.unwrap() >= 1 }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _ = stop.send(());
    let summary = running.await.unwrap().expect("producer");
    assert!(summary.stream.gaps_found >= 1 && summary.stream.unfilled >= 1, "{summary:?}");

    let gaps = gap_records(&lane.kafka.brokers, &gaps_topic);
    let recorded: u64 = gaps.iter().map(|g| g["count"].as_u64().unwrap()).sum();
    assert_eq!(recorded, summary.stream.unfilled);
    let (mut ids, _) = topic_ids(&lane.kafka.brokers, &lane.kafka.topic);
    for gap in &gaps {
        let (symbol, from, to) = (gap["symbol"].as_str().unwrap(), gap["from_id"].as_i64().unwrap(), gap["to_id"].as_i64().unwrap());
        assert!(gap["reason"].as_str().unwrap().contains(reason), "{gap}");
        let got = ids.get_mut(symbol).unwrap();
        let at = got.iter().position(|&id| id > from).unwrap_or(got.len());
        got.splice(at..at, from..=to);
    }
    assert_eq!(ids, fake.ids());
}

/// The records of the gaps topic.
fn gap_records(brokers: &str, topic: &str) -> Vec<serde_json::Value> {
    let consumer: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers).set("group.id", "gaps-reader").create().unwrap();
    let (low, high) = consumer.fetch_watermarks(topic, 0, Duration::from_secs(10)).unwrap();
    let mut list = TopicPartitionList::new();
    list.add_partition_offset(topic, 0, Offset::Offset(low)).unwrap();
    consumer.assign(&list).unwrap();
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while (out.len() as i64) < high - low && std::time::Instant::now() < deadline {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(500)) {
            out.push(serde_json::from_slice(message.payload().unwrap()).unwrap());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_rotate_before_their_lifetime_without_gap_or_duplicate() {
    let fake = FakeBinance::start(RATE, &[], 0).await;
    let lane = Lane::new("rotation");
    let mut config = config(&fake, &lane);
    config.stream.connection_lifetime = Duration::from_millis(800);
    let summary = run(&fake, &lane, config).await;
    assert!(summary.stream.rotations >= 2, "{summary:?}");
    assert_eq!((summary.stream.reconnects, summary.stream.rest_requests, summary.stream.unfilled), (0, 0, 0), "{summary:?}");
    assert_eq!(summary.published, fake.total() as u64);
    assert_once_in_order(&fake, &lane);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_producer_backfills_from_the_topic_tail() {
    // The first run stops a third of the way in; the second learns where it
    // stopped from the topic and fetches what it missed before streaming.
    let fake = FakeBinance::start(RATE / 2, &[], 0).await;
    let lane = Lane::new("restart");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let first = tokio::spawn(producer::run(config(&fake, &lane), async move {
        let _ = stopped.await;
    }));
    let third = fake.total() as i64 / 3;
    wait_for(|| {
        let lane = lane.clone();
        async move { tokio::task::spawn_blocking(move || trades_in(&lane.kafka.brokers, &lane.kafka.topic)).await.unwrap() >= third }
    })
    .await;
    let _ = stop.send(());
    let first = first.await.unwrap().expect("first run");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let second = run(&fake, &lane, config(&fake, &lane)).await;
    assert!(second.from_rest >= 1, "backfilled at start: {second:?}");
    assert_eq!(first.published + second.published, fake.total() as u64, "{first:?} {second:?}");
    assert_once_in_order(&fake, &lane);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_symbols_are_spread_over_connections_and_subscribed_at_most_five_requests_a_second() {
    // 1,100 symbols (two with trades, the rest quiet): 1,024 streams on the
    // first connection in six paced SUBSCRIBE requests, 76 on the second.
    let fake = FakeBinance::start(RATE, &[], 0).await;
    let lane = Lane::new("split");
    let mut config = config(&fake, &lane);
    config.stream.symbols.extend((0..1098).map(|i| format!("QUIET{i}USDT")));
    let summary = run(&fake, &lane, config).await;
    let seen = fake.seen();
    assert_eq!((seen.connections, seen.subscriptions), (2, 2));
    let mut counts: Vec<usize> = seen.requests.values().map(Vec::len).collect();
    counts.sort();
    assert_eq!(counts, [1, 6]);
    for times in seen.requests.values() {
        for window in times.windows(6) {
            assert!(window[5] - window[0] > Duration::from_secs(1), "more than five requests within a second: {times:?}");
        }
    }
    assert_eq!(summary.published, fake.total() as u64);
    assert_once_in_order(&fake, &lane);
}

/// The `producer` binary on `fake`, writing to `lane`.
fn spawn_producer(fake: &FakeBinance, lane: &Lane) -> std::process::Child {
    producer_command(fake, lane).spawn().expect("producer binary")
}

fn producer_command(fake: &FakeBinance, lane: &Lane) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_producer"));
    command
        .args(["--brokers", &lane.kafka.brokers, "--topic", &lane.kafka.topic, "--dlq-topic", &lane.kafka.dlq_topic])
        .args(["--gaps-topic", &lane.topic("gaps"), "--symbols", &fake.symbols().join(",")])
        .args(["--ws-url", &fake.ws_url, "--rest-url", &fake.rest_url, "--silence-timeout", "2s"])
        .env("RUST_LOG", std::env::var("PRODUCER_LOG").unwrap_or_else(|_| "warn".into()))
        .stdout(std::process::Stdio::null());
    command
}

/// The value of each unlabelled series on a Prometheus text page.
pub(crate) async fn scrape(addr: std::net::SocketAddr) -> HashMap<String, f64> {
    let page = reqwest::get(format!("http://{addr}/metrics")).await.expect("metrics page").text().await.unwrap();
    page.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split_once(' '))
        .filter_map(|(name, value)| Some((name.to_owned(), value.trim().parse().ok()?)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_producer_reports_trades_reconnects_and_filled_gaps_as_metrics() {
    use cryptopulse::telemetry;
    let fake = FakeBinance::start(RATE, &[Behaviour::Drop { after: 3000 }], 0).await;
    let lane = Lane::new("producer-metrics");
    let addr = free_addr();
    let child = producer_command(&fake, &lane).args(["--metrics-addr", &addr.to_string()]).spawn().expect("producer binary");
    let _child = Killed(child);
    let total = fake.total() as f64;
    wait_for(|| async move { scrape(addr).await.get(telemetry::PRODUCER_TRADES) == Some(&total) }).await;
    let metrics = scrape(addr).await;
    assert_eq!(metrics[telemetry::WS_RECONNECTS], 1.0, "{metrics:?}");
    assert!(metrics[telemetry::GAPS_FOUND] >= 1.0, "{metrics:?}");
    assert!(metrics[telemetry::GAP_TRADES_FILLED] >= 1.0, "{metrics:?}");
    assert_eq!((metrics[telemetry::GAP_TRADES_UNFILLED], metrics[telemetry::PRODUCER_DEAD_LETTERS]), (0.0, 0.0), "{metrics:?}");
    assert_once_in_order(&fake, &lane);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_producers_leave_the_same_redis_output_as_an_uninterrupted_run() {
    let want = Lane::undisturbed("replayed").await;
    // About 10 s of trades; the producer is killed four times meanwhile.
    let fake = FakeBinance::start(1500, &[], 0).await;
    let lane = Lane::new("sigkill");
    let mut child = Killed(spawn_producer(&fake, &lane));
    // A symbol the topic has never seen starts with the first trade
    // streamed, so the first kill waits until both symbols were published.
    wait_for(|| {
        let lane = lane.clone();
        async move { tokio::task::spawn_blocking(move || topic_ids(&lane.kafka.brokers, &lane.kafka.topic).0.len() == 2).await.unwrap() }
    })
    .await;
    let seed = std::env::var("CRYPTOPULSE_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| std::process::id() as u64);
    let mut state = seed;
    for _ in 0..4 {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        tokio::time::sleep(Duration::from_millis(400 + (state >> 33) % 1600)).await;
        child.0.kill().expect("SIGKILL");
        child.0.wait().expect("reaped");
        child = Killed(spawn_producer(&fake, &lane));
    }
    let total = fake.total();
    wait_for(|| {
        let (lane, released) = (lane.clone(), fake.all_released());
        async move {
            released
                && tokio::task::spawn_blocking(move || {
                    topic_ids(&lane.kafka.brokers, &lane.kafka.topic).0.values().map(Vec::len).sum::<usize>()
                })
                .await
                .unwrap()
                    >= total
        }
    })
    .await;
    let status = std::process::Command::new("kill").args(["-TERM", &child.0.id().to_string()]).status().expect("kill");
    assert!(status.success());
    assert!(child.0.wait().expect("reaped").success(), "the producer exits cleanly on SIGTERM (seed {seed})");

    // Records a killed producer had in flight may be in the topic twice;
    // the ids, repeats removed, are the input's in order.
    let (ids, misplaced) = topic_ids(&lane.kafka.brokers, &lane.kafka.topic);
    assert_eq!(misplaced, 0);
    for (symbol, want) in fake.ids() {
        let mut got = ids[&symbol].clone();
        got.dedup();
        assert_eq!(got, want, "{symbol} (seed {seed})");
    }
    let consumed = lane.consume(tempfile::tempdir().unwrap().path()).await;
    assert_eq!(consumed.counts.applied, total as u64);
    assert_eq!(lane.digest().await.dump, want.dump, "seed {seed}");
}
