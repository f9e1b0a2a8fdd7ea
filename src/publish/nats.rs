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
use async_nats::{Client, ConnectOptions, HeaderMap};
use futures::future::{join_all, BoxFuture};
use futures::FutureExt;
use tokio::sync::OnceCell;

use super::{
    render, CloudEvent, EncodeError, Encoded, Outgoing, PublishError, Publisher, CONTENT_TYPE,
};
use crate::config::NatsConfig;
use crate::event::SCHEMA_VERSION;

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
            let (url, userinfo) = crate::config::split_userinfo(url);
            match userinfo {
                Some((user, Some(pass))) => options = options.user_and_password(user, pass),
                Some((token, None)) if config.token.is_none() => options = options.token(token),
                _ => {}
            }
            urls.push(url);
        }
        let servers = crate::config::mask_url(&config.url);
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

    async fn send_one(&self, m: &Encoded) -> Result<(), PublishError> {
        let subject = m.destination.clone();
        let mut headers = HeaderMap::new();
        for (name, value) in &m.headers {
            headers.insert(*name, value.as_str());
        }
        if !self.config.jetstream {
            self.client
                .publish_with_headers(subject, headers, m.payload.clone())
                .await
                .map_err(|e| PublishError::Transient(e.to_string()))?;
            return Ok(());
        }
        let message = PublishMessage::build()
            .payload(m.payload.clone())
            .headers(headers)
            .message_id(&m.id);
        let ack = self
            .js
            .send_publish(subject, message)
            .await
            .map_err(|e| classify(&e))?;
        ack.await.map(|_| ()).map_err(|e| classify(&e))
    }
}

fn headers(o: &Outgoing) -> Vec<(&'static str, String)> {
    let ce = CloudEvent::of(&o.event);
    vec![
        ("Content-Type", CONTENT_TYPE.into()),
        ("Event-Id", ce.id.clone()),
        ("Schema-Version", SCHEMA_VERSION.to_string()),
        ("ce-specversion", "1.0".into()),
        ("ce-id", ce.id),
        ("ce-source", ce.source.into()),
        ("ce-type", ce.ty),
        ("ce-subject", ce.subject),
        ("ce-time", ce.time),
    ]
}

/// Permanent: the message itself is refused (too large for the server or
/// the stream). Missing streams, timeouts and broken connections heal.
pub fn classify(err: &jetstream::context::PublishError) -> PublishError {
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
        Ok(Encoded {
            seq: o.seq,
            destination: render(&self.config.subject, &o.event),
            key: o.event.task_id.clone(),
            id: o.event.event_id.clone(),
            headers: headers(o),
            payload: o.payload.clone(),
        })
    }

    fn publish<'a>(&'a self, batch: &'a [Encoded]) -> BoxFuture<'a, Vec<Result<(), PublishError>>> {
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
            let _ = tokio::time::timeout(timeout, self.client.flush()).await;
        }
        .boxed()
    }
}
