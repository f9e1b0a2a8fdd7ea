//! The provider's task API: `POST /api/v1/jobs/createTask` and
//! `GET /api/v1/jobs/recordInfo?taskId=`.
//!
//! Answers are classified once ([`classify`]) and callers branch on the
//! class: 429, 5xx, timeouts and network errors are retried here with a
//! capped doubling delay (the provider sends no `Retry-After`, but one is
//! honoured if present); 401 is [`ProviderError::Unauthorized`] (the caller
//! stops polling); 403 is [`ProviderError::Forbidden`] (account-wide or
//! "not your task": the caller decides); 404 is
//! [`ProviderError::UnknownTask`], which the caller only believes after a
//! grace period. `createTask` is never retried: it is not idempotent, and a
//! retry after a lost answer could create (and bill) a second task.
//!
//! Status requests share a semaphore (`provider.max_in_flight`) and a pacer
//! (`provider.requests_per_sec`). The API key is sent as a sensitive header
//! and appears in no log line or error message.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::{backoff, PollStats};
use crate::clock::now_ms;
use crate::config::ProviderConfig;
use crate::event::{self, Source, TaskEvent};
use crate::secret::Secret;
use crate::sync::lock;

/// An HTTP/1 client for `http://` and `https://` URLs (rustls, ring, the
/// system's root certificates). It follows no redirects: a 3xx is an answer.
pub type HttpClient = reqwest::Client;

/// Largest provider answer read, in bytes.
const MAX_ANSWER_BYTES: usize = 1024 * 1024;

/// Why a provider request did not give a usable answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// The key is missing, invalid, inactive or expired.
    #[error("the provider refused the API key (HTTP 401)")]
    Unauthorized,
    /// API access not enabled for the account, or not our task.
    #[error("the provider refused access (HTTP 403)")]
    Forbidden,
    #[error("the provider does not know this task (HTTP 404)")]
    UnknownTask,
    /// A 4xx other than the above: retrying the same request cannot help.
    #[error("the provider refused the request (HTTP {status})")]
    Refused { status: u16 },
    /// 200 but not a task record we can read, or not the task asked for.
    #[error("unreadable answer from the provider: {0}")]
    Invalid(String),
    /// Still failing after the retries: 429, 5xx, timeout, network error.
    #[error("provider unavailable: {0}")]
    Transient(String),
}

/// What an answer's status means for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Ok,
    /// Worth retrying after a delay: 408, 425, 429, 5xx.
    Retry,
    Unauthorized,
    Forbidden,
    NotFound,
    /// Any other status: final.
    Refused,
}

pub fn classify(status: u16) -> Class {
    match status {
        200..=299 => Class::Ok,
        401 => Class::Unauthorized,
        403 => Class::Forbidden,
        404 => Class::NotFound,
        408 | 425 | 429 | 500..=599 => Class::Retry,
        _ => Class::Refused,
    }
}

/// A `Retry-After` given in seconds (the HTTP-date form is ignored).
pub fn retry_after(value: Option<&HeaderValue>) -> Option<Duration> {
    let secs: u64 = value?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(secs))
}

/// Builds the shared HTTP client. Without any trusted root certificate on
/// the system only `http://` URLs work; `https_required` turns that into an
/// error at start-up instead of a TLS failure on every request.
pub fn http_client(https_required: bool) -> std::io::Result<HttpClient> {
    if https_required && rustls_native_certs::load_native_certs().certs.is_empty() {
        return Err(std::io::Error::other(
            "no trusted root certificates found on this system; install ca-certificates",
        ));
    }
    reqwest::Client::builder()
        .use_rustls_tls()
        .http1_only()
        .redirect(reqwest::redirect::Policy::none())
        .pool_idle_timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| std::io::Error::other(error_chain(&e.without_url())))
}

/// Spaces requests out to at most one per `period`.
struct Pacer {
    period: Duration,
    next: Mutex<Instant>,
}

impl Pacer {
    async fn wait(&self) {
        let at = {
            let mut next = lock(&self.next);
            let at = (*next).max(Instant::now());
            *next = at + self.period;
            at
        };
        tokio::time::sleep_until(at).await;
    }
}

/// The provider's task API, with our key.
pub struct ProviderClient {
    http: HttpClient,
    base: String,
    key: Option<Secret>,
    timeout: Duration,
    max_retries: u32,
    retry_initial: Duration,
    retry_max: Duration,
    permits: Semaphore,
    pacer: Pacer,
    stats: Arc<PollStats>,
}

