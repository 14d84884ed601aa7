//! CryptoPulse: Binance spot trades in, exact 1-second bars, VWAP and RSI
//! out, exactly once through crashes.
//!
//! The producer reads Binance's trade streams and publishes each event to
//! Kafka keyed by symbol. The consumer reads those records in Arrow record
//! batches, one per partition, computes bars and metrics over whole columns,
//! writes them to Redis with idempotent scripts, and then checkpoints the
//! window state of each partition together with that partition's next offset
//! in one synced RocksDB batch. After a crash it resumes from its checkpoint
//! and rewrites the same bars, so Redis ends as if nothing had happened.
//! `record` and `replay` move trades between Kafka-shaped JSON and Parquet.
//!
//! | role      | module |
//! |-----------|--------|
//! | source    | [`producer`] (live), [`binance`] (wire format), [`archive`] (Parquet), [`record`], [`replay`], [`synth`] (larger inputs) |
//! | transport | [`kafka`], [`fetch`] (records in batches; the one `unsafe` module) |
//! | compute   | [`trade`] (the Arrow schema), [`decimal`], [`window`] |
//! | state     | [`checkpoint`] |
//! | sink      | [`sink`] (Redis writes), [`digest`] (canonical dump) |
//! | wiring    | [`pipeline`] (the consumer loop and its writer), [`cli`] (shared flags) |
//! | health    | [`metrics`] (Prometheus names and exporter), [`doctor`] (service checks) |
//! | tools     | [`bench`] (throughput, CPU, memory, latency), [`crashtest`] |

#![deny(unsafe_code)]

pub mod archive;
pub mod bench;
pub mod binance;
pub mod checkpoint;
pub mod cli;
pub mod crashtest;
pub mod decimal;
pub mod digest;
pub mod doctor;
pub mod error;
pub mod faults;
pub mod fetch;
pub mod kafka;
pub mod metrics;
pub mod pipeline;
pub mod producer;
pub mod record;
pub mod replay;
pub mod sink;
pub mod synth;
pub mod trade;
pub mod window;

pub use error::{Error, Result};
