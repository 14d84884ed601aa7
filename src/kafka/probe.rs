//! Reaching the brokers first: a refused password, an untrusted broker
//! certificate, a refused client certificate or plain text to a TLS port
//! is said within seconds as an error naming the setting to check, instead
//! of a bare transport failure after the request timeout. librdkafka says
//! the cause only in its error and log callbacks; the probe listens to
//! them while it asks for metadata in short slices.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, TopicPartitionList};

use super::KafkaArgs;
use crate::error::{Error, Result};

/// How long the probe listens for a cause before it leaves the brokers to
/// the usual timeouts (a broker that is down or slow is not its business).
const LISTEN: Duration = Duration::from_secs(10);

/// Why the brokers could not be reached, as librdkafka's messages tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    Credentials,
    UntrustedBroker,
    ClientCertificate,
    NotTls,
    GroupDenied,
}

fn cause_of(text: &str) -> Option<Cause> {
    let text = text.to_ascii_lowercase();
    if text.contains("sasl authentication error") || text.contains("authentication failed") {
        Some(Cause::Credentials)
    } else if text.contains("certificate verify failed") {
        Some(Cause::UntrustedBroker)
    } else if text.contains("alert bad certificate") || text.contains("certificate required") {
        Some(Cause::ClientCertificate)
    } else if text.contains("disconnected") && text.contains("apiversion_query") {
        Some(Cause::NotTls)
    } else if text.contains("group authorization failed") {
        Some(Cause::GroupDenied)
    } else {
        None
    }
}

#[derive(Default)]
struct Probe {
    cause: Mutex<Option<Cause>>,
}

impl Probe {
    fn note(&self, text: &str) {
        if let (Some(cause), Ok(mut seen)) = (cause_of(text), self.cause.lock()) {
            seen.get_or_insert(cause);
        }
    }
}

impl ClientContext for Probe {
    fn log(&self, _level: RDKafkaLogLevel, _fac: &str, message: &str) {
        self.note(message);
    }
    fn error(&self, error: KafkaError, reason: &str) {
        self.note(reason);
        self.note(&error.to_string());
    }
}

impl ConsumerContext for Probe {}

impl KafkaArgs {
    /// Asks the brokers for metadata, listening for why it fails: a cause
    /// librdkafka names is an error saying which setting to check. Nothing
    /// heard within a few seconds, or an answer, is left to the caller.
    pub fn check_reachable(&self) -> Result<()> {
        let config = self.client_config()?;
        let consumer: BaseConsumer<Probe> = config.create_with_context(Probe::default()).map_err(|e| Error::kafka("probe client", e))?;
        let answer = listen(|| {
            let answered = consumer.fetch_metadata(None, Duration::from_secs(1)).is_ok();
            // Serves the error events, which reach the context on poll.
            let _ = consumer.poll(Duration::ZERO);
            let cause = consumer.context().cause.lock().ok().and_then(|seen| *seen);
            match (cause, answered) {
                (Some(Cause::NotTls), _) if !plain(&config) => None,
                (Some(cause), _) => Some(Err(Error::Config(explain(cause, &config, &self.brokers)))),
                (None, true) => Some(Ok(())),
                (None, false) => None,
            }
        });
        // Closing a client waits for its threads: not the caller's time.
        super::close_in_background(consumer);
        answer
    }
}