impl ProviderClient {
    pub fn new(config: &ProviderConfig, stats: Arc<PollStats>) -> std::io::Result<Self> {
        let base = config.base_url.trim_end_matches('/').to_string();
        Ok(Self {
            http: http_client(base.starts_with("https://"))?,
            key: config.api_key.clone(),
            timeout: Duration::from_millis(config.request_timeout_ms),
            max_retries: config.max_retries,
            retry_initial: Duration::from_millis(config.retry_initial_ms),
            retry_max: Duration::from_millis(config.retry_max_ms),
            permits: Semaphore::new(config.max_in_flight),
            pacer: Pacer {
                period: Duration::from_secs(1) / config.requests_per_sec.max(1),
                next: Mutex::new(Instant::now()),
            },
            stats,
            base,
        })
    }

    /// The task's current record, parsed like a callback (`source = poll`).
    /// Retries 429/5xx/network errors; every attempt counts in `polls`,
    /// every failed one in `pollErrors`.
    pub async fn record_info(&self, task_id: &str) -> Result<TaskEvent, ProviderError> {
        let url = format!(
            "{}/api/v1/jobs/recordInfo?taskId={}",
            self.base,
            percent_encode(task_id)
        );
        let mut attempt = 0;
        loop {
            let answer = {
                let _permit = self.permits.acquire().await;
                self.pacer.wait().await;
                PollStats::add(&self.stats.polls, 1);
                self.send(Method::GET, &url, None).await
            };
            let (delay, reason) = match answer {
                Ok((status, headers_delay, body)) => match classify(status.as_u16()) {
                    Class::Ok => return self.read_record(task_id, &body),
                    Class::Retry => (headers_delay, format!("HTTP {}", status.as_u16())),
                    other => return Err(final_error(other, status.as_u16())),
                },
                Err(reason) => (None, reason),
            };
            PollStats::add(&self.stats.poll_errors, 1);
            if attempt >= self.max_retries {
                return Err(ProviderError::Transient(reason));
            }
            let pause = backoff(self.retry_initial, self.retry_max, attempt);
            let pause = delay.map_or(pause, |d| d.max(pause).min(self.retry_max));
            tracing::debug!(%task_id, %reason, ?pause, "status request failed; retrying");
            tokio::time::sleep(pause).await;
            attempt += 1;
        }
    }

    /// Forwards a createTask body once; returns the provider's status and
    /// body as they are, or `Transient` if it could not be reached.
    pub async fn create_task(&self, body: &Value) -> Result<(StatusCode, Bytes), ProviderError> {
        let url = format!("{}/api/v1/jobs/createTask", self.base);
        let body = Bytes::from(serde_json::to_vec(body).unwrap_or_default());
        self.send(Method::POST, &url, Some(body))
            .await
            .map(|(status, _, body)| (status, body))
            .map_err(ProviderError::Transient)
    }

    fn read_record(&self, task_id: &str, body: &[u8]) -> Result<TaskEvent, ProviderError> {
        let fail = |reason: String| {
            PollStats::add(&self.stats.poll_errors, 1);
            Err(ProviderError::Invalid(reason))
        };
        let value: Value = match serde_json::from_slice(body) {
            Ok(value) => value,
            Err(e) => return fail(format!("not JSON: {e}")),
        };
        // An envelope with an error code and no record: the status is inside.
        if let Some(code) = envelope_error(&value) {
            return match classify(code) {
                Class::Ok | Class::Retry => fail(format!("envelope code {code} without a record")),
                other => Err(final_error(other, code)),
            };
        }
        match event::parse(body, Source::Poll, now_ms()) {
            Ok(event) if event.task_id == task_id => Ok(event),
            Ok(event) => fail(format!(
                "asked for task {task_id:?}, got {:?}",
                event.task_id
            )),
            Err(e) => fail(e.to_string()),
        }
    }

