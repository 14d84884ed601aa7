//! The one error type of the library: a variant per outside system, each
//! keeping its source, one per kind of failure of our own (configuration,
//! invalid data, a failed or panicked task, a broken invariant, a timeout),
//! and a way to ask whether trying again may help.

use std::path::PathBuf;

use crate::rejection::Reject;

/// Everything that can go wrong in the library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Talking to the Kafka broker failed.
    #[error("kafka: {context}: {source}")]
    Kafka {
        context: String,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    /// Talking to Redis failed.
    #[error("redis: {context}: {source}")]
    Redis {
        context: String,
        #[source]
        source: redis::RedisError,
    },
    /// The RocksDB checkpoint store failed.
    #[error("checkpoint store {path}: {source}")]
    Checkpoint {
        path: PathBuf,
        #[source]
        source: rocksdb::Error,
    },
    /// The checkpoint store holds something this build cannot use.
    #[error("checkpoint store {path}: {reason}")]
    CheckpointFormat { path: PathBuf, reason: String },
    /// Building or reading Arrow data failed.
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    /// Reading or writing a Parquet archive failed.
    #[error("parquet {path}: {source}")]
    Parquet {
        path: PathBuf,
        #[source]
        source: parquet::errors::ParquetError,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A payload that is not a valid trade; keeps the payload itself.
    #[error("cannot decode trade ({reason}: {detail}): {}", String::from_utf8_lossy(payload))]
    Decode { reason: Reject, detail: String, payload: Vec<u8> },
    /// Redis no longer holds bars this consumer wrote for these symbols
    /// (restarted empty, flushed, a key evicted, a failover, a hand edit):
    /// their keys were missing or incomplete, and are now deleted.
    #[error("redis lost bars of {} symbol(s) under prefix {prefix:?} ({}): their keys were missing or incomplete", symbols.len(), crate::error::first_few(symbols))]
    RedisDataLost { prefix: String, symbols: Vec<String> },
    /// Binance's WebSocket or REST endpoint failed, or answered with an error.
    #[error("binance: {context}: {detail}")]
    Binance { context: String, detail: String },
    /// The Prometheus exporter could not start (address in use, ...).
    #[error("metrics on {addr}: {reason}")]
    Metrics { addr: std::net::SocketAddr, reason: String },
    /// The flags and settings given cannot work together, or with what they
    /// point at (a topic that does not exist, a state dir of another topic).
    #[error("configuration: {0}")]
    Config(String),
    /// Data read from outside is not what it should be: a file that is not
    /// a trade archive, a child program's output without its summary.
    #[error("invalid data in {what}: {detail}")]
    InvalidData { what: String, detail: String },
    /// A task or thread of ours ended without doing its work: it stopped
    /// early on another error, was cancelled, or its child process failed.
    #[error("{task} failed: {detail}")]
    TaskFailed { task: String, detail: String },
    /// A task or thread of ours panicked: a bug.
    #[error("{task} panicked")]
    Panicked { task: String },
    /// Something that cannot happen happened: a bug.
    #[error("internal invariant broken: {0}")]
    Invariant(String),
    /// Waiting for something took longer than it may.
    #[error("{what} took longer than {after:?}")]
    Timeout { what: String, after: std::time::Duration },
}

impl Error {
    /// Whether the same operation may succeed if tried again later
    /// (a broker or Redis that went away), as opposed to bad input or a bug.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Kafka { source, .. } => {
                source.rdkafka_error_code().is_some_and(|code| !matches!(code, rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition))
            }
            Error::Redis { source, .. } => {
                source.is_io_error()
                    || source.is_connection_dropped()
                    || source.is_connection_refusal()
                    || source.is_timeout()
                    || matches!(
                        source.kind(),
                        redis::ErrorKind::BusyLoadingError | redis::ErrorKind::TryAgain | redis::ErrorKind::NoScriptError
                    )
            }
            Error::Io { .. } | Error::Binance { .. } | Error::Timeout { .. } => true,
            Error::Checkpoint { .. }
            | Error::CheckpointFormat { .. }
            | Error::Arrow(_)
            | Error::Parquet { .. }
            | Error::Decode { .. }
            | Error::RedisDataLost { .. }
            | Error::Metrics { .. }
            | Error::Config(_)
            | Error::InvalidData { .. }
            | Error::TaskFailed { .. }
            | Error::Panicked { .. }
            | Error::Invariant(_) => false,
        }
    }

    pub(crate) fn kafka(context: impl Into<String>, source: rdkafka::error::KafkaError) -> Self {
        Error::Kafka { context: context.into(), source }
    }

    /// A Redis error; an ACL refusal (NOPERM) says what the user needs.
    pub(crate) fn redis(context: impl Into<String>, source: redis::RedisError) -> Self {
        let context = context.into();
        if source.code() == Some("NOPERM") {
            return Error::Config(format!(
                "redis refused to {context} ({source}): the ACL user needs the keys under --redis-prefix (`~PREFIX:*`) \
                 and the commands listed in docs/security.md"
            ));
        }
        Error::Redis { context, source }
    }

    pub(crate) fn binance(context: impl Into<String>, detail: impl std::fmt::Display) -> Self {
        Error::Binance { context: context.into(), detail: detail.to_string() }
    }

    pub(crate) fn invalid_data(what: impl Into<String>, detail: impl std::fmt::Display) -> Self {
        Error::InvalidData { what: what.into(), detail: detail.to_string() }
    }

    pub(crate) fn task_failed(task: impl Into<String>, detail: impl std::fmt::Display) -> Self {
        Error::TaskFailed { task: task.into(), detail: detail.to_string() }
    }

    /// A task that was joined and did not finish: panicked or cancelled.
    pub(crate) fn join(task: impl Into<String>, error: tokio::task::JoinError) -> Self {
        let task = task.into();
        if error.is_panic() {
            Error::Panicked { task }
        } else {
            Error::TaskFailed { task, detail: error.to_string() }
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Up to five of `items`, and how many more: for messages about long lists.
pub fn first_few(items: &[String]) -> String {
    const SHOWN: usize = 5;
    let mut text = items.iter().take(SHOWN).map(String::as_str).collect::<Vec<_>>().join(", ");
    if items.len() > SHOWN {
        text.push_str(&format!(" and {} more", items.len() - SHOWN));
    }
    text
}
