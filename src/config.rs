//! Configuration: built-in defaults, then an optional TOML file, then
//! `HOOKBRIDGE_<SECTION>__<KEY>` environment variables (later layers win).
//!
//! Every struct denies unknown fields so a typo is an error at start-up, not a
//! silently ignored setting. [`Config::validate`] refuses values that would
//! only fail later, naming the key. Secrets are wrapped in [`Secret`], whose
//! `Debug` never prints them.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

/// The whole configuration of one hookbridge process.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The HTTP ingress.
    pub server: ServerConfig,
    /// The durable outbox between the ingress and the broker.
    pub outbox: OutboxConfig,
    /// Where accepted events are published. Not part of the serialized
    /// defaults: a `type` from a file or the environment must not inherit
    /// another backend's default fields.
    #[serde(skip_serializing)]
    pub publisher: PublisherConfig,
    /// Log output.
    pub log: LogConfig,
}

/// The HTTP ingress.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Largest accepted request body in bytes; larger bodies get 413.
    pub body_limit_bytes: usize,
    /// Bearer token that protects the `/admin/*` endpoints. Unset: they are
    /// served on loopback listeners only.
    pub admin_token: Option<Secret>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            body_limit_bytes: 1024 * 1024,
            admin_token: None,
        }
    }
}

/// The durable outbox (see `outbox` module docs).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxConfig {
    /// Folder that holds the outbox database; created if missing.
    pub data_dir: PathBuf,
    /// Most events waiting for the broker; past it the ingress answers 503.
    pub max_pending: u64,
    /// Most bytes of events waiting for the broker; past it the ingress answers 503.
    pub max_pending_bytes: u64,
    /// Drop repeated (taskId, state) callbacks and stale states (see README).
    pub dedup: bool,
    /// How long an accepted (taskId, state) suppresses repeats, in seconds.
    pub dedup_window_secs: u64,
    /// Most events the relay hands to the publisher at once.
    pub relay_batch: usize,
    /// First retry delay after a transient publish error, in milliseconds.
    pub retry_initial_ms: u64,
    /// Longest retry delay after repeated transient publish errors, in milliseconds.
    pub retry_max_ms: u64,
    /// How long shutdown waits for the in-flight batch, in milliseconds.
    pub shutdown_grace_ms: u64,
    /// How many rejected request bodies are kept for inspection (oldest dropped first).
    pub keep_rejected: u64,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("data"),
            max_pending: 1_000_000,
            max_pending_bytes: 4 * 1024 * 1024 * 1024,
            dedup: true,
            dedup_window_secs: 7 * 24 * 3600,
            relay_batch: 2000,
            retry_initial_ms: 100,
            retry_max_ms: 30_000,
            shutdown_grace_ms: 10_000,
            keep_rejected: 1000,
        }
    }
}

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
    /// Topic template; `{model}` and `{state}` are replaced per event.
    #[serde(default = "default_topic")]
    pub topic: String,
    /// How long librdkafka tries one message before reporting it failed; the
    /// relay then retries it, so this bounds one attempt, not the event's life.
    #[serde(default = "default_message_timeout_ms")]
    pub message_timeout_ms: u64,
    /// Extra librdkafka properties (TLS, SASL, compression, ...). Values
    /// here override hookbridge's own, except the delivery guarantees
    /// (`acks`, `enable.idempotence`), which are refused.
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
    /// Subject template; `{model}` and `{state}` are replaced per event.
    #[serde(default = "default_subject")]
    pub subject: String,
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

/// Logging.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `tracing` filter, e.g. `info` or `hookbridge=debug`; `RUST_LOG` wins.
    pub level: String,
    /// One JSON object per line instead of human-readable text.
    pub json: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            json: false,
        }
    }
}

/// A string that never appears in logs or `Debug` output.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The value, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

/// A configuration that cannot be used, with the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Load(#[from] Box<figment::Error>),
    #[error("invalid `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
}

