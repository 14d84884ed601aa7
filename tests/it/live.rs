//! Live mode (`--idle-finalize-ms`) through the real broker and Redis: a
//! symbol that goes quiet still gets its last bar written once a clock
//! record of the producer is that far past the bar's end, and a trade for
//! that second which comes afterwards is late (data contract §3, §5).

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cryptopulse::consumer;
use redis::AsyncCommands;

use crate::common::{wait_for, Lane};

const SYMBOL: &str = "LIVEUSDT";

fn trade(id: u64, time: i64, price: &str, qty: &str) -> String {
    format!(r#"{{"e":"trade","E":{time},"s":"{SYMBOL}","t":{id},"p":"{price}","q":"{qty}","T":{time},"m":false,"M":true}}"#)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_symbols_bar_is_written_after_the_idle_time_and_a_trade_for_it_then_is_late() {
    let lane = Lane::new("live");
    lane.kafka.ensure_topics().await.unwrap();
    let state = tempfile::tempdir().unwrap();
    let mut config = lane.consumer_config(state.path());
    config.exit_at_end = false;
    config.idle_finalize = Some(Duration::from_millis(300));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let consumer = tokio::spawn(consumer::run(config, async move {
        let _ = stopped.await;
    }));

    // Two trades in the current second, and none after them.
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64;
    let start = now - now % 1000;
    let (first, second) = (trade(1, start + 1, "100.00000000", "1.00000000"), trade(2, start + 2, "102.00000000", "3.00000000"));
    lane.produce(SYMBOL, &[&first, &second]).await;
    // The producer's clock 299 ms past the bar's end: not final yet; the
    // next clock, 300 ms past, makes it final.
    lane.produce_clock(start + 1299).await;
    let mut redis = lane.redis().await;
    let latest = lane.keys().latest(SYMBOL);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!redis.exists::<_, bool>(&latest).await.unwrap(), "a bar final before its idle time passed by the producer's clock");
    lane.produce_clock(start + 1300).await;

    wait_for(|| {
        let (mut redis, latest) = (redis.clone(), latest.clone());
        async move { redis.exists::<_, bool>(&latest).await.unwrap() }
    })
    .await;
    let hash: HashMap<String, String> = redis.hgetall(&latest).await.unwrap();
    assert_eq!(hash["window_end"], (start + 1000).to_string(), "{hash:?}");
    assert_eq!((hash["close"].as_str(), hash["volume"].as_str(), hash["trades"].as_str()), ("102.00000000", "4.00000000", "2"), "{hash:?}");
    let stream = lane.keys().bars(SYMBOL);
    let entries: redis::streams::StreamRangeReply = redis.xrange_all(&stream).await.unwrap();
    let ids: Vec<&str> = entries.ids.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, [format!("{}-0", start + 1000)]);

    // The bar is final: a newer trade for its second changes nothing.
    let late = trade(3, start + 500, "90.00000000", "1.00000000");
    lane.produce(SYMBOL, &[&late]).await;
    let letters = lane.dead_letters(1);
    assert_eq!(letters.len(), 1, "{letters:?}");
    let (headers, payload) = &letters[0];
    assert!(headers.contains(&("reason".to_owned(), "late".to_owned())), "{headers:?}");
    assert_eq!(payload, late.as_bytes());

    let _ = stop.send(());
    let summary = consumer.await.unwrap().unwrap();
    assert_eq!((summary.counts.applied, summary.counts.late, summary.counts.bars), (2, 1, 1), "{:?}", summary.counts);
    let after: HashMap<String, String> = redis.hgetall(&latest).await.unwrap();
    assert_eq!(after, hash, "the late trade left the bar as it was");
}
