//! The ingress's error type: validation problems become clear 4xx JSON,
//! everything else an opaque 5xx. Internals never reach the response.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::outbox::AppendError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not a callback we can read; the message says why.
    #[error("{0}")]
    InvalidPayload(String),
    #[error("request body is larger than the limit of {0} bytes")]
    TooLarge(usize),
    #[error("missing or wrong credentials")]
    Unauthorized,
    #[error("not found")]
    NotFound,
    /// Refused whatever the credentials (admin Host or cross-site checks).
    #[error("{0}")]
    Forbidden(&'static str),
    /// The request body did not arrive within `server.body_timeout_ms`.
    #[error("the request body did not arrive in time")]
    Timeout,
    /// Over a rate limit; retry after this many seconds.
    #[error("too many requests; retry after {0} s")]
    RateLimited(u64),
    /// Storage pressure: a cap of the backlog (named) is reached, nothing
    /// was stored. A 503 with the reason, never a 429: the client did
    /// nothing wrong.
    #[error("the event backlog is full ({0}); nothing was stored")]
    Backlog(&'static str),
    /// Storage is failing or the service is stopping: nothing was stored.
    #[error("the event could not be stored; nothing was accepted")]
    Unavailable,
    /// Anything unexpected; logged, never described to the client.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    fn parts(&self) -> (StatusCode, &'static str) {
        match self {
            Self::InvalidPayload(_) => (StatusCode::BAD_REQUEST, "invalid_payload"),
            Self::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            Self::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Self::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            Self::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            Self::Timeout => (StatusCode::REQUEST_TIMEOUT, "body_timeout"),
            Self::RateLimited(_) => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            Self::Backlog(_) => (StatusCode::SERVICE_UNAVAILABLE, "backlog_full"),
            Self::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable"),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl From<AppendError> for ApiError {
    fn from(e: AppendError) -> Self {
        match e {
            AppendError::Full(which) => Self::Backlog(which),
            AppendError::Storage(_) | AppendError::Closed => Self::Unavailable,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.parts();
        if let Self::Internal(detail) = &self {
            tracing::error!(%detail, "internal error");
        }
        let mut response = (
            status,
            Json(json!({ "error": code, "message": self.to_string() })),
        )
            .into_response();
        let retry_after = match &self {
            Self::RateLimited(secs) => Some(*secs),
            _ if status == StatusCode::SERVICE_UNAVAILABLE => Some(1),
            _ => None,
        };
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        response
    }
}
