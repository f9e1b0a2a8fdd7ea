//! Kafka backend (librdkafka through rdkafka).
//!
//! Key = taskId, so a task stays on one partition; `acks=all` with the
//! idempotent producer, so librdkafka's own retries neither duplicate nor
//! reorder within a partition. A message counts as published only when its
//! delivery report comes back without error. `message.timeout.ms` bounds one
//! attempt; the outbox keeps the event and the relay tries again, so no timer
//! ever drops an accepted event.

use std::sync::RwLock;
use std::time::Duration;

use futures::future::{join_all, BoxFuture};
use futures::FutureExt;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use super::{
    check_topic, render, CloudEvent, EncodeError, Encoded, Outgoing, PublishError, Publisher,
    CONTENT_TYPE,
};
use crate::config::KafkaConfig;
use crate::event::SCHEMA_VERSION;

pub struct KafkaPublisher {
    config: KafkaConfig,
    /// Replaced when librdkafka reports a fatal (idempotence) error, after
    /// which the old instance refuses every message.
    producer: RwLock<FutureProducer>,
}

impl KafkaPublisher {
    pub async fn new(config: KafkaConfig) -> anyhow::Result<Self> {
        let producer = create(&config).await?;
        Ok(Self {
            config,
            producer: RwLock::new(producer),
        })
    }

    fn producer(&self) -> FutureProducer {
        self.producer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The librdkafka settings hookbridge relies on, then the user's options.
pub fn client_config(config: &KafkaConfig) -> ClientConfig {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &config.brokers)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", config.message_timeout_ms.to_string())
        .set("linger.ms", "5")
        // Resume within about a second of the broker's return; librdkafka's
        // default backoff grows to 10 s (measured: first publish 6-10 s late).
        .set("reconnect.backoff.max.ms", "1000")
        .set("client.id", "hookbridge");
    for (key, value) in &config.options {
        cc.set(crate::config::librdkafka_key(key), value.expose());
    }
    cc
}

async fn create(config: &KafkaConfig) -> anyhow::Result<FutureProducer> {
    let cc = client_config(config);
    // Client creation resolves names and starts threads: keep it off the runtime.
    let producer = tokio::task::spawn_blocking(move || cc.create::<FutureProducer>()).await??;
    Ok(producer)
}

/// Permanent means the broker will refuse this message however often it is
/// sent; everything else (connectivity, leadership, timeouts) is retried.
pub fn classify(err: &KafkaError) -> PublishError {
    use RDKafkaErrorCode as C;
    let permanent = matches!(
        err.rdkafka_error_code(),
        Some(
            C::MessageSizeTooLarge
                | C::InvalidMessageSize
                | C::InvalidTopic
                | C::TopicAuthorizationFailed
                | C::ClusterAuthorizationFailed
                | C::InvalidRecord
                | C::PolicyViolation
                | C::InvalidMessage
        )
    );
    if permanent {
        PublishError::Permanent(err.to_string())
    } else {
        PublishError::Transient(err.to_string())
    }
}

/// One event as a Kafka record, before it meets a producer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedRecord {
    /// The rendered topic, checked to be a legal topic name.
    pub topic: String,
    /// The task id: one task stays on one partition.
    pub key: String,
    /// CloudEvents binary-mode headers plus `event-id` and `schema-version`.
    pub headers: Vec<(&'static str, String)>,
    pub payload: bytes::Bytes,
}

/// Encodes one event for `config`'s topic template. Total: an event whose record would be
/// refused (an illegal rendered topic) is an [`EncodeError`], never a panic.
pub fn encode(o: &Outgoing, config: &KafkaConfig) -> Result<EncodedRecord, EncodeError> {
    let topic = render(&config.topic, &o.meta, &config.models);
    check_topic(&topic)?;
    let ce = CloudEvent::of(&o.meta);
    // Kafka header values and keys are plain bytes: any string is a valid one.
    let headers = vec![
        ("content-type", CONTENT_TYPE.to_string()),
        ("event-id", ce.id.clone()),
        ("schema-version", SCHEMA_VERSION.to_string()),
        ("ce_specversion", "1.0".to_string()),
        ("ce_id", ce.id),
        ("ce_source", ce.source.to_string()),
        ("ce_type", ce.ty),
        ("ce_subject", ce.subject),
        ("ce_time", ce.time),
    ];
    Ok(EncodedRecord {
        topic,
        key: o.meta.task_id.clone(),
        headers,
        payload: o.payload.clone(),
    })
}

impl KafkaPublisher {
    async fn send_one(&self, producer: &FutureProducer, m: &Encoded) -> Result<(), PublishError> {
        let mut headers = OwnedHeaders::new_with_capacity(m.headers.len());
        for (key, value) in &m.headers {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_str()),
            });
        }
        let mut record = FutureRecord::to(&m.destination)
            .key(m.key.as_str())
            .payload(m.payload.as_ref())
            .headers(headers);
        // Enqueue; when librdkafka's local queue is full, wait for deliveries
        // to make room rather than failing the event.
        let delivery = loop {
            match producer.send_result(record) {
                Ok(delivery) => break delivery,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => return Err(classify(&e)),
            }
        };
        match delivery.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((e, _))) => Err(classify(&e)),
            Err(_canceled) => Err(PublishError::Transient(
                "producer dropped the message".into(),
            )),
        }
    }
}

impl Publisher for KafkaPublisher {
    fn name(&self) -> &'static str {
        "kafka"
    }

    fn encode(&self, o: &Outgoing) -> Result<Encoded, EncodeError> {
        let record = encode(o, &self.config)?;
        Ok(Encoded {
            seq: o.seq,
            destination: record.topic,
            key: record.key,
            id: o.meta.event_id.clone(),
            headers: record.headers,
            payload: record.payload,
        })
    }

    fn publish<'a>(&'a self, batch: &'a [Encoded]) -> BoxFuture<'a, Vec<Result<(), PublishError>>> {
        async move {
            let producer = self.producer();
            // All sends are enqueued before any is awaited: librdkafka batches
            // them, and per-partition order is kept by the idempotent producer.
            let results = join_all(batch.iter().map(|o| self.send_one(&producer, o))).await;
            if producer.client().fatal_error().is_some() {
                tracing::warn!("kafka producer hit a fatal error; creating a new one");
                match create(&self.config).await {
                    Ok(fresh) => *self.producer.write().unwrap_or_else(|p| p.into_inner()) = fresh,
                    Err(e) => tracing::error!(error = %e, "cannot recreate the kafka producer"),
                }
            }
            results
        }
        .boxed()
    }

    fn flush(&self, timeout: Duration) -> BoxFuture<'_, ()> {
        let producer = self.producer();
        async move {
            let _ = tokio::task::spawn_blocking(move || producer.flush(timeout)).await;
        }
        .boxed()
    }
}
