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
//! | source    | [`producer`] (live, with its [`producer::StreamArgs`]), [`binance`] (the wire format), [`archive`] (Parquet), [`record`], [`replay`], [`synth`] (larger inputs) |
//! | transport | [`kafka`] (flags and client settings, [`kafka::admin`] topics, [`kafka::dead_letter`], [`kafka::fetch`] records in batches: the one `unsafe` module) |
//! | compute   | [`trade`] (the Arrow schema), [`decimal`], [`window`] (bars, VWAP, RSI, their flags), [`rejection`] (why a record is turned away) |
//! | state     | [`checkpoint`] |
//! | sink      | [`sink`] (Redis writes and their flags) |
//! | wiring    | [`consumer`] (its source, loop and writer), [`cli`] (logging and shutdown, shared by every binary) |
//! | health    | [`telemetry`] (Prometheus names, exporter, heartbeat and flags), [`error`], [`crash_point`] (for the crash harness), [`secret`] (secrets from the environment, never shown) |
//! | tools     | [`tooling`]: [`tooling::bench`], [`tooling::crashtest`], [`tooling::doctor`], [`tooling::digest`] (canonical dump) |
//!
//! Modules depend downward only: `scripts/check-layers` fails on a `use`
//! cycle between them.

#![deny(unsafe_code)]

pub mod archive;
pub mod binance;
pub mod checkpoint;
pub mod cli;
pub mod consumer;
pub mod crash_point;
pub mod decimal;
pub mod error;
pub mod kafka;
pub mod producer;
pub mod record;
pub mod rejection;
pub mod replay;
pub mod secret;
pub mod sink;
pub mod synth;
pub mod telemetry;
pub mod tooling;
pub mod trade;
pub mod window;

pub use error::{Error, Result};
