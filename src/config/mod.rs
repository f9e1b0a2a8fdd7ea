//! Configuration: built-in defaults, then an optional TOML file, then
//! `HOOKBRIDGE_<SECTION>__<KEY>` environment variables (later layers win).
//!
//! Every struct denies unknown fields so a typo is an error at start-up, not a
//! silently ignored setting. [`Config::validate`] refuses values that would
//! only fail later, naming the key. Secrets are wrapped in [`Secret`], whose
//! `Debug` never prints them.
//!
//! One file a job: [`server`] (the listeners, `Cidr`), [`provider`] (the
//! provider's API and the reconciler), [`cluster`], [`ranges`] (every
//! number's range), [`show`] (the masked printout); the publisher's
//! settings and their checks belong to `crate::publish::config`, which this
//! module embeds and whose refusals it maps into [`ConfigError`].

use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

mod cluster;
mod provider;
mod ranges;
mod server;
mod show;
mod telemetry;
pub use crate::publish::config::{
    librdkafka_key, FileConfig, KafkaConfig, NatsConfig, PublisherConfig, StreamConfig,
    KAFKA_DEFAULT_MESSAGE_MAX_BYTES, KAFKA_MESSAGE_OVERHEAD, MAX_BODY_LIMIT,
};
pub use crate::secret::{mask_url, split_userinfo, Secret, MASK};
pub use cluster::ClusterConfig;
pub use provider::{ProviderConfig, ReconcileConfig};
pub use server::{AdminConfig, Cidr, ForwardedHeader, RateLimitConfig, ServerConfig, TlsConfig};
pub use show::is_secret_option;
pub use telemetry::TelemetryConfig;

