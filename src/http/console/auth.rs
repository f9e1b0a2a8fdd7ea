//! Console sessions: what lets a browser act (requeue, bury) without ever
//! holding the admin token in script reach.
//!
//! - `POST /ui/login` with the admin token (compared in constant time)
//!   opens a session: a random id in an `HttpOnly; SameSite=Strict;
//!   Path=/ui` cookie, kept in memory only (a restart signs everyone out).
//! - Each session has its own random CSRF token; every form carries it and
//!   every `POST` is checked against it in constant time.
//! - Sessions are bounded: at most [`MAX_SESSIONS`] (a new one pushes out
//!   the one closest to its end) and each ends [`SESSION_TTL`] after login.
//! - Without `admin.token` the admin listener is loopback-only (the config
//!   enforces it) and the API lets any `POST` that carries an
//!   `Authorization` header through. The console's equivalent: the login
//!   form opens a session without a token, so actions still need the
//!   session cookie and the CSRF token that no other site can obtain.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap, HeaderValue};

use super::super::constant_time_eq;
use crate::sync::lock;

/// Most sessions kept at once.
pub const MAX_SESSIONS: usize = 32;
/// How long a session lasts after login.
pub const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);
/// The session cookie's name.
pub const COOKIE: &str = "hookbridge_console";

struct Session {
    csrf: String,
    ends: Instant,
}

/// The open sessions, by id.
pub struct Sessions {
    open: Mutex<HashMap<String, Session>>,
    ttl: Duration,
}

impl Default for Sessions {
    fn default() -> Self {
        Self::new(SESSION_TTL)
    }
}

impl Sessions {
    pub fn new(ttl: Duration) -> Self {
        Self {
            open: Mutex::default(),
            ttl,
        }
    }

    /// Opens a session; returns its id and its CSRF token.
    pub fn open(&self) -> (String, String) {
        let (id, csrf) = (random_token(), random_token());
        let now = Instant::now();
        let mut open = lock(&self.open);
        open.retain(|_, s| s.ends > now);
        if open.len() >= MAX_SESSIONS {
            let closest = open
                .iter()
                .min_by_key(|(_, s)| s.ends)
                .map(|(id, _)| id.clone());
            if let Some(closest) = closest {
                open.remove(&closest);
            }
        }
        open.insert(
            id.clone(),
            Session {
                csrf: csrf.clone(),
                ends: now + self.ttl,
            },
        );
        (id, csrf)
    }

    /// The CSRF token of the live session `id`.
    pub fn csrf(&self, id: &str) -> Option<String> {
        let mut open = lock(&self.open);
        let live = open.get(id).is_some_and(|s| s.ends > Instant::now());
        if !live {
            open.remove(id);
            return None;
        }
        open.get(id).map(|s| s.csrf.clone())
    }

    pub fn close(&self, id: &str) {
        lock(&self.open).remove(id);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.open).len()
    }
}

/// 32 random bytes, hex: from the thread's CSPRNG (ChaCha, seeded and
/// reseeded from the OS).
fn random_token() -> String {
    rand::random::<[u8; 32]>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The session id the request's `Cookie` header carries, if any.
pub fn session_id(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
}

/// The `Set-Cookie` value that opens (`Some(id)`) or ends (`None`) a session.
pub fn cookie(id: Option<&str>, ttl: Duration) -> HeaderValue {
    let value = match id {
        Some(id) => format!(
            "{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/ui; Max-Age={}",
            ttl.as_secs()
        ),
        None => format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/ui; Max-Age=0"),
    };
    // Hex ids and fixed text only.
    HeaderValue::from_str(&value).unwrap_or(HeaderValue::from_static(""))
}

/// Whether the form's CSRF token is the session's.
pub fn csrf_ok(expected: &str, given: Option<&str>) -> bool {
    given.is_some_and(|given| constant_time_eq(given.as_bytes(), expected.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_are_random_bounded_and_end() {
        let sessions = Sessions::default();
        let (a, csrf_a) = sessions.open();
        let (b, _) = sessions.open();
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        assert_eq!(sessions.csrf(&a).as_deref(), Some(csrf_a.as_str()));
        assert_eq!(sessions.csrf("forged"), None);
        sessions.close(&a);
        assert_eq!(sessions.csrf(&a), None);
        for _ in 0..MAX_SESSIONS * 2 {
            sessions.open();
        }
        assert_eq!(sessions.len(), MAX_SESSIONS, "bounded in count");

        let short = Sessions::new(Duration::ZERO);
        let (id, _) = short.open();
        assert_eq!(short.csrf(&id), None, "ended");
    }

    #[test]
    fn the_cookie_is_http_only_same_site_strict_and_scoped() {
        let set = cookie(Some("abc"), SESSION_TTL);
        assert_eq!(
            set.to_str().unwrap(),
            "hookbridge_console=abc; HttpOnly; SameSite=Strict; Path=/ui; Max-Age=28800"
        );
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("other=1; hookbridge_console=abc"),
        );
        assert_eq!(session_id(&headers), Some("abc"));
        assert!(csrf_ok("t0k", Some("t0k")));
        assert!(!csrf_ok("t0k", Some("t0K")) && !csrf_ok("t0k", None));
        assert!(!csrf_ok("t0k", Some("")));
    }
}
