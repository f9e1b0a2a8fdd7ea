//! `GET /readyz`: whether this instance can do its job now. 200 when it
//! can; 503 with the list of problems when a background worker is down or
//! restarting, when the outbox cannot write, or when the relay has moved
//! nothing for `health.stall_secs` while events are pending and the broker
//! answers, or while the broker refuses some events where they go (no
//! stream, unknown topic) and they wait out their own backoff. A broker outage alone is not a problem here: callbacks are
//! still stored durably, and taking the instance out of service would lose
//! the ones the provider never retries. `/healthz` is liveness only.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::json;

use super::AppState;
use crate::outbox::{now_ms, Outbox};
use crate::supervise::{Health, WorkerState};

/// One thing that keeps the instance from being ready.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// A worker's name, `outbox-writer`, `storage`.
    pub component: &'static str,
    /// `restarting`, `failed`, `stopped`, `failing`, `stalled`, `refusing`,
    /// `unreachable` (cluster coordination) or `draining` (shutting down).
    pub problem: &'static str,
}

pub async fn readyz(State(state): State<AppState>) -> Response {
    let problems = problems(&state.health, &state.outbox);
    if problems.is_empty() {
        Json(json!({ "status": "ready" })).into_response()
    } else {
        let body = json!({ "status": "unavailable", "problems": problems });
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}

/// Everything that is wrong now; empty when ready.
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

        outbox.close().await;
        assert_eq!(
            problems(&health, &outbox),
            [problem("outbox-writer", "stopped")]
        );
    }
}
