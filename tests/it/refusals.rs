//! Per-event refusals and closed destination sets, against real brokers
//! (issue 20, items 5 to 7): an event the broker refuses where it goes is
//! retried alone and dead-lettered after `outbox.refusal_attempts` while the
//! others keep flowing, `/readyz` says so meanwhile; Kafka topics come from
//! hookbridge, never from a sender's model; a body limit the broker cannot
//! take is refused at start.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use hookbridge::config::{KafkaConfig, NatsConfig, PublisherConfig};
use hookbridge::App;
use hyper::StatusCode;
use serde_json::{json, Value};

use crate::support::app::{config, temp_dir, TestApp};
use crate::support::{brokers, eventually, kafka, nats, secs, unique};

fn callback(task_id: &str, model: &str) -> Value {
    json!({
        "taskId": task_id, "model": model, "state": "success",
        "output": [{"url": "https://static.kinovi.ai/generated/v.mp4"}],
        "updateTime": 1_735_599_754_000_i64
    })
}

fn nats_publisher(url: &str, subject: String, models: &[&str]) -> PublisherConfig {
    PublisherConfig::Nats(NatsConfig {
        url: url.to_string(),
        subject,
        jetstream: true,
        ack_timeout_ms: 2000,
        token: None,
        stream: None,
        models: models.iter().map(|m| m.to_string()).collect(),
    })
}

/// A stream that captures only `<prefix>.good.>`: events for `bad` find no
/// stream. The bad one is tried `refusal_attempts` times, alone, while every
/// good one is published; `/readyz` reports it meanwhile, and it ends as a
/// dead letter naming the refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_without_a_stream_is_dead_lettered_after_its_attempts_and_others_flow() {
    let url = brokers::nats().await;
    let prefix = unique("refused");
    let name = unique("REFUSED");
    let client = async_nats::connect(&url).await.expect("connect to NATS");
    jetstream::new(client)
        .create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![format!("{prefix}.good.>")],
            ..Default::default()
        })
        .await
        .expect("stream created");
    let publisher = nats_publisher(
        &url,
        format!("{prefix}.{{model}}.{{state}}"),
        &["good", "bad"],
    );
    let dir = temp_dir();
    let mut config = config(dir.path(), publisher);
    // Long enough waits that the good events are all through before the
    // bad one's attempts are used up (2 + 2 + 2 s at least).
    config.outbox.refusal_attempts = 4;
    config.outbox.retry_initial_ms = 2000;
    config.outbox.retry_max_ms = 2000;
    let app = TestApp::start(config).await;

    let run = unique("task");
    assert_eq!(
        app.callback(&callback(&format!("{run}_bad"), "bad")).await,
        StatusCode::OK
    );
    const GOOD: u64 = 30;
    for n in 0..GOOD {
        let body = callback(&format!("{run}_good_{n}"), "good");
        assert_eq!(app.callback(&body).await, StatusCode::OK);
    }
    let stored = nats::read_stream(&url, &name, GOOD, secs(30), Duration::ZERO).await;
    assert_eq!(stored.len() as u64, GOOD);
    let status = app.outbox.status().unwrap();
    assert_eq!(
        (status.pending, status.dead_letters),
        (1, 0),
        "the good events went through while the bad one waits alone: {status:?}"
    );
    let (code, ready) = app.admin.get("/readyz").await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{ready}");
    assert!(
        ready["problems"]
            .as_array()
            .unwrap()
            .contains(&json!({"component": "relay", "problem": "refusing"})),
        "{ready}"
    );

    let letters = eventually(
        Duration::from_secs(60),
        "the bad event to be dead-lettered",
        || {
            let outbox = app.outbox.clone();
            async move {
                let letters = outbox.dead_letters(10).unwrap();
                (!letters.is_empty()).then_some(letters)
            }
        },
    )
    .await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].event["taskId"], format!("{run}_bad"));
    assert!(
        letters[0].reason.contains("refused 4 times") && letters[0].reason.contains("stream"),
        "{}",
        letters[0].reason
    );
    app.drained(Duration::from_secs(10)).await;
    eventually(Duration::from_secs(10), "/readyz to be ready again", || {
        let admin = app.admin.clone();
        async move { (admin.get("/readyz").await.0 == StatusCode::OK).then_some(()) }
    })
    .await;
    app.stop().await;
}

