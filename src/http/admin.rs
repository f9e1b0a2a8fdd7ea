//! Operator endpoints: outbox status, dead letters (and re-queueing them),
//! rejected bodies. They are served on the admin listener only, behind
//! [`guard`]:
//!
//! - the `Host` header must name this listener (`localhost`, a loopback
//!   address, the listen address, or one of `admin.allowed_hosts`), which
//!   defeats DNS rebinding;
//! - cross-site browser requests are refused (`Sec-Fetch-Site` other than
//!   `same-origin`/`none`, or an `Origin` naming another host); no CORS
//!   headers are ever sent;
//! - with `admin.token`, every request needs `Authorization: Bearer <token>`
//!   (compared in constant time); without one (loopback only, enforced by
//!   the config), reads are open and `POST`s still need an `Authorization`
//!   header, which a browser page cannot add to a cross-site request.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use subtle::ConstantTimeEq;

use super::{ApiError, AppState};
use crate::config::AdminConfig;
use crate::secret::Secret;

/// `?limit=` and, where entries are numbered, `?after=`.
#[derive(Deserialize)]
pub struct Limit {
    limit: Option<usize>,
    after: Option<u64>,
}

/// Who may use the admin listener.
#[derive(Debug)]
pub struct AdminGuard {
    token: Option<Secret>,
    /// Lowercase host names and addresses accepted in `Host` / `Origin`.
    hosts: Vec<String>,
}

impl AdminGuard {
    pub fn new(config: &AdminConfig) -> Self {
        let mut hosts: Vec<String> = ["localhost", "127.0.0.1", "::1"]
            .into_iter()
            .map(String::from)
            .chain(std::iter::once(config.listen.ip().to_string()))
            .chain(config.allowed_hosts.iter().map(|h| h.to_ascii_lowercase()))
            .collect();
        hosts.dedup();
        Self {
            token: config.token.clone(),
            hosts,
        }
    }

    /// Whether `authority` (`host`, `host:port`, `[v6]:port`) names us.
    fn allows(&self, authority: &str) -> bool {
        let host = match authority.strip_prefix('[') {
            Some(rest) => rest.split(']').next().unwrap_or_default(),
            None => authority.split(':').next().unwrap_or_default(),
        };
        let host = host.to_ascii_lowercase();
        self.hosts.contains(&host)
    }

    /// `admin.token`, if set.
    pub fn token(&self) -> Option<&Secret> {
        self.token.as_ref()
    }

    /// The checks that need no credentials: the `Host` names this
    /// listener, and the request is not a cross-site browser request.
    pub fn check_site(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        if !text(header::HOST.as_str()).is_some_and(|h| self.allows(h)) {
            return Err(ApiError::Forbidden(
                "the Host header does not name this listener",
            ));
        }
        let cross_site = text("sec-fetch-site").is_some_and(|s| s != "same-origin" && s != "none")
            || text(header::ORIGIN.as_str()).is_some_and(|origin| {
                let authority = origin.split_once("://").map_or(origin, |(_, a)| a);
                !self.allows(authority)
            });
        if cross_site {
            return Err(ApiError::Forbidden("cross-site requests are refused"));
        }
        Ok(())
    }

    fn check(&self, method: &Method, headers: &HeaderMap) -> Result<(), ApiError> {
        self.check_site(headers)?;
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let given = text(header::AUTHORIZATION.as_str());
        match &self.token {
            Some(token) => check_bearer(headers, token),
            None if method == Method::GET || method == Method::HEAD => Ok(()),
            None if given.is_some() => Ok(()),
            None => Err(ApiError::Unauthorized),
        }
    }
}

/// The admin listener's middleware.
pub async fn guard(State(guard): State<Arc<AdminGuard>>, request: Request, next: Next) -> Response {
    match guard.check(request.method(), request.headers()) {
        Ok(()) => next.run(request).await,
        Err(e) => e.into_response(),
    }
}

/// `Authorization: Bearer <token>`, compared in constant time.
pub(super) fn check_bearer(headers: &HeaderMap, token: &Secret) -> Result<(), ApiError> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if constant_time_eq(given.as_bytes(), token.expose().as_bytes()) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized)
    }
}

/// Compares without an early exit, so timing does not reveal how much of a
/// guess was right (only whether its length was).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

pub(super) fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(e.to_string())
}

