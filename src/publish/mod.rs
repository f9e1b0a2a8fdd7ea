//! The broker boundary: one small trait, one backend a file.
//!
//! "Published" means acknowledged by the broker: a Kafka delivery report
//! without error (`acks=all`), a JetStream PubAck, or a synced line in the
//! file sink. The relay deletes an outbox entry only after that.

use std::time::Duration;

use futures::future::BoxFuture;

use crate::config::PublisherConfig;
use crate::event::MAX_TIME_MS;

pub use check::{check_config, destinations, kafka_message_max_bytes, subject_matches};

mod check;
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

    /// Publishes a batch. Returns one result per message, in batch order.
    /// Messages of one task never share a batch, so the backend may keep
    /// many in flight at once.
    fn publish<'a>(&'a self, batch: &'a [Encoded]) -> BoxFuture<'a, Vec<Result<(), PublishError>>>;

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
            publisher.check_max_payload(body_limit).await?;
            publisher
                .check_version(nats::OLDEST_SERVER, "hookbridge")
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

impl From<EncodeError> for PublishError {
    fn from(e: EncodeError) -> Self {
        Self::Permanent(e.to_string())
    }
}

/// Longest `{model}` value put into a topic or subject, in bytes.
pub const MAX_MODEL_TOKEN: usize = 64;
/// What `{model}` becomes for an event without a model, or with one the allowlist lacks.
pub const UNKNOWN_MODEL: &str = "unknown";
/// Longest Kafka topic name (the broker's own limit).
const MAX_TOPIC: usize = 249;
/// Longest subject hookbridge publishes to; NATS itself only bounds the protocol line.
const MAX_SUBJECT: usize = 1024;

/// Names the `{task}` token of subjects: UUIDv5s of task ids.
const TASK_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6b1c_52a8_4c1e_4a3c_9d0e_5f2b_7a61_c0de);

/// What `{task}` becomes for `task_id`: the UUIDv5 of the task id, as 32 hex digits, so
/// that any task id (dots, wildcards, any length) makes one legal subject token, and the
/// same task always the same one.
pub fn task_token(task_id: &str) -> String {
    uuid::Uuid::new_v5(&TASK_NAMESPACE, task_id.as_bytes())
        .simple()
        .to_string()
}

/// Expands `{model}`, `{state}` and `{task}` (NATS subjects only, see [`task_token`]) in a
/// topic or subject template.
///
/// `{state}` is one of five fixed words. `{model}` is the event's model when `models` (the
/// `publisher.models` allowlist) lists it exactly; any other model, and a missing one, is
/// [`UNKNOWN_MODEL`]. With an empty allowlist the model is reduced to `[A-Za-z0-9_-]` (other
/// characters become `_`) and cut to [`MAX_MODEL_TOKEN`] bytes. Either way the value is one
/// token that can be neither a NATS wildcard nor a separator; the result is still checked
/// by [`check_topic`] / [`check_subject`], since the template's fixed text counts too.
pub fn render(template: &str, event: &EventMeta, models: &[String]) -> String {
    if !template.contains('{') {
        return template.to_string();
    }
    template
        .replace("{model}", &model_token(event.model.as_deref(), models))
        .replace("{state}", event.state.as_str())
        .replace("{task}", &task_token(&event.task_id))
}

/// The `{model}` value of [`render`].
pub fn model_token(model: Option<&str>, models: &[String]) -> String {
    let Some(model) = model else {
        return UNKNOWN_MODEL.into();
    };
    if !models.is_empty() {
        return match models.iter().find(|m| *m == model) {
            Some(listed) => listed.clone(),
            None => UNKNOWN_MODEL.into(),
        };
    }
    let cleaned: String = model
        .chars()
        .map(|c| if is_token_char(c) { c } else { '_' })
        .take(MAX_MODEL_TOKEN)
        .collect();
    if cleaned.is_empty() {
        UNKNOWN_MODEL.into()
    } else {
        cleaned
    }
}

fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

/// Whether `name` may be listed in `publisher.models`: 1 to [`MAX_MODEL_TOKEN`] characters
/// of `[A-Za-z0-9_-]`, so that it is used in topics and subjects as it is.
pub fn is_model_token(name: &str) -> bool {
    (1..=MAX_MODEL_TOKEN).contains(&name.len()) && name.chars().all(is_token_char)
}

/// A legal Kafka topic name: 1 to 249 characters of `[A-Za-z0-9._-]`, not `.` or `..`.
pub fn check_topic(topic: &str) -> Result<(), EncodeError> {
    let problem = if topic.is_empty() || topic.len() > MAX_TOPIC {
        Some("must be 1 to 249 characters long")
    } else if !topic.chars().all(|c| is_token_char(c) || c == '.') {
        Some("may only contain A-Z, a-z, 0-9, '.', '_' and '-'")
    } else if topic == "." || topic == ".." {
        Some("must not be '.' or '..'")
    } else if topic.starts_with("__") {
        Some("must not start with '__' (Kafka's internal topics, such as __consumer_offsets)")
    } else {
        None
    };
    match problem {
        None => Ok(()),
        Some(problem) => Err(EncodeError::Topic {
            topic: topic.to_string(),
            problem,
        }),
    }
}

/// A subject a message may be published to: non-empty tokens separated by `.`, no
/// whitespace or control characters, no wildcard (`*`, `>`), at most 1024 bytes.
pub fn check_subject(subject: &str) -> Result<(), EncodeError> {
    let problem = if subject.is_empty() || subject.len() > MAX_SUBJECT {
        Some("must be 1 to 1024 bytes long")
    } else if subject.split('.').any(str::is_empty) {
        Some("must not have an empty token (leading, trailing or double '.')")
    } else if subject.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Some("must not contain whitespace or control characters")
    } else if subject.contains(['*', '>']) {
        Some("must not contain the wildcards '*' or '>'")
    } else {
        None
    };
    match problem {
        None => Ok(()),
        Some(problem) => Err(EncodeError::Subject {
            subject: subject.to_string(),
            problem,
        }),
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
