//! Callbacks in, task events out on a real Kafka broker.

use std::collections::{BTreeMap, HashMap};

use hookbridge::config::{KafkaConfig, PublisherConfig};
use hyper::StatusCode;

use crate::support::app::{config, temp_dir, TestApp};
use crate::support::{assert_valid_event, brokers, callbacks, kafka, secs, unique};

pub fn kafka_publisher(bootstrap: &str, topic: &str) -> PublisherConfig {
    PublisherConfig::Kafka(KafkaConfig {
        brokers: bootstrap.to_string(),
        topic: topic.to_string(),
        message_timeout_ms: 10_000,
        options: BTreeMap::new(),
        models: Vec::new(),
    })
}

/// Every documented payload shape arrives once, keyed by taskId, with the
/// CloudEvents headers, and validates against the published JSON Schema.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_payload_shape_arrives_keyed_by_task_with_cloudevents_headers() {
    let (bootstrap, topic) = kafka::new_topic("events", 3).await;
    let dir = temp_dir();
    let app = TestApp::start(config(dir.path(), kafka_publisher(&bootstrap, &topic))).await;

    let variants = callbacks::variants(&unique("task"));
    for (_, body, _) in &variants {
        assert_eq!(app.callback(body).await, StatusCode::OK);
    }
    let records = kafka::consume(&bootstrap, &topic, variants.len(), secs(60), secs(2)).await;
    assert_eq!(records.len(), variants.len(), "each callback exactly once");

    let by_key: HashMap<_, _> = records.iter().map(|r| (r.key.clone(), r)).collect();
    for (task_id, _, state) in &variants {
        let r = by_key
            .get(task_id)
            .unwrap_or_else(|| panic!("no record keyed {task_id}"));
        assert_valid_event(&r.value);
        assert_eq!(r.value["taskId"], task_id.as_str());
        assert_eq!(r.state(), *state);
        assert_eq!(
            r.event_id(),
            hookbridge::event::event_id(task_id, hookbridge::event::State::normalize(state))
        );
        let h = &r.headers;
        assert_eq!(h["content-type"], "application/json");
        assert_eq!(h["ce_specversion"], "1.0");
        assert_eq!(h["ce_id"], r.event_id());
        assert_eq!(h["event-id"], r.event_id());
        assert_eq!(h["ce_subject"], task_id.as_str());
        assert_eq!(h["ce_type"], format!("ai.kinovi.task.{state}"));
        assert_eq!(h["ce_source"], "https://kinovi.ai/api/v1/jobs");
        assert!(
            h["ce_time"].ends_with('Z'),
            "RFC 3339 UTC time: {}",
            h["ce_time"]
        );
    }
    let failure = by_key[&variants[1].0];
    assert_eq!(failure.value["error"]["code"], "2038");
    let errstr = by_key[&variants[3].0];
    assert_eq!(
        errstr.value["error"]["message"],
        "Failed to download your reference video"
    );
    assert_eq!(by_key[&variants[2].0].value["creditsUsed"], 2.17);
    assert_eq!(by_key[&variants[2].0].value["outputs"][0]["seed"], 42);
    app.stop().await;
}

/// `{state}` in the topic template routes events; the key still holds the
/// task on one partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_template_routes_by_state() {
    let bootstrap = brokers::kafka().await;
    let prefix = unique("routed");
    for state in ["success", "fail"] {
        kafka::create_topic(&bootstrap, &format!("{prefix}.{state}"), 1, &[]).await;
    }
    let dir = temp_dir();
    let app = TestApp::start(config(
        dir.path(),
        kafka_publisher(&bootstrap, &format!("{prefix}.{{state}}")),
    ))
    .await;
    let task = unique("task");
    assert_eq!(
        app.callback(&callbacks::success(&format!("{task}_a")))
            .await,
        StatusCode::OK
    );
    assert_eq!(
        app.callback(&callbacks::failure(&format!("{task}_b")))
            .await,
        StatusCode::OK
    );
    let ok = kafka::consume(
        &bootstrap,
        &format!("{prefix}.success"),
        1,
        secs(60),
        secs(1),
    )
    .await;
    let failed = kafka::consume(&bootstrap, &format!("{prefix}.fail"), 1, secs(60), secs(1)).await;
    assert_eq!((ok.len(), failed.len()), (1, 1));
    assert_eq!(ok[0].key, format!("{task}_a"));
    assert_eq!(failed[0].key, format!("{task}_b"));
    app.stop().await;
}
