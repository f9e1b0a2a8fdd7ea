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
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body_util::BodyExt;
use serde_json::json;
use tokio::net::TcpListener;

use crate::config::Config;
use crate::metrics::Reject;
use crate::outbox::Outbox;
use crate::secret::Secret;

mod admin;
mod clients;
pub mod console;
mod error;
pub mod metrics;
pub mod ready;
mod rejected;
mod serve;
mod tasks;
mod tls;
mod webhook;

pub use admin::{constant_time_eq, AdminGuard};
pub use clients::{ClientInfo, Clients, TopClients};
pub use error::ApiError;
pub use rejected::{Rejected, RejectedBodies};
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
    /// The per-task trace (the outbox's): `/admin/tasks/{taskId}`.
    pub traces: crate::trace::Traces,
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
    /// The public listener's client bookkeeping (penalties, top addresses).
    pub clients: Arc<Clients>,
    /// The rejected bodies kept for `/admin/rejected`.
    pub rejected: Arc<RejectedBodies>,
    /// The operator console's sessions and rates.
    pub console: Arc<console::Console>,
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
    /// Nothing here fails: a failed accept is logged and retried, a failed
    /// certificate reload logged and counted.
    pub async fn serve(
        self,
        public: TcpListener,
        state: AppState,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) {
        let shutdown = futures::FutureExt::shared(Box::pin(shutdown));
        let server = &self.config.server;
        let tls = self
            .tls
            .map(|tls| tls.counting_in(state.outbox.stats().clone()));
        tokio::join!(
            serve(
                public,
                self::public(state.clone(), &self.config),
                Limits::public(server),
                tls,
                Some(state.clients.clone()),
                shutdown.clone(),
            ),
            serve(
                self.admin,
                admin_router(state, &self.config),
                Limits::admin(server),
                None,
                None,
                shutdown,
            ),
        );
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

/// The public routes with the edge's limits: the client rules first (a
/// client in penalty costs no body read; every refusal is charged), then
/// the body deadline.
pub fn public(state: AppState, config: &Config) -> Router {
    let deadline = BodyDeadline {
        timeout: Duration::from_millis(config.server.body_timeout_ms),
        min_rate: config.server.min_body_bytes_per_sec,
        limit: config.server.body_limit_bytes,
        rejects: Some(state.rejected.clone()),
    };
    let clients = state.clients.clone();
    router(state)
        .layer(middleware::from_fn_with_state(deadline, read_body))
        .layer(middleware::from_fn_with_state(clients, clients::guard))
}

/// The operator routes, behind the admin guard (Host, cross-site, token),
/// and the console at `/ui` behind its own ([`console`]).
pub fn admin_router(state: AppState, config: &Config) -> Router {
    let guard = Arc::new(AdminGuard::new(&config.admin));
    let deadline = BodyDeadline {
        timeout: Duration::from_millis(config.server.body_timeout_ms),
        min_rate: config.server.min_body_bytes_per_sec,
        limit: 64 * 1024,
        rejects: None,
    };
    let console = console::router(state.clone(), guard.clone());
    Router::new()
        .route("/admin/status", get(admin::status))
        .route("/admin/dead-letters", get(admin::dead_letters))
        .route("/admin/dead-letters/{seq}", get(admin::dead_letter))
        .route("/admin/dead-letters/requeue", post(admin::requeue))
        .route("/admin/dead-letters/bury", post(admin::bury))
        .route("/admin/rejected", get(admin::rejected))
        .route("/admin/tasks/{task_id}", get(admin::task))
        .route("/metrics", get(metrics::serve))
        .route_layer(middleware::from_fn_with_state(guard, admin::guard))
        // Outside the guard: a kubelet probe can send neither a token nor a
        // Host the guard knows, and readiness reveals nothing an operator
        // would hide.
        .route("/readyz", get(ready::readyz))
        // Behind its own gate: the same site checks, sessions for browsers.
        .merge(console)
        .layer(middleware::from_fn_with_state(deadline, read_body))
        .with_state(state)
}

/// How long, and how much, a request body may take.
#[derive(Clone)]
struct BodyDeadline {
    timeout: Duration,
    /// Slowest pace after [`BODY_GRACE`], in bytes per second (0: none).
    min_rate: u64,
    limit: usize,
    /// Where an oversized body is counted as rejected (public listener).
    rejects: Option<Arc<RejectedBodies>>,
}

/// How long a body may take before `min_body_bytes_per_sec` applies.
const BODY_GRACE: Duration = Duration::from_secs(2);

/// Why a body was not read whole.
enum BodyError {
    TooLarge,
    Slow,
    Cut(String),
}

impl BodyDeadline {
    /// Reads `body` whole, within the size limit, the deadline and the
    /// minimum pace.
    async fn read(&self, mut body: Body) -> Result<Bytes, BodyError> {
        let start = tokio::time::Instant::now();
        let hard = start + self.timeout;
        let mut chunks: Vec<Bytes> = Vec::new();
        let mut received = 0usize;
        loop {
            let paced = if self.min_rate == 0 {
                hard
            } else {
                let allowed = Duration::from_secs_f64(received as f64 / self.min_rate as f64);
                hard.min(start + BODY_GRACE + allowed)
            };
            let frame = match tokio::time::timeout_at(paced, body.frame()).await {
                Err(_) => return Err(BodyError::Slow),
                Ok(None) => break,
                Ok(Some(Err(e))) => return Err(BodyError::Cut(e.to_string())),
                Ok(Some(Ok(frame))) => frame,
            };
            if let Ok(data) = frame.into_data() {
                received = received.saturating_add(data.len());
                if received > self.limit {
                    return Err(BodyError::TooLarge);
                }
                chunks.push(data);
            }
        }
        Ok(match chunks.len() {
            0 => Bytes::new(),
            1 => chunks.swap_remove(0),
            _ => Bytes::from(chunks.concat()),
        })
    }

    fn too_large(&self) -> Response {
        if let Some(rejects) = &self.rejects {
            rejects.keep(
                Reject::TooLarge,
                "other",
                b"",
                "body over the size limit (not kept)",
            );
        }
        close(ApiError::TooLarge(self.limit).into_response())
    }
}

/// Reads the whole body within the deadline before any handler runs, so a
/// body that trickles or stalls is answered 408 (and its connection closed)
/// instead of holding a handler, and an oversized one 413: at once, unread,
/// when its `Content-Length` says so.
async fn read_body(State(d): State<BodyDeadline>, request: Request, next: Next) -> Response {
    let declared = request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > d.limit as u64) {
        return d.too_large();
    }
    let (parts, body) = request.into_parts();
    let bytes = match d.read(body).await {
        Ok(bytes) => bytes,
        Err(BodyError::TooLarge) => return d.too_large(),
        Err(BodyError::Cut(e)) => {
            tracing::debug!(error = %e, "request body cut off");
            return close(ApiError::InvalidPayload("request body cut off".into()).into_response());
        }
        Err(BodyError::Slow) => return close(ApiError::Timeout.into_response()),
    };
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// The rest of the request was not read: the connection cannot be reused.
pub(crate) fn close(mut response: Response) -> Response {
    response.headers_mut().insert(
        axum::http::header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    response
}
