//! `record` on files of frames: archives with the right metadata, rejects
//! written beside them, and no half-written file under a final name. And
//! on the live sources: Binance's streams (a fake one here) with the gap
//! filled from REST, and the Kafka topic, both rotating archives.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use cryptopulse::archive::{self, ArchiveSummary, ArchiveWriter, SymbolIds};
use cryptopulse::producer::StreamConfig;
use cryptopulse::record::{self, live};
use cryptopulse::trade::TradeColumns;

use crate::common::fixture::{ARCHIVE, FRAMES, TRADES};
use crate::common::{wait_for, Lane};
use crate::fake_binance::{Behaviour, FakeBinance};

#[test]
fn records_the_fixture_frames_with_id_metadata() {
    let out = tempfile::tempdir().unwrap();
    let recorded = record::record_frames(&[FRAMES.into()], out.path()).unwrap();
    let archive = out.path().join("binance-spot-trades-2024-08-08.parquet");
    assert_eq!(recorded[0].output, archive);
    assert_eq!((recorded[0].rejected, recorded[0].summary.rows), (0, TRADES));
    let summary = ArchiveSummary::read(&archive).unwrap();
    assert_eq!(summary, recorded[0].summary);
    assert_eq!(summary.symbols["BTCUSDT"], SymbolIds { first: 3_735_683_259, last: 3_735_693_015, count: 9_757, missing: vec![] });
    assert_eq!(summary.symbols["ETHUSDT"], SymbolIds { first: 1_520_538_925, last: 1_520_545_030, count: 6_106, missing: vec![] });
    let rows: usize = archive::open(&archive, 1000).unwrap().map(|b| b.unwrap().num_rows()).sum();
    assert_eq!(rows as u64, TRADES);
    let leftovers: Vec<_> = std::fs::read_dir(out.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 1, "{leftovers:?}");
}

#[test]
fn bad_lines_are_reported_beside_the_archive_and_gaps_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("mixed.txt");
    let mut file = std::fs::File::create(&input).unwrap();
    let trade = |id: i64, price: &str| {
        format!(r#"{{"e":"trade","E":1,"s":"BTCUSDT","t":{id},"p":"{price}","q":"1.0","T":1000,"m":true,"M":true}}"#)
    };
    writeln!(file, "1723161254087896568 {{\"stream\":\"btcusdt@trade\",\"data\":{}}}", trade(10, "1.5")).unwrap();
    writeln!(file, "{}", trade(11, "-1")).unwrap();
    writeln!(file, "{{\"result\":null,\"id\":1}}").unwrap();
    writeln!(file, "{}", trade(14, "2.5")).unwrap();
    writeln!(file, "{{\"stream\":\"btcusdt@trade\",\"da").unwrap();
    drop(file);

    let out = dir.path().join("out");
    let recorded = record::record_frames(&[input], &out).unwrap();
    assert_eq!((recorded[0].summary.rows, recorded[0].rejected, recorded[0].other_frames), (2, 2, 1));
    assert_eq!(recorded[0].summary.symbols["BTCUSDT"].missing, vec![[11, 13]]);
    let rejects = std::fs::read_to_string(out.join("mixed.rejects.jsonl")).unwrap();
    let reasons: Vec<String> =
        rejects.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["reason"].as_str().unwrap().to_owned()).collect();
    assert_eq!(reasons, vec!["bad_price", "malformed_json"]);
    let batch = archive::open(&out.join("mixed.parquet"), 10).unwrap().next().unwrap().unwrap();
    assert_eq!(TradeColumns::new(&batch).unwrap().id.values().to_vec(), vec![10, 14]);
}

#[test]
fn an_unfinished_archive_never_appears_under_its_final_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("partial.parquet");
    let batch = archive::open(Path::new(ARCHIVE), 100).unwrap().next().unwrap().unwrap();
    let mut writer = ArchiveWriter::create(&path).unwrap();
    writer.write(&batch).unwrap();
    drop(writer); // a recorder killed before finish
    assert!(!path.exists());
    let mut writer = ArchiveWriter::create(&path).unwrap();
    writer.write(&batch).unwrap();
    assert_eq!(writer.finish().unwrap().rows, 100);
    assert!(path.exists());
}

