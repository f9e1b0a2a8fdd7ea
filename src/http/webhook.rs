//! `POST /webhooks/kinovi`: parse, store durably (deduplicated), answer.
//!
//! The answer is 200 only once the event (or the decision that it is a
//! duplicate or stale) is on disk; the broker is never on this path.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use super::{ApiError, AppState};
use crate::event::{self, Source};
use crate::outbox::{now_ms, Appended, Stats};

pub async fn kinovi(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            state
                .outbox
                .reject(b"", "body over the size limit (not kept)");
            ApiError::TooLarge(state.body_limit)
        } else {
            ApiError::InvalidPayload(rejection.body_text())
        }
    })?;
    let event = event::parse(&body, Source::Webhook, now_ms()).map_err(|e| {
        let reason = e.to_string();
        tracing::info!(%reason, "rejected callback");
        state.outbox.reject(&body, &reason);
        ApiError::InvalidPayload(reason)
    })?;
    if state.outbox.is_full() {
        Stats::add(&state.outbox.stats().refused_full, 1);
        return Err(ApiError::Backlog);
    }
    let (task_id, event_id) = (event.task_id.clone(), event.event_id.clone());
    let outcome = state.outbox.append(event).await?;
    match outcome {
        Appended::New { .. } | Appended::Conflict { .. } => {
            tracing::debug!(%task_id, %event_id, ?outcome, "accepted")
        }
        // The provider must never see an error for a repeat.
        Appended::Duplicate | Appended::Stale { .. } => {
            tracing::debug!(%task_id, %event_id, ?outcome, "suppressed")
        }
    }
    Ok(Json(json!({ "message": "ok" })))
}
