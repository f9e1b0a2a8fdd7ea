//! The HTTP surface: the provider's callback endpoint, a health check, the
//! task registration endpoints, and the operator endpoints. `router(state)`
//! is all a test needs.

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::config::Secret;
use crate::outbox::Outbox;

mod admin;
mod error;
pub mod ready;
mod tasks;
mod webhook;

pub use admin::constant_time_eq;
pub use error::ApiError;

/// What handlers share.
#[derive(Clone)]
pub struct AppState {
    pub outbox: Outbox,
    pub publisher_name: &'static str,
    pub body_limit: usize,
    pub admin_token: Option<Secret>,
    /// No token set and the listener is on loopback: admin is open to it.
    pub admin_on_loopback: bool,
    /// Registered tasks, the provider client and the task endpoints' settings.
    pub tasks: crate::poll::Tasks,
    /// The background workers' states, for `/readyz`.
    pub health: std::sync::Arc<crate::supervise::Health>,
}

pub fn router(state: AppState) -> Router {
    let limit = state.body_limit;
    Router::new()
        .route("/webhooks/kinovi", post(webhook::kinovi))
        .route("/tasks", post(tasks::create))
        .route("/tasks/{task_id}/watch", post(tasks::watch))
        .route(
            "/healthz",
            get(|| async { Json(json!({ "status": "ok" })) }),
        )
        .route("/readyz", get(ready::readyz))
        .route("/admin/status", get(admin::status))
        .route("/admin/dead-letters", get(admin::dead_letters))
        .route("/admin/dead-letters/requeue", post(admin::requeue))
        .route("/admin/rejected", get(admin::rejected))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}
