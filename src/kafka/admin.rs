//! Topic administration: the topics a run needs, created when missing, and
//! the partitions of an existing one.

use rdkafka::admin::{AdminClient, AdminOptions, ConfigResourceResult, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;
use tracing::warn;

use super::{KafkaArgs, REQUEST_TIMEOUT};
use crate::error::{Error, Result};

impl KafkaArgs {
    /// Creates the raw topic (`--partitions`) and the dead-letter topic (one
    /// partition) unless they exist, with the broker's replication factor.
    pub async fn ensure_topics(&self) -> Result<()> {
        self.ensure(&[(&self.topic, self.partitions), (&self.dlq_topic, 1)]).await
    }

    /// Creates those of `topics` (name, partitions) that are missing, with
    /// the same settings as the raw topic; with `--no-create-topics` a
    /// missing topic is an error. Only a missing topic is asked for: an
    /// account that may read and write the topics but not create them
    /// works once they exist.
    pub async fn ensure(&self, topics: &[(&str, i32)]) -> Result<()> {
        let bytes = self.topic_retention_bytes.to_string();
        self.ensure_with(topics, &[("retention.ms", "-1"), ("retention.bytes", &bytes)]).await
    }

    /// A compacted topic of `partitions` for the consumer group's state
    /// (its changelog): only each key's last record is kept, however long.
    /// A snapshot may be larger than the broker's default record limit.
    pub async fn ensure_compacted(&self, topic: &str, partitions: i32) -> Result<()> {
        let max = CHANGELOG_MAX_BYTES.to_string();
        self.ensure_with(&[(topic, partitions)], &[("cleanup.policy", "compact"), ("max.message.bytes", &max), ("segment.ms", "600000")])
            .await
    }

    async fn ensure_with(&self, topics: &[(&str, i32)], settings: &[(&str, &str)]) -> Result<()> {
        let args = self.clone();
        tokio::task::spawn_blocking(move || args.check_reachable()).await.map_err(|e| Error::join("kafka probe", e))??;
        let admin: AdminClient<DefaultClientContext> = self.client_config()?.create().map_err(|e| Error::kafka("admin client", e))?;
        let missing = missing_topics(&admin, topics)?;
        if missing.is_empty() {
            return Ok(());
        }
        let names: Vec<&str> = missing.iter().map(|(name, _)| *name).collect();
        if self.no_create_topics {
            return Err(Error::Config(format!(
                "topic(s) {names:?} do not exist and --no-create-topics is set: create them (scripts/services topic NAME PARTITIONS, or your cluster's tooling)"
            )));
        }
        let new: Vec<NewTopic<'_>> = missing
            .iter()
            .map(|&(name, partitions)| {
                settings
                    .iter()
                    .fold(NewTopic::new(name, partitions, TopicReplication::Fixed(-1)), |topic, (key, value)| topic.set(key, value))
            })
            .collect();
        let options = AdminOptions::new().operation_timeout(Some(REQUEST_TIMEOUT));
        let results = admin.create_topics(&new, &options).await.map_err(|e| Error::kafka("create topics", e))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code @ (RDKafkaErrorCode::TopicAuthorizationFailed | RDKafkaErrorCode::ClusterAuthorizationFailed))) => {
                    return Err(Error::Config(format!(
                        "topic {topic} does not exist and this account may not create it ({code}): have it created, with the partitions and retention of docs/configuration.md"
                    )))
                }
                Err((topic, code)) => return Err(Error::kafka(format!("create topic {topic}"), KafkaError::AdminOp(code))),
            }
        }
        Ok(())
    }
}

/// Largest record of a changelog topic (a partition's state snapshot).
pub const CHANGELOG_MAX_BYTES: usize = 16 << 20;

/// Those of `topics` the broker's metadata does not list. The metadata of
/// all topics (those the account may describe), in one request: asking for
/// a topic by name lets a broker with `auto.create.topics.enable` create it
/// with its own defaults.
fn missing_topics<'a>(admin: &AdminClient<DefaultClientContext>, topics: &[(&'a str, i32)]) -> Result<Vec<(&'a str, i32)>> {
    let metadata = admin.inner().fetch_metadata(None, REQUEST_TIMEOUT).map_err(|e| Error::kafka("fetch metadata", e))?;
    let exists = |name: &str| metadata.topics().iter().any(|t| t.name() == name && t.error().is_none() && !t.partitions().is_empty());
    Ok(topics.iter().copied().filter(|&(name, _)| !exists(name)).collect())
}

/// The partition ids of `topic`; an error if the topic does not exist.
pub fn partitions_of<X: ConsumerContext, C: Consumer<X>>(consumer: &C, topic: &str) -> Result<Vec<i32>> {
    let metadata = consumer.fetch_metadata(Some(topic), REQUEST_TIMEOUT).map_err(|e| Error::kafka("fetch metadata", e))?;
    let found = metadata.topics().iter().find(|t| t.name() == topic);
    match found {
        Some(t) if t.error().is_none() && !t.partitions().is_empty() => Ok(t.partitions().iter().map(|p| p.id()).collect()),
        _ => Err(Error::Config(format!("topic {topic:?} does not exist on the broker; create it (scripts/services up, or replay)"))),
    }
}

/// librdkafka's `message.max.bytes` when it is not set.
const CLIENT_MESSAGE_MAX_BYTES: usize = 1_000_000;
/// Room kept in a record beside its payload: headers, key and framing.
const RECORD_OVERHEAD: usize = 4096;

/// The most payload bytes a record to each of `topics` may carry from a
/// producer with `config`: the smaller of the client's `message.max.bytes`
/// and the topic's `max.message.bytes` as the broker reports it (one request
/// for all), less room for headers and key. An account that may not
/// describe the topics' configuration gets the client's limit, with a
/// warning.
pub async fn payload_rooms<const N: usize>(config: &ClientConfig, topics: [&str; N]) -> [usize; N] {
    let client = config.get("message.max.bytes").and_then(|v| v.parse().ok()).unwrap_or(CLIENT_MESSAGE_MAX_BYTES);
    let broker = match max_message_bytes(config, &topics).await {
        Ok(limits) => limits,
        Err(e) => {
            warn!(?topics, error = %e, "cannot read the topics' max.message.bytes; going by the client's message.max.bytes");
            [None; N]
        }
    };
    broker.map(|limit| client.min(limit.unwrap_or(client)).saturating_sub(RECORD_OVERHEAD))
}

/// Each topic's `max.message.bytes`, where the broker says.
async fn max_message_bytes<const N: usize>(config: &ClientConfig, topics: &[&str; N]) -> Result<[Option<usize>; N]> {
    let admin: AdminClient<DefaultClientContext> = config.create().map_err(|e| Error::kafka("admin client", e))?;
    let options = AdminOptions::new().request_timeout(Some(REQUEST_TIMEOUT));
    let resources = topics.map(ResourceSpecifier::Topic);
    let results = admin.describe_configs(&resources, &options).await.map_err(|e| Error::kafka("describe topics", e))?;
    let limit = |result: Option<&ConfigResourceResult>| result?.as_ref().ok()?.get("max.message.bytes")?.value.as_deref()?.parse().ok();
    // The results come in the order of the request.
    Ok(std::array::from_fn(|i| limit(results.get(i))))
}
