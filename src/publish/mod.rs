//! The broker boundary: one small trait, one backend a file.
//!
//! "Published" means acknowledged by the broker: a Kafka delivery report
//! without error (`acks=all`), a JetStream PubAck, or a synced line in the
//! file sink. The relay deletes an outbox entry only after that.

use std::time::Duration;

use futures::future::BoxFuture;

use crate::config::PublisherConfig;
use crate::event::TaskEvent;

pub mod file;
#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "nats")]
pub mod nats;

/// One event on its way to the broker.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The outbox sequence number (arrival order).
    pub seq: u64,
    pub event: TaskEvent,
    /// The event serialized once, as JSON: the message body.
    pub payload: bytes::Bytes,
}

/// A message ready for the wire: everything derived from the event's
/// content (destination, key, headers) computed once, by
/// [`Publisher::encode`], so that sending it is only moving bytes.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// The outbox sequence number of the event.
    pub seq: u64,
    /// The Kafka topic or NATS subject.
    pub destination: String,
    /// The task id: Kafka's message key.
    pub key: String,
    /// The event id: JetStream's `Nats-Msg-Id`.
    pub id: String,
    /// Header names are the backend's own constants; values come from the event.
    pub headers: Vec<(&'static str, String)>,
    /// The message body.
    pub payload: bytes::Bytes,
}

/// Why one event cannot be turned into a message. Retrying cannot help:
/// the relay dead-letters the event with this reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot encode the event: {0}")]
pub struct EncodeError(pub String);

/// Why a publish did not succeed, classified once so callers branch on the
/// class, never on message text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// Worth retrying as is: broker unreachable, leader change, timeout,
    /// queue full.
    #[error("transient: {0}")]
    Transient(String),
    /// Retrying the same message cannot succeed (too large, not
    /// authorized, invalid destination): it goes to the dead letters.
    #[error("permanent: {0}")]
    Permanent(String),
}

impl PublishError {
    pub fn is_permanent(&self) -> bool {
        matches!(self, Self::Permanent(_))
    }
}

/// A broker backend.
pub trait Publisher: Send + Sync {
    /// Short backend name for logs and the admin status.
    fn name(&self) -> &'static str;

    /// Everything about one message that depends on the event's content.
    /// The relay calls it once per event and contains its errors and
    /// panics to that event.
    fn encode(&self, message: &Outgoing) -> Result<Encoded, EncodeError>;

    /// Publishes a batch. Returns one result per message, in batch order.
    /// Messages of one task never share a batch, so the backend may keep
    /// many in flight at once.
    fn publish<'a>(&'a self, batch: &'a [Encoded]) -> BoxFuture<'a, Vec<Result<(), PublishError>>>;

    /// Waits (bounded) for anything the client still queues; called once at
    /// shutdown.
    fn flush(&self, timeout: Duration) -> BoxFuture<'_, ()>;
}

/// Builds the backend chosen in the configuration. Never waits for the
/// broker: an unreachable broker shows up as transient publish errors.
pub async fn build(config: &PublisherConfig) -> anyhow::Result<Box<dyn Publisher>> {
    Ok(match config {
        PublisherConfig::File(c) => Box::new(file::FilePublisher::open(c)?),
        #[cfg(feature = "kafka")]
        PublisherConfig::Kafka(c) => Box::new(kafka::KafkaPublisher::new(c.clone()).await?),
        #[cfg(feature = "nats")]
        PublisherConfig::Nats(c) => Box::new(nats::NatsPublisher::connect(c.clone()).await?),
        #[allow(unreachable_patterns)]
        other => anyhow::bail!("publisher {other:?} is not compiled into this build"),
    })
}

/// Expands `{model}` and `{state}` in a topic or subject template. Values are
/// reduced to `[A-Za-z0-9_-]` so they stay one valid token of a Kafka topic
/// name or NATS subject whatever the provider sends.
pub fn render(template: &str, event: &TaskEvent) -> String {
    if !template.contains('{') {
        return template.to_string();
    }
    let model = event.model.as_deref().unwrap_or("unknown");
    template
        .replace("{model}", &token(model))
        .replace("{state}", event.state.as_str())
}

fn token(value: &str) -> String {
    let cleaned: String = value
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(100)
        .collect();
    if cleaned.is_empty() {
        "unknown".into()
    } else {
        cleaned
    }
}

/// CloudEvents attributes shared by the backends (binary content mode).
pub struct CloudEvent {
    pub id: String,
    pub source: &'static str,
    pub ty: String,
    pub subject: String,
    pub time: String,
}

/// Where events come from, in CloudEvents' `source` attribute.
pub const CE_SOURCE: &str = "https://kinovi.ai/api/v1/jobs";
/// The message body's content type.
pub const CONTENT_TYPE: &str = "application/json";

impl CloudEvent {
    pub fn of(event: &TaskEvent) -> Self {
        let millis = event.update_time.unwrap_or(event.received_at).max(0) as u64;
        let time = std::time::UNIX_EPOCH + Duration::from_millis(millis);
        Self {
            id: event.event_id.clone(),
            source: CE_SOURCE,
            ty: format!("ai.kinovi.task.{}", event.state.as_str()),
            subject: event.task_id.clone(),
            time: humantime::format_rfc3339_millis(time).to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{parse, Source};

    fn event(model: &str) -> TaskEvent {
        let body = format!(
            r#"{{"taskId":"t1","model":"{model}","state":"success","updateTime":1735599754000}}"#
        );
        parse(body.as_bytes(), Source::Webhook, 1).unwrap()
    }

    #[test]
    fn templates_expand_to_safe_tokens() {
        let e = event("seedance-20");
        assert_eq!(
            render("kinovi.{model}.{state}", &e),
            "kinovi.seedance-20.success"
        );
        let e = event("a.b c>*");
        assert_eq!(render("k.{model}", &e), "k.a_b_c__");
        assert_eq!(render("fixed", &e), "fixed");
    }

    #[test]
    fn cloud_event_time_is_rfc3339() {
        let ce = CloudEvent::of(&event("m"));
        assert_eq!(ce.time, "2024-12-30T23:02:34.000Z");
        assert_eq!(ce.ty, "ai.kinovi.task.success");
        assert_eq!(ce.subject, "t1");
    }
}
