//! The example consumers in `examples/`, run as the real binaries against
//! the real brokers: each (taskId, state) is processed exactly once and in
//! the task's order, though the broker holds repeats and a stale event.
//!
//! The test builds the example itself (`cargo build --example`) instead of
//! expecting it under `target/`: `cargo test --tests` does not build
//! examples, and a binary left there by an earlier build could be stale.
//! Cargo names the executable it built, so no path is guessed.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use async_nats::jetstream;
use hookbridge::event::{event_id, State};
use hyper::StatusCode;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::{json, Value};

use crate::kafka::kafka_publisher;
use crate::nats::jetstream_publisher;
use crate::support::app::{config, temp_dir, TestApp};
use crate::support::{brokers, callbacks, kafka, nats, secs, unique};

const TASKS: usize = 4;
const STATES: [&str; 3] = ["waiting", "generating", "success"];

/// Builds an example and returns the path of its executable.
async fn build_example(name: &str) -> PathBuf {
    let cargo = option_env!("CARGO").unwrap_or("cargo");
    let output = tokio::process::Command::new(cargo)
        .args([
            "build",
            "--example",
            name,
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stderr(Stdio::inherit())
        .output();
    let output = tokio::time::timeout(Duration::from_secs(900), output)
        .await
        .expect("the example builds within 15 minutes")
        .expect("cargo runs");
    assert!(
        output.status.success(),
        "cargo build --example {name} failed"
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == name)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .unwrap_or_else(|| panic!("cargo named no executable for example {name}"))
}

/// Runs the example to its end and returns its stdout lines as JSON and its
/// stderr.
async fn run_example(binary: PathBuf, args: &[String]) -> (Vec<Value>, String) {
    let child = tokio::process::Command::new(&binary)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the example starts");
    let output = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .expect("the example stops within 120 s")
        .expect("the example's output is read");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{binary:?} failed: {stderr}");
    let lines = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON object a line"))
        .collect();
    (lines, stderr)
}

/// Posts every task's progress through hookbridge and returns the task ids.
async fn post_progress(app: &TestApp) -> Vec<String> {
    let tasks: Vec<String> = (0..TASKS).map(|_| unique("task")).collect();
    for (n, state) in STATES.iter().enumerate() {
        for task in &tasks {
            let body = callbacks::progress(task, state, 1_735_599_700_000 + n as i64);
            assert_eq!(app.callback(&body).await, StatusCode::OK);
        }
    }
    app.drained(Duration::from_secs(60)).await;
    tasks
}

/// A `pending` event after the task finished: a new eventId, but stale.
fn stale_event(task_id: &str) -> Value {
    json!({"schemaVersion": 1, "eventId": event_id(task_id, State::Pending),
           "taskId": task_id, "state": "pending"})
}

/// Each (taskId, state) once, a task's states in their order, with the
/// event ids hookbridge gives them; `skipped` repeats and one stale event
/// were reported on stderr.
fn assert_once_in_order(lines: &[Value], stderr: &str, tasks: &[String], duplicates: usize) {
    let mut seen = HashSet::new();
    let mut by_task: HashMap<&str, Vec<&str>> = HashMap::new();
    for line in lines {
        let (task, state) = (
            line["taskId"].as_str().unwrap(),
            line["state"].as_str().unwrap(),
        );
        assert!(seen.insert((task, state)), "{task} {state} processed twice");
        assert_eq!(line["eventId"], event_id(task, State::normalize(state)));
        by_task.entry(task).or_default().push(state);
    }
    for task in tasks {
        assert_eq!(by_task.get(task.as_str()), Some(&STATES.to_vec()), "{task}");
    }
    assert_eq!(lines.len(), tasks.len() * STATES.len(), "{lines:?}");
    assert_eq!(
        stderr.matches("duplicate eventId").count(),
        duplicates,
        "{stderr}"
    );
    assert_eq!(stderr.matches("stale state").count(), 1, "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_consumer_processes_each_task_state_once_in_order() {
    let binary = build_example("kafka_consumer").await;
    let (bootstrap, topic) = kafka::new_topic("events", 3).await;
    let dir = temp_dir();
    let app = TestApp::start(config(dir.path(), kafka_publisher(&bootstrap, &topic))).await;
    let tasks = post_progress(&app).await;
    let published = TASKS * STATES.len();
    let records = kafka::consume(&bootstrap, &topic, published, secs(60), secs(1)).await;
    app.stop().await;

    // Redeliveries, as after a crash between ack and delete: every record
    // again, with its key, after the originals; then one stale event.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .expect("producer");
    let extra = records
        .iter()
        .map(|r| (r.key.clone(), r.value.clone()))
        .chain([(tasks[0].clone(), stale_event(&tasks[0]))]);
    for (key, value) in extra {
        let payload = serde_json::to_vec(&value).unwrap();
        producer
            .send(
                FutureRecord::to(&topic).key(&key).payload(&payload),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("republished");
    }

    let args = [
        format!("--brokers={bootstrap}"),
        format!("--topic={topic}"),
        format!("--group={}", unique("example")),
        format!("--max-messages={}", 2 * published + 1),
        "--idle-timeout-secs=60".into(),
    ];
    let (lines, stderr) = run_example(binary, &args).await;
    assert_once_in_order(&lines, &stderr, &tasks, published);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_consumer_processes_each_task_state_once_in_order() {
    let binary = build_example("jetstream_consumer").await;
    let url = brokers::nats().await;
    let (stream, prefix) = (unique("S").to_uppercase(), unique("tasks"));
    let subject = nats::create_stream(&url, &stream, &prefix, Duration::from_secs(120)).await;
    let dir = temp_dir();
    let app = TestApp::start(config(
        dir.path(),
        jetstream_publisher(&url, &subject, None),
    ))
    .await;
    let tasks = post_progress(&app).await;
    let published = TASKS * STATES.len();
    let stored = nats::read_stream(&url, &stream, published as u64, secs(30), secs(1)).await;
    app.stop().await;

    // Repeats the server cannot drop: published without `Nats-Msg-Id`, as
    // after the duplicate window; then one stale event.
    let client = async_nats::connect(&url).await.expect("connect to NATS");
    let js = jetstream::new(client);
    let extra = stored
        .iter()
        .map(|m| (m.subject.clone(), m.value.clone()))
        .chain([(format!("{prefix}.pending"), stale_event(&tasks[0]))]);
    for (subject, value) in extra {
        js.publish(subject, serde_json::to_vec(&value).unwrap().into())
            .await
            .expect("published")
            .await
            .expect("stored");
    }

    let args = [
        format!("--url={url}"),
        format!("--stream={stream}"),
        format!("--subject={prefix}.>"),
        format!("--durable={}", unique("example")),
        format!("--max-messages={}", 2 * published + 1),
        "--idle-timeout-secs=60".into(),
    ];
    let (lines, stderr) = run_example(binary, &args).await;
    assert_once_in_order(&lines, &stderr, &tasks, published);
}
