//! hookbridge turns the provider's best-effort task callbacks into durable,
//! deduplicated, per-task ordered events on Kafka or NATS JetStream.
//!
//! # The data path
//!
//! ```text
//! provider --POST /webhooks/kinovi--> http::serve (slots, TLS) -> http::Clients
//!                                     (refusal budget) -> http::webhook
//!     event::parse        any documented payload shape -> TaskEvent (pure);
//!                         a refused body -> http's rejected ring (in memory)
//!     outbox::append      dedup + state guard, then one record (the event and
//!                         its event::EventMeta) in the pending log: one write
//!                         + fdatasync shared by concurrent requests (group
//!                         commit); dedup records reach the task store (redb)
//!                         in bulk, off the request path
//!   <-- 200 {"message":"ok"}   only after that sync; then the decision
//!                              goes to trace::Traces (memory, bounded)
//! outbox::Relay            oldest first, one entry per task per batch
//!     publish::Publisher   Kafka (key = taskId, acks=all, idempotent) |
//!                          JetStream (Nats-Msg-Id = eventId, PubAck) | file
//!     outbox::complete     ack in the log (segments deleted once all acked),
//!                          dead-letter (redb) on permanent refusal;
//!                          where each event landed -> trace::Traces
//! poll::Reconciler         registered tasks without a terminal event: poll
//!                          recordInfo, outbox::append (source=poll) or bury
//! poll::Verifier           verify mode: held callbacks confirmed, then
//!                          outbox::append, else outbox::bury
//! ```
//!
//! # Where each part lives (imports point down, never in a loop)
//!
//! ```text
//! app, main, cli     wiring: App::build/run; operator commands
//! http               routers, serve (accept loop, slots, TLS), webhook, tasks,
//!                    admin, ready (/readyz); http::metrics renders /metrics;
//!                    http::rejected keeps rejected bodies for /admin/rejected;
//!                    http::console serves the operator console at /ui
//! supervise          restarts the background workers, feeds /readyz
//! poll, cluster      provider client, task registry, reconciler, verifier;
//!                    replicas as one bridge
//! outbox             pending log, writer (dedup, group commit), store, relay
//! trace              the per-task trace (GET /admin/tasks/{id}, `trace`)
//! telemetry          logs; OpenTelemetry spans (receive, store, publish) over
//!                    OTLP, off unless telemetry.otlp_endpoint is set
//! config             layering, validation; maps publish's (key, reason) errors
//! publish            Publisher + kafka, nats, file; publish::config (its
//!                    settings) and publish::names (topic/subject checks)
//! event              parser, TaskEvent (pure); event::meta: EventMeta, what a
//!                    log record stores beside the event's JSON
//! bottom floor       clock (now_ms), sync (lock, panic_message), secret
//! (no crate import)  (Secret, mask_url), db (redb errors, table_len, the
//!                    re-openable redb cell), metrics (the instruments)
//! ```
//!
//! # The guarantees, and where each lives
//!
//! - **Nothing accepted is lost** ([`outbox`]): a 2xx means the event is on
//!   disk; the relay retries transient broker errors with capped backoff
//!   for as long as it takes and deletes an entry only after the broker
//!   acknowledged it. A restart resumes what is pending. Permanent refusals
//!   are kept as dead letters (capped by count and bytes, the oldest
//!   dropped first and counted); an event refused where it goes (no
//!   stream, unknown topic) is retried alone and dead-lettered after
//!   `outbox.refusal_attempts`, never holding the others up. A batch is
//!   bounded in count and bytes (`outbox.relay_batch_bytes`). Damage on
//!   disk costs only the records it hits: the log skips to the next valid
//!   record and keeps the damaged bytes as a dead letter; a damaged redb
//!   file is set aside at start.
//! - **One event per task state** ([`outbox`], [`event::event_id`]): the
//!   (taskId, state) key is checked by the single writer and recorded in
//!   the very log record that stores the event, then in the task store,
//!   for `outbox.dedup_window_secs`; a restart reads back what the store
//!   lacks. The event id
//!   is a UUIDv5 of that key, so consumers and JetStream can dedupe the rare
//!   republish after a crash (delivery to the broker is at least once).
//! - **Per-task order** ([`outbox::Relay`]): entries are relayed in commit
//!   order with at most one in flight per task; Kafka keys by taskId, so a
//!   task stays on one partition.
//! - **Fast answers**: the broker is never on the request path; the answer
//!   waits for one shared fsync.
//! - **Untrusted input** ([`event`], [`http`]): bodies are size- and
//!   time-limited and parsed strictly within stated bounds (times, nesting
//!   depth, repeated keys, task id characters); a bad one gets a 4xx JSON
//!   error naming the field and is kept, cut and capped, in memory for
//!   `/admin/rejected` (http's ring), never in the outbox. The public listener
//!   ([`http::Clients`]) never rate limits valid callbacks: it charges what
//!   it refuses to the client's address (a penalty at accept once its
//!   budget is spent), caps connections per address, evicts fairly, keeps
//!   slots and a backlog share for known senders, and delivers every early
//!   answer (a half-close and a bounded drain, never a reset); the operator
//!   endpoints live on a separate admin listener behind a Host, cross-site
//!   and token guard.
//! - **No registered task forgotten** ([`poll`]): tasks created through
//!   `POST /tasks` or watched are polled when their callback does not come,
//!   and dead-lettered as `stuck` at their deadline; verify mode keeps forged
//!   callbacks off the broker. `sim` (feature `sim`) simulates the provider for tests.
//! - **No destination at the sender's choice** ([`publish`]): `{model}` needs
//!   an allowlist, so every topic or subject is known at start; the Kafka
//!   publisher creates its topics and never has one auto-created.
//! - **One bad event never stops the flow** ([`outbox::Relay`]): each event
//!   is encoded on its own; an error or a panic there, or an entry that does
//!   not decode, makes that one event a dead letter and the relay goes on.
//! - **Workers are supervised** ([`supervise`]): the relay, the pruner, the
//!   reconciler and the verifier are restarted with backoff when they stop
//!   or panic, the outbox writer thread survives a panicking group and is
//!   joined on shutdown, and `run` ends with an error when a worker cannot
//!   be kept alive. `GET /readyz` ([`http::ready`]) says 503 while anything
//!   is down, restarting, failing to write, or stalled; `/healthz` is
//!   liveness only.
//! - **Several replicas as one bridge** ([`cluster`], `[cluster] enabled`):
//!   dedup and per-task order across replicas through a Kafka consumer
//!   group with transactions, or JetStream writes conditional on the task's last message.

pub mod app;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod db;
pub mod event;
pub mod http;
pub mod metrics;
pub mod outbox;
pub mod poll;
pub mod publish;
pub mod redb_file;
pub mod secret;
#[cfg(feature = "sim")]
pub mod sim;
pub mod supervise;
pub mod sync;
pub mod telemetry;
pub mod trace;

pub use app::App;
pub use config::Config;

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            // No SIGINT handler: SIGTERM (below) still stops the service.
            tracing::warn!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received"),
        _ = term => tracing::info!("SIGTERM received"),
    }
}