/// The whole configuration of one hookbridge process.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The HTTP ingress.
    pub server: ServerConfig,
    /// The operator listener: `/admin/*` and readiness.
    pub admin: AdminConfig,
    /// The durable outbox between the ingress and the broker.
    pub outbox: OutboxConfig,
    /// Where accepted events are published. Not part of the serialized
    /// defaults: a `type` from a file or the environment must not inherit
    /// another backend's default fields.
    #[serde(skip_serializing)]
    pub publisher: PublisherConfig,
    /// Log output.
    pub log: LogConfig,
    /// The provider's task API: task creation, polling, callback verification.
    pub provider: ProviderConfig,
    /// Fallback polling of registered tasks whose callback does not come.
    pub reconcile: ReconcileConfig,
    /// Restarts of background workers, and what `/readyz` calls stalled.
    pub health: HealthConfig,
    /// Cluster mode: several replicas as one bridge (off by default).
    pub cluster: ClusterConfig,
    /// The per-task trace (`GET /admin/tasks/{taskId}`, `hookbridge trace`).
    pub trace: crate::trace::TraceConfig,
    /// OpenTelemetry traces over OTLP (off unless `otlp_endpoint` is set).
    pub telemetry: TelemetryConfig,
}
/// Supervision of the background workers and the readiness check.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// `/readyz` answers 503 when events are pending, the broker answers,
    /// and the relay has moved nothing for this long, in seconds.
    pub stall_secs: u64,
    /// Delay before restarting a worker that stopped or panicked, in
    /// milliseconds; it doubles with each restart up to 30 s.
    pub restart_backoff_ms: u64,
    /// Most restarts of one worker within `restart_window_secs`; one more
    /// and hookbridge exits with an error.
    pub max_restarts: u32,
    /// The window `max_restarts` counts in, in seconds.
    pub restart_window_secs: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            stall_secs: 120,
            restart_backoff_ms: 500,
            max_restarts: 10,
            restart_window_secs: 600,
        }
    }
}
/// The durable outbox (see `outbox` module docs).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxConfig {
    /// Folder that holds the outbox (the pending log in `pending/`, the
    /// dedup records and dead letters in `outbox.redb`); created if missing.
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
    /// Most bytes of events (their JSON) the relay reads and hands to the
    /// publisher at once, beside `relay_batch`: what bounds the relay's
    /// memory when events are large. One event larger than this still goes,
    /// alone. 64 KiB to 1 GiB.
    pub relay_batch_bytes: u64,
    /// How many times the broker may refuse one event for a reason that
    /// retrying cannot fix for that event (no stream for its subject, an
    /// unknown or invalid topic) before it becomes a dead letter. Each such
    /// event waits out its own backoff (`retry_initial_ms` doubling up to
    /// `retry_max_ms`); the others keep flowing. 1 to 1000.
    pub refusal_attempts: u32,
    /// First retry delay after a transient publish error, in milliseconds.
    pub retry_initial_ms: u64,
    /// Longest retry delay after repeated transient publish errors, in milliseconds.
    pub retry_max_ms: u64,
    /// How long shutdown waits for the in-flight batch, in milliseconds.
    pub shutdown_grace_ms: u64,
    /// How many rejected request bodies are kept in memory for inspection
    /// (each cut to 4 KiB; the oldest is dropped first).
    pub keep_rejected: u64,
    /// Most tasks whose dedup record is kept. Past it the oldest records are
    /// evicted, those of finished tasks first: a new task is never refused,
    /// but an evicted task's repeat may be published again (same `eventId`).
    pub max_tracked_tasks: u64,
    /// Most bytes of dedup records (task id + 65 bytes each), with the same
    /// eviction as `max_tracked_tasks`.
    pub max_tracked_bytes: u64,
    /// How long the record of a one-off task is kept, in seconds: a task
    /// seen in one callback only and not registered with hookbridge (the
    /// usual shape of junk). A value over `dedup_window_secs` counts as that.
    pub one_off_window_secs: u64,
    /// Memory for the page cache of `outbox.redb` (dedup records, dead
    /// letters), in MiB: with the channel and batch sizes, what bounds
    /// hookbridge's memory whatever the number of tasks tracked. Pending
    /// events are read from the log; memory holds only where each one is.
    pub cache_mib: usize,
    /// Most dead letters kept; past it (or past `max_dead_letter_bytes`)
    /// the oldest are deleted to make room, and counted
    /// (`hookbridge_dead_letters_dropped_total`).
    pub max_dead_letters: u64,
    /// Most bytes of dead letters kept (as stored, JSON), with the same
    /// policy: the oldest go first.
    pub max_dead_letter_bytes: u64,
    /// Most bytes of an event a dead letter keeps: a longer one (say, one
    /// the broker refused as too large) keeps its first bytes, hex-encoded,
    /// and says so (`truncatedFrom`); it cannot be requeued.
    pub dead_letter_keep_bytes: u64,
    /// A pending log segment is closed once it holds this many bytes, and
    /// deleted once nothing in it is pending. Smaller segments give disk
    /// space back sooner after an outage; at least 4096.
    pub segment_bytes: u64,
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
            relay_batch_bytes: 16 * 1024 * 1024,
            refusal_attempts: 8,
            retry_initial_ms: 100,
            retry_max_ms: 30_000,
            shutdown_grace_ms: 10_000,
            keep_rejected: 1000,
            max_tracked_tasks: 10_000_000,
            max_tracked_bytes: 2 * 1024 * 1024 * 1024,
            one_off_window_secs: 24 * 3600,
            cache_mib: 256,
            max_dead_letters: 100_000,
            max_dead_letter_bytes: 256 * 1024 * 1024,
            dead_letter_keep_bytes: 64 * 1024,
            // Small in the unit tests, so that they cross segments.
            segment_bytes: if cfg!(test) { 4096 } else { 64 << 20 },
        }
    }
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
/// A configuration that cannot be used, with the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Load(#[from] Box<figment::Error>),
    #[error("invalid `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
    /// A value still holds what `check` prints in place of a secret.
    #[error("invalid `{key}`: {}", crate::secret::MASKED_READ_BACK)]
    Masked { key: String },
}

