//! NATS backend (async-nats): JetStream by default, core NATS on request.
//!
//! JetStream: every message carries `Nats-Msg-Id` = eventId, so the server
//! drops repeats inside the stream's duplicate window (relay retries, or
//! several hookbridge replicas publishing the same callback). A message
//! counts as published when its PubAck arrives. Publishes of a batch are
//! sent back to back on one connection and their acks awaited together.

use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::{self, context::PublishErrorKind, message::PublishMessage};
use async_nats::{Client, ConnectOptions, HeaderMap, HeaderValue};
use futures::future::{join_all, BoxFuture};
use futures::FutureExt;
use tokio::sync::OnceCell;

use super::config::NatsConfig;
use super::names::{check_subject, destination};
use super::{
    CloudEvent, EncodeError, Encoded, HeaderNames, Outgoing, PublishError, Published, Publisher,
    Receipt,
};

/// JetStream's deduplication header.
const NATS_MSG_ID: &str = "Nats-Msg-Id";

/// The message headers, in [`CloudEvent::headers`]' order: CloudEvents
/// binary mode (`ce-` prefix) plus `Event-Id` and `Schema-Version`; then
/// `Nats-Msg-Id` and, with telemetry on, `traceparent` and `ce-traceparent`.
const HEADERS: HeaderNames = [
    "Content-Type",
    "Event-Id",
    "Schema-Version",
    "ce-specversion",
    "ce-id",
    "ce-source",
    "ce-type",
    "ce-subject",
    "ce-time",
];

/// Conditions JetStream checks before it stores a message.
const EXPECTED_LAST_SUBJECT_SEQUENCE: &str = "Nats-Expected-Last-Subject-Sequence";
const EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT: &str = "Nats-Expected-Last-Subject-Sequence-Subject";

/// The oldest nats-server hookbridge publishes to (cluster mode needs a newer
/// one, see `cluster::jetstream::OLDEST_SERVER`).
pub const OLDEST_SERVER: Version = Version(2, 9, 0);

/// JetStream API error: "message size exceeds maximum allowed".
const JS_MESSAGE_TOO_LARGE: u64 = 10054;

pub struct NatsPublisher {
    config: NatsConfig,
    client: Client,
    js: jetstream::Context,
    stream_ready: OnceCell<()>,
}

impl NatsPublisher {
    /// Connects in the background: an unreachable server is not an error
    /// here, publishes simply fail (transiently) until it is back.
    pub async fn connect(config: NatsConfig) -> anyhow::Result<Self> {
        let mut options = ConnectOptions::new()
            .name("hookbridge")
            .retry_on_initial_connect()
            .max_reconnects(None);
        if let Some(token) = &config.token {
            options = options.token(token.expose().to_string());
        }
        // async-nats neither authenticates with a URL's userinfo nor keeps
        // it out of its debug logs: take it out and pass it as options.
        let mut urls = Vec::new();
        for url in config.url.split(',').map(str::trim) {
            let (url, userinfo) = crate::secret::split_userinfo(url);
            match userinfo {
                Some((user, Some(pass))) => options = options.user_and_password(user, pass),
                Some((token, None)) if config.token.is_none() => options = options.token(token),
                _ => {}
            }
            urls.push(url);
        }
        let servers = crate::secret::mask_url(&config.url);
        tracing::info!(%servers, jetstream = config.jetstream, "connecting to NATS");
        let client = options
            .connect(urls.as_slice())
            .await
            .with_context(|| format!("cannot connect to NATS at {servers}"))?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(Duration::from_millis(config.ack_timeout_ms));
        Ok(Self {
            config,
            client,
            js,
            stream_ready: OnceCell::new(),
        })
    }

