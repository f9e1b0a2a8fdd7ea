//! The broker boundary: one small trait, one backend a file.
//!
//! "Published" means acknowledged by the broker: a Kafka delivery report
//! without error (`acks=all`), a JetStream PubAck, or a synced line in the
//! file sink. The relay deletes an outbox entry only after that.

use std::time::Duration;

use futures::future::BoxFuture;

use crate::event::MAX_TIME_MS;

pub use check::{
    check_config, check_settings, destinations, kafka_message_max_bytes, subject_matches, Refusal,
};
pub use config::{FileConfig, KafkaConfig, NatsConfig, PublisherConfig, StreamConfig};
pub use names::{
    check_subject, check_topic, is_model_token, model_token, render, task_token, MAX_MODEL_TOKEN,
    UNKNOWN_MODEL,
};

mod check;
pub mod config;
pub mod file;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod names;
#[cfg(feature = "nats")]
pub mod nats;

/// One event on its way to the broker.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The outbox sequence number (arrival order).
    pub seq: u64,
    /// What the backends derive the destination, key and headers from.
    pub meta: EventMeta,
    /// The event serialized once, as JSON: the message body.
    pub payload: bytes::Bytes,
}

/// Stored by the outbox beside each event; defined by the event module.
pub use crate::event::EventMeta;

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

impl Encoded {
    /// `message` as one wire message to `destination`: keyed by its task,
    /// identified by its event.
    pub fn of(
        message: &Outgoing,
        destination: String,
        headers: Vec<(&'static str, String)>,
        payload: bytes::Bytes,
    ) -> Self {
        Self {
            seq: message.seq,
            destination,
            key: message.meta.task_id.clone(),
            id: message.meta.event_id.clone(),
            headers,
            payload,
        }
    }
}

/// Where the broker put an acknowledged message, as far as its
/// acknowledgement says: Kafka's partition and offset, JetStream's stream
/// and sequence. Empty for the file sink, for core NATS (nothing is
/// acknowledged there) and for an event found already on the broker.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Receipt {
    pub partition: Option<i32>,
    pub offset: Option<i64>,
    pub stream: Option<String>,
    pub sequence: Option<u64>,
}

/// The outcome of publishing one message.
pub type Published = Result<Receipt, PublishError>;

/// Why a publish did not succeed, classified once so callers branch on the
/// class, never on message text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// Worth retrying as is, for every event: broker unreachable, leader
    /// change, timeout, queue full.
    #[error("transient: {0}")]
    Transient(String),
    /// The broker refuses this event where it is going (no stream captures
    /// its subject, its topic does not exist): nothing heals that but an
    /// operator. The relay retries this event alone, with its own backoff,
    /// and dead-letters it after `outbox.refusal_attempts`; the others flow.
    #[error("refused: {0}")]
    Refused(String),
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

    /// Publishes a batch. Returns one result per message, in batch order:
    /// where each acknowledged message landed, or why it did not.
    /// Messages of one task never share a batch, so the backend may keep
    /// many in flight at once.
    fn publish<'a>(&'a self, batch: &'a [Encoded]) -> BoxFuture<'a, Vec<Published>>;

    /// Waits (bounded) for anything the client still queues; called once at
    /// shutdown.
    fn flush(&self, timeout: Duration) -> BoxFuture<'_, ()>;
}

/// Builds the backend chosen in the configuration, and checks what only
/// the broker can tell: the Kafka topics are created, and a `body_limit`
/// larger than the broker's message limit (a topic's `max.message.bytes`,
/// the NATS server's `max_payload`) is refused. Waits for the broker only a
/// bounded time: an unreachable broker shows up as transient publish errors.
pub async fn build(
    config: &PublisherConfig,
    body_limit: usize,
) -> anyhow::Result<Box<dyn Publisher>> {
    check_config(config).map_err(|(key, reason)| anyhow::anyhow!("invalid `{key}`: {reason}"))?;
    Ok(match config {
        PublisherConfig::File(c) => Box::new(file::FilePublisher::open(c)?),
        #[cfg(feature = "kafka")]
        PublisherConfig::Kafka(c) => {
            let publisher = kafka::KafkaPublisher::new(c.clone()).await?;
            publisher.prepare(body_limit).await?;
            Box::new(publisher)
        }
        #[cfg(feature = "nats")]
        PublisherConfig::Nats(c) => {
            let publisher = nats::NatsPublisher::connect(c.clone()).await?;
            publisher
                .check_server(Some(body_limit), nats::OLDEST_SERVER, "hookbridge")
                .await?;
            Box::new(publisher)
        }
        #[allow(unreachable_patterns)]
        other => anyhow::bail!("publisher {other:?} is not compiled into this build"),
    })
}

