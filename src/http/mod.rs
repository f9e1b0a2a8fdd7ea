//! The HTTP surface, on two listeners. The public one ([`public`]) serves
//! the provider's callback endpoint, the task registration endpoints and a
//! health check; the admin one ([`admin_router`]) serves the operator
//! endpoints. `router(state)` (the public routes without the edge limits)
//! is all a router test needs; [`serve()`] runs a router on a socket.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::json;
use tokio::net::TcpListener;

use crate::config::{Config, Secret};
use crate::metrics::Reject;
use crate::outbox::Outbox;

mod admin;
mod error;
mod limit;
pub mod ready;
mod serve;
mod tasks;
mod tls;
mod webhook;

pub use admin::{constant_time_eq, AdminGuard};
pub use error::ApiError;
pub use limit::RateLimit;
pub use serve::{serve, Limits};
pub use tls::{Tls, TlsError};

/// What handlers share: one allocation, so the clone axum makes for every
/// request is one reference count.
#[derive(Clone)]
pub struct AppState(std::sync::Arc<Shared>);

impl From<Shared> for AppState {
    fn from(shared: Shared) -> Self {
        Self(std::sync::Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The parts of [`AppState`].
pub struct Shared {
    pub outbox: Outbox,
    pub publisher_name: &'static str,
    pub body_limit: usize,
    /// `admin.token`.
    pub admin_token: Option<Secret>,
    /// The admin listener is on loopback.
    pub admin_on_loopback: bool,
    /// Registered tasks, the provider client and the task endpoints' settings.
    pub tasks: crate::poll::Tasks,
    /// The background workers' states, for `/readyz`.
    pub health: std::sync::Arc<crate::supervise::Health>,
}

/// What the HTTP side needs besides the public listener: the bound admin
/// listener, the TLS certificate, and the settings of both.
pub struct Edge {
    admin: TcpListener,
    tls: Option<Tls>,
    config: Config,
}

impl Edge {
    /// Binds the admin listener and loads the TLS certificate, if any.
    pub async fn bind(config: &Config) -> anyhow::Result<Self> {
        let admin = TcpListener::bind(config.admin.listen)
            .await
            .with_context(|| format!("cannot listen on admin.listen = {}", config.admin.listen))?;
        let tls = config
            .server
            .tls
            .as_ref()
            .map(Tls::load)
            .transpose()
            .context("cannot use server.tls")?;
        Ok(Self {
            admin,
            tls,
            config: config.clone(),
        })
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .local_addr()
            .expect("bound listener has an address")
    }

    /// Serves the public routes on `public` and the admin routes on the
    /// admin listener until `shutdown`, then stops both (see [`serve()`]).
    pub async fn serve(
        self,
        public: TcpListener,
        state: AppState,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let shutdown = futures::FutureExt::shared(Box::pin(shutdown));
        let server = &self.config.server;
        tokio::join!(
            serve(
                public,
                self::public(state.clone(), &self.config),
                Limits::public(server),
                self.tls,
                shutdown.clone(),
            ),
            serve(
                self.admin,
                admin_router(state, &self.config),
                Limits::admin(server),
                None,
                shutdown,
            ),
        );
        Ok(())
    }
}

/// The public routes, with the body size limit only.
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
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// The public routes with the edge's limits: rate limits first (a refused
/// request costs no body read), then the body deadline.
pub fn public(state: AppState, config: &Config) -> Router {
    let deadline = BodyDeadline {
        timeout: Duration::from_millis(config.server.body_timeout_ms),
        limit: config.server.body_limit_bytes,
        rejects: Some(state.outbox.clone()),
    };
    let rate = Arc::new(RateLimit::new(
        &config.server.rate_limit,
        state.outbox.stats().clone(),
    ));
    router(state)
        .layer(middleware::from_fn_with_state(deadline, read_body))
        .layer(middleware::from_fn_with_state(rate, limit::enforce))
}

/// The operator routes, behind the admin guard (Host, cross-site, token).
pub fn admin_router(state: AppState, config: &Config) -> Router {
    let guard = Arc::new(AdminGuard::new(&config.admin));
    let deadline = BodyDeadline {
        timeout: Duration::from_millis(config.server.body_timeout_ms),
        limit: 64 * 1024,
        rejects: None,
    };
    Router::new()
        .route("/admin/status", get(admin::status))
        .route("/admin/dead-letters", get(admin::dead_letters))
        .route("/admin/dead-letters/{seq}", get(admin::dead_letter))
        .route("/admin/dead-letters/requeue", post(admin::requeue))
        .route("/admin/rejected", get(admin::rejected))
        .route("/metrics", get(crate::metrics::serve))
        .route_layer(middleware::from_fn_with_state(guard, admin::guard))
        // Outside the guard: a kubelet probe can send neither a token nor a
        // Host the guard knows, and readiness reveals nothing an operator
        // would hide.
        .route("/readyz", get(ready::readyz))
        .layer(middleware::from_fn_with_state(deadline, read_body))
        .with_state(state)
}

/// How long, and how much, a request body may take.
#[derive(Clone)]
struct BodyDeadline {
    timeout: Duration,
    limit: usize,
    /// Where an oversized body is counted as rejected (public listener).
    rejects: Option<Outbox>,
}

/// Reads the whole body within the deadline before any handler runs, so a
/// body that trickles or stalls is answered 408 (and its connection closed)
/// instead of holding a handler, and an oversized one 413.
async fn read_body(State(d): State<BodyDeadline>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let read = tokio::time::timeout(d.timeout, Limited::new(body, d.limit).collect()).await;
    let bytes = match read {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
            if let Some(outbox) = &d.rejects {
                outbox.reject(b"", "body over the size limit (not kept)");
                outbox.stats().metrics.rejected(Reject::TooLarge);
            }
            return close(ApiError::TooLarge(d.limit).into_response());
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "request body cut off");
            return close(ApiError::InvalidPayload("request body cut off".into()).into_response());
        }
        Err(_) => return close(ApiError::Timeout.into_response()),
    };
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// The rest of the request was not read: the connection cannot be reused.
fn close(mut response: Response) -> Response {
    response.headers_mut().insert(
        axum::http::header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    response
}