    /// Waits (bounded by the ack timeout) for the connection; false when it
    /// is not up by then, so nothing the server says is known yet.
    async fn connected(&self) -> bool {
        let wait = Duration::from_millis(self.config.ack_timeout_ms);
        tokio::time::timeout(wait, async {
            while self.client.connection_state() != async_nats::connection::State::Connected {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .is_ok()
    }

    /// What only the server can tell, checked once it answers within the ack timeout
    /// (one wait, else nothing is known yet and a warning says so): a server older than
    /// `oldest` is refused (`for_what` says what needs it), and so is a `body_limit`
    /// above the server's `max_payload`.
    pub async fn check_server(
        &self,
        body_limit: Option<usize>,
        oldest: Version,
        for_what: &str,
    ) -> anyhow::Result<()> {
        if !self.connected().await {
            tracing::warn!(
                "NATS: not connected yet; the server's version and max_payload are not checked at start"
            );
            return Ok(());
        }
        self.version_ok(oldest, for_what)
            .map_err(|e| anyhow::anyhow!(e))?;
        let max_payload = self.client.server_info().max_payload;
        match body_limit {
            Some(limit) if max_payload > 0 && limit > max_payload => anyhow::bail!(
                "invalid `server.body_limit_bytes`: {limit} is larger than the NATS \
                 server's max_payload ({max_payload}); such events could be accepted but \
                 never published"
            ),
            _ => Ok(()),
        }
    }

    /// `Err` with the reason when the connected server is older than `oldest`. A server
    /// whose version cannot be read is taken as it is.
    pub fn version_ok(&self, oldest: Version, for_what: &str) -> Result<(), String> {
        let reported = self.client.server_info().version;
        match Version::parse(&reported) {
            Some(v) if v < oldest => Err(format!(
                "nats-server {reported} is too old: {for_what} needs nats-server {oldest} or newer"
            )),
            _ => Ok(()),
        }
    }

    /// The JetStream context (cluster mode reads a task's last message).
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    async fn ensure_stream(&self) -> Result<(), PublishError> {
        let Some(stream) = &self.config.stream else {
            return Ok(());
        };
        self.stream_ready
            .get_or_try_init(|| async {
                self.js
                    .get_or_create_stream(jetstream::stream::Config {
                        name: stream.name.clone(),
                        subjects: stream.subjects.clone(),
                        duplicate_window: Duration::from_secs(stream.duplicate_window_secs),
                        ..Default::default()
                    })
                    .await
                    .map(|_| ())
                    .map_err(|e| {
                        PublishError::Transient(format!(
                            "cannot create stream {}: {e}",
                            stream.name
                        ))
                    })
            })
            .await
            .map(|_| ())
    }

    async fn send_one(&self, m: &Encoded) -> Published {
        self.send(m, None).await.map_err(|e| match e {
            Checked::Moved => PublishError::Transient("wrong last sequence".into()),
            Checked::Failed(e) => e,
        })
    }

    /// Publishes `m` through JetStream only if the last message on `expect.filter` is
    /// still `expect.last_sequence` (0: none): the stream's leader decides, so two
    /// writers that read the same last message cannot both land.
    pub async fn send_expecting(
        &self,
        m: &Encoded,
        expect: &Expect<'_>,
    ) -> Result<Receipt, Checked> {
        self.send(m, Some(expect)).await
    }

    async fn send(&self, m: &Encoded, expect: Option<&Expect<'_>>) -> Result<Receipt, Checked> {
        let subject = m.destination.clone();
        let mut headers = HeaderMap::new();
        let invalid = |name: &str| {
            Checked::Failed(PublishError::Permanent(format!(
                "header {name} cannot carry its value"
            )))
        };
        for (name, value) in &m.headers {
            // `encode` checked every value; async-nats panics on one it cannot carry.
            let value = value.parse::<HeaderValue>().map_err(|_| invalid(name))?;
            headers.insert(*name, value);
        }
        if let Some(expect) = expect {
            let sequence = expect.last_sequence.to_string();
            for (name, value) in [
                (EXPECTED_LAST_SUBJECT_SEQUENCE, sequence.as_str()),
                (EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT, expect.filter),
            ] {
                let value = value.parse::<HeaderValue>().map_err(|_| invalid(name))?;
                headers.insert(name, value);
            }
        }
        if !self.config.jetstream {
            self.client
                .publish_with_headers(subject, headers, m.payload.clone())
                .await
                .map_err(|e| Checked::Failed(PublishError::Transient(e.to_string())))?;
            return Ok(Receipt::default());
        }
        // The headers already hold `Nats-Msg-Id`.
        let message = PublishMessage::build()
            .payload(m.payload.clone())
            .headers(headers);
        let checked = |e: jetstream::context::PublishError| {
            if e.kind() == PublishErrorKind::WrongLastSequence {
                Checked::Moved
            } else {
                Checked::Failed(classify(&e))
            }
        };
        let ack = self
            .js
            .send_publish(subject, message)
            .await
            .map_err(checked)?;
        let ack = ack.await.map_err(checked)?;
        Ok(Receipt {
            stream: Some(ack.stream),
            sequence: Some(ack.sequence),
            ..Receipt::default()
        })
    }
}

/// The condition of [`NatsPublisher::send_expecting`].
#[derive(Debug, Clone, Copy)]
pub struct Expect<'a> {
    /// A subject filter (wildcards allowed) in the same stream.
    pub filter: &'a str,
    /// The sequence of the last message on it as read; 0 when it had none.
    pub last_sequence: u64,
}

/// Why a conditional publish did not land.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checked {
    /// Another message landed on the filter since it was read: read again.
    Moved,
    /// Any other failure, classified.
    Failed(PublishError),
}

/// A nats-server version, compared part by part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u64, pub u64, pub u64);

impl Version {
    /// `2.15.3`, `v2.11.0-RC.1` (pre-release text ignored); `None` when there are not
    /// three numbers.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim().trim_start_matches('v');
        let core = text.split(['-', '+']).next()?;
        let mut parts = core.split('.').map(|p| p.parse::<u64>().ok());
        match (parts.next(), parts.next(), parts.next()) {
            (Some(Some(a)), Some(Some(b)), Some(Some(c))) => Some(Self(a, b, c)),
            _ => None,
        }
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// One event as a NATS message, before it meets a connection.
#[derive(Debug, Clone)]
pub struct EncodedMessage {
    /// The rendered subject, checked to be one a message may be published to.
    pub subject: String,
    /// CloudEvents headers, `Event-Id`, `Schema-Version`, and `Nats-Msg-Id` (the event id)
    /// for JetStream's deduplication; every value checked to be one a header can carry.
    pub headers: Vec<(&'static str, String)>,
    pub payload: bytes::Bytes,
}

/// Encodes one event for `config`'s subject template. Total: a value a header cannot carry
/// or an illegal rendered subject is an [`EncodeError`], never a panic (async-nats panics
/// on a header value with a line break, so values go through its fallible parser).
pub fn encode(o: &Outgoing, config: &NatsConfig) -> Result<EncodedMessage, EncodeError> {
    let subject = destination(&config.subject, &o.meta, &config.models, check_subject)?;
    let mut headers = CloudEvent::of(&o.meta).headers(HEADERS);
    headers.push((NATS_MSG_ID, o.meta.event_id.clone()));
    super::trace_headers(&o.meta, "ce-traceparent", &mut headers);
    if let Some(&(name, _)) = headers
        .iter()
        .find(|(_, value)| value.parse::<HeaderValue>().is_err())
    {
        return Err(EncodeError::Header {
            name,
            problem: "a header value cannot contain a line break",
        });
    }
    Ok(EncodedMessage {
        subject,
        headers,
        payload: o.payload.clone(),
    })
}

/// Permanent: the message itself is refused (too large for the server or
/// the stream). Refused: no stream captures its subject, which only an
/// operator can change. Timeouts and broken connections heal.
pub fn classify(err: &jetstream::context::PublishError) -> PublishError {
    if err.kind() == PublishErrorKind::StreamNotFound {
        return PublishError::Refused(err.to_string());
    }
    let too_large = match err.kind() {
        PublishErrorKind::MaxPayloadExceeded => true,
        PublishErrorKind::Other => std::error::Error::source(err)
            .and_then(|s| s.downcast_ref::<jetstream::Error>())
            .is_some_and(|js| js.error_code().0 == JS_MESSAGE_TOO_LARGE),
        _ => false,
    };
    if too_large {
        PublishError::Permanent(err.to_string())
    } else {
        PublishError::Transient(err.to_string())
    }
}

impl Publisher for NatsPublisher {
    fn name(&self) -> &'static str {
        if self.config.jetstream {
            "jetstream"
        } else {
            "nats"
        }
    }

