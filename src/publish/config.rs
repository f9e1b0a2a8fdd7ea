//! The publisher's settings (`[publisher]`): which backend, where it
//! publishes, the Kafka and NATS specifics. The central configuration
//! embeds [`PublisherConfig`] and maps this module's refusals (see
//! `check.rs`) into its own error; nothing here knows of it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::secret::Secret;

/// librdkafka's default producer `message.max.bytes`.
pub const KAFKA_DEFAULT_MESSAGE_MAX_BYTES: u64 = 1_000_000;
/// Room for a record's key, headers and framing beside the event's JSON,
/// which hookbridge adds to `server.body_limit_bytes` for the producer's
/// `message.max.bytes` when the options do not set it.
pub const KAFKA_MESSAGE_OVERHEAD: u64 = 64 * 1024;

/// Largest `server.body_limit_bytes`: an event is one record of the outbox's
/// log, which bounds a record (see `outbox/log.rs`). The Kafka producer is
/// sized for it.
pub const MAX_BODY_LIMIT: usize = 64 * 1024 * 1024;

/// The broker backend, chosen once at start-up by `type`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum PublisherConfig {
    /// JSON lines to a file or stdout: the embedded default, needs no broker.
    File(FileConfig),
    /// Apache Kafka through librdkafka.
    Kafka(KafkaConfig),
    /// NATS JetStream (or core NATS).
    Nats(NatsConfig),
}

impl Default for PublisherConfig {
    fn default() -> Self {
        Self::File(FileConfig::default())
    }
}

/// The embedded file sink.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    /// File to append JSON lines to; `-` writes to stdout.
    pub path: String,
    /// fsync the file after each batch (published means on disk).
    pub fsync: bool,
}

impl Default for FileConfig {
    fn default() -> Self {
        Self {
            path: "-".into(),
            fsync: false,
        }
    }
}

/// Kafka producer settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// `bootstrap.servers`, e.g. `127.0.0.1:9092`.
    pub brokers: String,
    /// Topic template; `{model}` and `{state}` are replaced per event. Every
    /// topic it can become is created at start (with the broker's default
    /// partitions and replication) if missing; the producer never has a
    /// topic auto-created (`allow.auto.create.topics = false`). Names starting
    /// with `__` (Kafka's internal topics) are refused.
    #[serde(default = "default_topic")]
    pub topic: String,
    /// Allowlist of model names `{model}` may become (each 1-64 characters of
    /// `[A-Za-z0-9_-]`); any other model becomes `unknown`. Required (non-empty)
    /// when the template uses `{model}`, so that no sender can name a destination:
    /// every destination is known at start.
    #[serde(default)]
    pub models: Vec<String>,
    /// How long librdkafka tries one message before reporting it failed; the
    /// relay then retries it, so this bounds one attempt, not the event's life.
    #[serde(default = "default_message_timeout_ms")]
    pub message_timeout_ms: u64,
    /// Extra librdkafka properties (TLS, SASL, compression, ...). Values
    /// here override hookbridge's own, except the delivery guarantees
    /// (`acks`, `enable.idempotence`, `allow.auto.create.topics`), which are
    /// refused, as are `transactional.id`, `delivery.report.only.error`, an
    /// unknown `security.protocol` and a `message.max.bytes` below
    /// `server.body_limit_bytes`. `_` in a key reads
    /// as `.` (librdkafka keys have none), so the environment can set them:
    /// `HOOKBRIDGE_PUBLISHER__OPTIONS__SASL_PASSWORD` sets `sasl.password`.
    #[serde(default)]
    pub options: BTreeMap<String, Secret>,
}

fn default_topic() -> String {
    "kinovi.task-events".into()
}
fn default_message_timeout_ms() -> u64 {
    30_000
}

/// NATS settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URL(s), comma separated, e.g. `nats://127.0.0.1:4222`.
    pub url: String,
    /// Subject template; `{model}` and `{state}` are replaced per event, `{task}`
    /// by a token of the task id (its UUIDv5, 32 hex digits). Cluster mode needs
    /// `{task}` (e.g. `kinovi.tasks.{state}.{task}`). With `stream`, the stream's
    /// subjects must capture every subject it can become.
    #[serde(default = "default_subject")]
    pub subject: String,
    /// Allowlist of model names `{model}` may become (each 1-64 characters of
    /// `[A-Za-z0-9_-]`); any other model becomes `unknown`. Required (non-empty)
    /// when the template uses `{model}`, so that no sender can name a destination:
    /// every destination is known at start.
    #[serde(default)]
    pub models: Vec<String>,
    /// Publish through JetStream and wait for its PubAck (recommended). When
    /// false, core NATS publishing is used: acknowledged by nobody, so an
    /// event is "published" once the server has it after a flush.
    #[serde(default = "yes")]
    pub jetstream: bool,
    /// How long to wait for one PubAck, in milliseconds.
    #[serde(default = "default_ack_timeout_ms")]
    pub ack_timeout_ms: u64,
    /// Credentials: a token, if the server wants one.
    #[serde(default)]
    pub token: Option<Secret>,
    /// Create (or update) this stream at start-up.
    #[serde(default)]
    pub stream: Option<StreamConfig>,
}

fn default_subject() -> String {
    "kinovi.tasks.{state}".into()
}
fn default_ack_timeout_ms() -> u64 {
    5_000
}
fn yes() -> bool {
    true
}

/// A JetStream stream that hookbridge creates when missing.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    /// Stream name.
    pub name: String,
    /// Subjects the stream captures, e.g. `["kinovi.tasks.>"]`.
    pub subjects: Vec<String>,
    /// JetStream's own deduplication window on `Nats-Msg-Id`, in seconds.
    #[serde(default = "default_duplicate_window_secs")]
    pub duplicate_window_secs: u64,
}

fn default_duplicate_window_secs() -> u64 {
    120
}

/// A librdkafka property name from a config key: environment variables
/// cannot hold dots, so `sasl_password` (from `..._OPTIONS__SASL_PASSWORD`)
/// means `sasl.password`.
pub fn librdkafka_key(key: &str) -> String {
    key.replace('_', ".")
}

/// The librdkafka property hookbridge sets itself that `key` would
/// override, under any of its names: an alias (`acks` is
/// `request.required.acks`, `bootstrap.servers` is `metadata.broker.list`)
/// or the `topic.` prefix that sets a topic property globally.
pub(super) fn reserved_kafka_option(key: &str) -> Option<&'static str> {
    const RESERVED: [(&str, &str); 6] = [
        ("allow.auto.create.topics", "allow.auto.create.topics"),
        ("acks", "acks"),
        ("request.required.acks", "acks"),
        ("enable.idempotence", "enable.idempotence"),
        ("bootstrap.servers", "bootstrap.servers"),
        ("metadata.broker.list", "bootstrap.servers"),
    ];
    let key = librdkafka_key(key.trim()).to_ascii_lowercase();
    let key = key.strip_prefix("topic.").unwrap_or(&key);
    RESERVED
        .iter()
        .find(|(name, _)| *name == key)
        .map(|&(_, reserved)| reserved)
}
