//! The simulator's HTTP API: the provider's two endpoints plus a small
//! control surface under `/_sim/` (no key needed: it is a local tool).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use super::{deliver, lock, Outcome, RequestLog, Shared, SimTask};
use crate::clock::now_ms;

pub(super) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/api/v1/jobs/createTask", post(create_task))
        .route("/api/v1/jobs/recordInfo", get(record_info))
        .route("/_sim/fail-next", post(fail_next))
        .route("/_sim/tasks", get(tasks))
        .with_state(shared)
}

/// Logs the request and builds the answer.
fn answer(
    shared: &Shared,
    endpoint: &'static str,
    task_id: Option<String>,
    status: StatusCode,
    body: Value,
) -> Response {
    lock(&shared.requests).push(RequestLog {
        at: Instant::now(),
        endpoint,
        task_id,
        status: status.as_u16(),
    });
    (status, Json(body)).into_response()
}

/// The provider's error bodies for statuses the tests inject.
fn error_body(status: u16) -> Value {
    match status {
        401 => json!({"message": "Invalid API key"}),
        402 => json!({"message": "Insufficient credits", "required": 200, "available": 0}),
        403 => json!({"message": "API access not enabled"}),
        404 => json!({"message": "Task not found"}),
        429 => json!({"message": "Concurrency limit reached (3)", "limit": 3, "current": 3}),
        500 => json!({"message": "Internal server error"}),
        _ => json!({"message": "Simulated failure"}),
    }
}

/// An injected failure, else a key check. `Some` is the answer to give.
fn gate(shared: &Shared, headers: &HeaderMap) -> Option<StatusCode> {
    if let Some(status) = lock(&shared.fail_next).pop_front() {
        return Some(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR));
    }
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    (given != Some(shared.config.api_key.as_str())).then_some(StatusCode::UNAUTHORIZED)
}

fn valid_url(url: &str) -> bool {
    (url.starts_with("http://") || url.starts_with("https://"))
        && url
            .parse::<axum::http::Uri>()
            .is_ok_and(|u| u.host().is_some())
}

async fn create_task(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    const EP: &str = "createTask";
    if let Some(status) = gate(&shared, &headers) {
        return answer(&shared, EP, None, status, error_body(status.as_u16()));
    }
    let bad = |message: &str, errors: Value| {
        let body = json!({"message": message, "errors": errors});
        answer(&shared, EP, None, StatusCode::BAD_REQUEST, body)
    };
    let Ok(Value::Object(request)) = serde_json::from_slice::<Value>(&body) else {
        return bad("Invalid inputs", json!(["body must be a JSON object"]));
    };
    let Some(model) = request
        .get("model")
        .and_then(Value::as_str)
        .filter(|m| !m.is_empty())
    else {
        return bad("Invalid inputs", json!(["model is required"]));
    };
    let callback_url = match request.get("callBackUrl") {
        None | Some(Value::Null) => None,
        Some(Value::String(url)) if valid_url(url) => Some(url.clone()),
        Some(_) => return bad("callBackUrl must be a valid URL", json!(["callBackUrl"])),
    };
    let prompt = request
        .get("inputs")
        .and_then(|i| i.get("prompt"))
        .and_then(Value::as_str)
        .unwrap_or_default();
    let n = shared.created.fetch_add(1, Ordering::Relaxed) + 1;
    let every = shared.config.fail_every;
    let outcome = if prompt.contains("[stuck]") {
        Outcome::Stuck
    } else if prompt.contains("[fail]") || (every > 0 && n % every == 0) {
        Outcome::Fail
    } else {
        Outcome::Success
    };
    let id = format!("task_{}", uuid::Uuid::new_v4().simple());
    let task = SimTask {
        id: id.clone(),
        model: model.to_string(),
        created: Instant::now(),
        created_ms: now_ms(),
        outcome,
        callback_url,
    };
    let has_callback = task.callback_url.is_some();
    lock(&shared.tasks).insert(id.clone(), task);
    if has_callback {
        let handle = tokio::spawn(deliver::run(shared.clone(), id.clone()));
        let mut deliverers = lock(&shared.deliverers);
        deliverers.retain(|h| !h.is_finished());
        deliverers.push(handle.abort_handle());
    }
    tracing::info!(task_id = %id, ?outcome, "simulated task created");
    answer(
        &shared,
        EP,
        Some(id.clone()),
        StatusCode::OK,
        json!({"taskId": id}),
    )
}

async fn record_info(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    const EP: &str = "recordInfo";
    let task_id = query.get("taskId").cloned();
    if let Some(status) = gate(&shared, &headers) {
        return answer(&shared, EP, task_id, status, error_body(status.as_u16()));
    }
    let Some(id) = task_id.filter(|id| !id.is_empty()) else {
        let body = json!({"message": "taskId is required"});
        return answer(&shared, EP, None, StatusCode::BAD_REQUEST, body);
    };
    let Some(task) = shared.task(&id) else {
        return answer(
            &shared,
            EP,
            Some(id),
            StatusCode::NOT_FOUND,
            error_body(404),
        );
    };
    let state = shared.state_now(&task);
    let body = super::render(&task, state, shared.config.record_variant, now_ms());
    answer(&shared, EP, Some(id), StatusCode::OK, body)
}

#[derive(serde::Deserialize)]
struct FailNext {
    status: u16,
    #[serde(default = "one")]
    count: usize,
}

fn one() -> usize {
    1
}

/// `POST /_sim/fail-next?status=429&count=5`
async fn fail_next(State(shared): State<Arc<Shared>>, Query(q): Query<FailNext>) -> Response {
    if StatusCode::from_u16(q.status).is_err() {
        let body = json!({"message": "status must be an HTTP status code"});
        return answer(&shared, "control", None, StatusCode::BAD_REQUEST, body);
    }
    lock(&shared.fail_next).extend(std::iter::repeat_n(q.status, q.count));
    let body = json!({"failNext": q.count, "status": q.status});
    answer(&shared, "control", None, StatusCode::OK, body)
}

/// `GET /_sim/tasks`: every task and its state now.
async fn tasks(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let tasks: Vec<SimTask> = lock(&shared.tasks).values().cloned().collect();
    let listed: Vec<Value> = tasks
        .iter()
        .map(|t| {
            json!({"taskId": t.id, "state": shared.state_now(t),
                   "outcome": format!("{:?}", t.outcome).to_lowercase(),
                   "callBackUrl": t.callback_url})
        })
        .collect();
    Json(json!({ "tasks": listed }))
}
