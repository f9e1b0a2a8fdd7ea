//! Hostile callbacks against real Kafka and JetStream: each one gets its documented answer,
//! nothing refused is stored, and a good callback sent after all of them is published.

use std::time::Duration;

use hookbridge::config::{KafkaConfig, NatsConfig, PublisherConfig};
use hyper::StatusCode;
use serde_json::{json, Value};

use crate::support::app::{config, temp_dir, TestApp};
use crate::support::{assert_valid_event, brokers, kafka, nats, secs, unique};

/// A body posted as raw bytes, and the field its 400 must name (`None`: must be accepted).
struct Case {
    what: String,
    body: Vec<u8>,
    field: Option<&'static str>,
}

fn refused(what: impl Into<String>, body: Vec<u8>, field: &'static str) -> Case {
    Case {
        what: what.into(),
        body,
        field: Some(field),
    }
}

fn callback(task_id: &str, extra: Value) -> Value {
    let mut body = json!({
        "taskId": task_id, "model": "seedance-20", "state": "success",
        "output": [{"url": "https://static.kinovi.ai/generated/v.mp4"}],
        "updateTime": 1_735_599_754_000_i64
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

fn bytes(value: &Value) -> Vec<u8> {
    serde_json::to_vec(value).unwrap()
}

/// Every hostile body of the suite; the last one (the odd model) is accepted.
fn hostile(prefix: &str) -> Vec<Case> {
    let mut cases = Vec::new();
    for field in ["createTime", "completeTime", "updateTime"] {
        for (label, time) in [
            ("year 10000", json!(253_402_300_800_000_i64)),
            ("negative", json!(-1)),
            ("i64::MAX", json!(i64::MAX)),
        ] {
            let task = format!("{prefix}_{field}_{}", time);
            cases.push(refused(
                format!("{field} {label}"),
                bytes(&callback(&task, json!({ field: time }))),
                field,
            ));
        }
    }
    // The same in an envelope: the field is named as sent.
    let envelope = json!({"code": 200, "message": "success",
        "data": callback(&format!("{prefix}_env"), json!({"updateTime": 253_402_300_800_000_i64}))});
    cases.push(refused(
        "envelope year 10000",
        bytes(&envelope),
        "data.updateTime",
    ));

    let deep = "[".repeat(199) + "{}" + &"]".repeat(199);
    let body =
        format!(r#"{{"taskId":"{prefix}_deep","state":"success","output":[{{"x":{deep}}}]}}"#);
    cases.push(refused("200-deep output", body.into_bytes(), "output[0].x"));

    let body = callback(&format!("{prefix}_\u{202e}gpj.exe"), json!({}));
    cases.push(refused("taskId with U+202E", bytes(&body), "taskId"));

    let body = format!(
        r#"{{"taskId":"{prefix}_dup","state":"fail","state":"success","model":"seedance-20"}}"#
    );
    cases.push(refused("repeated key", body.into_bytes(), "state"));

    cases.push(Case {
        what: "model a.*.>".into(),
        body: bytes(&callback(
            &format!("{prefix}_model"),
            json!({"model": "a.*.>"}),
        )),
        field: None,
    });
    cases
}

/// Posts every hostile body and checks each answer; then the good one.
async fn post_all(app: &TestApp, prefix: &str) -> Value {
    for case in hostile(prefix) {
        let (status, answer) = app
            .http
            .request("POST", "/webhooks/kinovi", case.body.clone())
            .await;
        match case.field {
            Some(field) => {
                assert_eq!(status, StatusCode::BAD_REQUEST, "{}: {answer}", case.what);
                assert_eq!(answer["error"], "invalid_payload", "{}", case.what);
                let message = answer["message"].as_str().unwrap_or_default();
                assert!(
                    message.contains(&format!("`{field}")),
                    "{}: {message} should name {field}",
                    case.what
                );
            }
            None => assert_eq!(status, StatusCode::OK, "{}: {answer}", case.what),
        }
    }
    // Only the odd model's event was stored.
    let status = app.outbox.status().unwrap();
    assert_eq!(status.tasks_tracked, 1, "{status:?}");

    let good = callback(&format!("{prefix}_good"), json!({}));
    assert_eq!(app.callback(&good).await, StatusCode::OK);
    good
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_callbacks_are_refused_and_kafka_keeps_flowing() {
    let bootstrap = brokers::kafka().await;
    let base = unique("hostile");
    // The allowlist: the odd model becomes `unknown`; hookbridge creates both topics.
    let publisher = PublisherConfig::Kafka(KafkaConfig {
        brokers: bootstrap.clone(),
        topic: format!("{base}.{{model}}"),
        message_timeout_ms: 10_000,
        options: Default::default(),
        models: vec!["seedance-20".into()],
    });
    let dir = temp_dir();
    let app = TestApp::start(config(dir.path(), publisher)).await;
    let prefix = unique("task");
    let good = post_all(&app, &prefix).await;

    let limit = Duration::from_secs(60);
    let quiet = Duration::from_secs(2);
    let arrived = kafka::consume(&bootstrap, &format!("{base}.seedance-20"), 1, limit, quiet).await;
    assert_eq!(arrived.len(), 1, "{arrived:?}");
    assert_eq!(arrived[0].key, good["taskId"].as_str().unwrap());
    assert_eq!(arrived[0].headers["ce_time"], "2024-12-30T23:02:34.000Z");
    assert_valid_event(&arrived[0].value);
    let odd = kafka::consume(&bootstrap, &format!("{base}.unknown"), 1, limit, quiet).await;
    assert_eq!(odd.len(), 1, "{odd:?}");
    assert_eq!(odd[0].value["model"], "a.*.>");

    app.drained(limit).await;
    let status = app.outbox.status().unwrap();
    assert_eq!((status.pending, status.dead_letters), (0, 0), "{status:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_callbacks_are_refused_and_jetstream_keeps_flowing() {
    let url = brokers::nats().await;
    let stream = unique("HOSTILE");
    let prefix = unique("hostile");
    nats::create_stream(&url, &stream, &prefix, Duration::from_secs(120)).await;
    // With an allowlist: the odd model becomes `unknown`.
    let publisher = PublisherConfig::Nats(NatsConfig {
        url: url.clone(),
        subject: format!("{prefix}.{{model}}.{{state}}"),
        jetstream: true,
        ack_timeout_ms: 2000,
        token: None,
        stream: None,
        models: vec!["seedance-20".into()],
    });
    let dir = temp_dir();
    let app = TestApp::start(config(dir.path(), publisher)).await;
    let good = post_all(&app, &unique("task")).await;

    let stored = nats::read_stream(&url, &stream, 2, secs(60), secs(2)).await;
    assert_eq!(stored.len(), 2, "{stored:?}");
    let odd = &stored[0];
    assert_eq!(odd.subject, format!("{prefix}.unknown.success"));
    assert_eq!(odd.value["model"], "a.*.>");
    let arrived = &stored[1];
    assert_eq!(arrived.subject, format!("{prefix}.seedance-20.success"));
    assert_eq!(arrived.value["taskId"], good["taskId"]);
    assert_eq!(arrived.headers["Nats-Msg-Id"], arrived.event_id());
    assert_valid_event(&arrived.value);

    app.drained(Duration::from_secs(60)).await;
    let status = app.outbox.status().unwrap();
    assert_eq!((status.pending, status.dead_letters), (0, 0), "{status:?}");
    app.stop().await;
}
