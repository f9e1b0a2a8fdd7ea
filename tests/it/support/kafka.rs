//! Reading back what hookbridge put on Kafka, with a real consumer.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, NewTopic, ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use serde_json::Value;

/// One record as a consumer sees it.
#[derive(Debug, Clone)]
pub struct Record {
    pub key: String,
    pub headers: HashMap<String, String>,
    pub value: Value,
    pub partition: i32,
    pub offset: i64,
}

impl Record {
    pub fn event_id(&self) -> &str {
        self.value["eventId"].as_str().unwrap()
    }
    pub fn state(&self) -> &str {
        self.value["state"].as_str().unwrap()
    }
}

/// The test broker and a topic of its own (`prefix_<random>`) with
/// `partitions` partitions: (bootstrap servers, topic).
pub async fn new_topic(prefix: &str, partitions: i32) -> (String, String) {
    let bootstrap = super::brokers::kafka().await;
    let topic = super::unique(prefix);
    create_topic(&bootstrap, &topic, partitions, &[]).await;
    (bootstrap, topic)
}

/// Creates `topic` with `partitions` partitions and extra topic configs.
pub async fn create_topic(bootstrap: &str, topic: &str, partitions: i32, configs: &[(&str, &str)]) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("admin client");
    let mut new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    for (k, v) in configs {
        new = new.set(k, v);
    }
    let results = admin
        .create_topics(
            [&new],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .expect("create_topics answered");
    for r in results {
        r.expect("topic created");
    }
}

/// Sets `topic`'s `max.message.bytes` (after hookbridge started: at start it
/// refuses a topic that cannot take its largest body) and waits, bounded,
/// until the broker reports it.
pub async fn limit_message_bytes(bootstrap: &str, topic: &str, bytes: u32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("admin client");
    let value = bytes.to_string();
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(30)));
    let change = AlterConfig::new(ResourceSpecifier::Topic(topic)).set("max.message.bytes", &value);
    for r in admin
        .alter_configs([&change], &options)
        .await
        .expect("alter_configs answered")
    {
        r.expect("topic config altered");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let described = admin
            .describe_configs([&ResourceSpecifier::Topic(topic)], &options)
            .await
            .expect("describe_configs answered");
        let now = described.into_iter().flatten().any(|resource| {
            resource
                .entries
                .iter()
                .any(|e| e.name == "max.message.bytes" && e.value.as_deref() == Some(&value))
        });
        if now {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "max.message.bytes of {topic} not applied"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The topics the broker has now.
pub async fn topics(bootstrap: &str) -> Vec<String> {
    let bootstrap = bootstrap.to_string();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .create()
            .expect("metadata client");
        let metadata = consumer
            .fetch_metadata(None, Duration::from_secs(30))
            .expect("metadata");
        metadata
            .topics()
            .iter()
            .map(|t| t.name().to_string())
            .collect()
    })
    .await
    .expect("metadata task")
}

/// Consumes `topic` from the beginning until `expected` records arrived,
/// then keeps listening for `quiet` more so that extra copies would show.
/// Panics if fewer than `expected` arrive within `limit`.
pub async fn consume(
    bootstrap: &str,
    topic: &str,
    expected: usize,
    limit: Duration,
    quiet: Duration,
) -> Vec<Record> {
    consume_with(bootstrap, topic, expected, limit, quiet, &[]).await
}

/// [`consume`] with extra consumer `settings` (for example
/// `isolation.level`).
pub async fn consume_with(
    bootstrap: &str,
    topic: &str,
    expected: usize,
    limit: Duration,
    quiet: Duration,
    settings: &[(&'static str, &'static str)],
) -> Vec<Record> {
    let (bootstrap, topic, settings) =
        (bootstrap.to_string(), topic.to_string(), settings.to_vec());
    tokio::task::spawn_blocking(move || {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", super::unique("reader"))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false");
        for (key, value) in settings {
            config.set(key, value);
        }
        let consumer: BaseConsumer = config.create().expect("consumer");
        consumer.subscribe(&[&topic]).expect("subscribe");
        let deadline = std::time::Instant::now() + limit;
        let mut out = Vec::new();
        let mut quiet_until: Option<std::time::Instant> = None;
        loop {
            let now = std::time::Instant::now();
            if let Some(q) = quiet_until {
                if now >= q {
                    break;
                }
            } else if now >= deadline {
                panic!(
                    "only {} of {expected} records arrived on {topic} within {limit:?}",
                    out.len()
                );
            }
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => {
                    let mut headers = HashMap::new();
                    if let Some(h) = m.headers() {
                        for header in h.iter() {
                            let value = header
                                .value
                                .map(|v| String::from_utf8_lossy(v).into_owned())
                                .unwrap_or_default();
                            headers.insert(header.key.to_string(), value);
                        }
                    }
                    out.push(Record {
                        key: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                        headers,
                        value: serde_json::from_slice(m.payload().unwrap_or_default())
                            .expect("value is JSON"),
                        partition: m.partition(),
                        offset: m.offset(),
                    });
                    if out.len() >= expected && quiet_until.is_none() {
                        quiet_until = Some(std::time::Instant::now() + quiet);
                    }
                }
                Some(Err(e)) => eprintln!("consumer: {e}"),
                None => {}
            }
        }
        out
    })
    .await
    .unwrap()
}