/// The publisher's refusals (`crate::publish::Refusal`) name their key too.
impl From<(&'static str, String)> for ConfigError {
    fn from((key, reason): (&'static str, String)) -> Self {
        Self::Invalid { key, reason }
    }
}

impl Config {
    /// Defaults, then `file` (when given), then `HOOKBRIDGE_*` variables.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            figment = figment.merge(Toml::file_exact(file));
        }
        Self::extract(figment.merge(Self::environment()))
    }

    /// `HOOKBRIDGE_<SECTION>__<KEY>` variables: only names with a double
    /// underscore are configuration, and an unknown one is refused by name.
    /// Single-underscore names (`HOOKBRIDGE_CONFIG`, `HOOKBRIDGE_CACHE`,
    /// `HOOKBRIDGE_TEST_*`, the variables `docker-compose.yml` reads) belong
    /// to the tools around the bridge and are left alone.
    fn environment() -> Env {
        Env::prefixed("HOOKBRIDGE_")
            .filter(|key| key.as_str().contains("__"))
            .split("__")
    }

    /// Parses a TOML document over the defaults (no environment), for tests.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Self::extract(
            Figment::from(Serialized::defaults(Config::default())).merge(Toml::string(text)),
        )
    }

    fn extract(figment: Figment) -> Result<Self, ConfigError> {
        let config: Config = figment.extract().map_err(Box::new)?;
        show::refuse_masked_urls(&config)?;
        config.validate()?;
        Ok(config)
    }

    /// Refuses values that would only fail later: every number's range
    /// first (`ranges.rs`, the one place a range is stated), then each
    /// section's rules that a range cannot say, the publisher's last.
    pub fn validate(&self) -> Result<(), ConfigError> {
        ranges::check(self)?;
        self.validate_outbox()?;
        self.validate_server()?;
        self.validate_provider()?;
        self.validate_cluster()?;
        self.telemetry.check()?;
        crate::publish::check_settings(&self.publisher, self.server.body_limit_bytes)?;
        Ok(())
    }

    /// The body limit and the outbox's sizes: each event is one record of
    /// the outbox's log, and the backlog must hold at least one.
    fn validate_outbox(&self) -> Result<(), ConfigError> {
        let o = &self.outbox;
        if self.server.body_limit_bytes == 0 {
            return invalid("server.body_limit_bytes", "must be at least 1");
        }
        if self.server.body_limit_bytes > MAX_BODY_LIMIT {
            return invalid(
                "server.body_limit_bytes",
                "must be at most 67108864 (64 MiB): each event is one record of the outbox's log",
            );
        }
        if o.max_pending_bytes < self.server.body_limit_bytes as u64 {
            return invalid(
                "outbox.max_pending_bytes",
                "must be at least server.body_limit_bytes",
            );
        }
        if o.max_tracked_bytes < 64 * 1024 {
            return invalid("outbox.max_tracked_bytes", "must be at least 65536");
        }
        if o.one_off_window_secs == 0 {
            return invalid("outbox.one_off_window_secs", "must be at least 1");
        }
        if !(4096..=1 << 30).contains(&o.segment_bytes) {
            return invalid(
                "outbox.segment_bytes",
                "must be between 4096 and 1073741824",
            );
        }
        if o.max_dead_letters == 0 {
            return invalid("outbox.max_dead_letters", "must be at least 1");
        }
        if !(1024..=16 * 1024 * 1024).contains(&o.dead_letter_keep_bytes) {
            return invalid(
                "outbox.dead_letter_keep_bytes",
                "must be between 1024 and 16777216",
            );
        }
        // A dead letter stores what it keeps hex-encoded, with its reason.
        if o.max_dead_letter_bytes < 4 * o.dead_letter_keep_bytes {
            return invalid(
                "outbox.max_dead_letter_bytes",
                "must be at least 4 x outbox.dead_letter_keep_bytes",
            );
        }
        Ok(())
    }
}

/// `Err` naming `key` and why it is refused.
fn invalid(key: &'static str, reason: &str) -> Result<(), ConfigError> {
    Err(ConfigError::Invalid {
        key,
        reason: reason.to_string(),
    })
}

#[cfg(test)]
mod tests;