/// With `{model}` in the topic, the topics are the allowlist's and
/// `unknown`, created by hookbridge at start; a sender's model never names
/// a topic, even on a broker that auto-creates them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_topics_are_created_at_start_and_never_by_a_sender() {
    let bootstrap = brokers::kafka().await;
    let base = unique("closed");
    let publisher = PublisherConfig::Kafka(KafkaConfig {
        brokers: bootstrap.clone(),
        topic: format!("{base}.{{model}}"),
        message_timeout_ms: 10_000,
        options: Default::default(),
        models: vec!["m1".into()],
    });
    let dir = temp_dir();
    let app = TestApp::start(config(dir.path(), publisher)).await;
    let before = kafka::topics(&bootstrap).await;
    for topic in [format!("{base}.m1"), format!("{base}.unknown")] {
        assert!(
            before.contains(&topic),
            "{topic} created at start: {before:?}"
        );
    }

    let run = unique("task");
    let chosen = format!("attacker-{run}");
    assert_eq!(
        app.callback(&callback(&format!("{run}_a"), &chosen)).await,
        StatusCode::OK
    );
    assert_eq!(
        app.callback(&callback(&format!("{run}_b"), "m1")).await,
        StatusCode::OK
    );
    app.drained(Duration::from_secs(60)).await;
    let limit = Duration::from_secs(60);
    let quiet = Duration::from_secs(1);
    let unknown = kafka::consume(&bootstrap, &format!("{base}.unknown"), 1, limit, quiet).await;
    assert_eq!(unknown[0].value["model"], chosen.as_str());
    let listed = kafka::consume(&bootstrap, &format!("{base}.m1"), 1, limit, quiet).await;
    assert_eq!(listed[0].key, format!("{run}_b"));

    let after = kafka::topics(&bootstrap).await;
    let ours: Vec<&String> = after.iter().filter(|t| t.starts_with(&base)).collect();
    assert_eq!(ours.len(), 2, "no topic but the allowlist's: {ours:?}");
    assert_eq!(app.outbox.status().unwrap().dead_letters, 0);
    app.stop().await;
}

/// A body limit above what the broker takes is refused at start, naming the
/// key: such events could only be accepted and never published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_limit_above_the_brokers_message_limit_is_refused_at_start() {
    let bootstrap = brokers::kafka().await;
    let topic = unique("small");
    kafka::create_topic(&bootstrap, &topic, 1, &[("max.message.bytes", "100000")]).await;
    let kafka = PublisherConfig::Kafka(KafkaConfig {
        brokers: bootstrap.clone(),
        topic: topic.clone(),
        message_timeout_ms: 10_000,
        options: Default::default(),
        models: Vec::new(),
    });
    let dir = temp_dir();
    let err = App::build(config(dir.path(), kafka.clone()))
        .await
        .err()
        .expect("refused at start");
    let err = format!("{err:#}");
    assert!(
        err.contains("server.body_limit_bytes") && err.contains("100000"),
        "{err}"
    );
    let mut fits = config(dir.path(), kafka);
    fits.server.body_limit_bytes = 100_000;
    let app = App::build(fits).await.expect("a limit the topic takes");
    drop(app);

    let url = brokers::nats().await;
    let mut nats = config(dir.path(), nats_publisher(&url, "s.{state}".into(), &[]));
    // The server's default max_payload is 1 MiB.
    nats.server.body_limit_bytes = 2 * 1024 * 1024;
    let err = App::build(nats).await.err().expect("refused at start");
    let err = format!("{err:#}");
    assert!(
        err.contains("server.body_limit_bytes") && err.contains("max_payload"),
        "{err}"
    );
}
