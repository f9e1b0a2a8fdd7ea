//! `POST /webhooks/kinovi`: parse, store durably (deduplicated), answer.
//!
//! The answer is 200 only once the event (or the decision that it is a
//! duplicate or stale) is on disk; the broker is never on this path.
//!
//! With telemetry on, the request runs in a `receive` span (continuing an
//! incoming `traceparent`) and the append in a `store` span, whose context
//! is stored with the event (see `crate::telemetry`).
//!
//! Registered tasks: a task created through `POST /tasks` must send its
//! `?token=` (else nothing is stored, answered 200 all the same: see
//! `tasks::check_callback_token`). In verify mode the callback is only
//! held (durably) for the verifier, which publishes it once the provider
//! confirms it. Callbacks for unregistered tasks, or tasks registered with
//! `watch`, are trusted on shape alone unless verify mode is on.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Extension, FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use tracing::Instrument;

use super::{tasks, ApiError, AppState, ClientInfo};
use crate::clock::now_ms;
use crate::event::{self, Source};
use crate::metrics::Reject;
use crate::outbox::{Appended, Stats};
use crate::trace::{CallbackEntry, Caller, Decision, Origin};

/// The callback URL's query: `?token=` for tasks created through `POST /tasks`.
#[derive(serde::Deserialize)]
pub struct CallbackQuery {
    token: Option<String>,
}

/// The one answer of every accepted callback, the same bytes each time.
const OK_BODY: &[u8] = br#"{"message":"ok"}"#;

fn ok() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        Bytes::from_static(OK_BODY),
    )
        .into_response()
}

/// The `receive` span of a callback, made from its headers only when
/// telemetry is on (the headers are not even looked at otherwise).
pub struct Received(Option<tracing::Span>);

impl<S: Send + Sync> FromRequestParts<S> for Received {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(crate::telemetry::receive_span(&parts.headers)))
    }
}

pub async fn kinovi(
    State(state): State<AppState>,
    Received(span): Received,
    client: Option<Extension<ClientInfo>>,
    query: Result<Query<CallbackQuery>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    match span {
        Some(span) => receive(state, client, query, body).instrument(span).await,
        None => receive(state, client, query, body).await,
    }
}

async fn receive(
    state: AppState,
    client: Option<Extension<ClientInfo>>,
    query: Result<Query<CallbackQuery>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let _timer = state.outbox.stats().metrics.time_answer();
    let client = client.map(|Extension(c)| c);
    let caller = Caller {
        origin: Origin::Webhook,
        client: client.as_ref().map(|c| c.ip),
        trace_id: crate::telemetry::current_trace_id(),
    };
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            state.rejected.keep(
                Reject::TooLarge,
                "too_large",
                b"",
                "body over the size limit (not kept)",
            );
            ApiError::TooLarge(state.body_limit)
        } else {
            ApiError::InvalidPayload(rejection.body_text())
        }
    })?;
    let event = event::parse(&body, Source::Webhook, now_ms()).map_err(|e| {
        let reason = e.to_string();
        tracing::info!(%reason, "rejected callback");
        state
            .rejected
            .keep(Reject::Invalid, "invalid", &body, &reason);
        if let Some(task_id) = event::task_id_hint(&body) {
            let entry = noted(&caller, now_ms(), None, Decision::Rejected);
            state.traces.callback(
                &task_id,
                CallbackEntry {
                    reason: Some(reason.clone()),
                    status: Some(400),
                    ..entry
                },
            );
        }
        ApiError::InvalidPayload(reason)
    })?;
    let token = query.ok().and_then(|Query(q)| q.token);
    let task = tasks::check_callback_token(&state, &event.task_id, token.as_deref(), &body).await?;
    if task == tasks::CallbackTask::Refused {
        let entry = noted(&caller, event.received_at, Some(&event), Decision::Rejected);
        state.traces.callback(
            &event.task_id,
            CallbackEntry {
                reason: Some(
                    "no valid callback token for a task created through POST /tasks".into(),
                ),
                ..entry
            },
        );
        // Answered like any callback (no token oracle), charged all the same.
        if let Some(c) = &client {
            state.clients.charge(c.ip);
        }
        return Ok(ok());
    }
    // Others may not fill the share of the backlog kept for known senders.
    if let Some(c) = &client {
        if c.reserved_percent > 0 && state.outbox.over_share(c.reserved_percent) {
            Stats::add(&state.outbox.stats().refused_reserved, 1);
            let why = "the rest is reserved for known senders";
            let entry = noted(&caller, event.received_at, Some(&event), Decision::Refused);
            state.traces.callback(
                &event.task_id,
                CallbackEntry {
                    reason: Some(format!("the event backlog is full ({why})")),
                    status: Some(503),
                    ..entry
                },
            );
            return Err(ApiError::Backlog(why));
        }
    }
    if state.tasks.verify {
        // Known senders are not held to the per-address quota.
        let from = match &client {
            Some(c) if !c.sender => crate::poll::sender_of(c.ip),
            _ => String::new(),
        };
        let entry = noted(&caller, event.received_at, Some(&event), Decision::Held);
        let task_id = event.task_id.clone();
        tasks::hold_for_verification(&state, event, from, &body).await?;
        state.traces.callback(&task_id, entry);
        return Ok(ok());
    }
    // The ids are copied for the log line only when it is written.
    let ids = tracing::enabled!(tracing::Level::DEBUG)
        .then(|| (event.task_id.clone(), event.event_id.clone()));
    let trusted = task == tasks::CallbackTask::Registered;
    let append = |event| state.outbox.append_from(event, trusted, caller);
    let outcome = match crate::telemetry::store_span(&event.task_id) {
        Some((span, traceparent)) => {
            tracing::Span::current().record("task.id", event.task_id.as_str());
            let mut event = event;
            event.traceparent = traceparent;
            append(event).instrument(span).await?
        }
        None => append(event).await?,
    };
    if let Some((task_id, event_id)) = ids {
        match outcome {
            Appended::New { .. } | Appended::Conflict { .. } => {
                tracing::debug!(%task_id, %event_id, ?outcome, "accepted")
            }
            // The provider must never see an error for a repeat.
            Appended::Duplicate | Appended::Stale { .. } => {
                tracing::debug!(%task_id, %event_id, ?outcome, "suppressed")
            }
        }
    }
    Ok(ok())
}

/// The trace entry of a callback from `caller`, of `event` when it could
/// be read, decided `decision`; reason and status to add.
fn noted(
    caller: &Caller,
    received_at: i64,
    event: Option<&event::TaskEvent>,
    decision: Decision,
) -> CallbackEntry {
    CallbackEntry {
        received_at,
        origin: caller.origin,
        client: caller.client,
        state: event.map(|e| e.state),
        decision,
        reason: None,
        status: None,
        event_id: event.map(|e| e.event_id.clone()),
        trace_id: caller.trace_id.clone(),
    }
}
