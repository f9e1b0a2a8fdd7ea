//! Configuration: built-in defaults, then an optional TOML file, then
//! `HOOKBRIDGE_<SECTION>__<KEY>` environment variables (later layers win).
//!
//! Every struct denies unknown fields so a typo is an error at start-up, not a
//! silently ignored setting. [`Config::validate`] refuses values that would
//! only fail later, naming the key. Secrets are wrapped in [`Secret`], whose
//! `Debug` never prints them.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

mod ranges;
mod show;
pub use crate::publish::config::{
    librdkafka_key, FileConfig, KafkaConfig, NatsConfig, PublisherConfig, StreamConfig,
    KAFKA_DEFAULT_MESSAGE_MAX_BYTES, KAFKA_MESSAGE_OVERHEAD, MAX_BODY_LIMIT,
};
pub use crate::secret::{mask_url, split_userinfo, Secret, MASK};
pub use show::is_secret_option;

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
}

/// Cluster mode: N replicas behind a load balancer behave as one bridge,
/// coordinated by the broker itself (see `cluster` module docs).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Turn cluster mode on. Off (the default): single-instance mode.
    pub enabled: bool,
    /// Kafka: the internal topic the relays publish to, keyed by taskId.
    pub internal_topic: String,
    /// Kafka: the compacted topic holding each task's guard state.
    pub changelog_topic: String,
    /// Kafka: the consumer group that assigns task ownership.
    pub group_id: String,
    /// Kafka: `transactional.id` of this replica's owner; unique per
    /// replica, stable across its restarts. Required with Kafka.
    pub transactional_id: String,
    /// Kafka: partitions of the internal and changelog topics when
    /// hookbridge creates them (the most replicas that share the work).
    pub partitions: i32,
    /// Kafka: replication factor of those topics when created.
    pub replication_factor: i32,
    /// On SIGTERM, `/readyz` answers 503 for this long before the listener
    /// closes, so the load balancer stops sending first, in milliseconds.
    pub drain_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            internal_topic: "hookbridge.internal".into(),
            changelog_topic: "hookbridge.changelog".into(),
            group_id: "hookbridge-owners".into(),
            transactional_id: String::new(),
            partitions: 12,
            replication_factor: 3,
            drain_ms: 3_000,
        }
    }
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

/// The HTTP ingress: the provider's callbacks, the task endpoints, `/healthz`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Largest accepted request body in bytes; larger bodies get 413. At
    /// most 64 MiB, and at most the broker's message limit (a Kafka topic's
    /// `max.message.bytes`, the NATS server's `max_payload`), checked at
    /// start when the broker answers.
    pub body_limit_bytes: usize,
    /// Longest wait for a request's headers, in milliseconds, counted from
    /// the moment the server waits for them: it also closes a keep-alive
    /// connection that stays idle that long.
    pub header_timeout_ms: u64,
    /// Longest time to receive a whole request body, in milliseconds; a
    /// slower one gets 408 and its connection is closed.
    pub body_timeout_ms: u64,
    /// Largest request head (request line and headers) in bytes; a larger
    /// one closes the connection.
    pub max_header_bytes: usize,
    /// Most connections served at once; more wait in the kernel's accept
    /// queue (no file descriptor is spent on them) until one closes.
    pub max_connections: usize,
    /// How long shutdown waits for open requests, in milliseconds; the
    /// connections still open then are dropped.
    pub shutdown_timeout_ms: u64,
    /// Most connections one client address may hold at once, once fewer
    /// than a quarter of `max_connections` are free. At the cap a
    /// new connection takes the place of that address's own oldest idle
    /// one; when all of them are busy, it waits (at most
    /// `header_timeout_ms`) for one of them to end. Known senders and
    /// trusted proxies are exempt.
    pub max_connections_per_client: usize,
    /// Slowest request body accepted, in bytes per second, after a grace
    /// of 2 s: a body behind that pace gets 408 and its connection is
    /// closed (0 turns it off; `body_timeout_ms` still applies).
    pub min_body_bytes_per_sec: u64,
    /// Known senders (the provider's addresses, CIDRs or single
    /// addresses). They are never charged or refused by the rate limits,
    /// never evicted, have `sender_connections` slots of their own and
    /// `sender_backlog_percent` of the backlog to themselves. Empty (the
    /// default): every address is treated alike.
    pub senders: Vec<String>,
    /// Connection slots reserved for known senders out of
    /// `max_connections`: other addresses are held to the rest. Only with
    /// `senders`.
    pub sender_connections: usize,
    /// Share of the outbox's backlog caps (`max_pending`,
    /// `max_pending_bytes`), in percent, that only known senders may fill:
    /// callbacks from other addresses get 503 once the backlog is past the
    /// rest. Only with `senders`.
    pub sender_backlog_percent: u8,
    /// Native TLS (HTTPS) on this listener. Unset: plain HTTP.
    pub tls: Option<TlsConfig>,
    /// What is limited per client address, and how the client's address is
    /// found behind proxies.
    pub rate_limit: RateLimitConfig,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            body_limit_bytes: 1024 * 1024,
            header_timeout_ms: 10_000,
            body_timeout_ms: 30_000,
            max_header_bytes: 16 * 1024,
            max_connections: 512,
            shutdown_timeout_ms: 15_000,
            max_connections_per_client: 64,
            min_body_bytes_per_sec: 1024,
            senders: Vec::new(),
            sender_connections: 64,
            sender_backlog_percent: 20,
            tls: None,
            rate_limit: RateLimitConfig::default(),
        }
    }
}

