//! Callbacks in, task events out on a real NATS JetStream server.

use std::time::Duration;

use hookbridge::config::{NatsConfig, PublisherConfig, StreamConfig};
use hyper::StatusCode;

use crate::support::app::{config, temp_dir, TestApp};
use crate::support::{assert_valid_event, brokers, callbacks, ms, nats, secs, unique};

pub fn jetstream_publisher(
    url: &str,
    subject: &str,
    stream: Option<StreamConfig>,
) -> PublisherConfig {
    PublisherConfig::Nats(NatsConfig {
        url: url.to_string(),
        subject: subject.to_string(),
        jetstream: true,
        ack_timeout_ms: 2000,
        token: None,
        stream,
        models: Vec::new(),
    })
}

/// Every payload shape lands in the stream once, with `Nats-Msg-Id` equal
/// to the event id and a schema-valid body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_payload_shape_lands_in_jetstream_with_msg_id() {
    let url = brokers::nats().await;
    let (stream, prefix) = (unique("S").to_uppercase(), unique("tasks"));
    let subject = nats::create_stream(&url, &stream, &prefix, Duration::from_secs(120)).await;
    let dir = temp_dir();
    let app = TestApp::start(config(
        dir.path(),
        jetstream_publisher(&url, &subject, None),
    ))
    .await;

    let variants = callbacks::variants(&unique("task"));
    for (_, body, _) in &variants {
        assert_eq!(app.callback(body).await, StatusCode::OK);
    }
    let stored = nats::read_stream(&url, &stream, variants.len() as u64, secs(30), secs(1)).await;
    assert_eq!(stored.len(), variants.len(), "each callback exactly once");
    for (task_id, _, state) in &variants {
        let m = stored
            .iter()
            .find(|m| m.value["taskId"] == task_id.as_str())
            .unwrap_or_else(|| panic!("no message for {task_id}"));
        assert_valid_event(&m.value);
        assert_eq!(m.value["state"], *state);
        assert_eq!(m.subject, format!("{prefix}.{state}"));
        assert_eq!(m.headers["Nats-Msg-Id"], m.event_id());
        assert_eq!(m.headers["ce-id"], m.event_id());
        assert_eq!(m.headers["ce-subject"], task_id.as_str());
        assert_eq!(m.headers["Content-Type"], "application/json");
    }
    app.stop().await;
}

/// With `[publisher.stream]` set, hookbridge creates the stream itself, with
/// the configured duplicate window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_the_configured_stream() {
    let url = brokers::nats().await;
    let (stream, prefix) = (unique("C").to_uppercase(), unique("created"));
    let config_stream = StreamConfig {
        name: stream.clone(),
        subjects: vec![format!("{prefix}.>")],
        duplicate_window_secs: 300,
    };
    let dir = temp_dir();
    let publisher = jetstream_publisher(&url, &format!("{prefix}.{{state}}"), Some(config_stream));
    let app = TestApp::start(config(dir.path(), publisher)).await;
    assert_eq!(
        app.callback(&callbacks::success(&unique("task"))).await,
        StatusCode::OK
    );
    let stored = nats::read_stream(&url, &stream, 1, secs(30), ms(500)).await;
    assert_eq!(stored.len(), 1);
    let client = async_nats::connect(&url).await.unwrap();
    let mut info = async_nats::jetstream::new(client)
        .get_stream(&stream)
        .await
        .unwrap();
    assert_eq!(
        info.info().await.unwrap().config.duplicate_window,
        Duration::from_secs(300)
    );
    app.stop().await;
}

/// Core NATS mode (no JetStream): a subscriber sees the event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_nats_mode_reaches_a_subscriber() {
    use futures::StreamExt;
    let url = brokers::nats().await;
    let prefix = unique("core");
    let client = async_nats::connect(&url).await.unwrap();
    let mut sub = client.subscribe(format!("{prefix}.>")).await.unwrap();
    client.flush().await.unwrap();
    let dir = temp_dir();
    let mut publisher = jetstream_publisher(&url, &format!("{prefix}.{{state}}"), None);
    if let hookbridge::config::PublisherConfig::Nats(n) = &mut publisher {
        n.jetstream = false;
    }
    let app = TestApp::start(config(dir.path(), publisher)).await;
    let task = unique("task");
    assert_eq!(
        app.callback(&callbacks::failure(&task)).await,
        StatusCode::OK
    );
    let m = tokio::time::timeout(Duration::from_secs(60), sub.next())
        .await
        .expect("message within 60 s")
        .unwrap();
    let value: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
    assert_eq!(value["taskId"], task.as_str());
    assert_eq!(m.subject.as_str(), format!("{prefix}.fail"));
    app.stop().await;
}