/// The most entries one `?limit=` may ask for: a larger value is refused
/// with 400 rather than cut silently. `?after=` pages through the rest.
pub const MAX_LIMIT: usize = 1000;
const DEFAULT_LIMIT: usize = 100;

impl Limit {
    fn get(&self) -> Result<usize, ApiError> {
        match self.limit {
            None => Ok(DEFAULT_LIMIT),
            Some(n) if n <= MAX_LIMIT => Ok(n),
            Some(n) => Err(ApiError::InvalidPayload(format!(
                "limit must be at most {MAX_LIMIT} (got {n}); page with after=<seq>"
            ))),
        }
    }
}

/// Runs a redb read on the blocking pool: a read may wait on the disk, and
/// must not hold an async worker meanwhile.
async fn blocking<T, E>(read: impl FnOnce() -> Result<T, E> + Send + 'static) -> Result<T, ApiError>
where
    T: Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    tokio::task::spawn_blocking(read)
        .await
        .map_err(internal)?
        .map_err(internal)
}

pub async fn status(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    blocking(move || {
        let status = state.outbox.status()?;
        let mut poll = state.tasks.status();
        if let Err(e) = state.tasks.registry.counts() {
            // Not 0: the registry cannot say (a broken `tasks.redb`).
            poll["activeTasks"] = Value::Null;
            poll["awaitingVerification"] = Value::Null;
            poll["registryError"] = json!(e.to_string());
        }
        Ok::<_, crate::outbox::OutboxError>(Json(json!({
            "publisher": state.publisher_name,
            "outbox": status,
            "poll": poll,
            "clients": state.clients.top(TOP_CLIENTS),
            "trace": trace_usage(&state.traces),
        })))
    })
    .await
}

/// What the per-task trace holds: `/admin/status`'s `trace`.
fn trace_usage(traces: &crate::trace::Traces) -> Value {
    let (tasks, bytes) = traces.usage();
    json!({
        "enabled": traces.enabled(),
        "tasks": tasks,
        "bytes": bytes,
        "dropped": traces.dropped(),
    })
}

/// How many addresses `/admin/status` lists under `clients.accepted` and
/// `clients.refused`: enough to find the provider's.
const TOP_CLIENTS: usize = 20;

/// `?limit=` (default 100, at most [`MAX_LIMIT`]) dead letters in sequence
/// order, after `?after=<seq>` if given.
pub async fn dead_letters(
    State(state): State<AppState>,
    Query(q): Query<Limit>,
) -> Result<Json<Value>, ApiError> {
    let (limit, after) = (q.get()?, q.after);
    let letters = blocking(move || state.outbox.dead_letters_after(after, limit)).await?;
    Ok(Json(json!({ "deadLetters": letters })))
}

pub async fn dead_letter(
    State(state): State<AppState>,
    Path(seq): Path<u64>,
) -> Result<Json<Value>, ApiError> {
    match blocking(move || state.outbox.dead_letter(seq)).await? {
        Some(letter) => Ok(Json(json!(letter))),
        None => Err(ApiError::NotFound),
    }
}

/// `GET /admin/tasks/{taskId}`: what became of the task's callbacks and
/// where its events landed (see `crate::trace`); 404 when nothing is kept
/// about it (never seen, past the window, pushed out by `trace.max_bytes`,
/// or from before a restart).
pub async fn task(
    State(state): State<AppState>,
    Path(task_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    match state.traces.get(&task_id) {
        Some(trace) => Ok(Json(trace.to_json())),
        None => Err(ApiError::NotFound),
    }
}

/// What `POST /admin/dead-letters/requeue` may name: no body (or `{}`)
/// requeues every dead letter.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RequeueRequest {
    /// The dead letters to requeue, by `seq`.
    seqs: Option<Vec<u64>>,
}

/// Answers `requeued` (how many moved) and, when `seqs` were named, the
/// `notRequeued` ones: unknown, or without a readable event.
pub async fn requeue(State(state): State<AppState>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let request: RequeueRequest = if body.iter().all(u8::is_ascii_whitespace) {
        RequeueRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::InvalidPayload(format!("expected {{\"seqs\": [..]}}: {e}")))?
    };
    let asked = request.seqs.clone();
    let moved = state
        .outbox
        .requeue_dead_letters(request.seqs)
        .await
        .map_err(internal)?;
    let mut answer = json!({ "requeued": moved.len() });
    if let Some(mut asked) = asked {
        // `moved` comes back in sequence order.
        asked.sort_unstable();
        asked.dedup();
        asked.retain(|seq| moved.binary_search(seq).is_err());
        answer["notRequeued"] = json!(asked);
    }
    Ok(Json(answer))
}