/// PEM files for native TLS; re-read when their modification time changes
/// or on SIGHUP, without dropping open connections.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The certificate chain, leaf first (PEM).
    pub cert: PathBuf,
    /// The private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// How often the files' modification times are checked, in milliseconds.
    #[serde(default = "default_tls_reload_check_ms")]
    pub reload_check_ms: u64,
}

fn default_tls_reload_check_ms() -> u64 {
    10_000
}

/// What is limited per client address on the public listener.
///
/// Valid callbacks are never rate limited (unless `others_per_sec` is set
/// with `senders`): the provider never retries, so a 429 would be a lost
/// callback. What is charged is what gets refused: every 4xx answer
/// (invalid body, wrong token, oversize, unknown path, slow body) and every
/// connection closed for a malformed or unfinished request head takes a
/// token from the client's refusal bucket. A client with an empty bucket
/// is refused for `penalty_secs`: its new connections are closed at
/// accept (429 before the body is read when it comes through a trusted
/// proxy). Known senders are never charged.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Refused requests per second one client address may cause in the
    /// long run; 0 turns the refusal budget off.
    pub refusals_per_sec: u32,
    /// Refused requests one client address may cause at once above that rate.
    pub refusal_burst: u32,
    /// How long a client past its refusal budget is refused, in seconds.
    pub penalty_secs: u64,
    /// With `server.senders` set: requests per second (valid or not) that
    /// any OTHER address may send; past it, 429. 0 (the default) leaves
    /// valid callbacks unlimited. Refused at start without senders, since
    /// it would then limit the provider too.
    pub others_per_sec: u32,
    /// Requests another address may send at once above `others_per_sec`.
    pub others_burst: u32,
    /// Most client addresses tracked at once; past it, idle ones are forgotten.
    pub max_clients: usize,
    /// Proxies (CIDRs such as `10.0.0.0/8` or single addresses) whose
    /// `forwarded_header` names the client. From any other peer the
    /// header is ignored.
    pub trusted_proxies: Vec<String>,
    /// The one header trusted proxies name the client in:
    /// `x-forwarded-for` (the default) or `forwarded` (RFC 7239). The
    /// other is ignored, and only the hops appended by trusted proxies
    /// count: the client is the right-most hop that is not a trusted proxy.
    pub forwarded_header: ForwardedHeader,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            refusals_per_sec: 10,
            refusal_burst: 200,
            penalty_secs: 30,
            others_per_sec: 0,
            others_burst: 0,
            max_clients: 100_000,
            trusted_proxies: Vec::new(),
            forwarded_header: ForwardedHeader::XForwardedFor,
        }
    }
}

