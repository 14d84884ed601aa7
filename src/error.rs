//! The one error type of the library: a variant per outside system, each
//! keeping its source, and a way to ask whether trying again may help.

use std::path::PathBuf;

use crate::binance::Reject;

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
    /// Redis no longer holds what this consumer wrote (restarted empty or
    /// flushed): its marker key is gone.
    #[error("redis lost the data under prefix {prefix:?} (its marker key is gone: restarted empty or flushed)")]
    RedisDataLost { prefix: String },
    /// Binance's WebSocket or REST endpoint failed, or answered with an error.
    #[error("binance: {context}: {detail}")]
    Binance { context: String, detail: String },
    /// The Prometheus exporter could not start (address in use, ...).
    #[error("metrics on {addr}: {reason}")]
    Metrics { addr: std::net::SocketAddr, reason: String },
    /// The configuration given cannot work.
    #[error("configuration: {0}")]
    Config(String),
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
            Error::Io { .. } | Error::Binance { .. } => true,
            _ => false,
        }
    }

    pub(crate) fn kafka(context: impl Into<String>, source: rdkafka::error::KafkaError) -> Self {
        Error::Kafka { context: context.into(), source }
    }

    pub(crate) fn redis(context: impl Into<String>, source: redis::RedisError) -> Self {
        Error::Redis { context: context.into(), source }
    }

    pub(crate) fn binance(context: impl Into<String>, detail: impl std::fmt::Display) -> Self {
        Error::Binance { context: context.into(), detail: detail.to_string() }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
