//! Fallback polling and callback verification against the provider's task API.
//!
//! The provider's callbacks are best-effort (sent once, never retried) and
//! unsigned. Its status endpoint is the source of truth, and this module
//! uses it in two ways:
//!
//! - **Reconciler** ([`Reconciler`]): a task registered with hookbridge
//!   (`POST /tasks` creates it at the provider, `POST /tasks/{taskId}/watch`
//!   adopts one created elsewhere) that has no terminal event in the outbox
//!   `reconcile.first_poll_after_secs` after registration is polled on a
//!   doubling schedule. A terminal record goes through `Outbox::append` with
//!   `source = "poll"`: the outbox's (taskId, state) dedup collapses it with
//!   the callback, whichever comes first, so a consumer sees it once. A task
//!   still not finished at `reconcile.deadline_secs` becomes a dead letter
//!   with the reason `stuck: ...` (the last polled record, or a synthetic
//!   `pending` one) and is not polled again: no registered task is ever
//!   silently forgotten. So is a task the provider keeps answering 404 for
//!   after `reconcile.unknown_task_grace_secs` (`unknown task: ...`).
//! - **Verifier** ([`Verifier`], `provider.verify = true`): the webhook
//!   stores a callback durably as "to verify" and answers 200 at once (the
//!   provider's advice: answer fast). The verifier then fetches the task with
//!   our own key; a confirmed callback is appended (the provider's record,
//!   `source = "webhook"`: none of the sender's fields), an unconfirmed one
//!   (unknown task, other state) is buried as a dead letter with the reason.
//!   A forged callback therefore never reaches the broker. The held queue
//!   keeps one callback per (taskId, state), only what verification needs
//!   (task id, state, receive time, address, 256 bytes of the body), at
//!   most `provider.max_held` entries, `max_held_bytes` bytes and
//!   `max_held_per_address` entries from one client address; the verifier
//!   takes them round-robin across addresses, so a flood from one address
//!   delays a callback from another by a bounded time.
//!
//! Per-task callback tokens: a task created through `POST /tasks` gets a
//! `callBackUrl` carrying 32 random bytes; a callback for that task without
//! the same token is not stored, and kept (cut) under `/admin/rejected`.
//! It is answered 200 like any other, so that the answer does not tell a
//! sender which task ids were created through hookbridge; a real callback
//! that lost its token is still recovered by polling (the task is
//! registered).
//! Callbacks for tasks that are not registered, or were registered through
//! `watch` (no token), take the normal path: trusted on shape alone unless
//! verify mode is on.
//!
//! Stopping: 401 or 403 to a status request of the reconciler, or 401 to one
//! of the verifier, means the key is not (or no longer) valid. Polling and
//! verification stop with one error log line, `poll.authFailures` and
//! `poll.halted` in `/admin/status`; registrations and held callbacks stay
//! on disk and resume after a restart with a working key. (A 403 on a
//! verification only refutes that callback: a forged callback naming
//! another account's task must not be able to stop verification.)
//!
//! With `outbox.dedup = false` the outbox keeps no per-task record, so the
//! reconciler cannot see that a callback already told: every registered task
//! is polled once due and its terminal state published again (same
//! `eventId`, for consumers to drop).
//!
//! State lives in its own redb file, `<outbox.data_dir>/tasks.redb`
//! ([`Registry`]), so a restart resumes polling where it was. Schedule
//! updates are committed without fsync: losing one after a crash only means
//! an earlier poll. Registrations and held callbacks are fsynced before the
//! HTTP answer.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};

use crate::clock::now_ms;
use crate::config::{Config, ReconcileConfig};
use crate::event::{self, Source, State, TaskEvent};
use crate::outbox::Outbox;
use crate::secret::Secret;
use crate::sync::lock;

pub mod client;
mod reconciler;
pub mod registry;
mod verifier;

pub use client::{ProviderClient, ProviderError};
pub use reconciler::{Reconcile, ReconcileStep, Reconciler};
pub use registry::{
    sender_of, Due, Held, HeldCap, HeldDue, HeldLimits, Holding, Origin, Registration, Registry,
    RegistryError, RegistryOptions, Unreadable, UnreadableTask,
};
pub use verifier::{Verifier, Verify, VerifyStep};

/// Counters of the provider integration, shown under `poll` in `/admin/status`.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PollStats {
    /// Tasks registered through `POST /tasks` or `watch`.
    pub registered: AtomicU64,
    /// Status requests sent (each attempt counts).
    pub polls: AtomicU64,
    /// Status requests that failed: 429, 5xx, network error, timeout, unreadable answer.
    pub poll_errors: AtomicU64,
    /// 401/403 answers that stopped polling or verification.
    pub auth_failures: AtomicU64,
    /// Registered tasks the provider did not know after the grace period (dead letters).
    pub unknown_tasks: AtomicU64,
    /// Registered tasks with no terminal state by the deadline (dead letters).
    pub stuck: AtomicU64,
    /// Callbacks confirmed by the provider and passed on.
    pub verified: AtomicU64,
    /// Callbacks the provider did not confirm (dead letters).
    pub unconfirmed: AtomicU64,
    /// Registrations that could not be read, kept as dead letters.
    pub unreadable_registrations: AtomicU64,
    #[serde(skip)]
    halted: Mutex<Option<String>>,
}