/// The header trusted proxies use to name the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ForwardedHeader {
    #[serde(rename = "x-forwarded-for")]
    XForwardedFor,
    #[serde(rename = "forwarded")]
    Forwarded,
}

/// The operator listener: `/admin/*` and readiness.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address to listen on; port 0 picks a free port. Beyond loopback a
    /// `token` is required.
    pub listen: SocketAddr,
    /// Bearer token for `/admin/*`, at least 16 characters. Unset: reads are
    /// open to the (loopback) listener, and `POST`s still need an
    /// `Authorization` header, which a browser cannot send cross-site.
    pub token: Option<Secret>,
    /// Host names accepted in the `Host` header besides `localhost`, the
    /// loopback addresses and the listen address (e.g. a proxy's name).
    pub allowed_hosts: Vec<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9091)),
            token: None,
            allowed_hosts: Vec::new(),
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

/// The provider's task API and the endpoints that register tasks with hookbridge.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProviderConfig {
    /// Base URL of the provider's API (`/api/v1/jobs/...` is appended).
    pub base_url: String,
    /// The provider API key, sent as `Authorization: Bearer`. Needed for
    /// `POST /tasks`, polling and verify mode; never logged.
    pub api_key: Option<Secret>,
    /// Longest wait for one provider request, answer included, in milliseconds.
    pub request_timeout_ms: u64,
    /// Most status requests to the provider in flight at once.
    pub max_in_flight: usize,
    /// Most status requests to the provider per second.
    pub requests_per_sec: u32,
    /// Extra attempts of a status request after a 429, a 5xx or a network error.
    pub max_retries: u32,
    /// First delay before such a retry, in milliseconds; doubles per attempt.
    pub retry_initial_ms: u64,
    /// Longest delay between two attempts, in milliseconds.
    pub retry_max_ms: u64,
    /// hookbridge's own base URL as the provider reaches it, e.g.
    /// `https://hooks.example.com`; `POST /tasks` sets `callBackUrl` to
    /// `{public_url}/webhooks/kinovi?token=...`.
    pub public_url: Option<String>,
    /// Bearer token that protects `POST /tasks` and `POST /tasks/{taskId}/watch`.
    /// Unset: those endpoints answer 404. At least 16 characters.
    pub tasks_token: Option<Secret>,
    /// Confirm every callback against the status endpoint before publishing
    /// it; unconfirmed ones become dead letters. Needs `api_key`.
    pub verify: bool,
    /// Verify mode: most callbacks awaiting verification at once; past it
    /// the webhook answers 503. A repeated (taskId, state) takes no room.
    pub max_held: u64,
    /// Verify mode: most bytes of held callbacks (each keeps the task id,
    /// the state, the receive time, the sender's address and at most 256
    /// bytes of the body); past it the webhook answers 503.
    pub max_held_bytes: u64,
    /// Verify mode: most callbacks held at once for one client address (an
    /// IPv6 address counts by its /64), so that one address cannot fill the
    /// queue; past it that address gets 503.
    pub max_held_per_address: u64,
    /// Memory for the page cache of the task registry
    /// (`<outbox.data_dir>/tasks.redb`: registrations and held callbacks), in MiB.
    pub registry_cache_mib: usize,
}

impl Default for ProviderConfig {
    fn default() -> Self {
        Self {
            base_url: "https://kinovi.ai".into(),
            api_key: None,
            request_timeout_ms: 10_000,
            max_in_flight: 4,
            requests_per_sec: 10,
            max_retries: 3,
            retry_initial_ms: 500,
            retry_max_ms: 10_000,
            public_url: None,
            tasks_token: None,
            verify: false,
            max_held: 100_000,
            max_held_bytes: 64 * 1024 * 1024,
            max_held_per_address: 10_000,
            registry_cache_mib: 32,
        }
    }
}

