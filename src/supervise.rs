//! One owner for every background worker (the relay, the pruner, the
//! reconciler, the verifier, and the watch on the outbox writer thread).
//!
//! - A worker runs until the shared [`CancellationToken`] is cancelled. If it
//!   returns earlier or panics, the cause is logged and it is started again
//!   after a backoff that doubles from `health.restart_backoff_ms` to 30 s.
//! - More than `health.max_restarts` restarts of one worker within
//!   `health.restart_window_secs` means it cannot be kept alive: the
//!   supervisor gives up, [`Supervisor::gave_up`] fires, and the app stops
//!   with an error (a non-zero exit, for the process manager to act on).
//! - Every worker's state is in [`Health`], which `/readyz` reads.
//! - [`Supervisor::shutdown`] cancels and joins everything it started: no
//!   task outlives it, and a task aborted from outside takes its worker
//!   with it.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::config::HealthConfig;
use crate::sync::{lock, panic_message};

/// Longest delay before a restart.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// A worker could not be kept alive.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("worker {worker} cannot be kept alive: {cause}")]
pub struct GaveUp {
    pub worker: &'static str,
    pub cause: String,
}

/// Where a worker is in its life, as `/readyz` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum WorkerState {
    Running,
    /// Stopped unexpectedly; waiting out the backoff before the next start.
    Restarting,
    /// Out of restarts; the app is stopping.
    Failed,
    /// Stopped on shutdown.
    Stopped,
}

/// Every worker's state and when `/readyz` calls the relay stalled; shared
/// with the HTTP handlers.
#[derive(Debug)]
pub struct Health {
    workers: Mutex<BTreeMap<&'static str, WorkerState>>,
    /// Problems reported from outside the supervisor (cluster coordination,
    /// draining), by component.
    conditions: Mutex<BTreeMap<&'static str, &'static str>>,
    /// How long the relay may make no progress with events pending and the
    /// broker answering.
    pub stall: Duration,
}

impl Default for Health {
    fn default() -> Self {
        Self::new(&HealthConfig::default())
    }
}

impl Health {
    pub fn new(config: &HealthConfig) -> Self {
        Self {
            workers: Mutex::new(BTreeMap::new()),
            conditions: Mutex::new(BTreeMap::new()),
            stall: Duration::from_secs(config.stall_secs),
        }
    }

    /// Every worker the supervisor started, with its state.
    pub fn workers(&self) -> BTreeMap<&'static str, WorkerState> {
        lock(&self.workers).clone()
    }

    /// Sets (`Some`) or clears (`None`) a problem `/readyz` reports for
    /// `component`.
    pub fn set_condition(&self, component: &'static str, problem: Option<&'static str>) {
        let mut conditions = lock(&self.conditions);
        match problem {
            Some(problem) => conditions.insert(component, problem),
            None => conditions.remove(component),
        };
    }

    /// The problems set with [`Health::set_condition`].
    pub fn conditions(&self) -> BTreeMap<&'static str, &'static str> {
        lock(&self.conditions).clone()
    }

    fn set(&self, worker: &'static str, state: WorkerState) {
        lock(&self.workers).insert(worker, state);
    }
}

/// Restart settings, from [`HealthConfig`].
#[derive(Debug, Clone, Copy)]
struct Policy {
    backoff: Duration,
    max_restarts: usize,
    window: Duration,
}

/// What a worker task needs to stop the app for good: the first worker to
/// give up is the one `shutdown` reports.
struct Stopper {
    health: Arc<Health>,
    failure: Arc<Mutex<Option<GaveUp>>>,
    gave_up: CancellationToken,
}

impl Stopper {
    fn give_up(&self, worker: &'static str, cause: String) {
        self.health.set(worker, WorkerState::Failed);
        lock(&self.failure).get_or_insert(GaveUp { worker, cause });
        self.gave_up.cancel();
    }
}

pub struct Supervisor {
    stop: CancellationToken,
    gave_up: CancellationToken,
    failure: Arc<Mutex<Option<GaveUp>>>,
    workers: JoinSet<()>,
    health: Arc<Health>,
    policy: Policy,
}

impl Supervisor {
    pub fn new(config: &HealthConfig, health: Arc<Health>) -> Self {
        Self {
            stop: CancellationToken::new(),
            gave_up: CancellationToken::new(),
            failure: Arc::default(),
            workers: JoinSet::new(),
            health,
            policy: Policy {
                backoff: Duration::from_millis(config.restart_backoff_ms),
                max_restarts: config.max_restarts as usize,
                window: Duration::from_secs(config.restart_window_secs),
            },
        }
    }

    /// Cancelled once a worker could not be kept alive.
    pub fn gave_up(&self) -> CancellationToken {
        self.gave_up.clone()
    }

    fn stopper(&self) -> Stopper {
        Stopper {
            health: self.health.clone(),
            failure: self.failure.clone(),
            gave_up: self.gave_up.clone(),
        }
    }

