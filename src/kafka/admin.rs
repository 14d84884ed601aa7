//! Topic administration: the topics a run needs, created when missing, and
//! the partitions of an existing one.

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

use super::{KafkaArgs, REQUEST_TIMEOUT};
use crate::error::{Error, Result};

impl KafkaArgs {
    /// Creates the raw topic (`--partitions`) and the dead-letter topic (one
    /// partition) unless they exist, with the broker's replication factor.
    pub async fn ensure_topics(&self) -> Result<()> {
        self.ensure(&[(&self.topic, self.partitions), (&self.dlq_topic, 1)]).await
    }

    /// Creates `topics` (name, partitions) unless they exist, with the same
    /// settings as the raw topic.
    pub async fn ensure(&self, topics: &[(&str, i32)]) -> Result<()> {
        let admin: AdminClient<DefaultClientContext> = self.client_config()?.create().map_err(|e| Error::kafka("admin client", e))?;
        let bytes = self.topic_retention_bytes.to_string();
        let topics: Vec<NewTopic<'_>> = topics
            .iter()
            .map(|&(name, partitions)| {
                NewTopic::new(name, partitions, TopicReplication::Fixed(-1)).set("retention.ms", "-1").set("retention.bytes", &bytes)
            })
            .collect();
        let options = AdminOptions::new().operation_timeout(Some(REQUEST_TIMEOUT));
        let results = admin.create_topics(&topics, &options).await.map_err(|e| Error::kafka("create topics", e))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => return Err(Error::kafka(format!("create topic {topic}"), KafkaError::AdminOp(code))),
            }
        }
        Ok(())
    }
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
