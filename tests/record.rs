//! `record` on files of frames: archives with the right metadata, rejects
//! written beside them, and no half-written file under a final name.

use std::io::Write;
use std::path::Path;

use cryptopulse::archive::{self, ArchiveSummary, ArchiveWriter, SymbolIds};
use cryptopulse::record;
use cryptopulse::trade::TradeColumns;

const FRAMES: &str = "fixtures/binance-spot-trades-2024-08-08.txt.gz";

#[test]
fn records_the_fixture_frames_with_id_metadata() {
    let out = tempfile::tempdir().unwrap();
    let recorded = record::record_frames(&[FRAMES.into()], out.path()).unwrap();
    let archive = out.path().join("binance-spot-trades-2024-08-08.parquet");
    assert_eq!(recorded[0].output, archive);
    assert_eq!((recorded[0].rejected, recorded[0].summary.rows), (0, 15_863));
    let summary = ArchiveSummary::read(&archive).unwrap();
    assert_eq!(summary, recorded[0].summary);
    assert_eq!(summary.symbols["BTCUSDT"], SymbolIds { first: 3_735_683_259, last: 3_735_693_015, count: 9_757, missing: vec![] });
    assert_eq!(summary.symbols["ETHUSDT"], SymbolIds { first: 1_520_538_925, last: 1_520_545_030, count: 6_106, missing: vec![] });
    let rows: usize = archive::open(&archive, 1000).unwrap().map(|b| b.unwrap().num_rows()).sum();
    assert_eq!(rows, 15_863);
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
    let batch = archive::open(Path::new("fixtures/binance-spot-trades-2024-08-08.parquet"), 100).unwrap().next().unwrap().unwrap();
    let mut writer = ArchiveWriter::create(&path).unwrap();
    writer.write(&batch).unwrap();
    drop(writer); // a recorder killed before finish
    assert!(!path.exists());
    let mut writer = ArchiveWriter::create(&path).unwrap();
    writer.write(&batch).unwrap();
    assert_eq!(writer.finish().unwrap().rows, 100);
    assert!(path.exists());
}