    /// One request with the timeout; `Err` is a network-level failure.
    async fn send(
        &self,
        method: Method,
        url: &str,
        body: Option<Bytes>,
    ) -> Result<(StatusCode, Option<Duration>, Bytes), String> {
        let mut request = self.http.request(method, url);
        if let Some(key) = &self.key {
            let mut value = HeaderValue::from_str(&format!("Bearer {}", key.expose()))
                .map_err(|_| "the API key is not a valid header value".to_string())?;
            value.set_sensitive(true);
            request = request.header(AUTHORIZATION, value);
        }
        if let Some(body) = body {
            request = request.header(CONTENT_TYPE, "application/json").body(body);
        }
        let exchange = async {
            let mut response = request
                .send()
                .await
                .map_err(|e| format!("request failed: {}", error_chain(&e.without_url())))?;
            let status = response.status();
            let delay = retry_after(response.headers().get(RETRY_AFTER));
            let body = read_capped(&mut response, MAX_ANSWER_BYTES).await?;
            Ok((status, delay, body))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {:?}", self.timeout)))
    }
}

/// Reads the body chunk by chunk and stops at `cap` bytes, whatever
/// `content-length` claims.
async fn read_capped(response: &mut reqwest::Response, cap: usize) -> Result<Bytes, String> {
    let mut body = BytesMut::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| {
        format!(
            "reading the answer failed: {}",
            error_chain(&e.without_url())
        )
    })? {
        if body.len() + chunk.len() > cap {
            return Err(format!(
                "reading the answer failed: longer than {cap} bytes"
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

fn final_error(class: Class, status: u16) -> ProviderError {
    match class {
        Class::Unauthorized => ProviderError::Unauthorized,
        Class::Forbidden => ProviderError::Forbidden,
        Class::NotFound => ProviderError::UnknownTask,
        _ => ProviderError::Refused { status },
    }
}

/// `{code: 404, message: ..., data: null}`: an error inside a 200 envelope.
fn envelope_error(value: &Value) -> Option<u16> {
    let object = value.as_object()?;
    let data_missing = object.get("data").is_none_or(Value::is_null);
    let code = object.get("code")?.as_u64()?;
    (data_missing && object.get("taskId").is_none() && code != 200).then_some(code as u16)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    // It is logged: a URL in it must not carry `base_url`'s credentials.
    crate::secret::mask_url(&out)
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{SimConfig, Simulator};
    use serde_json::json;

    #[test]
    fn statuses_are_classified_once() {
        for (status, class) in [
            (200, Class::Ok),
            (204, Class::Ok),
            (401, Class::Unauthorized),
            (403, Class::Forbidden),
            (404, Class::NotFound),
            (408, Class::Retry),
            (429, Class::Retry),
            (500, Class::Retry),
            (502, Class::Retry),
            (503, Class::Retry),
            (400, Class::Refused),
            (402, Class::Refused),
            (302, Class::Refused),
        ] {
            assert_eq!(classify(status), class, "HTTP {status}");
        }
    }

    #[test]
    fn retry_after_seconds_and_envelope_errors() {
        let header = |s: &'static str| HeaderValue::from_static(s);
        assert_eq!(
            retry_after(Some(&header("3"))),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            retry_after(Some(&header("Wed, 21 Oct 2015 07:28:00 GMT"))),
            None
        );
        assert_eq!(retry_after(None), None);
        assert_eq!(
            envelope_error(&json!({"code": 404, "message": "x", "data": null})),
            Some(404)
        );
        assert_eq!(envelope_error(&json!({"code": 200, "data": null})), None);
        assert_eq!(
            envelope_error(&json!({"code": 500, "data": {"taskId": "t"}})),
            None
        );
        assert_eq!(
            envelope_error(&json!({"taskId": "t", "state": "fail", "code": 7})),
            None
        );
        assert_eq!(
            percent_encode("task_1 a/b?&é"),
            "task_1%20a%2Fb%3F%26%C3%A9"
        );
    }

    fn config(base_url: String, key: &str) -> ProviderConfig {
        ProviderConfig {
            base_url,
            api_key: Some(Secret::new(key)),
            requests_per_sec: 1000,
            max_retries: 3,
            retry_initial_ms: 20,
            retry_max_ms: 80,
            request_timeout_ms: 5_000,
            ..ProviderConfig::default()
        }
    }

    async fn sim() -> (Simulator, ProviderClient, Arc<PollStats>, String) {
        let sim_config = SimConfig {
            api_key: "unit-key-0123".into(),
            waiting_ms: 0,
            generating_ms: 0,
            ..SimConfig::default()
        };
        let sim = Simulator::start("127.0.0.1:0".parse().unwrap(), sim_config)
            .await
            .unwrap();
        let stats = Arc::new(PollStats::default());
        let client =
            ProviderClient::new(&config(sim.base_url(), "unit-key-0123"), stats.clone()).unwrap();
        let (status, body) = client
            .create_task(&json!({"model": "seedance-20", "inputs": {"prompt": "a cat"}}))
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK);
        let task_id = serde_json::from_slice::<Value>(&body).unwrap()["taskId"]
            .as_str()
            .unwrap()
            .to_string();
        (sim, client, stats, task_id)
    }

    fn count(c: &std::sync::atomic::AtomicU64) -> u64 {
        c.load(std::sync::atomic::Ordering::Relaxed)
    }

    #[tokio::test]
    async fn rate_limits_and_server_errors_are_retried_with_growing_delays() {
        let (sim, client, stats, task_id) = sim().await;
        sim.fail_next(429, 2);
        sim.fail_next(500, 1);
        let event = client
            .record_info(&task_id)
            .await
            .expect("recovers after retries");
        assert_eq!(event.task_id, task_id);
        assert_eq!(event.source, Source::Poll);
        assert_eq!(event.state, crate::event::State::Success);
        assert_eq!((count(&stats.polls), count(&stats.poll_errors)), (4, 3));
        let polls: Vec<_> = sim
            .requests()
            .into_iter()
            .filter(|r| r.endpoint == "recordInfo")
            .collect();
        let statuses: Vec<u16> = polls.iter().map(|r| r.status).collect();
        assert_eq!(statuses, [429, 429, 500, 200]);
        let gaps: Vec<Duration> = polls.windows(2).map(|w| w[1].at - w[0].at).collect();
        for (gap, at_least) in gaps.iter().zip([20, 40, 80]) {
            assert!(*gap >= Duration::from_millis(at_least), "gaps {gaps:?}");
        }
    }

    #[tokio::test]
    async fn retries_end_in_a_transient_error() {
        let (sim, client, stats, task_id) = sim().await;
        sim.fail_next(503, 10);
        let err = client.record_info(&task_id).await.unwrap_err();
        assert_eq!(err, ProviderError::Transient("HTTP 503".into()));
        assert_eq!(
            count(&stats.poll_errors),
            4,
            "one attempt and three retries"
        );
    }

    #[tokio::test]
    async fn auth_and_unknown_tasks_are_final_at_once() {
        let (sim, client, stats, task_id) = sim().await;
        sim.fail_next(401, 1);
        assert_eq!(
            client.record_info(&task_id).await,
            Err(ProviderError::Unauthorized)
        );
        sim.fail_next(403, 1);
        assert_eq!(
            client.record_info(&task_id).await,
            Err(ProviderError::Forbidden)
        );
        assert_eq!(
            client.record_info("task_never_created").await,
            Err(ProviderError::UnknownTask)
        );
        assert_eq!(count(&stats.polls), 3, "none of these is retried");
        assert_eq!(count(&stats.poll_errors), 0);

        let wrong =
            ProviderClient::new(&config(sim.base_url(), "wrong-key-xyz"), stats.clone()).unwrap();
        let err = wrong.record_info(&task_id).await.unwrap_err();
        assert_eq!(err, ProviderError::Unauthorized);
        assert!(!format!("{err} {err:?}").contains("wrong-key-xyz"));
    }

    #[tokio::test]
    async fn create_task_is_not_retried() {
        let (sim, client, _, _) = sim().await;
        sim.fail_next(500, 1);
        let (status, body) = client.create_task(&json!({"model": "m"})).await.unwrap();
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(String::from_utf8_lossy(&body).contains("message"));
        let creates = sim
            .requests()
            .iter()
            .filter(|r| r.endpoint == "createTask")
            .count();
        assert_eq!(creates, 2, "the set-up's and this one, no retry");
    }

    /// A chunked answer (no content-length) past 1 MiB is cut off, not read
    /// whole.
    #[tokio::test]
    async fn answers_over_the_cap_are_refused() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            while !request.ends_with(b"\r\n\r\n") {
                let mut byte = [0u8; 1];
                socket.read_exact(&mut byte).await.unwrap();
                request.push(byte[0]);
            }
            let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                        transfer-encoding: chunked\r\n\r\n";
            socket.write_all(head.as_bytes()).await.unwrap();
            let chunk = vec![b' '; 64 * 1024];
            // 2 MiB in all, unless the client hangs up first.
            for _ in 0..32 {
                let framed =
                    [format!("{:x}\r\n", chunk.len()).as_bytes(), &chunk, b"\r\n"].concat();
                if socket.write_all(&framed).await.is_err() {
                    return;
                }
            }
            let _ = socket.write_all(b"0\r\n\r\n").await;
        });
        let stats = Arc::new(PollStats::default());
        let mut config = config(format!("http://{addr}"), "k");
        config.max_retries = 0;
        let client = ProviderClient::new(&config, stats).unwrap();
        let err = client.record_info("t").await.unwrap_err();
        assert_eq!(
            err,
            ProviderError::Transient(format!(
                "reading the answer failed: longer than {MAX_ANSWER_BYTES} bytes"
            ))
        );
        server.await.unwrap();
    }

    #[tokio::test]
    async fn unreachable_provider_is_transient() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let stats = Arc::new(PollStats::default());
        let client = ProviderClient::new(
            &config(format!("http://127.0.0.1:{port}"), "k"),
            stats.clone(),
        )
        .unwrap();
        assert!(matches!(
            client.record_info("t").await,
            Err(ProviderError::Transient(_))
        ));
        assert_eq!(count(&stats.poll_errors), 4);
    }
}
