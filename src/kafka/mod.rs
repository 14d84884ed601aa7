//! Kafka plumbing shared by every binary that talks to the broker: the
//! connection flags ([`KafkaArgs`]) and the librdkafka settings made from
//! them, topic administration ([`admin`]), the dead-letter producer
//! ([`dead_letter`]) and records fetched in batches ([`fetch`]). It knows
//! nothing of trades beyond the reason a record was turned away.

pub mod admin;
pub mod dead_letter;
pub mod fetch;
pub mod probe;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use rdkafka::ClientConfig;
use tracing::warn;

use crate::error::{Error, Result};
use crate::secret;
pub use admin::partitions_of;
pub use dead_letter::{DeadLetter, DeadLetters};

pub const DEFAULT_BROKERS: &str = "127.0.0.1:9092";
pub const DEFAULT_TOPIC: &str = "trades.raw";
pub const DEFAULT_DLQ_TOPIC: &str = "trades.dlq";
pub const DEFAULT_PARTITIONS: i32 = 6;
pub const DEFAULT_TOPIC_RETENTION_BYTES: i64 = 1 << 30;

/// Where Kafka is and what to pass to librdkafka. Its `Debug` hides the
/// values of secret properties.
#[derive(Args, Clone)]
pub struct KafkaArgs {
    /// Bootstrap brokers, host:port[,host:port...].
    #[arg(long, env = "CRYPTOPULSE_BROKERS", default_value = DEFAULT_BROKERS)]
    pub brokers: String,
    /// Topic of raw trades.
    #[arg(long, env = "CRYPTOPULSE_TOPIC", default_value = DEFAULT_TOPIC)]
    pub topic: String,
    /// Dead-letter topic for records that are not usable trades.
    #[arg(long, env = "CRYPTOPULSE_DLQ_TOPIC", default_value = DEFAULT_DLQ_TOPIC)]
    pub dlq_topic: String,
    /// Partitions of the raw topic when this program creates it.
    #[arg(long, env = "CRYPTOPULSE_PARTITIONS", default_value_t = DEFAULT_PARTITIONS, value_parser = clap::value_parser!(i32).range(1..=10_000))]
    pub partitions: i32,
    /// Bytes kept per partition of the topics this program creates. Their
    /// time retention is off: record timestamps are trade times, and a
    /// replay of old trades would be deleted minutes after it was written.
    #[arg(long, env = "CRYPTOPULSE_TOPIC_RETENTION_BYTES", default_value_t = DEFAULT_TOPIC_RETENTION_BYTES, value_parser = clap::value_parser!(i64).range(1 << 20..))]
    pub topic_retention_bytes: i64,
    /// Any librdkafka property, as kcat takes it: `-X key=value`, repeatable.
    /// Secrets (`sasl.password`, ...) are refused here: they go in the
    /// environment twin or the properties file.
    #[arg(short = 'X', value_name = "KEY=VALUE", value_parser = parse_key_value, env = "CRYPTOPULSE_KAFKA_PROPERTIES", value_delimiter = ';', hide_env_values = true)]
    pub properties: Vec<(String, String)>,
    /// A file of librdkafka properties, `key=value` per line (`#` comments):
    /// the place for secrets such as `sasl.password`.
    #[arg(long, env = "CRYPTOPULSE_KAFKA_CONFIG_FILE")]
    pub kafka_config_file: Option<PathBuf>,
    /// Never create a topic, even one that is missing: for accounts that
    /// may only read and write their topics. Without it, only topics found
    /// missing are created.
    #[arg(long, env = "CRYPTOPULSE_NO_CREATE_TOPICS")]
    pub no_create_topics: bool,
}

impl std::fmt::Debug for KafkaArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let properties: Vec<(&str, &str)> = self.properties.iter().map(|(k, v)| (k.as_str(), secret::redact_property(k, v))).collect();
        f.debug_struct("KafkaArgs")
            .field("brokers", &self.brokers)
            .field("topic", &self.topic)
            .field("dlq_topic", &self.dlq_topic)
            .field("partitions", &self.partitions)
            .field("topic_retention_bytes", &self.topic_retention_bytes)
            .field("properties", &properties)
            .field("kafka_config_file", &self.kafka_config_file)
            .field("no_create_topics", &self.no_create_topics)
            .finish()
    }
}

/// Header of a clock record: a record of the raw topic without a key that
/// carries the producer's clock (ms since the epoch, in decimal) instead
/// of a trade. The producer writes one to every partition about once a
/// second; a consumer in live mode finalizes a quiet symbol's bar by it
/// (data contract §3), so every reader of the partition decides alike.
pub const CLOCK_HEADER: &str = "cryptopulse.clock";