impl Config {
    /// Defaults, then `file` (when given), then `HOOKBRIDGE_*` variables.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            figment = figment.merge(Toml::file_exact(file));
        }
        Self::extract(figment.merge(Env::prefixed("HOOKBRIDGE_").split("__")))
    }

    /// Parses a TOML document over the defaults (no environment), for tests.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Self::extract(
            Figment::from(Serialized::defaults(Config::default())).merge(Toml::string(text)),
        )
    }

    fn extract(figment: Figment) -> Result<Self, ConfigError> {
        let config: Config = figment.extract().map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    /// Refuses values that would only fail later.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: &str| {
            Err(ConfigError::Invalid {
                key,
                reason: reason.to_string(),
            })
        };
        let o = &self.outbox;
        if self.server.body_limit_bytes == 0 {
            return invalid("server.body_limit_bytes", "must be at least 1");
        }
        if o.max_pending == 0 {
            return invalid("outbox.max_pending", "must be at least 1");
        }
        if o.max_pending_bytes < self.server.body_limit_bytes as u64 {
            return invalid(
                "outbox.max_pending_bytes",
                "must be at least server.body_limit_bytes",
            );
        }
        if o.relay_batch == 0 || o.relay_batch > 100_000 {
            return invalid("outbox.relay_batch", "must be between 1 and 100000");
        }
        if o.retry_initial_ms == 0 || o.retry_max_ms < o.retry_initial_ms {
            return invalid(
                "outbox.retry_max_ms",
                "retry_initial_ms must be > 0 and retry_max_ms >= retry_initial_ms",
            );
        }
        if o.dedup_window_secs == 0 {
            return invalid("outbox.dedup_window_secs", "must be at least 1");
        }
        if let Some(token) = &self.server.admin_token {
            if token.expose().len() < 16 {
                return invalid("server.admin_token", "must be at least 16 characters");
            }
        }
        match &self.publisher {
            PublisherConfig::File(f) if f.path.is_empty() => {
                invalid("publisher.path", "must be a file path or `-`")
            }
            PublisherConfig::Kafka(k) => {
                if k.brokers.trim().is_empty() {
                    return invalid("publisher.brokers", "must list at least one broker");
                }
                check_template("publisher.topic", &k.topic)?;
                for key in ["acks", "enable.idempotence", "bootstrap.servers"] {
                    if k.options.contains_key(key) {
                        return Err(ConfigError::Invalid {
                            key: "publisher.options",
                            reason: format!(
                                "`{key}` is set by hookbridge and may not be overridden"
                            ),
                        });
                    }
                }
                Ok(())
            }
            PublisherConfig::Nats(n) => {
                if n.url.trim().is_empty() {
                    return invalid("publisher.url", "must name at least one server");
                }
                check_template("publisher.subject", &n.subject)?;
                if let Some(s) = &n.stream {
                    if s.name.is_empty() || s.subjects.is_empty() {
                        return invalid(
                            "publisher.stream",
                            "needs a name and at least one subject",
                        );
                    }
                    if !n.jetstream {
                        return invalid("publisher.stream", "needs `jetstream = true`");
                    }
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

fn check_template(key: &'static str, template: &str) -> Result<(), ConfigError> {
    let stripped = template.replace("{model}", "").replace("{state}", "");
    if template.is_empty() || stripped.contains(['{', '}']) {
        return Err(ConfigError::Invalid {
            key,
            reason: "must be non-empty and may only use the placeholders {model} and {state}"
                .into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_config_files_parse() {
        for name in ["default.toml", "kafka.toml", "nats.toml"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("config")
                .join(name);
            let text = std::fs::read_to_string(&path).unwrap();
            Config::from_toml(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = Config::from_toml("[server]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n").unwrap_err();
        assert!(err.to_string().contains("lisen"), "{err}");
        let err =
            Config::from_toml("[publisher]\ntype = \"kafka\"\nbrokers = \"x:1\"\ntopik = \"t\"\n")
                .unwrap_err();
        assert!(err.to_string().contains("topik"), "{err}");
    }

    #[test]
    fn invalid_values_name_their_key() {
        let err = Config::from_toml("[outbox]\nmax_pending = 0\n").unwrap_err();
        assert!(err.to_string().contains("outbox.max_pending"), "{err}");
        let err = Config::from_toml("[publisher]\ntype = \"kafka\"\nbrokers = \"\"\n").unwrap_err();
        assert!(err.to_string().contains("publisher.brokers"), "{err}");
        let err = Config::from_toml(
            "[publisher]\ntype = \"kafka\"\nbrokers = \"a:1\"\n[publisher.options]\nacks = \"1\"\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("acks"), "{err}");
        let err = Config::from_toml(
            "[publisher]\ntype = \"nats\"\nurl = \"x\"\nsubject = \"a.{task}\"\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("publisher.subject"), "{err}");
        let err = Config::from_toml("[server]\nlisten = \"nowhere\"\n").unwrap_err();
        assert!(err.to_string().contains("listen"), "{err}");
    }

    #[test]
    fn secrets_are_not_printed() {
        let config = Config::from_toml(
            "[publisher]\ntype = \"kafka\"\nbrokers = \"a:1\"\n[publisher.options]\n\"sasl.password\" = \"hunter2-hunter2\"\n",
        )
        .unwrap();
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's own signature
    fn environment_overrides_nested_keys() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("HOOKBRIDGE_PUBLISHER__TYPE", "nats");
            jail.set_env("HOOKBRIDGE_PUBLISHER__URL", "nats://127.0.0.1:4999");
            jail.set_env("HOOKBRIDGE_OUTBOX__MAX_PENDING", "42");
            let config = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(config.outbox.max_pending, 42);
            match config.publisher {
                PublisherConfig::Nats(n) => assert_eq!(n.url, "nats://127.0.0.1:4999"),
                other => panic!("{other:?}"),
            }
            Ok(())
        });
    }
}
