//! Operator endpoints: outbox status, dead letters (and re-queueing them),
//! rejected bodies. Guarded by `server.admin_token`, or served to loopback
//! listeners only when no token is set.

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{ApiError, AppState};
use crate::config::Secret;

#[derive(Deserialize)]
pub struct Limit {
    limit: Option<usize>,
}

fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    match &state.admin_token {
        None if state.admin_on_loopback => Ok(()),
        None => Err(ApiError::NotFound),
        Some(token) => check_bearer(headers, token),
    }
}

/// `Authorization: Bearer <token>`, compared in constant time.
pub(super) fn check_bearer(headers: &HeaderMap, token: &Secret) -> Result<(), ApiError> {
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if constant_time_eq(given.as_bytes(), token.expose().as_bytes()) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized)
    }
}

/// Compares without an early exit, so timing does not reveal the prefix.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(super) fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(e.to_string())
}

pub async fn status(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    let status = state.outbox.status().map_err(internal)?;
    Ok(Json(json!({
        "publisher": state.publisher_name,
        "outbox": status,
        "poll": state.tasks.status(),
    })))
}

pub async fn dead_letters(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<Limit>,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    let letters = state
        .outbox
        .dead_letters(q.limit.unwrap_or(100))
        .map_err(internal)?;
    Ok(Json(json!({ "deadLetters": letters })))
}

pub async fn requeue(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    let moved = state.outbox.requeue_dead().await.map_err(internal)?;
    Ok(Json(json!({ "requeued": moved })))
}

pub async fn rejected(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<Limit>,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    let bodies = state
        .outbox
        .rejected(q.limit.unwrap_or(100))
        .map_err(internal)?;
    Ok(Json(json!({ "rejected": bodies })))
}
