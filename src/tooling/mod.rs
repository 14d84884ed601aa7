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