impl PollStats {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Why polling stopped, if it did.
    pub fn halted(&self) -> Option<String> {
        lock(&self.halted).clone()
    }

    /// Stops polling and verification for the life of the process; logs once.
    pub(crate) fn halt(&self, reason: String) {
        let mut halted = lock(&self.halted);
        if halted.is_none() {
            Self::add(&self.auth_failures, 1);
            tracing::error!(
                %reason,
                "provider refused our API key: polling and callback verification STOPPED; \
                 fix provider.api_key and restart (registered tasks and held callbacks are kept)"
            );
            *halted = Some(reason);
        }
    }
}

/// What the HTTP handlers and the workers share: the registry, the provider
/// client (when a key is configured) and the settings of the task endpoints.
#[derive(Clone)]
pub struct Tasks {
    pub registry: Registry,
    pub client: Option<Arc<ProviderClient>>,
    pub stats: Arc<PollStats>,
    /// hookbridge's public base URL, without a trailing slash.
    pub public_url: Option<String>,
    pub tasks_token: Option<Secret>,
    pub verify: bool,
    /// `provider.max_held`, `max_held_bytes`, `max_held_per_address`.
    pub held_limits: HeldLimits,
    /// `reconcile.first_poll_after_secs`, in milliseconds.
    pub first_poll_after_ms: i64,
}

impl Tasks {
    /// Opens `<data_dir>/tasks.redb` and builds the provider client if an
    /// API key is configured.
    pub fn open(config: &Config) -> anyhow::Result<Self> {
        use anyhow::Context;
        let stats = Arc::new(PollStats::default());
        let options = RegistryOptions {
            cache_bytes: config
                .provider
                .registry_cache_mib
                .saturating_mul(1024 * 1024),
            reconciled: config.reconcile.enabled && config.provider.api_key.is_some(),
        };
        let registry = Registry::open(&config.outbox.data_dir, options)?;
        let client = match &config.provider.api_key {
            Some(_) => Some(Arc::new(
                ProviderClient::new(&config.provider, stats.clone())
                    .context("cannot create the provider client")?,
            )),
            None => None,
        };
        Ok(Self {
            registry,
            client,
            stats,
            public_url: config
                .provider
                .public_url
                .as_ref()
                .map(|u| u.trim_end_matches('/').to_string()),
            tasks_token: config.provider.tasks_token.clone(),
            verify: config.provider.verify,
            held_limits: HeldLimits {
                entries: config.provider.max_held,
                bytes: config.provider.max_held_bytes,
                per_address: config.provider.max_held_per_address,
            },
            first_poll_after_ms: (config.reconcile.first_poll_after_secs as i64)
                .saturating_mul(1000),
        })
    }

    /// The `poll` section of `/admin/status`.
    pub fn status(&self) -> Value {
        let (active, held) = self.registry.counts().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot count the registered tasks; reporting 0");
            (0, 0)
        });
        let (_, held_bytes) = self.registry.held_size().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot size the held callbacks; reporting 0");
            (0, 0)
        });
        json!({
            "polling": self.client.is_some(),
            "verify": self.verify,
            "halted": self.stats.halted(),
            "activeTasks": active,
            "awaitingVerification": held,
            "awaitingVerificationBytes": held_bytes,
            "counters": serde_json::to_value(&*self.stats).unwrap_or_default(),
        })
    }
}

/// A record for a task the provider never described to us (never polled
/// successfully): what the dead letter of a stuck or unknown task holds.
pub(crate) fn synthetic_pending(task_id: &str, now_ms: i64) -> TaskEvent {
    TaskEvent {
        schema_version: event::SCHEMA_VERSION,
        event_id: event::event_id(task_id, State::Pending),
        task_id: task_id.to_string(),
        order_id: None,
        model: None,
        state: State::Pending,
        provider_state: "pending".into(),
        credits_used: None,
        outputs: Vec::new(),
        error: None,
        create_time: None,
        complete_time: None,
        update_time: None,
        received_at: now_ms,
        source: Source::Poll,
        warnings: Vec::new(),
        conflicts_with: None,
        traceparent: None,
    }
}

/// `initial * 2^attempt`, capped at `max`.
pub(crate) fn backoff(initial: Duration, max: Duration, attempt: u32) -> Duration {
    initial
        .checked_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX))
        .unwrap_or(max)
        .min(max)
}