/// Whether a record read with rdkafka's own API is a clock record (the
/// consumer's fetch path checks [`fetch::Record::clock`] instead).
pub fn is_clock(message: &impl rdkafka::Message) -> bool {
    use rdkafka::message::Headers;
    message.key().is_none() && message.headers().is_some_and(|headers| headers.iter().any(|h| h.key == CLOCK_HEADER))
}

/// How long metadata and admin requests may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

impl KafkaArgs {
    /// librdkafka settings: brokers, then the properties file, then `-X`.
    pub fn client_config(&self) -> Result<ClientConfig> {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        if let Some(path) = &self.kafka_config_file {
            let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
            for (key, value) in read_properties(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))? {
                config.set(key, value);
            }
        }
        for (key, value) in &self.properties {
            config.set(key, value);
        }
        Ok(config)
    }

    /// Settings of an idempotent producer that keeps each partition in order.
    /// murmur2 is the Java client's partitioner: any client keyed by symbol
    /// sends a symbol to the same partition.
    pub fn producer_config(&self) -> Result<ClientConfig> {
        self.config_with(&[
            ("enable.idempotence", "true"),
            ("acks", "all"),
            ("compression.type", "lz4"),
            ("linger.ms", "5"),
            ("batch.size", "1000000"),
            ("partitioner", "murmur2_random"),
        ])
    }

    /// `defaults`, overridden by the user's settings.
    pub fn config_with(&self, defaults: &[(&str, &str)]) -> Result<ClientConfig> {
        let mut config = ClientConfig::new();
        for (key, value) in defaults {
            config.set(*key, *value);
        }
        for (key, value) in self.client_config()?.config_map() {
            config.set(key, value);
        }
        Ok(config)
    }
}

/// `key=value`; the error never repeats the text, which may be a secret.
fn parse_key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => Ok((key.trim().to_owned(), value.to_owned())),
        Some(_) => Err("expected key=value, got no key before the '='".to_owned()),
        None => Err(format!("expected key=value, got {} characters without '='", text.chars().count())),
    }
}

/// Reads a properties file: `key=value` lines, blank lines and `#` comments.
pub fn read_properties(text: &str) -> Result<Vec<(String, String)>, String> {
    text.lines()
        .enumerate()
        .map(|(i, line)| (i + 1, line.trim()))
        .filter(|(_, line)| !line.is_empty() && !line.starts_with('#'))
        .map(|(number, line)| {
            parse_key_value(line).map(|(key, value)| (key, value.trim().to_owned())).map_err(|e| format!("line {number}: {e}"))
        })
        .collect()
}

/// Drops librdkafka clients on a thread of their own. Dropping a consumer
/// that has a group closes it and waits in steps of 100 ms for that to
/// finish, and a producer stops its polling thread the same way: a tenth of
/// a second or two added to the end of every run, of the consumer and of the
/// benchmark's no-op consumer alike. Nothing is left to them: offsets are in
/// the checkpoint, the last commit for monitoring was synchronous and every
/// dead letter was acknowledged.
pub fn close_in_background<T: Send + 'static>(clients: T) {
    let spawned = std::thread::Builder::new().name("kafka-close".into()).spawn(move || drop(clients));
    if let Err(e) = spawned {
        warn!(error = %e, "no thread to close the kafka clients on; they are closed when the process ends");
    }
}

/// Shares a flag between the consumer loop and the source thread.
pub fn stop_flag() -> Arc<AtomicBool> {
    Arc::new(AtomicBool::new(false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_properties_files() {
        let props = read_properties("# secrets\nsasl.username=u\n\n sasl.password = p=w \n").unwrap();
        assert_eq!(props, vec![("sasl.username".into(), "u".into()), ("sasl.password".into(), "p=w".into())]);
        let err = read_properties("a=1\n# c\nsasl.password:hunter2").unwrap_err();
        assert_eq!(err, "line 3: expected key=value, got 21 characters without '='");
        let args = KafkaArgs {
            brokers: "b".into(),
            topic: "t".into(),
            dlq_topic: "d".into(),
            partitions: 1,
            topic_retention_bytes: 1 << 20,
            properties: vec![("sasl.username".into(), "alice".into()), ("sasl.password".into(), "hunter2".into())],
            kafka_config_file: None,
            no_create_topics: false,
        };
        let shown = format!("{args:?}");
        assert!(shown.contains("alice") && shown.contains(secret::REDACTED) && !shown.contains("hunter2"), "{shown}");
    }
}