/// The live archives of `dir` in the order they were opened, and the trade
/// ids of each symbol across them in that order.
fn live_archives(dir: &Path) -> (usize, HashMap<String, Vec<i64>>) {
    let mut names: Vec<(u128, u64, std::path::PathBuf)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter_map(|path| {
            let name = path.file_name()?.to_str()?.to_owned();
            let stem = name.strip_prefix("trades-")?.strip_suffix(".parquet")?;
            let (ms, n) = stem.split_once('-')?;
            Some((ms.parse().ok()?, n.parse().ok()?, path))
        })
        .collect();
    names.sort();
    let mut ids: HashMap<String, Vec<i64>> = HashMap::new();
    for (_, _, path) in &names {
        for batch in archive::open(path, 4096).unwrap() {
            let batch = batch.unwrap();
            let cols = TradeColumns::new(&batch).unwrap();
            for row in 0..batch.num_rows() {
                ids.entry(cols.symbol_at(row).to_owned()).or_default().push(cols.id.value(row));
            }
        }
    }
    (names.len(), ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recording_the_live_streams_fills_the_gap_from_rest_and_rotates() {
    let fake = FakeBinance::start(5000, &[Behaviour::Drop { after: 3000 }], 0).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = StreamConfig::new(fake.symbols(), &fake.ws_url, &fake.rest_url);
    config.silence_timeout = Duration::from_secs(2);
    let rotation = live::Rotation { max_bytes: 128 << 10, max_age: Duration::from_millis(500) };
    let total = fake.total();
    let path = dir.path().to_owned();
    // Stops once the completed archives hold every trade: the last one is
    // closed by age although no trade follows.
    let done = async move {
        wait_for(|| {
            let path = path.clone();
            async move { live_archives(&path).1.values().map(Vec::len).sum::<usize>() >= total }
        })
        .await
    };
    let recorded = live::record_stream(&config, dir.path(), rotation, done).await.expect("record");
    assert_eq!(recorded.stream.reconnects, 1, "{recorded:?}");
    assert!(recorded.stream.rest_requests >= 1, "the gap was filled from REST: {recorded:?}");
    assert_eq!((recorded.unfilled, recorded.rejected, recorded.duplicates), (0, 0, 0));
    let (files, ids) = live_archives(dir.path());
    assert!(files >= 2, "rotated into {files} archives");
    assert_eq!(files, recorded.archives.len());
    assert_eq!(ids, fake.ids(), "every trade once, in id order per symbol");
    assert!(!dir.path().join("gaps.jsonl").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recording_the_topic_leaves_duplicates_out_and_resumes_from_committed_offsets() {
    let lane = Lane::new("record-topic");
    // The fixtures twice: every trade arrives a second time; clock records
    // of the producer between them are no trades and no rejects.
    lane.replay(None, None).await;
    lane.produce_clock(1_723_100_000_000).await;
    lane.replay(None, None).await;
    let dir = tempfile::tempdir().unwrap();
    let rotation = live::Rotation { max_bytes: 128 << 10, max_age: Duration::from_secs(3600) };
    let group = format!("{}-record", lane.name);
    let (kafka, path) = (lane.kafka.clone(), dir.path().to_owned());
    let stop = cryptopulse::kafka::stop_flag();
    let first = tokio::task::spawn_blocking(move || live::record_topic(&kafka, &group, &path, rotation, true, &stop))
        .await
        .unwrap()
        .expect("record");
    let rows: u64 = first.archives.iter().map(|(_, s)| s.rows).sum();
    assert_eq!((rows, first.duplicates, first.rejected, first.unfilled), (TRADES, TRADES, 0, 0));
    assert!(first.archives.len() >= 2, "rotated by size");
    let (_, ids) = live_archives(dir.path());
    let mut want: HashMap<String, Vec<i64>> = HashMap::new();
    for symbol in ["BTCUSDT", "ETHUSDT"] {
        let summary = ArchiveSummary::read(Path::new(ARCHIVE)).unwrap();
        let range = &summary.symbols[symbol];
        want.insert(symbol.to_owned(), (range.first..=range.last).collect());
    }
    assert_eq!(ids, want);

    // Offsets were committed: a second run finds nothing new.
    let (kafka, group, path) = (lane.kafka.clone(), format!("{}-record", lane.name), dir.path().to_owned());
    let stop = cryptopulse::kafka::stop_flag();
    let second = tokio::task::spawn_blocking(move || live::record_topic(&kafka, &group, &path, rotation, true, &stop))
        .await
        .unwrap()
        .expect("record");
    assert_eq!((second.archives.len(), second.duplicates), (0, 0));
}

/// Every final bar of an archive, one symbol's state per symbol.
fn bars_of(path: &Path) -> Vec<(String, i64, cryptopulse::window::Bar)> {
    let cfg = cryptopulse::window::WindowConfig::default();
    let mut state = cryptopulse::window::PartitionState::default();
    let mut bars = Vec::new();
    for batch in archive::open(path, 1000).unwrap() {
        bars.extend(state.apply(&batch.unwrap(), &cfg).unwrap().bars.into_iter().map(|b| (b.symbol, b.end, b.bar)));
    }
    bars.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    bars
}

#[test]
fn binance_dumps_in_either_time_unit_give_the_bars_of_the_same_trades_from_frames() {
    let dir = tempfile::tempdir().unwrap();
    // The fixture frames as Binance's public dumps would hold them: BTCUSDT
    // as a 2024 CSV (ms) with the header newer dumps carry, ETHUSDT zipped
    // with times in µs as the 2025 dumps have them (and a sub-ms part).
    let text = {
        use std::io::Read;
        let mut text = String::new();
        flate2::read::MultiGzDecoder::new(std::fs::File::open(FRAMES).unwrap()).read_to_string(&mut text).unwrap();
        text
    };
    let (mut btc, mut eth) = (String::from("id,price,qty,quote_qty,time,is_buyer_maker,is_best_match\n"), String::new());
    for line in text.lines() {
        let frame: serde_json::Value = serde_json::from_str(line.split_once(' ').unwrap().1).unwrap();
        let d = &frame["data"];
        let maker = if d["m"].as_bool().unwrap() { "True" } else { "False" };
        let (id, p, q, t) = (d["t"].as_i64().unwrap(), d["p"].as_str().unwrap(), d["q"].as_str().unwrap(), d["T"].as_i64().unwrap());
        match d["s"].as_str().unwrap() {
            "BTCUSDT" => btc.push_str(&format!("{id},{p},{q},0,{t},{maker},True\n")),
            _ => eth.push_str(&format!("{id},{p},{q},0,{}{:03},{maker},True\n", t, id % 1000)),
        }
    }
    let btc_csv = dir.path().join("BTCUSDT-trades-2024-08-08.csv");
    std::fs::write(&btc_csv, btc).unwrap();
    let eth_zip = dir.path().join("ETHUSDT-trades-2024-08-08.zip");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&eth_zip).unwrap());
    zip.start_file("ETHUSDT-trades-2024-08-08.csv", zip::write::SimpleFileOptions::default()).unwrap();
    zip.write_all(eth.as_bytes()).unwrap();
    zip.finish().unwrap();

    let out = dir.path().join("out");
    let imported = record::binance_csv::import(&[btc_csv, eth_zip], &out, None).unwrap();
    assert_eq!(imported.iter().map(|r| (r.summary.rows, r.rejected)).collect::<Vec<_>>(), [(9_757, 0), (6_106, 0)]);
    let mut from_dumps: Vec<_> = imported.iter().flat_map(|r| bars_of(&r.output)).collect();
    from_dumps.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    let from_frames = bars_of(&record::record_frames(&[FRAMES.into()], &dir.path().join("frames")).unwrap()[0].output);
    assert_eq!(from_dumps.len() as u64, crate::common::fixture::BARS);
    assert_eq!(from_dumps, from_frames);

    // A dump without the symbol in its name needs --symbol; a bad row is a reject.
    let odd = dir.path().join("trades.csv");
    std::fs::write(&odd, "1,100.0,1.0,100.0,1723161255000,True,True\n2,abc,1.0,0,1723161255001,False,True\n3,1.0,1.0,1.0,1723161255002\n")
        .unwrap();
    assert!(record::binance_csv::import(std::slice::from_ref(&odd), &out, None).unwrap_err().to_string().contains("--symbol"));
    let imported = record::binance_csv::import(&[odd], &out, Some("BTCUSDT")).unwrap();
    assert_eq!((imported[0].summary.rows, imported[0].rejected), (1, 2));
    let rejects = std::fs::read_to_string(out.join("trades.rejects.jsonl")).unwrap();
    assert!(rejects.contains("bad_price") && rejects.contains("7 comma-separated fields"), "{rejects}");
}