/// The pause after failed attempt number `attempt` (from 0) to poll a task
/// or verify a callback: `reconcile.poll_initial_ms`, doubling, capped at
/// `reconcile.poll_max_ms`.
pub(crate) fn retry_pause(config: &ReconcileConfig, attempt: u32) -> Duration {
    backoff(
        Duration::from_millis(config.poll_initial_ms),
        Duration::from_millis(config.poll_max_ms),
        attempt,
    )
}

/// Longest idle wait of a worker between two looks at the registry.
const IDLE: Duration = Duration::from_secs(5);
/// Shortest wait between two steps, so that work whose update could not be
/// saved does not spin the loop.
const MIN_PAUSE: Duration = Duration::from_millis(10);

/// The registry queue that feeds a worker.
#[derive(Debug, Clone, Copy)]
pub enum Queue {
    /// Registered tasks, for the reconciler.
    Registered,
    /// Held callbacks, for the verifier.
    Held,
}

impl Queue {
    /// Names the worker of this queue in log lines.
    fn worker(self) -> &'static str {
        match self {
            Self::Registered => "reconciler",
            Self::Held => "callback verifier",
        }
    }
}

/// What one kind of worker does in a step ([`Reconciler`], [`Verifier`]).
pub trait Job: Sized {
    const QUEUE: Queue;
    /// Does what is due now; `Ok(true)` when work is halted (the provider
    /// refused our key).
    fn step(
        worker: &mut PollWorker<Self>,
    ) -> impl Future<Output = Result<bool, RegistryError>> + Send;
}

/// A background worker of this module: the parts both kinds are made of,
/// and the loop that runs them. The kind `J` supplies the step.
pub struct PollWorker<J> {
    tasks: Tasks,
    client: Arc<ProviderClient>,
    outbox: Outbox,
    config: ReconcileConfig,
    max_in_flight: usize,
    job: std::marker::PhantomData<J>,
}

impl<J: Job> PollWorker<J> {
    /// `None` when there is no provider client (no API key).
    pub fn new(
        tasks: Tasks,
        outbox: Outbox,
        config: ReconcileConfig,
        max_in_flight: usize,
    ) -> Option<Self> {
        Some(Self {
            client: tasks.client.clone()?,
            tasks,
            outbox,
            config,
            max_in_flight: max_in_flight.max(1),
            job: std::marker::PhantomData,
        })
    }

    /// When the next piece of work falls due (ms since the epoch), if any.
    async fn next_due(&self) -> Option<i64> {
        let next = match J::QUEUE {
            Queue::Registered => self.tasks.registry.blocking(|r| r.next_due()).await,
            Queue::Held => self.tasks.registry.blocking(|r| r.next_held()).await,
        };
        next.ok().flatten()
    }

    /// Resolves when new work may have arrived early.
    async fn wake(&self) {
        match J::QUEUE {
            Queue::Registered => self.tasks.registry.task_added().await,
            Queue::Held => self.tasks.registry.callback_held().await,
        }
    }

    /// Steps until `shutdown` resolves: after each step it sleeps until the
    /// next due time (between [`MIN_PAUSE`] and [`IDLE`]) or a wake-up. A
    /// halted worker only waits for shutdown. A step cut short by shutdown
    /// loses nothing: the registry still says what is due.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        let name = J::QUEUE.worker();
        tracing::info!("{name} started");
        self.run_steps(shutdown).await;
        tracing::info!("{name} stopped");
    }

    async fn run_steps(&mut self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            if self.tasks.stats.halted().is_some() {
                // Logged by `halt`; wait for shutdown only.
                shutdown.as_mut().await;
                break;
            }
            let step = tokio::select! {
                step = J::step(self) => step,
                _ = &mut shutdown => break,
            };
            let floor = match step {
                // Halted: the check above waits for shutdown.
                Ok(true) => continue,
                Ok(false) => MIN_PAUSE,
                Err(e) => {
                    tracing::error!(error = %e, "{} step failed", J::QUEUE.worker());
                    Duration::from_secs(1)
                }
            };
            let pause = self
                .next_due()
                .await
                .map_or(IDLE, |at| {
                    Duration::from_millis((at - now_ms()).max(0) as u64)
                })
                .clamp(floor, IDLE);
            tokio::select! {
                _ = &mut shutdown => break,
                _ = self.wake() => {}
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        let (i, m) = (Duration::from_millis(100), Duration::from_millis(1000));
        let seq: Vec<u64> = (0..6)
            .map(|a| backoff(i, m, a).as_millis() as u64)
            .collect();
        assert_eq!(seq, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(backoff(i, m, 200), m, "no overflow for huge attempt counts");
    }

    #[test]
    fn halting_counts_once_and_keeps_the_first_reason() {
        let stats = PollStats::default();
        stats.halt("401 first".into());
        stats.halt("401 again".into());
        assert_eq!(stats.halted().as_deref(), Some("401 first"));
        assert_eq!(stats.auth_failures.load(Ordering::Relaxed), 1);
        let shown = serde_json::to_value(&stats).unwrap();
        assert_eq!(shown["authFailures"], 1);
        assert!(shown.get("halted").is_none());
    }
}
