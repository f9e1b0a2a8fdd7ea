//! Callback delivery for one task, with the configured faults. Like the real
//! provider, a failed delivery (network error, non-2xx) is not retried.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{lock, render, Delivery, DeliveryResult, Outcome, Shared};
use crate::clock::now_ms;

/// Longest wait for the receiver's answer.
const TIMEOUT: Duration = Duration::from_secs(10);

pub(super) async fn run(shared: Arc<Shared>, task_id: String) {
    let Some(task) = shared.task(&task_id) else {
        return;
    };
    let (waiting, generating) = (shared.config.waiting_ms, shared.config.generating_ms);
    let mut plan: Vec<(u64, &'static str)> = Vec::new();
    if shared.config.progress_callbacks {
        plan.push((0, "waiting"));
        plan.push((waiting, "generating"));
    }
    match task.outcome {
        Outcome::Success => plan.push((waiting + generating, "success")),
        Outcome::Fail => plan.push((waiting + generating, "fail")),
        Outcome::Stuck => {}
    }
    let mut held = Vec::new();
    for (offset, state) in plan {
        let at = task.created + Duration::from_millis(offset);
        tokio::time::sleep_until(at.into()).await;
        if lock(&shared.faults).reorder {
            held.push(state);
        } else {
            send(&shared, &task_id, state).await;
        }
    }
    for state in held.into_iter().rev() {
        send(&shared, &task_id, state).await;
    }
}

fn log(shared: &Shared, task_id: &str, state: &'static str, result: DeliveryResult) {
    tracing::debug!(%task_id, state, ?result, "simulated callback");
    lock(&shared.deliveries).push(Delivery {
        at: Instant::now(),
        task_id: task_id.to_string(),
        state,
        result,
    });
}

async fn send(shared: &Shared, task_id: &str, state: &'static str) {
    let faults = lock(&shared.faults).clone();
    let Some(task) = shared.task(task_id) else {
        return;
    };
    let Some(url) = task.callback_url.clone() else {
        return;
    };
    if rand::random::<f64>() < faults.drop_rate {
        log(shared, task_id, state, DeliveryResult::Dropped);
        return;
    }
    if faults.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(faults.delay_ms)).await;
    }
    let copies = if rand::random::<f64>() < faults.duplicate_rate {
        2
    } else {
        1
    };
    let body = Bytes::from(
        serde_json::to_vec(&render(&task, state, faults.variant, now_ms())).unwrap_or_default(),
    );
    for _ in 0..copies {
        let request = shared
            .http
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.clone())
            .send();
        let result = match tokio::time::timeout(TIMEOUT, request).await {
            Ok(Ok(response)) => DeliveryResult::Sent(response.status().as_u16()),
            Ok(Err(e)) => DeliveryResult::Failed(e.to_string()),
            Err(_) => DeliveryResult::Failed(format!("no answer within {TIMEOUT:?}")),
        };
        log(shared, task_id, state, result);
    }
}
