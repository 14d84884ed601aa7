//! Criterion benches of the consumer's stages on the fixture trades:
//! Binance JSON -> Arrow batch, bars/VWAP/RSI over batches, the Redis field
//! encoding of bars, and a synced checkpoint write.

use std::hint::black_box;
use std::path::Path;

use arrow::array::RecordBatch;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use cryptopulse::checkpoint::{CheckpointStore, PartitionCheckpoint};
use cryptopulse::trade::{TradeBatchBuilder, TradeColumns};
use cryptopulse::window::{PartitionState, WindowConfig};
use cryptopulse::{archive, binance, sink};

const ARCHIVE: &str = "fixtures/binance-spot-trades-2024-08-08.parquet";
const BATCH_ROWS: usize = 8192;

fn batches() -> Vec<RecordBatch> {
    archive::open(Path::new(ARCHIVE), BATCH_ROWS).and_then(|r| r.map(|b| b.map_err(Into::into)).collect()).unwrap_or_default()
}

fn payloads(batches: &[RecordBatch]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for batch in batches {
        let Ok(cols) = TradeColumns::new(batch) else { continue };
        for row in 0..batch.num_rows() {
            let mut value = Vec::new();
            binance::encode(&cols.trade(row), &mut value);
            out.push(value);
        }
    }
    out
}

fn decode(c: &mut Criterion) {
    let payloads = payloads(&batches());
    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Elements(payloads.len() as u64));
    group.bench_function("binance_json_to_arrow", |b| {
        b.iter(|| {
            let mut builder = TradeBatchBuilder::with_capacity(BATCH_ROWS);
            let mut out = Vec::new();
            for chunk in payloads.chunks(BATCH_ROWS) {
                for payload in chunk {
                    if let Ok(trade) = binance::decode(payload) {
                        builder.push(&trade);
                    }
                }
                out.push(builder.finish());
            }
            black_box(out)
        })
    });
    group.finish();
}

fn compute(c: &mut Criterion) {
    let batches = batches();
    let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
    let cfg = WindowConfig::default();
    let mut group = c.benchmark_group("compute");
    group.throughput(Throughput::Elements(rows as u64));
    group.bench_function("bars_vwap_rsi", |b| {
        b.iter(|| {
            let mut state = PartitionState::default();
            let bars: usize = batches.iter().filter_map(|batch| state.apply(batch, &cfg).ok()).map(|out| out.bars.len()).sum();
            black_box(bars)
        })
    });
    group.finish();
}

fn redis_encoding(c: &mut Criterion) {
    let cfg = WindowConfig::default();
    let mut state = PartitionState::default();
    let bars: Vec<_> = batches().iter().filter_map(|batch| state.apply(batch, &cfg).ok()).flat_map(|out| out.bars).collect();
    let names = cfg.names();
    let mut group = c.benchmark_group("redis");
    group.throughput(Throughput::Elements(bars.len() as u64));
    group.bench_function("bar_fields", |b| b.iter(|| black_box(bars.iter().map(|bar| sink::fields_of(bar, &names).len()).sum::<usize>())));
    group.finish();
}

fn checkpoint(c: &mut Criterion) {
    let cfg = WindowConfig::default();
    let mut state = PartitionState::default();
    for batch in batches() {
        let _ = state.apply(&batch, &cfg);
    }
    let Ok(dir) = tempfile::tempdir() else { return };
    let Ok(store) = CheckpointStore::open(dir.path(), "bench") else { return };
    let checkpoint = PartitionCheckpoint { next_offset: 15_863, state };
    let mut group = c.benchmark_group("checkpoint");
    group.throughput(Throughput::Elements(1));
    group.bench_function("synced_write_2_symbols", |b| {
        b.iter_batched(|| checkpoint.clone(), |cp| store.save([(0, &cp)]).is_ok(), BatchSize::SmallInput)
    });
    group.finish();
}

criterion_group!(benches, decode, compute, redis_encoding, checkpoint);
criterion_main!(benches);
