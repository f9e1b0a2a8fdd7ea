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

use anyhow::Context;
use futures::future::{join_all, BoxFuture};
use futures::FutureExt;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tokio::sync::OnceCell;

use super::config::{librdkafka_key, KafkaConfig, KAFKA_MESSAGE_OVERHEAD, MAX_BODY_LIMIT};
use super::names::{check_topic, destination};
use super::{
    destinations, CloudEvent, EncodeError, Encoded, HeaderNames, Outgoing, PublishError, Published,
    Publisher, Receipt,
};

/// The record headers, in [`CloudEvent::headers`]' order: CloudEvents
/// binary mode (`ce_` prefix) plus `event-id` and `schema-version`; then,
/// with telemetry on, `traceparent` and `ce_traceparent`.
const HEADERS: HeaderNames = [
    "content-type",
    "event-id",
    "schema-version",
    "ce_specversion",
    "ce_id",
    "ce_source",
    "ce_type",
    "ce_subject",
    "ce_time",
];

/// Longest wait for one admin request (topic creation, configs) at start.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

pub struct KafkaPublisher {
    config: KafkaConfig,
    /// Replaced when librdkafka reports a fatal (idempotence) error, after
    /// which the old instance refuses every message.
    producer: RwLock<FutureProducer>,
    /// Set once the broker answered the topic check: every topic the
    /// template can become exists (or could not be created, and was logged).
    topics_ready: OnceCell<()>,
}

impl KafkaPublisher {
    pub async fn new(config: KafkaConfig) -> anyhow::Result<Self> {
        let producer = create(&config).await?;
        Ok(Self {
            config,
            producer: RwLock::new(producer),
            topics_ready: OnceCell::new(),
        })
    }

    /// Start-up: creates the topics events may go to and refuses a
    /// `body_limit` the broker would refuse. A broker that does not answer
    /// in time is not an error here: the topics are then created before
    /// the first publish, and the limit is not checked.
    pub async fn prepare(&self, body_limit: usize) -> anyhow::Result<()> {
        match self.ensure_topics().await {
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(error = %e, "kafka: cannot check the topics now; will before the first publish");
                return Ok(());
            }
        }
        let topics = destinations(&self.config.topic, &self.config.models);
        let limit = match topic_message_limit(&self.config, &topics).await {
            Ok(limit) => limit,
            Err(e) => {
                tracing::warn!(error = %e, "kafka: cannot read the topics' max.message.bytes");
                return Ok(());
            }
        };
        if let Some((topic, limit)) = limit {
            if body_limit as u64 > limit {
                anyhow::bail!(
                    "invalid `server.body_limit_bytes`: {body_limit} is larger than the \
                     max.message.bytes of topic {topic:?} ({limit}); such events could be \
                     accepted but never published"
                );
            }
        }
        Ok(())
    }

    /// Creates every topic the template can become, once the broker answers.
    async fn ensure_topics(&self) -> Result<(), PublishError> {
        self.topics_ready
            .get_or_try_init(|| async {
                let topics = destinations(&self.config.topic, &self.config.models);
                create_topics(&self.config, &topics)
                    .await
                    .map_err(|e| PublishError::Transient(format!("cannot create topics: {e:#}")))
            })
            .await
            .map(|_| ())
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
        // Topics come from hookbridge (created at start), never from a
        // metadata request that names one.
        .set("allow.auto.create.topics", "false")
        // Large enough for any accepted event: the broker's own limit is
        // the one that counts, checked at start.
        .set(
            "message.max.bytes",
            (MAX_BODY_LIMIT as u64 + KAFKA_MESSAGE_OVERHEAD).to_string(),
        )
        .set("client.id", "hookbridge");
    for (key, value) in &config.options {
        cc.set(librdkafka_key(key), value.expose());
    }
    cc
}

async fn create(config: &KafkaConfig) -> anyhow::Result<FutureProducer> {
    let cc = client_config(config);
    // Client creation resolves names and starts threads: keep it off the runtime.
    let producer = tokio::task::spawn_blocking(move || cc.create::<FutureProducer>()).await??;
    Ok(producer)
}