    /// Starts `make(stop)` now and again whenever it ends before `stop` is
    /// cancelled. The worker must return soon after `stop` is cancelled.
    pub fn spawn<F, Fut>(&mut self, worker: &'static str, mut make: F)
    where
        F: FnMut(CancellationToken) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (stop, policy, health) = (self.stop.clone(), self.policy, self.health.clone());
        let stopper = self.stopper();
        health.set(worker, WorkerState::Running);
        self.workers.spawn(async move {
            let mut restarts: VecDeque<Instant> = VecDeque::new();
            let mut backoff = policy.backoff;
            loop {
                health.set(worker, WorkerState::Running);
                let run = AbortOnDropHandle::new(tokio::spawn(make(stop.clone())));
                let ended = run.await;
                if stop.is_cancelled() {
                    health.set(worker, WorkerState::Stopped);
                    return;
                }
                let cause = match ended {
                    Ok(()) => "returned before shutdown".to_string(),
                    Err(e) if e.is_panic() => format!(
                        "panicked: {}",
                        panic_message(&*e.into_panic())
                    ),
                    Err(e) => e.to_string(),
                };
                let now = Instant::now();
                restarts.retain(|at| now.duration_since(*at) < policy.window);
                if restarts.is_empty() {
                    // Up for a whole window: start over with a short backoff.
                    backoff = policy.backoff;
                }
                if restarts.len() >= policy.max_restarts {
                    tracing::error!(worker, %cause, restarts = restarts.len(), "worker stopped again; giving up");
                    stopper.give_up(worker, cause);
                    return;
                }
                restarts.push_back(now);
                tracing::error!(worker, %cause, restart_in_ms = backoff.as_millis() as u64, "worker stopped; restarting");
                health.set(worker, WorkerState::Restarting);
                tokio::select! {
                    _ = stop.cancelled() => {
                        health.set(worker, WorkerState::Stopped);
                        return;
                    }
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        });
    }

    /// Checks `alive` every `every` until shutdown; the first time it is
    /// false, the supervisor gives up (for what cannot be restarted from
    /// here, such as the outbox writer thread, which restarts itself).
    pub fn watch(
        &mut self,
        worker: &'static str,
        every: Duration,
        alive: impl Fn() -> bool + Send + 'static,
    ) {
        let (stop, health) = (self.stop.clone(), self.health.clone());
        let stopper = self.stopper();
        health.set(worker, WorkerState::Running);
        self.workers.spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => {
                        health.set(worker, WorkerState::Stopped);
                        return;
                    }
                    _ = tokio::time::sleep(every) => {}
                }
                if !alive() {
                    let cause = "stopped and cannot be restarted".to_string();
                    tracing::error!(worker, %cause, "giving up");
                    stopper.give_up(worker, cause);
                    return;
                }
            }
        });
    }

    /// Cancels every worker and waits until all have returned. Returns the
    /// worker that could not be kept alive, if any.
    pub async fn shutdown(mut self) -> Result<(), GaveUp> {
        self.stop.cancel();
        while let Some(joined) = self.workers.join_next().await {
            if let Err(e) = joined {
                tracing::error!(error = %e, "supervisor task failed");
            }
        }
        match lock(&self.failure).take() {
            Some(failure) => Err(failure),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn config(max_restarts: u32) -> HealthConfig {
        HealthConfig {
            restart_backoff_ms: 1,
            max_restarts,
            ..HealthConfig::default()
        }
    }

    #[test]
    fn health_settings_are_checked_by_key() {
        let refused = |change: fn(&mut HealthConfig)| {
            let mut config = crate::Config::default();
            change(&mut config.health);
            match config.validate() {
                Err(crate::config::ConfigError::Invalid { key, .. }) => key,
                other => panic!("refused, got {other:?}"),
            }
        };
        assert_eq!(refused(|h| h.stall_secs = 0), "health.stall_secs");
        assert_eq!(
            refused(|h| h.restart_backoff_ms = 30_001),
            "health.restart_backoff_ms"
        );
        assert_eq!(
            refused(|h| h.restart_window_secs = 0),
            "health.restart_window_secs"
        );
        assert!(crate::Config::default().validate().is_ok());
    }

    #[tokio::test]
    async fn a_panicking_worker_is_restarted_until_it_stays_up() {
        let health = Arc::new(Health::default());
        let mut supervisor = Supervisor::new(&config(5), health.clone());
        let starts = Arc::new(AtomicUsize::new(0));
        let counted = starts.clone();
        supervisor.spawn("flaky", move |stop| {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 2 {
                    panic!("start {n} fails");
                }
                stop.cancelled().await;
            }
        });
        tokio::time::timeout(Duration::from_secs(10), async {
            while starts.load(Ordering::SeqCst) < 3
                || health.workers()["flaky"] != WorkerState::Running
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("restarted twice");
        assert!(!supervisor.gave_up().is_cancelled());
        assert_eq!(supervisor.shutdown().await, Ok(()));
        assert_eq!(health.workers()["flaky"], WorkerState::Stopped);
    }

    #[tokio::test]
    async fn a_worker_that_keeps_failing_exhausts_the_budget() {
        let health = Arc::new(Health::default());
        let mut supervisor = Supervisor::new(&config(3), health.clone());
        supervisor.spawn("broken", |_stop| async {});
        let gave_up = supervisor.gave_up();
        tokio::time::timeout(Duration::from_secs(10), gave_up.cancelled())
            .await
            .expect("gives up");
        assert_eq!(health.workers()["broken"], WorkerState::Failed);
        let failure = supervisor.shutdown().await.unwrap_err();
        assert_eq!(failure.worker, "broken");
        assert_eq!(failure.cause, "returned before shutdown");
    }
}
