//! Criterion benches of the consumer's stages on the fixture trades:
//! Binance JSON -> Arrow batch, bars/VWAP/RSI over batches, both together
//! (the consumer's per-trade work on one core), the Redis encoding of the
//! bars of a batch, and a synced checkpoint write.

use std::hint::black_box;
use std::path::Path;

use arrow::array::RecordBatch;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use cryptopulse::checkpoint::{CheckpointStore, PartitionCheckpoint};
use cryptopulse::synth::{self, SynthConfig};
use cryptopulse::trade::{TradeBatchBuilder, TradeColumns};
use cryptopulse::window::{FinalBar, MetricNames, PartitionState, WindowConfig};
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

/// Decodes payloads into Arrow batches of up to `BATCH_ROWS`, as the source thread does.
fn decode_batches(payloads: &[Vec<u8>]) -> Vec<RecordBatch> {
    let mut builder = TradeBatchBuilder::with_capacity(BATCH_ROWS);
    let mut out = Vec::new();
    for chunk in payloads.chunks(BATCH_ROWS) {
        for payload in chunk {
            if let Ok(trade) = binance::decode(payload) {
                builder.push(&trade);
            }
        }
        out.extend(builder.finish().ok());
    }
    out
}

fn decode(c: &mut Criterion) {
    let payloads = payloads(&batches());
    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Elements(payloads.len() as u64));
    group.bench_function("binance_json_to_arrow", |b| b.iter(|| black_box(decode_batches(&payloads))));
    group.finish();
}

/// JSON in, bars out: the consumer's work per trade (the 3 M trades/s target).
fn decode_compute(c: &mut Criterion) {
    let payloads = payloads(&batches());
    let cfg = WindowConfig::default();
    let mut group = c.benchmark_group("decode_compute");
    group.throughput(Throughput::Elements(payloads.len() as u64));
    group.bench_function("json_to_bars", |b| {
        b.iter(|| {
            let mut state = PartitionState::default();
            let bars: usize =
                decode_batches(&payloads).iter().filter_map(|batch| state.apply(batch, &cfg).ok()).map(|out| out.bars.len()).sum();
            black_box(bars)
        })
    });
    group.finish();
}

/// `trades` generated trades over `symbols` symbols in trade-time order (as `gen`), in batches.
fn generated(symbols: usize, trades: u64) -> Vec<RecordBatch> {
    let Ok(dir) = tempfile::tempdir() else { return Vec::new() };
    let out = dir.path().join("gen.parquet");
    let config = SynthConfig { symbols, repeats: 1, trades: Some(trades) };
    if synth::generate(Path::new(ARCHIVE), &out, &config).is_err() {
        return Vec::new();
    }
    archive::open(&out, BATCH_ROWS).and_then(|r| r.map(|b| b.map_err(Into::into)).collect()).unwrap_or_default()
}

fn compute(c: &mut Criterion) {
    let cfg = WindowConfig::default();
    let mut group = c.benchmark_group("compute");
    for (name, batches) in [("bars_vwap_rsi", batches()), ("bars_vwap_rsi_1000_symbols", generated(1000, 200_000))] {
        let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
        group.throughput(Throughput::Elements(rows as u64));
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut state = PartitionState::default();
                let bars: usize = batches.iter().filter_map(|batch| state.apply(batch, &cfg).ok()).map(|out| out.bars.len()).sum();
                black_box(bars)
            })
        });
    }
    group.finish();
}

fn redis_encoding(c: &mut Criterion) {
    let cfg = WindowConfig::default();
    let mut state = PartitionState::default();
    let bars: Vec<_> = batches().iter().filter_map(|batch| state.apply(batch, &cfg).ok()).flat_map(|out| out.bars).collect();
    let names = cfg.names();
    let keys = sink::Keys { prefix: "cryptopulse".into() };
    let mut group = c.benchmark_group("redis");
    group.throughput(Throughput::Elements(bars.len() as u64));
    group.bench_function("bar_fields", |b| b.iter(|| black_box(bars.iter().map(|bar| sink::fields_of(bar, &names).len()).sum::<usize>())));
    group.bench_function("script_pipeline_bytes", |b| b.iter(|| black_box(script_pipeline(&bars, &keys, &names).len())));
    group.finish();
}

/// The bytes of the pipeline `sink::RedisSink` sends for `bars`: one
/// `EVALSHA` per symbol with its bars.
fn script_pipeline(bars: &[FinalBar], keys: &sink::Keys, names: &MetricNames) -> Vec<u8> {
    sink::bars_pipeline(&sink::write_script(), keys, names, 86_400_000, bars).get_packed_pipeline()
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

criterion_group!(benches, decode, compute, decode_compute, redis_encoding, checkpoint);
criterion_main!(benches);
