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

use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use subtle::ConstantTimeEq;

use super::{ApiError, AppState};
use crate::config::{AdminConfig, Secret};

#[derive(Deserialize)]
pub struct Limit {
    limit: Option<usize>,
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

    fn check(&self, method: &Method, headers: &HeaderMap) -> Result<(), ApiError> {
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

pub async fn status(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let status = state.outbox.status().map_err(internal)?;
    Ok(Json(json!({
        "publisher": state.publisher_name,
        "outbox": status,
        "poll": state.tasks.status(),
    })))
}

pub async fn dead_letters(
    State(state): State<AppState>,
    Query(q): Query<Limit>,
) -> Result<Json<Value>, ApiError> {
    let letters = state
        .outbox
        .dead_letters(q.limit.unwrap_or(100))
        .map_err(internal)?;
    Ok(Json(json!({ "deadLetters": letters })))
}

pub async fn requeue(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let moved = state.outbox.requeue_dead().await.map_err(internal)?;
    Ok(Json(json!({ "requeued": moved })))
}

pub async fn rejected(
    State(state): State<AppState>,
    Query(q): Query<Limit>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(
        json!({ "rejected": state.outbox.rejected(q.limit.unwrap_or(100)) }),
    ))
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