/// The reconciler: polls registered tasks that have no terminal event yet.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReconcileConfig {
    /// Poll registered tasks. Has no effect without `provider.api_key`.
    pub enabled: bool,
    /// How long after registration a task without a terminal event is first
    /// polled, in seconds (the provider advises 10-15 minutes); 0 polls at once.
    pub first_poll_after_secs: u64,
    /// How long after registration a task without a terminal state is given
    /// up on: it becomes a dead letter with the reason `stuck`, in seconds.
    pub deadline_secs: u64,
    /// Delay between the first two polls of a task, in milliseconds; it
    /// doubles after each poll that finds the task still running.
    pub poll_initial_ms: u64,
    /// Longest delay between two polls of a task, in milliseconds.
    pub poll_max_ms: u64,
    /// How long the provider may answer 404 for a task (registered, or named
    /// by a callback in verify mode) before it counts as unknown, in seconds.
    pub unknown_task_grace_secs: u64,
    /// Also publish the non-terminal states (`waiting`, `generating`) that
    /// polling observes.
    pub publish_progress: bool,
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            first_poll_after_secs: 600,
            deadline_secs: 1800,
            poll_initial_ms: 5_000,
            poll_max_ms: 60_000,
            unknown_task_grace_secs: 60,
            publish_progress: false,
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

    /// Refuses values that would only fail later.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: &str| {
            Err(ConfigError::Invalid {
                key,
                reason: reason.to_string(),
            })
        };
        ranges::check(self)?;
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
        if o.cache_mib == 0 {
            return invalid("outbox.cache_mib", "must be at least 1");
        }
        if o.dedup_window_secs == 0 {
            return invalid("outbox.dedup_window_secs", "must be at least 1");
        }
        let h = &self.health;
        if h.stall_secs == 0 {
            return invalid("health.stall_secs", "must be at least 1");
        }
        if h.restart_backoff_ms == 0 || h.restart_backoff_ms > 30_000 {
            return invalid("health.restart_backoff_ms", "must be between 1 and 30000");
        }
        if h.restart_window_secs == 0 {
            return invalid("health.restart_window_secs", "must be at least 1");
        }
        if o.max_tracked_tasks == 0 {
            return invalid("outbox.max_tracked_tasks", "must be at least 1");
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
        self.validate_edge()?;
        self.validate_provider()?;
        self.validate_cluster()?;
        crate::publish::check_settings(&self.publisher, self.server.body_limit_bytes)?;
        Ok(())
    }
}