/// What `POST /admin/dead-letters/bury` names: the same shape as
/// requeue's, but `seqs` is required (deleting every dead letter at once
/// is not an accident an API should make easy).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BuryRequest {
    seqs: Vec<u64>,
}

/// Deletes the named dead letters for good; answers `buried` (how many)
/// and the `notBuried` ones (unknown).
pub async fn bury(State(state): State<AppState>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let request: BuryRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::InvalidPayload(format!("expected {{\"seqs\": [..]}}: {e}")))?;
    let mut asked = request.seqs.clone();
    let deleted = state
        .outbox
        .delete_dead_letters(request.seqs)
        .await
        .map_err(internal)?;
    asked.sort_unstable();
    asked.dedup();
    asked.retain(|seq| deleted.binary_search(seq).is_err());
    Ok(Json(json!({ "buried": deleted.len(), "notBuried": asked })))
}

pub async fn rejected(
    State(state): State<AppState>,
    Query(q): Query<Limit>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({ "rejected": state.rejected.newest(q.get()?) })))
}

/// The state of the routers under test (file publisher, no tokens).
#[cfg(test)]
pub(super) fn state(config: &crate::config::Config, outbox: crate::outbox::Outbox) -> AppState {
    AppState::from(super::Shared {
        publisher_name: "file",
        traces: outbox.traces().clone(),
        body_limit: 1024,
        admin_token: None,
        admin_on_loopback: true,
        tasks: crate::poll::Tasks::open(config).unwrap(),
        health: Default::default(),
        clients: Arc::new(super::Clients::new(&config.server, Default::default())),
        rejected: Arc::new(super::RejectedBodies::new(
            config.outbox.keep_rejected,
            outbox.stats().clone(),
        )),
        console: Default::default(),
        outbox,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(token: Option<&str>) -> AdminGuard {
        AdminGuard::new(&AdminConfig {
            listen: "127.0.0.1:9091".parse().unwrap(),
            token: token.map(Secret::new),
            allowed_hosts: vec!["Admin.Example".into()],
        })
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(*k, v.parse().unwrap());
        }
        map
    }

    /// The admin router on a fresh data dir holding two dead letters.
    async fn admin_app(dir: &std::path::Path) -> (axum::Router, Vec<u64>) {
        let mut config = crate::config::Config::default();
        config.outbox.data_dir = dir.to_path_buf();
        let outbox = crate::outbox::Outbox::open(&config.outbox).unwrap();
        let mut seqs = Vec::new();
        for task in ["task_a", "task_b"] {
            let event = crate::poll::synthetic_pending(task, 1);
            seqs.push(outbox.bury(event, "refused".into()).await.unwrap());
        }
        (
            super::super::admin_router(state(&config, outbox), &config),
            seqs,
        )
    }

    async fn call(app: &axum::Router, method: &str, uri: &str, body: &str) -> (u16, Value) {
        use tower::ServiceExt;
        let request = axum::http::Request::builder()
            .method(method)
            .uri(uri)
            .header(header::HOST, "localhost")
            .header(header::AUTHORIZATION, "Bearer local")
            .body(axum::body::Body::from(body.to_string()))
            .unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        let status = response.status().as_u16();
        let bytes = http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap()
            .to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    #[tokio::test]
    async fn dead_letters_page_show_and_requeue_by_seq() {
        let dir = tempfile::tempdir().unwrap();
        let (app, seqs) = admin_app(dir.path()).await;
        let (status, body) = call(&app, "GET", "/admin/dead-letters?limit=1", "").await;
        assert_eq!(status, 200);
        assert_eq!(body["deadLetters"][0]["seq"], seqs[0]);
        assert_eq!(body["deadLetters"].as_array().unwrap().len(), 1);
        let uri = format!("/admin/dead-letters?after={}", seqs[0]);
        let (_, body) = call(&app, "GET", &uri, "").await;
        assert_eq!(body["deadLetters"][0]["event"]["taskId"], "task_b");
        let uri = format!("/admin/dead-letters?limit={}", MAX_LIMIT + 1);
        assert_eq!(call(&app, "GET", &uri, "").await.0, 400, "over the cap");
        assert_eq!(
            call(&app, "GET", "/admin/rejected?limit=5000", "").await.0,
            400
        );

        let (status, letter) =
            call(&app, "GET", &format!("/admin/dead-letters/{}", seqs[1]), "").await;
        assert_eq!((status, &letter["reason"]), (200, &json!("refused")));
        assert_eq!(
            call(&app, "GET", "/admin/dead-letters/999", "").await.0,
            404
        );

        let body = json!({ "seqs": [seqs[1], 999, seqs[1]] }).to_string();
        let (status, answer) = call(&app, "POST", "/admin/dead-letters/requeue", &body).await;
        assert_eq!(status, 200);
        assert_eq!(answer, json!({ "requeued": 1, "notRequeued": [999] }));
        let (_, body) = call(&app, "GET", "/admin/dead-letters", "").await;
        assert_eq!(body["deadLetters"].as_array().unwrap().len(), 1, "{body}");
        assert_eq!(body["deadLetters"][0]["seq"], seqs[0]);
        let (status, _) = call(&app, "POST", "/admin/dead-letters/requeue", "{\"ids\":[1]}").await;
        assert_eq!(status, 400, "unknown field");
        let body = json!({ "seqs": [seqs[0], 999] }).to_string();
        let (status, answer) = call(&app, "POST", "/admin/dead-letters/bury", &body).await;
        assert_eq!(status, 200);
        assert_eq!(answer, json!({ "buried": 1, "notBuried": [999] }));
        let (status, _) = call(&app, "POST", "/admin/dead-letters/bury", "").await;
        assert_eq!(status, 400, "bury names its dead letters");
        let (status, answer) = call(&app, "POST", "/admin/dead-letters/requeue", "").await;
        assert_eq!((status, answer), (200, json!({ "requeued": 0 })));

        let (status, body) = call(&app, "GET", "/admin/status", "").await;
        assert_eq!((status, &body["outbox"]["deadLetters"]), (200, &json!(0)));
        assert_eq!(body["outbox"]["pending"], 1, "one requeued, one buried");
        assert_eq!(body["outbox"]["counters"]["deadBuried"], 1);
    }

    #[test]
    fn host_and_cross_site_requests_are_checked() {
        let g = guard(None);
        for host in ["localhost:9091", "127.0.0.1", "[::1]:9091", "admin.example"] {
            assert!(
                g.check(&Method::GET, &headers(&[("host", host)])).is_ok(),
                "{host}"
            );
        }
        for host in ["evil.example", "127.0.0.2:9091", ""] {
            assert!(
                g.check(&Method::GET, &headers(&[("host", host)])).is_err(),
                "{host}"
            );
        }
        assert!(g.check(&Method::GET, &HeaderMap::new()).is_err(), "no Host");
        let site = headers(&[("host", "localhost"), ("sec-fetch-site", "cross-site")]);
        assert!(g.check(&Method::GET, &site).is_err());
        let origin = headers(&[("host", "localhost"), ("origin", "https://evil.example")]);
        assert!(g.check(&Method::GET, &origin).is_err());
        let own = headers(&[("host", "localhost"), ("origin", "http://localhost:9091")]);
        assert!(g.check(&Method::GET, &own).is_ok());
    }

    #[test]
    fn posts_need_authorization_even_on_loopback() {
        let g = guard(None);
        let bare = headers(&[("host", "localhost")]);
        assert!(matches!(
            g.check(&Method::POST, &bare),
            Err(ApiError::Unauthorized)
        ));
        let with = headers(&[("host", "localhost"), ("authorization", "Bearer local")]);
        assert!(g.check(&Method::POST, &with).is_ok());
        let g = guard(Some("a-long-enough-admin-token"));
        assert!(g.check(&Method::GET, &bare).is_err());
        let right = headers(&[
            ("host", "localhost"),
            ("authorization", "Bearer a-long-enough-admin-token"),
        ]);
        assert!(g.check(&Method::GET, &right).is_ok());
        let wrong = headers(&[
            ("host", "localhost"),
            ("authorization", "Bearer a-long-enough-admin-tokeN"),
        ]);
        assert!(g.check(&Method::GET, &wrong).is_err());
        assert!(constant_time_eq(b"abc", b"abc") && !constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