/// Creates `topics` with the broker's default partitions and replication;
/// one that exists already is fine. A topic that cannot be created (no
/// right to) is logged: its events are refused as unknown-topic and become
/// dead letters after `outbox.refusal_attempts`, the others flow.
async fn create_topics(config: &KafkaConfig, topics: &[String]) -> anyhow::Result<()> {
    let admin = admin_client(config).await?;
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|t| NewTopic::new(t, -1, TopicReplication::Fixed(-1)))
        .collect();
    let options = AdminOptions::new().request_timeout(Some(ADMIN_TIMEOUT));
    let results = admin
        .create_topics(&new, &options)
        .await
        .context("the broker did not answer the topic creation")?;
    for result in results {
        match result {
            Ok(topic) => tracing::info!(%topic, "kafka: topic created"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, RDKafkaErrorCode::RequestTimedOut | RDKafkaErrorCode::OperationTimedOut)) => {
                anyhow::bail!("the broker did not answer the topic creation in time")
            }
            Err((topic, code)) => {
                tracing::error!(%topic, error = %code, "kafka: cannot create a topic hookbridge may publish to")
            }
        }
    }
    Ok(())
}

/// The smallest `max.message.bytes` among `topics`, with its topic.
async fn topic_message_limit(
    config: &KafkaConfig,
    topics: &[String],
) -> anyhow::Result<Option<(String, u64)>> {
    let admin = admin_client(config).await?;
    let specifiers: Vec<ResourceSpecifier> =
        topics.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
    let options = AdminOptions::new().request_timeout(Some(ADMIN_TIMEOUT));
    let results = admin
        .describe_configs(&specifiers, &options)
        .await
        .context("the broker did not answer for the topic configs")?;
    let mut smallest: Option<(String, u64)> = None;
    for (topic, result) in topics.iter().zip(results) {
        let Ok(resource) = result else { continue };
        let limit = resource
            .entries
            .iter()
            .find(|e| e.name == "max.message.bytes")
            .and_then(|e| e.value.as_deref()?.parse::<u64>().ok());
        if let Some(limit) = limit {
            if smallest.as_ref().is_none_or(|(_, s)| limit < *s) {
                smallest = Some((topic.clone(), limit));
            }
        }
    }
    Ok(smallest)
}

async fn admin_client(config: &KafkaConfig) -> anyhow::Result<AdminClient<DefaultClientContext>> {
    let cc = client_config(config);
    // Client creation resolves names and starts threads: keep it off the runtime.
    let admin = tokio::task::spawn_blocking(move || cc.create::<AdminClient<_>>()).await??;
    Ok(admin)
}

/// Permanent means the broker will refuse this message however often it is
/// sent; refused means it refuses it where it is going now (an unknown
/// topic), which only an operator can fix; everything else (connectivity,
/// leadership, timeouts) is retried.
pub fn classify(err: &KafkaError) -> PublishError {
    use RDKafkaErrorCode as C;
    if matches!(
        err.rdkafka_error_code(),
        Some(C::UnknownTopicOrPartition | C::UnknownTopic | C::UnknownPartition)
    ) {
        return PublishError::Refused(err.to_string());
    }
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
    let topic = destination(&config.topic, &o.meta, &config.models, check_topic)?;
    // Kafka header values and keys are plain bytes: any string is a valid one.
    let mut headers = CloudEvent::of(&o.meta).headers(HEADERS);
    super::trace_headers(&o.meta, "ce_traceparent", &mut headers);
    Ok(EncodedRecord {
        topic,
        key: o.meta.task_id.clone(),
        headers,
        payload: o.payload.clone(),
    })
}

impl KafkaPublisher {
    async fn send_one(&self, producer: &FutureProducer, m: &Encoded) -> Published {
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
            Ok(Ok(delivery)) => Ok(Receipt {
                partition: Some(delivery.partition),
                offset: Some(delivery.offset),
                ..Receipt::default()
            }),
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
        encode(o, &self.config).map(|r| Encoded::of(o, r.topic, r.headers, r.payload))
    }

    fn publish<'a>(&'a self, batch: &'a [Encoded]) -> BoxFuture<'a, Vec<Published>> {
        async move {
            if let Err(e) = self.ensure_topics().await {
                return vec![Err(e); batch.len()];
            }
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
            // What is not acknowledged stays in the outbox: say so, and go on.
            match tokio::task::spawn_blocking(move || producer.flush(timeout)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "kafka: the producer's queue was not flushed at shutdown")
                }
                Err(e) => tracing::error!(error = %e, "kafka: the flush at shutdown failed"),
            }
        }
        .boxed()
    }
}
