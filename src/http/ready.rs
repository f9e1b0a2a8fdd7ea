//! `GET /readyz`: whether this instance can do its job now. 200 when it
//! can; 503 with the list of problems when a background worker is down or
//! restarting, when the outbox cannot write, or when the relay has moved
//! nothing for `health.stall_secs` while events are pending and the broker
//! answers, or while the broker refuses some events where they go (no
//! stream, unknown topic) and they wait out their own backoff. A broker outage alone is not a problem here: callbacks are
//! still stored durably, and taking the instance out of service would lose
//! the ones the provider never retries. `/healthz` is liveness only.
//!
//! Warnings are listed in either answer without changing its status:
//! damage found at start (see [`warnings`]), and the dedup records at their
//! cap with records of unfinished tasks evicted (`task-records: evicting`).
//! Every callback is still stored then, and a 503 would let a flood of junk
//! task ids, or one damaged byte, take the instance out of service.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::json;

use super::AppState;
use crate::clock::now_ms;
use crate::outbox::Outbox;
use crate::supervise::{Health, WorkerState};

/// One thing that keeps the instance from being ready.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// A worker's name, `outbox-writer`, `storage`.
    pub component: &'static str,
    /// `restarting`, `failed`, `stopped`, `failing`, `stalled`, `refusing`,
    /// `unreachable` (cluster coordination) or `draining` (shutting down);
    /// as a warning (ready all the same), `evicting`, `damaged` or
    /// `unreadable` (the task registry).
    pub problem: &'static str,
}

