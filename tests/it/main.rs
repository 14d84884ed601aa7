//! The integration tests: one binary, a module per area, against the real
//! broker and Redis that `scripts/test` starts (each test on a lane of its
//! own, so they run in parallel) and local fakes. Tests that need a service
//! to themselves are binaries of their own beside this directory
//! (`tests/broker_restart.rs`).
//!
//! - `common`: lanes (topic, dead-letter topic, Redis prefix per test), the
//!   fixtures' facts, and a real Prometheus (`common::prometheus`)
//! - `fake_binance`: a local Binance, WebSocket and REST, replaying the fixtures
//! - `bench`: the benchmark tool end to end on a tiny input
//! - `cluster`: the consumer, `latest` and `digest` against a Redis Cluster (scripts/redis-cluster)
//! - `compose`: docker-compose.yml and the Prometheus config, checked statically
//! - `crash`: the consumer SIGKILLed and aborted at every crash point
//! - `dashboard`: the Grafana dashboards' queries against what the pipeline wrote
//! - `doctor`: the `doctor` binary against running and absent services
//! - `hostile`: records of any size and implausible trades; a state dir's settings
//! - `live`: live mode's idle finalization and late trades
//! - `metrics`: what Prometheus scrapes from the consumer and producer
//! - `pipeline`: replay, consume, and what Redis holds; dead letters
//! - `producer`: the producer against the fake Binance misbehaving
//! - `properties`: property tests of the decoder and the bars (proptest)
//! - `record`: archives from frames, from the live streams and from the topic
//! - `recovery`: a bad checkpoint, a second owner, Redis paused or emptied
//! - `reference`: every bar against exact decimal arithmetic and shipped values
//! - `secrets`: no secret from a flag or in `--help`; a Redis password from a file
//! - `security`: SASL_SSL and SSL with ACLs (scripts/secure-kafka): end to end as a limited account, wrong settings
//! - `services`: `scripts/services clean-tests` and the lane names it matches
//! - `sink`: the Redis sink written in any cut, and its retention

mod common;
mod fake_binance;

mod bench;
mod cluster;
mod compose;
mod crash;
mod dashboard;
mod doctor;
mod group;
mod hostile;
mod live;
mod metrics;
mod pipeline;
mod producer;
mod properties;
mod record;
mod recovery;
mod reference;
mod secrets;
mod security;
mod services;
mod sink;