    fn encode(&self, o: &Outgoing) -> Result<Encoded, EncodeError> {
        encode(o, &self.config).map(|m| Encoded::of(o, m.subject, m.headers, m.payload))
    }

    fn publish<'a>(&'a self, batch: &'a [Encoded]) -> BoxFuture<'a, Vec<Published>> {
        async move {
            let limit = Duration::from_millis(self.config.ack_timeout_ms);
            let timed_out = || {
                Err(PublishError::Transient(
                    "no answer from the NATS server in time".into(),
                ))
            };
            if let Err(e) = self.ensure_stream().await {
                return vec![Err(e); batch.len()];
            }
            let mut results = join_all(batch.iter().map(|o| async move {
                tokio::time::timeout(limit, self.send_one(o))
                    .await
                    .unwrap_or_else(|_| timed_out())
            }))
            .await;
            // Core NATS has no per-message ack: the batch is published once
            // the server has answered a flush (PING/PONG) after it.
            if !self.config.jetstream {
                let flushed = tokio::time::timeout(limit, self.client.flush()).await;
                if !matches!(flushed, Ok(Ok(()))) {
                    results = vec![timed_out(); batch.len()];
                }
            }
            results
        }
        .boxed()
    }

    fn flush(&self, timeout: Duration) -> BoxFuture<'_, ()> {
        async move {
            // Nothing can be flushed to a server we are not connected to;
            // whatever is unacknowledged stays in the outbox anyway.
            if self.client.connection_state() != async_nats::connection::State::Connected {
                return;
            }
            // What is not acknowledged stays in the outbox: say so, and go on.
            match tokio::time::timeout(timeout, self.client.flush()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "NATS: the flush at shutdown failed"),
                Err(_) => tracing::warn!(?timeout, "NATS: the flush at shutdown timed out"),
            }
        }
        .boxed()
    }
}
