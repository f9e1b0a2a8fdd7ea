//! The per-task trace against real brokers: each callback's decision, and
//! where each event landed, as `GET /admin/tasks/{taskId}` and
//! `hookbridge trace` show them.

use std::time::Duration;

use hyper::StatusCode;
use serde_json::{json, Value};

use crate::kafka::kafka_publisher;
use crate::nats::jetstream_publisher;
use crate::support::app::{config, temp_dir, TestApp};
use crate::support::{brokers, callbacks, kafka, nats, secs, unique};

/// The callbacks of one task: `generating` accepted then repeated, `success`
/// accepted, `waiting` after it (stale), and a body with the task's id
/// but no state (rejected). Returns the decisions expected, in order.
async fn send_the_story(app: &TestApp, task: &str) -> Vec<&'static str> {
    let generating = callbacks::progress(task, "generating", 1_735_599_700_000);
    let success = callbacks::progress(task, "success", 1_735_599_800_000);
    let waiting = callbacks::progress(task, "waiting", 1_735_599_650_000);
    for body in [&generating, &generating, &success, &waiting] {
        assert_eq!(app.callback(body).await, StatusCode::OK);
    }
    let (status, _) = app
        .http
        .post_json("/webhooks/kinovi", &json!({"data": {"taskId": task}}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    vec!["accepted", "duplicate", "accepted", "stale", "rejected"]
}

/// The task's trace once both events are acknowledged.
async fn trace_of(app: &TestApp, task: &str) -> Value {
    app.drained(secs(60)).await;
    let (status, trace) = app.admin.get(&format!("/admin/tasks/{task}")).await;
    assert_eq!(status, StatusCode::OK, "{trace}");
    trace
}

fn decisions(trace: &Value) -> Vec<String> {
    trace["callbacks"]
        .as_array()
        .expect("callbacks")
        .iter()
        .map(|c| c["decision"].as_str().unwrap_or("?").to_owned())
        .collect()
}

/// The common part of a task's trace: every callback with its decision,
/// client and event id, the refused one with its reason and status.
fn assert_callbacks(trace: &Value, task: &str, expected: &[&str]) {
    assert_eq!(trace["taskId"], task);
    assert_eq!(decisions(trace), expected, "{trace:#}");
    let callbacks = trace["callbacks"].as_array().expect("callbacks");
    for c in callbacks {
        assert_eq!(c["client"], "127.0.0.1", "{c}");
        assert_eq!(c["source"], "webhook");
        assert!(
            c["receivedAt"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{c}"
        );
    }
    let generating = hookbridge::event::event_id(task, hookbridge::event::State::Generating);
    assert_eq!(callbacks[0]["eventId"], generating.as_str());
    assert_eq!(callbacks[1]["eventId"], generating.as_str());
    assert_eq!(callbacks[3]["reason"], "the task reached success");
    let rejected = &callbacks[4];
    assert_eq!(rejected["status"], 400);
    assert!(
        rejected["reason"]
            .as_str()
            .is_some_and(|r| r.contains("state")),
        "{rejected}"
    );
    assert!(rejected.get("eventId").is_none(), "{rejected}");
}

/// Runs `hookbridge ARGS` against the app's admin listener.
async fn cli(app: &TestApp, args: &[&str]) -> std::process::Output {
    let admin = format!("http://{}", app.admin_addr);
    let mut cmd = crate::support::bin::hookbridge_async(args);
    cmd.args(["--admin", &admin]);
    tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("hookbridge trace finishes within 60 s")
        .expect("hookbridge runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_task_shows_each_decision_and_the_partition_and_offset_of_each_event() {
    let (bootstrap, topic) = kafka::new_topic("traced", 3).await;
    let dir = temp_dir();
    let app = TestApp::start(config(dir.path(), kafka_publisher(&bootstrap, &topic))).await;
    let task = unique("traced");
    let expected = send_the_story(&app, &task).await;
    let records = kafka::consume(&bootstrap, &topic, 2, secs(60), secs(1)).await;
    let trace = trace_of(&app, &task).await;
    assert_callbacks(&trace, &task, &expected);

    let published = trace["published"].as_array().expect("published");
    assert_eq!(published.len(), 2, "{trace:#}");
    for (p, state) in published.iter().zip(["generating", "success"]) {
        let record = records
            .iter()
            .find(|r| r.state() == state)
            .unwrap_or_else(|| panic!("no {state} record"));
        assert_eq!(p["state"], state);
        assert_eq!(p["eventId"], record.event_id());
        assert_eq!(p["broker"], "kafka");
        assert_eq!(p["topic"], topic.as_str());
        assert_eq!(p["partition"], record.partition, "{p}");
        assert_eq!(p["offset"], record.offset, "{p}");
        assert!(
            p.get("stream").is_none() && p.get("sequence").is_none(),
            "{p}"
        );
    }

    // The CLI: a timeline with the same facts, and the same JSON.
    let out = cli(&app, &["trace", &task]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let success = records
        .iter()
        .find(|r| r.state() == "success")
        .expect("success");
    assert!(
        text.contains(&format!(
            "partition {} offset {}",
            success.partition, success.offset
        )),
        "{text}"
    );
    for decision in ["accepted", "duplicate", "stale", "rejected", "acknowledged"] {
        assert!(text.contains(decision), "{decision} missing:\n{text}");
    }
    let out = cli(&app, &["trace", &task, "--json"]).await;
    let printed: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(printed, trace);

    // An unknown task: a JSON 404, and the CLI's "not found" exit code.
    let (status, error) = app.admin.get("/admin/tasks/no-such-task").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error["error"], "not_found", "{error}");
    let out = cli(&app, &["trace", "no-such-task"]).await;
    assert_eq!(out.status.code(), Some(5));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jetstream_task_shows_each_decision_and_the_stream_sequence_of_each_event() {
    let url = brokers::nats().await;
    let (stream, prefix) = (unique("T").to_uppercase(), unique("traced"));
    let subject = nats::create_stream(&url, &stream, &prefix, Duration::from_secs(120)).await;
    let dir = temp_dir();
    let app = TestApp::start(config(
        dir.path(),
        jetstream_publisher(&url, &subject, None),
    ))
    .await;
    let task = unique("traced");
    let expected = send_the_story(&app, &task).await;
    let stored = nats::read_stream(&url, &stream, 2, secs(30), secs(1)).await;
    let trace = trace_of(&app, &task).await;
    assert_callbacks(&trace, &task, &expected);

    let published = trace["published"].as_array().expect("published");
    assert_eq!(published.len(), 2, "{trace:#}");
    for p in published {
        let m = stored
            .iter()
            .find(|m| m.event_id() == p["eventId"])
            .unwrap_or_else(|| panic!("no message for {p}"));
        assert_eq!(p["broker"], "nats");
        assert_eq!(p["subject"], m.subject.as_str());
        assert_eq!(p["stream"], stream.as_str());
        assert_eq!(p["sequence"], m.seq, "{p}");
        assert!(p.get("partition").is_none(), "{p}");
    }
    app.stop().await;
}