impl Config {
    fn validate_edge(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: &str| {
            Err(ConfigError::Invalid {
                key,
                reason: reason.to_string(),
            })
        };
        let s = &self.server;
        for (key, value) in [
            ("server.header_timeout_ms", s.header_timeout_ms),
            ("server.body_timeout_ms", s.body_timeout_ms),
            ("server.shutdown_timeout_ms", s.shutdown_timeout_ms),
        ] {
            if value == 0 {
                return invalid(key, "must be at least 1");
            }
        }
        if s.max_header_bytes < 1024 {
            return invalid("server.max_header_bytes", "must be at least 1024");
        }
        if s.max_connections == 0 {
            return invalid("server.max_connections", "must be at least 1");
        }
        if let Some(tls) = &s.tls {
            if tls.reload_check_ms == 0 {
                return invalid("server.tls.reload_check_ms", "must be at least 1");
            }
        }
        if s.max_connections_per_client == 0 {
            return invalid("server.max_connections_per_client", "must be at least 1");
        }
        for sender in &s.senders {
            if let Err(reason) = Cidr::parse(sender) {
                return invalid("server.senders", &reason);
            }
        }
        if !s.senders.is_empty() {
            if s.sender_connections >= s.max_connections {
                return invalid(
                    "server.sender_connections",
                    "must be less than server.max_connections (others need slots too)",
                );
            }
            if s.sender_backlog_percent > 90 {
                return invalid("server.sender_backlog_percent", "must be at most 90");
            }
        }
        let r = &s.rate_limit;
        if r.refusals_per_sec > 0 && r.refusal_burst == 0 {
            return invalid("server.rate_limit.refusal_burst", "must be at least 1");
        }
        if r.penalty_secs > 86_400 {
            return invalid("server.rate_limit.penalty_secs", "must be at most 86400");
        }
        if r.others_per_sec > 0 {
            if s.senders.is_empty() {
                return invalid(
                    "server.rate_limit.others_per_sec",
                    "needs server.senders: without them it would rate limit the provider",
                );
            }
            if r.others_burst == 0 {
                return invalid("server.rate_limit.others_burst", "must be at least 1");
            }
        }
        if r.max_clients == 0 {
            return invalid("server.rate_limit.max_clients", "must be at least 1");
        }
        for proxy in &r.trusted_proxies {
            match Cidr::parse(proxy) {
                Err(reason) => return invalid("server.rate_limit.trusted_proxies", &reason),
                // A /0 trusts every peer: any client could name any address.
                Ok(cidr) if cidr.prefix == 0 => {
                    return invalid(
                        "server.rate_limit.trusted_proxies",
                        &format!("{proxy:?} would trust every peer; list the proxies"),
                    )
                }
                Ok(_) => {}
            }
        }
        let a = &self.admin;
        if let Some(token) = &a.token {
            if token.expose().chars().count() < 16 {
                return invalid("admin.token", "must be at least 16 characters");
            }
        } else if !a.listen.ip().is_loopback() {
            return invalid(
                "admin.listen",
                "a listener beyond loopback needs admin.token",
            );
        }
        Ok(())
    }

    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let c = &self.cluster;
        if !c.enabled {
            return Ok(());
        }
        let invalid = |key, reason: &str| {
            Err(ConfigError::Invalid {
                key,
                reason: reason.to_string(),
            })
        };
        if c.drain_ms > 600_000 {
            return invalid("cluster.drain_ms", "must be at most 600000");
        }
        match &self.publisher {
            PublisherConfig::File(_) => {
                invalid("cluster.enabled", "needs a Kafka or a JetStream publisher")
            }
            PublisherConfig::Kafka(_) => {
                for (key, topic) in [
                    ("cluster.internal_topic", &c.internal_topic),
                    ("cluster.changelog_topic", &c.changelog_topic),
                ] {
                    crate::publish::names::check_topic(topic)
                        .or_else(|e| invalid(key, &e.to_string()))?;
                }
                if c.internal_topic == c.changelog_topic {
                    return invalid(
                        "cluster.changelog_topic",
                        "must differ from cluster.internal_topic",
                    );
                }
                if c.group_id.trim().is_empty() {
                    return invalid("cluster.group_id", "must not be empty");
                }
                if c.transactional_id.trim().is_empty() {
                    return invalid(
                        "cluster.transactional_id",
                        "must be set, unique per replica, with a Kafka publisher",
                    );
                }
                if !(1..=10_000).contains(&c.partitions) {
                    return invalid("cluster.partitions", "must be between 1 and 10000");
                }
                if !(1..=16).contains(&c.replication_factor) {
                    return invalid("cluster.replication_factor", "must be between 1 and 16");
                }
                Ok(())
            }
            PublisherConfig::Nats(n) => {
                if !n.jetstream {
                    return invalid("cluster.enabled", "needs `publisher.jetstream = true`");
                }
                // The stream's own write keeps each task's order: every
                // state of a task must land on subjects one filter selects.
                if !crate::publish::names::has_whole_task_token(&n.subject) {
                    return invalid(
                        "publisher.subject",
                        "must have {task} as one of its tokens in JetStream cluster mode, \
                         and {model}, {state} and {task} only as whole tokens \
                         (e.g. kinovi.tasks.{state}.{task}): the stream keeps each task's \
                         order by the last message on that task's subjects",
                    );
                }
                Ok(())
            }
        }
    }

    fn validate_provider(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: &str| {
            Err(ConfigError::Invalid {
                key,
                reason: reason.to_string(),
            })
        };
        let (p, r) = (&self.provider, &self.reconcile);
        check_url("provider.base_url", &p.base_url)?;
        if let Some(url) = &p.public_url {
            check_url("provider.public_url", url)?;
            if url.contains(['?', '#']) {
                return invalid("provider.public_url", "must not carry a query or fragment");
            }
        }
        if p.request_timeout_ms == 0 {
            return invalid("provider.request_timeout_ms", "must be at least 1");
        }
        if p.max_in_flight == 0 {
            return invalid("provider.max_in_flight", "must be at least 1");
        }
        if p.requests_per_sec == 0 {
            return invalid("provider.requests_per_sec", "must be at least 1");
        }
        if p.retry_initial_ms == 0 || p.retry_max_ms < p.retry_initial_ms {
            return invalid(
                "provider.retry_max_ms",
                "retry_initial_ms must be > 0 and retry_max_ms >= retry_initial_ms",
            );
        }
        if p.api_key
            .as_ref()
            .is_some_and(|k| k.expose().trim().is_empty())
        {
            return invalid("provider.api_key", "must not be empty");
        }
        if p.max_held == 0 {
            return invalid("provider.max_held", "must be at least 1");
        }
        if p.max_held_bytes < 64 * 1024 {
            return invalid("provider.max_held_bytes", "must be at least 65536");
        }
        if p.max_held_per_address == 0 {
            return invalid("provider.max_held_per_address", "must be at least 1");
        }
        if p.registry_cache_mib == 0 {
            return invalid("provider.registry_cache_mib", "must be at least 1");
        }
        if p.verify && p.api_key.is_none() {
            return invalid("provider.verify", "needs provider.api_key");
        }
        if let Some(token) = &p.tasks_token {
            if token.expose().chars().count() < 16 {
                return invalid("provider.tasks_token", "must be at least 16 characters");
            }
            if p.api_key.is_none() || p.public_url.is_none() {
                return invalid(
                    "provider.tasks_token",
                    "needs provider.api_key and provider.public_url",
                );
            }
        }
        if r.deadline_secs == 0 || r.deadline_secs <= r.first_poll_after_secs {
            return invalid(
                "reconcile.deadline_secs",
                "must be greater than reconcile.first_poll_after_secs",
            );
        }
        if r.poll_initial_ms == 0 || r.poll_max_ms < r.poll_initial_ms {
            return invalid(
                "reconcile.poll_max_ms",
                "poll_initial_ms must be > 0 and poll_max_ms >= poll_initial_ms",
            );
        }
        Ok(())
    }
}

fn check_url(key: &'static str, url: &str) -> Result<(), ConfigError> {
    let ok = (url.starts_with("http://") || url.starts_with("https://"))
        && url
            .parse::<axum::http::Uri>()
            .is_ok_and(|u| u.host().is_some());
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            key,
            reason: format!("{url:?} is not an http:// or https:// URL"),
        })
    }
}

/// An address block such as `10.0.0.0/8`, or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Result<Self, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{text:?} is not an address or CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{text:?} has an invalid prefix length"))?,
            None => max,
        };
        Ok(Self { addr, prefix })
    }

    /// Whether `ip` is inside the block (IPv4-mapped IPv6 counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let (a, b, bits) = match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => (u32::from(a) as u128, u32::from(b) as u128, 32),
            (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), 128),
            _ => return false,
        };
        let host_bits = bits - u32::from(self.prefix);
        let mask = if host_bits >= 128 {
            0
        } else {
            u128::MAX << host_bits
        };
        a & mask == b & mask
    }
}

#[cfg(test)]
mod tests;
