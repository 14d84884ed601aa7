//! The library's tooling: what the tool binaries run beside the pipeline,
//! and what the tests use to judge it. Nothing in the pipeline depends on
//! anything here.
//!
//! | tool | module |
//! |---|---|
//! | throughput, CPU, memory and latency of the real binaries | [`bench`] |
//! | SIGKILLs and crash points against an uncrashed reference | [`crashtest`] |
//! | seeded mutants of real trades, every record accounted for | [`hostile`] |
//! | are the services up and wired as the pipeline needs | [`doctor`] |
//! | a canonical dump and SHA-256 of what is in Redis | [`digest`] |

pub mod bench;
pub mod crashtest;
pub mod digest;
pub mod doctor;
pub mod hostile;

use std::path::PathBuf;

use crate::kafka::KafkaArgs;
use crate::sink::RedisArgs;

/// A seeded harness run (`crashtest`, `hostile`): the seed given, or one
/// from the clock, and the run's name `<tool>-<seed>-<unix seconds>`,
/// added as `.<name>` to the topics and key prefix given, which are stems,
/// so every run has its own.
pub fn own_run(tool: &str, seed: Option<u64>, kafka: &mut KafkaArgs, redis: &mut RedisArgs) -> crate::Result<(u64, String)> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| crate::Error::Config("the clock is before 1970".into()))?;
    let seed = seed.unwrap_or(now.as_nanos() as u64);
    let run = format!("{tool}-{seed}-{}", now.as_secs());
    kafka.topic = format!("{}.{run}", kafka.topic);
    kafka.dlq_topic = format!("{}.{run}", kafka.dlq_topic);
    redis.target.prefix = format!("{}.{run}", redis.target.prefix);
    Ok((seed, run))
}

/// The consumer binary a harness runs: `given`, or `consumer` beside it.
pub fn consumer_bin(given: Option<PathBuf>) -> std::io::Result<PathBuf> {
    match given {
        Some(path) => Ok(path),
        None => Ok(std::env::current_exe()?.with_file_name("consumer")),
    }
}