pub async fn readyz(State(state): State<AppState>) -> Response {
    let problems = problems(&state.health, &state.outbox);
    let read = state.clone();
    let registry = match tokio::task::spawn_blocking(move || registry_warning(&read)).await {
        Ok(registry) => registry,
        Err(e) => return super::ApiError::Internal(e.to_string()).into_response(),
    };
    let mut warnings = warnings(&state.outbox, now_ms());
    warnings.extend(registry);
    let mut body = if problems.is_empty() {
        json!({ "status": "ready" })
    } else {
        json!({ "status": "unavailable", "problems": problems })
    };
    if !warnings.is_empty() {
        body["warnings"] = json!(warnings);
    }
    if problems.is_empty() {
        Json(body).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}

/// How long `/readyz` warns after records of unfinished tasks were evicted.
const EVICTING_WARNS_MS: i64 = 10 * 60 * 1000;

/// What is wrong but does not keep the instance from its job: damage found
/// at start (ranges of the pending log skipped, a database file set
/// aside), and records of unfinished tasks evicted at the tracked-task cap.
/// Taking the instance out of service would not bring back what is damaged
/// or evicted, and would stop what is intact from being delivered; the
/// details are in `/admin/status` (`outbox.damage`) and the dead letters.
pub fn warnings(outbox: &Outbox, now: i64) -> Vec<Problem> {
    let stats = outbox.stats();
    let mut out = Vec::new();
    if stats.log_damaged_ranges.load(Ordering::Relaxed) > 0 {
        out.push(Problem {
            component: "pending-log",
            problem: "damaged",
        });
    }
    if stats.stores_set_aside.load(Ordering::Relaxed) > 0 {
        out.push(Problem {
            component: "storage",
            problem: "damaged",
        });
    }
    let at = stats.evicted_unfinished_at.load(Ordering::Relaxed);
    if at > 0 && now - at < EVICTING_WARNS_MS {
        out.push(Problem {
            component: "task-records",
            problem: "evicting",
        });
    }
    out
}

/// A task registry that cannot be read, as a warning: it reads the registry
/// (redb), so on the blocking pool. A warning, not a problem: the registry
/// only serves polling and verification, and a replica out of service would
/// refuse the provider's callbacks, which its outbox still takes.
pub fn registry_warning(state: &AppState) -> Option<Problem> {
    state
        .tasks
        .registry
        .counts()
        .err()
        .map(|e| registry_unreadable(&e))
}

/// A task registry that cannot be read (a broken `tasks.redb`): logged,
/// and named in `/readyz` rather than counted as empty.
pub fn registry_unreadable(e: &crate::poll::RegistryError) -> Problem {
    tracing::error!(error = %e, "cannot read the task registry");
    Problem {
        component: "registry",
        problem: "unreadable",
    }
}

/// Everything that keeps the instance from being ready; empty when ready.
pub fn problems(health: &Health, outbox: &Outbox) -> Vec<Problem> {
    let mut out = Vec::new();
    for (component, state) in health.workers() {
        let problem = match state {
            WorkerState::Running => continue,
            WorkerState::Restarting => "restarting",
            WorkerState::Failed => "failed",
            WorkerState::Stopped => "stopped",
        };
        out.push(Problem { component, problem });
    }
    for (component, problem) in health.conditions() {
        out.push(Problem { component, problem });
    }
    if !outbox.writer_alive() {
        out.push(Problem {
            component: "outbox-writer",
            problem: "stopped",
        });
    }
    let stats = outbox.stats();
    if stats.storage_failing.load(Ordering::Relaxed) {
        out.push(Problem {
            component: "storage",
            problem: "failing",
        });
    }
    // Events the broker refuses where they go wait alone; the others flow,
    // but these are stuck until an operator fixes the destination or they
    // become dead letters.
    if stats.refusing.load(Ordering::Relaxed) > 0 {
        out.push(Problem {
            component: "relay",
            problem: "refusing",
        });
    }
    let stall = health.stall.as_millis() as i64;
    let now = now_ms();
    let progress = stats.relay_progress_at.load(Ordering::Relaxed);
    let broker_failed = stats.broker_error_at.load(Ordering::Relaxed);
    let pending = stats.pending.load(Ordering::Relaxed) > 0;
    if pending && progress > 0 && now - progress > stall && now - broker_failed > stall {
        out.push(Problem {
            component: "relay",
            problem: "stalled",
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{HealthConfig, OutboxConfig};

    fn problem(component: &'static str, problem: &'static str) -> Problem {
        Problem { component, problem }
    }

    #[tokio::test]
    async fn each_cause_is_named_and_a_broker_outage_is_not_one() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(&OutboxConfig {
            data_dir: dir.path().to_path_buf(),
            ..OutboxConfig::default()
        })
        .unwrap();
        let health = Health::new(&HealthConfig {
            stall_secs: 60,
            ..HealthConfig::default()
        });
        assert_eq!(problems(&health, &outbox), []);

        let stats = outbox.stats();
        let now = now_ms();
        stats.pending.store(1, Ordering::Relaxed);
        stats
            .relay_progress_at
            .store(now - 61_000, Ordering::Relaxed);
        assert_eq!(
            problems(&health, &outbox),
            [problem("relay", "stalled")],
            "pending, no progress, the broker answers"
        );
        stats.broker_error_at.store(now - 1_000, Ordering::Relaxed);
        assert_eq!(problems(&health, &outbox), [], "the broker is down");
        stats.broker_error_at.store(0, Ordering::Relaxed);
        stats.pending.store(0, Ordering::Relaxed);
        assert_eq!(problems(&health, &outbox), [], "nothing pending");

        stats.refusing.store(2, Ordering::Relaxed);
        assert_eq!(problems(&health, &outbox), [problem("relay", "refusing")]);
        stats.refusing.store(0, Ordering::Relaxed);

        stats.storage_failing.store(true, Ordering::Relaxed);
        assert_eq!(problems(&health, &outbox), [problem("storage", "failing")]);
        stats.storage_failing.store(false, Ordering::Relaxed);

        assert_eq!(warnings(&outbox, now), []);
        stats
            .evicted_unfinished_at
            .store(now - 1_000, Ordering::Relaxed);
        assert_eq!(
            warnings(&outbox, now),
            [problem("task-records", "evicting")]
        );
        assert_eq!(problems(&health, &outbox), [], "a warning only");
        assert_eq!(warnings(&outbox, now + EVICTING_WARNS_MS), []);

        outbox.close().await;
        assert_eq!(
            problems(&health, &outbox),
            [problem("outbox-writer", "stopped")]
        );
    }
}