/// Why one event cannot be put into a broker message. Permanent for that event: the relay
/// dead-letters it with this reason and goes on with the next.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("topic {topic:?} is not a valid Kafka topic name: {problem}")]
    Topic {
        topic: String,
        problem: &'static str,
    },
    #[error("subject {subject:?} is not a valid NATS subject: {problem}")]
    Subject {
        subject: String,
        problem: &'static str,
    },
    #[error("header {name} cannot carry its value: {problem}")]
    Header {
        name: &'static str,
        problem: &'static str,
    },
    #[error("the event's JSON is not a single line")]
    NotOneLine,
}

impl EncodeError {
    fn topic(topic: &str, problem: &'static str) -> Self {
        Self::Topic {
            topic: topic.to_string(),
            problem,
        }
    }

    fn subject(subject: &str, problem: &'static str) -> Self {
        Self::Subject {
            subject: subject.to_string(),
            problem,
        }
    }
}

impl From<EncodeError> for PublishError {
    fn from(e: EncodeError) -> Self {
        Self::Permanent(e.to_string())
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
    /// Never fails: the time is the provider's `updateTime` (else the arrival time), which
    /// the parser keeps within the years 1970 to 9999; anything else is clamped into them.
    pub fn of(event: &EventMeta) -> Self {
        Self {
            id: event.event_id.clone(),
            source: CE_SOURCE,
            ty: format!("ai.kinovi.task.{}", event.state.as_str()),
            subject: event.task_id.clone(),
            time: rfc3339_millis(event.update_time.unwrap_or(event.received_at)),
        }
    }
}

/// Header names of one backend for [`CloudEvent::headers`], in its order.
pub type HeaderNames = [&'static str; 9];

impl CloudEvent {
    /// The headers every backend sends, under the backend's `names`: the
    /// content type, the event id, the schema version, then the CloudEvents
    /// attributes (spec version, id, source, type, subject, time).
    pub fn headers(self, names: HeaderNames) -> Vec<(&'static str, String)> {
        let values = [
            CONTENT_TYPE.to_string(),
            self.id.clone(),
            crate::event::SCHEMA_VERSION.to_string(),
            "1.0".to_string(),
            self.id,
            self.source.to_string(),
            self.ty,
            self.subject,
            self.time,
        ];
        names.into_iter().zip(values).collect()
    }
}

/// The W3C `traceparent` header, the name OpenTelemetry's messaging
/// instrumentations read.
pub const TRACEPARENT: &str = "traceparent";

/// Adds the event's trace context, when it has one (telemetry on), under
/// the plain `traceparent` and the CloudEvents distributed-tracing
/// extension's binary-mode name `ce_name` (`ce_traceparent` on Kafka,
/// `ce-traceparent` on NATS): a consumer's span joins the same trace.
pub fn trace_headers(
    event: &EventMeta,
    ce_name: &'static str,
    headers: &mut Vec<(&'static str, String)>,
) {
    if let Some(traceparent) = &event.traceparent {
        headers.push((TRACEPARENT, traceparent.clone()));
        headers.push((ce_name, traceparent.clone()));
    }
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for milliseconds since the epoch, clamped to
/// `0..=MAX_TIME_MS` (the range in which RFC 3339 has four-digit years).
pub fn rfc3339_millis(ms: i64) -> String {
    let ms = ms.clamp(0, MAX_TIME_MS);
    let (days, ms) = (ms / 86_400_000, ms % 86_400_000);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000
    )
}

/// Gregorian (year, month, day) of a day count since 1970-01-01, for counts >= 0 (Howard
/// Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests;
