//! Task registration (`POST /tasks`, `POST /tasks/{taskId}/watch`) and the
//! two checks the webhook makes for registered tasks: the per-task callback
//! token, and holding callbacks for the verifier in verify mode.
//!
//! Both endpoints are for the user's own services: they need
//! `Authorization: Bearer <provider.tasks_token>` and answer 404 while no
//! token is configured.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::admin::check_bearer;
use super::{constant_time_eq, ApiError, AppState};
use crate::clock::now_ms;
use crate::event::{task_id_problem, TaskEvent};
use crate::metrics::Reject;
use crate::poll::{Held, HeldCap, Holding, Origin, PollStats, Registration};

fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(token) = &state.tasks.tasks_token else {
        return Err(ApiError::NotFound);
    };
    check_bearer(headers, token)
}

/// The rules the callback parser applies to task ids.
fn check_task_id(id: &str) -> Result<(), ApiError> {
    match task_id_problem(id) {
        None => Ok(()),
        Some(problem) => Err(ApiError::InvalidPayload(format!("taskId {problem}"))),
    }
}

/// 32 random bytes, hex: safe in a URL without escaping.
fn new_token() -> String {
    rand::random::<[u8; 32]>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn new_registration(state: &AppState, token: Option<String>, origin: Origin) -> Registration {
    let now = now_ms();
    Registration {
        token,
        origin,
        registered_at: now,
        next_poll_at: now + state.tasks.first_poll_after_ms,
        attempts: 0,
        done: false,
        last_event: None,
        last_error: None,
    }
}

async fn register(
    state: &AppState,
    task_id: &str,
    registration: Registration,
) -> Result<(Registration, bool), ApiError> {
    let id = task_id.to_string();
    let (registration, new) = state
        .tasks
        .registry
        .blocking(move |r| r.register(&id, registration))
        .await
        .map_err(|e| {
            tracing::error!(%task_id, error = %e, "cannot register a task");
            ApiError::Unavailable
        })?;
    if new {
        PollStats::add(&state.tasks.stats.registered, 1);
        tracing::info!(%task_id, origin = ?registration.origin, "task registered");
    }
    Ok((registration, new))
}

/// `POST /tasks`: forwards a createTask body to the provider with our
/// `callBackUrl`, registers the new task, answers what the provider answered.
/// Any `callBackUrl` in the body is replaced: hookbridge is the receiver.
pub async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    let (Some(client), Some(public_url)) = (&state.tasks.client, &state.tasks.public_url) else {
        return Err(ApiError::NotFound);
    };
    let body = body.map_err(|r| ApiError::InvalidPayload(r.body_text()))?;
    let mut request: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::InvalidPayload(format!("body is not valid JSON: {e}")))?;
    let Some(fields) = request.as_object_mut() else {
        return Err(ApiError::InvalidPayload(
            "body must be a JSON object (a createTask request)".into(),
        ));
    };
    let token = new_token();
    let callback = format!("{public_url}/webhooks/kinovi?token={token}");
    fields.insert("callBackUrl".into(), Value::String(callback));

    let (status, answer) = match client.create_task(&request).await {
        Ok(answered) => answered,
        Err(e) => {
            tracing::warn!(error = %e, "createTask: provider unreachable");
            let body = json!({"error": "provider_unreachable",
                              "message": "the provider could not be reached; no task was registered"});
            return Ok((StatusCode::BAD_GATEWAY, Json(body)).into_response());
        }
    };
    let task_id = status
        .is_success()
        .then(|| serde_json::from_slice::<Value>(&answer).ok())
        .flatten()
        .and_then(|v| {
            let id = v.get("taskId").or_else(|| v.get("data")?.get("taskId"))?;
            id.as_str().map(str::to_owned)
        });
    match task_id {
        Some(id) if check_task_id(&id).is_ok() => {
            let registration = new_registration(&state, Some(token), Origin::Created);
            if let Err(e) = register(&state, &id, registration).await {
                tracing::error!(task_id = %id, error = %e, "task created at the provider but not registered");
                let body = json!({"error": "registration_failed", "taskId": id,
                    "message": "the provider created the task but hookbridge could not register it; \
                                retry with POST /tasks/{taskId}/watch"});
                return Ok((StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response());
            }
        }
        _ if status.is_success() => {
            tracing::warn!(%status, "createTask answered without a usable taskId; nothing registered")
        }
        _ => tracing::info!(%status, "createTask refused by the provider"),
    }
    let mut response = (status, answer).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

/// `POST /tasks/{taskId}/watch`: registers a task created elsewhere (no
/// token: its callbacks take the normal path). Registering twice is harmless.
pub async fn watch(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(task_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    check_task_id(&task_id)?;
    let registration = new_registration(&state, None, Origin::Watched);
    let (registration, new) = register(&state, &task_id, registration).await?;
    Ok(Json(json!({
        "taskId": task_id,
        "registered": new,
        "origin": registration.origin,
        "registeredAt": registration.registered_at,
    })))
}

/// What the registry says of a callback's task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CallbackTask {
    /// Not registered: trusted on shape alone (unless verify mode is on).
    Unregistered,
    /// Registered (created with the right token, or watched): a real task,
    /// whose dedup record keeps the full window.
    Registered,
    /// Created through `POST /tasks`, and the token is missing or wrong:
    /// nothing is stored. The caller answers it like an accepted callback.
    Refused,
}

/// For a task created through `POST /tasks`, the callback must carry its
/// token; a wrong or missing one is not stored, and kept (cut) for
/// inspection. Unregistered and watched tasks pass.
///
/// The refusal is not told to the sender (the webhook answers 200 as for
/// any callback): a 401 here and a 200 for an unknown task would tell
/// anyone which task ids were created through hookbridge. Nothing real is
/// lost by it: a created task is registered, so polling publishes its
/// state even if its genuine callback lost the token on the way.
pub(super) async fn check_callback_token(
    state: &AppState,
    task_id: &str,
    given: Option<&str>,
    body: &[u8],
) -> Result<CallbackTask, ApiError> {
    if state.tasks.registry.is_empty() {
        return Ok(CallbackTask::Unregistered);
    }
    let id = task_id.to_string();
    let registration = state
        .tasks
        .registry
        .blocking(move |r| r.get(&id))
        .await
        .map_err(|e| {
            // Fail closed: the reconciler still recovers a registered task.
            tracing::error!(error = %e, "cannot read the task registry");
            ApiError::Unavailable
        })?;
    let Some(registration) = registration else {
        return Ok(CallbackTask::Unregistered);
    };
    let Some(expected) = registration.token else {
        return Ok(CallbackTask::Registered);
    };
    let given = given.unwrap_or_default();
    if constant_time_eq(given.as_bytes(), expected.as_bytes()) {
        return Ok(CallbackTask::Registered);
    }
    let reason = if given.is_empty() {
        format!("callback for task {task_id} has no token, but the task was created through POST /tasks (answered 200, not stored)")
    } else {
        format!("callback for task {task_id} carries a wrong token (answered 200, not stored)")
    };
    tracing::warn!(%task_id, %reason, "callback refused");
    state
        .rejected
        .keep(Reject::BadToken, "bad_token", body, &reason);
    Ok(CallbackTask::Refused)
}

/// Verify mode: stores what the verifier needs of the callback (durable
/// when it returns; see [`crate::poll::Held`]); nothing is published before
/// the provider confirms it. A callback whose (taskId, state) is already
/// held is answered as held. `from` is the client address ("" when unknown:
/// no per-address cap).
pub(super) async fn hold_for_verification(
    state: &AppState,
    event: TaskEvent,
    from: String,
    body: &[u8],
) -> Result<(), ApiError> {
    let held = Held::new(&event, &from, body, now_ms());
    let (task_id, limits) = (event.task_id, state.tasks.held_limits);
    let holding = state
        .tasks
        .registry
        .blocking(move |r| r.hold(&held, limits))
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "cannot hold a callback for verification");
            ApiError::Unavailable
        })?;
    match holding {
        Holding::Held(_) => tracing::debug!(%task_id, "callback held for verification"),
        Holding::Duplicate => tracing::debug!(%task_id, "callback already held"),
        Holding::Full(cap) => {
            let which = match cap {
                HeldCap::Entries => "provider.max_held",
                HeldCap::Bytes => "provider.max_held_bytes",
                HeldCap::Address => "provider.max_held_per_address",
            };
            tracing::warn!(%task_id, %from, cap = which, "held queue full: callback refused with 503");
            return Err(ApiError::Backlog(which));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use axum::body::Body;
    use tower::ServiceExt;

    async fn status_of(app: axum::Router, uri: &str, bearer: &str) -> StatusCode {
        let request = axum::http::Request::post(uri)
            .header(header::AUTHORIZATION, format!("Bearer {bearer}"))
            .body(Body::from(r#"{"model":"m"}"#))
            .unwrap();
        app.oneshot(request).await.unwrap().status()
    }

    #[tokio::test]
    async fn endpoints_are_hidden_without_a_tasks_token() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.outbox.data_dir = dir.path().to_path_buf();
        config.provider.api_key = Some(crate::secret::Secret::new("k"));
        let outbox = crate::outbox::Outbox::open(&config.outbox).unwrap();
        let state = super::super::admin::state(&config, outbox);
        let app = super::super::router(state);
        for uri in ["/tasks", "/tasks/task_1/watch"] {
            let status = status_of(app.clone(), uri, "anything-at-all-long").await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{uri}");
        }
        assert_eq!(new_token().len(), 64);
        assert_ne!(new_token(), new_token());
        assert!(check_task_id("task_1").is_ok());
        assert!(check_task_id(" ").is_err() && check_task_id("a\nb").is_err());
    }
}
