//! The operator console at `/ui` on the admin listener: server-rendered
//! HTML, its stylesheet embedded in the binary, no script at all.
//!
//! - `/ui`: readiness and its problems, the backlog, rates over the last
//!   15 minutes ([`charts`]), dead letters by reason, top client addresses.
//! - `/ui/tasks/{taskId}` (and the search box on every page): one task's
//!   trace as a timeline.
//! - `/ui/dead-letters`: paged, filtered by reason; one letter's body;
//!   requeue and bury.
//!
//! Who may do what ([`gate`]): every request passes the admin guard's
//! `Host` and cross-site checks. Reads follow the admin API: open without
//! `admin.token`, otherwise a session (or the bearer token) is needed.
//! Actions always need a session and its CSRF token ([`auth`]). Every
//! answer forbids framing, caching and any script or outside resource
//! (`Content-Security-Policy`).
//!
//! The console never slows the public listener: it is served by the admin
//! listener, with its own slots, and at most [`MAX_BUSY`] console requests
//! run at once (the rest are answered 503). Lists are paged and every scan
//! of the dead letters is capped ([`pages::SCAN_LIMIT`]).

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use http_body_util::BodyExt;
use tokio::sync::Semaphore;

use super::admin::{check_bearer, AdminGuard};
use super::constant_time_eq;
use super::AppState;

pub mod auth;
pub mod charts;
pub mod html;
mod pages;
mod timeline;

pub use charts::{sample_every, Rates};

/// Console requests served at once; more wait for nothing: 503.
pub const MAX_BUSY: usize = 4;

/// The console's own state: sessions, the rates ring, its request slots.
pub struct Console {
    pub sessions: auth::Sessions,
    pub rates: Arc<Rates>,
    busy: Semaphore,
}

impl Default for Console {
    fn default() -> Self {
        Self {
            sessions: auth::Sessions::default(),
            rates: Arc::default(),
            busy: Semaphore::new(MAX_BUSY),
        }
    }
}

/// What the gate found out about the request, for the handlers.
#[derive(Clone, Default)]
pub struct Access {
    /// The session's id and CSRF token, when signed in.
    pub session: Option<(String, String)>,
    /// Whether `admin.token` is set (a login is then a real one).
    pub token_set: bool,
    /// A `POST`'s form fields (its CSRF token already checked).
    pub form: HashMap<String, String>,
    /// On `POST /ui/login`: whether the form's token is `admin.token`
    /// (compared in constant time; true when none is set).
    pub token_ok: bool,
}

impl Access {
    pub fn viewer(&self) -> html::Viewer<'_> {
        html::Viewer {
            csrf: self.session.as_ref().map(|(_, csrf)| csrf.as_str()),
            can_login: true,
        }
    }

    pub fn field(&self, name: &str) -> Option<&str> {
        self.form.get(name).map(String::as_str)
    }
}

/// The console's routes, behind [`gate`].
pub fn router(state: AppState, guard: Arc<AdminGuard>) -> Router<AppState> {
    Router::new()
        .route("/ui", get(pages::overview))
        .route("/ui/assets/console.css", get(stylesheet))
        .route("/ui/login", get(pages::login_form).post(pages::login))
        .route("/ui/logout", post(pages::logout))
        .route("/ui/tasks", get(timeline::search))
        .route("/ui/tasks/{task_id}", get(timeline::task))
        .route("/ui/dead-letters", get(pages::dead_letters))
        .route("/ui/dead-letters/{seq}", get(pages::dead_letter))
        .route("/ui/dead-letters/requeue", post(pages::requeue))
        .route("/ui/dead-letters/bury", post(pages::bury))
        .route_layer(middleware::from_fn_with_state((state.clone(), guard), gate))
        .with_state(state)
}

async fn stylesheet() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("console.css"),
    )
        .into_response()
}

/// Paths served to anyone who passes the site checks.
fn open_path(path: &str) -> bool {
    matches!(path, "/ui/login" | "/ui/assets/console.css")
}