impl KafkaArgs {
    /// Asks for consumer group `group_id`'s committed offsets, which needs
    /// the group's DESCRIBE (READ implies it), listening for a refusal: an
    /// account that may not use the group is told so at start. Otherwise
    /// every commit is refused, and a run to the end waits out its final
    /// commit (46 s measured) to exit 0 as if nothing were wrong. librdkafka
    /// says the refusal only as an error event while the request waits for
    /// a coordinator it is not allowed to find.
    pub fn check_group(&self, group_id: &str) -> Result<()> {
        let config = self.config_with(&[("group.id", group_id)])?;
        let consumer: BaseConsumer<Probe> = config.create_with_context(Probe::default()).map_err(|e| Error::kafka("probe client", e))?;
        let mut list = TopicPartitionList::new();
        list.add_partition(&self.topic, 0);
        let answer = listen(|| {
            let answer = consumer.committed_offsets(list.clone(), Duration::from_secs(1));
            let _ = consumer.poll(Duration::ZERO);
            let cause = consumer.context().cause.lock().ok().and_then(|seen| *seen);
            let denied = answer.as_ref().err().and_then(KafkaError::rdkafka_error_code) == Some(RDKafkaErrorCode::GroupAuthorizationFailed);
            if denied || cause == Some(Cause::GroupDenied) {
                return Some(Err(Error::Config(format!(
                    "the brokers at {} refuse consumer group {group_id:?} to this account (its offsets are committed for lag monitoring): \
                     choose a --group-id (CRYPTOPULSE_GROUP_ID) the account may use, or grant it READ on that group",
                    self.brokers
                ))));
            }
            answer.is_ok().then_some(Ok(()))
        });
        super::close_in_background(consumer);
        answer
    }
}

/// Asks `attempt` until it has an answer, for at most [`LISTEN`]; no
/// answer is left to the caller's own timeouts.
fn listen(mut attempt: impl FnMut() -> Option<Result<()>>) -> Result<()> {
    let started = Instant::now();
    while started.elapsed() < LISTEN {
        if let Some(answer) = attempt() {
            return answer;
        }
    }
    Ok(())
}

/// Whether the settings speak plain text (`security.protocol` unset,
/// `plaintext` or `sasl_plaintext`).
fn plain(config: &rdkafka::ClientConfig) -> bool {
    config.get("security.protocol").is_none_or(|p| !p.to_ascii_lowercase().contains("ssl"))
}

fn explain(cause: Cause, config: &rdkafka::ClientConfig, brokers: &str) -> String {
    let setting = |key: &str| config.get(key).map_or_else(|| format!("{key} unset"), |value| format!("{key}={value}"));
    match cause {
        Cause::Credentials => format!(
            "the brokers at {brokers} refused the SASL credentials ({}, {}): check sasl.password (in the file of --kafka-config-file or CRYPTOPULSE_KAFKA_PROPERTIES)",
            setting("sasl.username"),
            setting("sasl.mechanisms")
        ),
        Cause::UntrustedBroker => format!(
            "the certificate of the brokers at {brokers} is not trusted ({}): check ssl.ca.location, the CA that signed it",
            setting("ssl.ca.location")
        ),
        Cause::ClientCertificate => format!(
            "the brokers at {brokers} refused this client's certificate ({}, {}): check ssl.certificate.location and ssl.key.location",
            setting("ssl.certificate.location"),
            setting("ssl.key.location")
        ),
        Cause::GroupDenied => format!("the brokers at {brokers} refuse the consumer group named by group.id to this account"),
        Cause::NotTls => format!(
            "the brokers at {brokers} closed the connection at the first request ({}): the port probably expects TLS; check security.protocol (SSL or SASL_SSL)",
            setting("security.protocol")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn librdkafkas_messages_name_their_cause() {
        for (text, cause) in [
            ("SASL authentication error: Authentication failed during authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512", Cause::Credentials),
            ("SSL handshake failed: error:0A000086:SSL routines::certificate verify failed: broker certificate could not be verified", Cause::UntrustedBroker),
            ("SSL handshake failed: sslv3 alert bad certificate: SSL alert number 42", Cause::ClientCertificate),
            ("Disconnected: connection closed by peer: receive 0 after POLLIN (after 1ms in state APIVERSION_QUERY)", Cause::NotTls),
            ("FindCoordinator response error: Group authorization failed.", Cause::GroupDenied),
        ] {
            assert_eq!(cause_of(text), Some(cause), "{text}");
        }
        assert_eq!(cause_of("Connect to ipv4#127.0.0.1:1 failed: Connection refused"), None);
        let config = rdkafka::ClientConfig::new().set("sasl.username", "pipeline").set("sasl.password", "hunter2").clone();
        let text = explain(Cause::Credentials, &config, "b:9192");
        assert!(text.contains("sasl.username=pipeline") && text.contains("sasl.password") && !text.contains("hunter2"), "{text}");
    }
}