/// The console's guard: site checks, sign-in, CSRF, its request slots;
/// then the security headers on whatever the answer is.
async fn gate(
    State((state, guard)): State<(AppState, Arc<AdminGuard>)>,
    request: Request,
    next: Next,
) -> Response {
    let response = match admit(&state, &guard, request).await {
        Err(refused) => refused,
        Ok(request) => match state.console.busy.try_acquire() {
            Ok(_slot) => next.run(request).await,
            Err(_) => error(
                StatusCode::SERVICE_UNAVAILABLE,
                "The console is busy; try again in a moment.",
            ),
        },
    };
    secure(response)
}

async fn admit(
    state: &AppState,
    guard: &AdminGuard,
    request: Request,
) -> Result<Request, Response> {
    let (mut parts, body) = request.into_parts();
    if let Err(e) = guard.check_site(&parts.headers) {
        return Err(error(StatusCode::FORBIDDEN, &e.to_string()));
    }
    let session = auth::session_id(&parts.headers).and_then(|id| {
        let csrf = state.console.sessions.csrf(id)?;
        Some((id.to_string(), csrf))
    });
    let token = guard.token();
    let bearer = token.is_some_and(|t| check_bearer(&parts.headers, t).is_ok());
    let path = parts.uri.path().to_string();
    let signed_in = session.is_some() || bearer;
    if token.is_some() && !signed_in && !open_path(&path) {
        return Err(if parts.method == Method::GET {
            see_other("/ui/login")
        } else {
            error(StatusCode::UNAUTHORIZED, "Sign in first.")
        });
    }
    let mut access = Access {
        session: session.clone(),
        token_set: token.is_some(),
        form: HashMap::new(),
        token_ok: false,
    };
    let body = if parts.method == Method::POST {
        // The body is in memory already (the admin listener's body limit).
        let bytes: Bytes = match body.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(_) => return Err(error(StatusCode::BAD_REQUEST, "The form was cut off.")),
        };
        access.form = serde_urlencoded::from_bytes::<Vec<(String, String)>>(&bytes)
            .map_err(|_| error(StatusCode::BAD_REQUEST, "The form could not be read."))?
            .into_iter()
            .collect();
        if path == "/ui/login" {
            let given = access.field("token").unwrap_or("").as_bytes();
            access.token_ok = token.is_none_or(|t| constant_time_eq(given, t.expose().as_bytes()));
        } else {
            let Some((_, csrf)) = &session else {
                return Err(error(StatusCode::FORBIDDEN, "Sign in to act."));
            };
            if !auth::csrf_ok(csrf, access.field("csrf")) {
                return Err(error(
                    StatusCode::FORBIDDEN,
                    "The form's CSRF token is missing or wrong; reload the page.",
                ));
            }
        }
        Body::from(bytes)
    } else {
        body
    };
    parts.extensions.insert(access);
    Ok(Request::from_parts(parts, body))
}

/// What every console answer carries: no framing, no caching, no script,
/// nothing from elsewhere, no referrer to other sites (task ids stay
/// here). Not `no-referrer`: a browser then sends `Origin: null` with a
/// form, which the site check refuses as it must.
fn secure(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        ("x-frame-options", "DENY"),
        (
            "content-security-policy",
            "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; \
             frame-ancestors 'none'; base-uri 'none'",
        ),
        ("cache-control", "no-store"),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "same-origin"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// A `303 See Other` to `location` (a path of ours).
pub fn see_other(location: &str) -> Response {
    let mut response = StatusCode::SEE_OTHER.into_response();
    if let Ok(value) = HeaderValue::from_str(location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

/// A small HTML page naming what went wrong.
pub fn error(status: StatusCode, message: &str) -> Response {
    let viewer = html::Viewer {
        csrf: None,
        can_login: true,
    };
    let body = format!("<p class=\"error\">{}</p>", html::escape(message));
    (
        status,
        page(status.canonical_reason().unwrap_or("Error"), &viewer, &body),
    )
        .into_response()
}

/// A whole page as an HTML response.
pub fn page(title: &str, viewer: &html::Viewer<'_>, body: &str) -> axum::response::Html<String> {
    axum::response::Html(html::page(title, viewer, body))
}

#[cfg(test)]
mod tests;
