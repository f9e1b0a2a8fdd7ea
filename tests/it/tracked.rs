//! The dedup records at their cap (`outbox.max_tracked_tasks`): junk task
//! ids never lock out a new task. Against real storage and JetStream.

use std::time::{Duration, Instant};

use futures::StreamExt;
use hyper::StatusCode;
use serde_json::Value;

use crate::support::app::{config, temp_dir, TestApp};
use crate::support::{callbacks, nats, secs, unique};

const WAIT: Duration = Duration::from_secs(60);

/// Posts every body, 16 at a time; every answer must be 200.
async fn post_all(app: &TestApp, bodies: &[Value]) {
    let answers: Vec<StatusCode> = futures::stream::iter(bodies)
        .map(|body| app.http.callback(body))
        .buffer_unordered(16)
        .collect()
        .await;
    let refused = answers.iter().filter(|s| **s != StatusCode::OK).count();
    assert_eq!(
        refused,
        0,
        "{refused} of {} not answered 200",
        answers.len()
    );
}

/// 500 junk tasks fill `max_tracked_tasks = 500`; a new task is then
/// answered 200 and published (it was 503 before, pruner or not). The
/// records that made room are counted; while they are of finished tasks
/// `/readyz` has nothing to say, once unfinished ones go it warns (still
/// 200: every callback is still stored).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_tasks_at_the_cap_never_lock_out_a_new_task() {
    const CAP: u64 = 500;
    let url = crate::support::brokers::nats().await;
    let (stream, prefix) = (unique("TRACKED").to_uppercase(), unique("tracked"));
    let subject = nats::create_stream(&url, &stream, &prefix, Duration::from_secs(1)).await;
    let dir = temp_dir();
    let publisher = crate::nats::jetstream_publisher(&url, &subject, None);
    let mut c = config(dir.path(), publisher);
    c.outbox.max_tracked_tasks = CAP;
    let app = TestApp::start(c).await;

    let run = unique("junk");
    let junk: Vec<Value> = (0..CAP)
        .map(|i| callbacks::success(&format!("{run}_{i}")))
        .collect();
    post_all(&app, &junk).await;
    assert_eq!(app.outbox.status().unwrap().tasks_tracked, CAP);
    app.outbox.prune().await.unwrap();

    let real = unique("task_real");
    let started = Instant::now();
    let answer = app
        .http
        .try_callback(&callbacks::success(&real))
        .await
        .unwrap();
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
    let answered = started.elapsed();
    let stored = nats::read_stream(&url, &stream, CAP + 1, WAIT, secs(1)).await;
    assert_eq!(stored.len() as u64, CAP + 1);
    assert!(stored.iter().any(|m| m.value["taskId"] == real.as_str()));

    let status = app.outbox.status().unwrap();
    assert!(status.tasks_tracked <= CAP, "{}", status.tasks_tracked);
    assert!(status.counters["evictedFinished"].as_u64().unwrap() >= 1);
    assert_eq!(status.counters["evictedUnfinished"], 0);
    assert_eq!(status.counters["refusedFull"], 0);
    let (ready, body) = app.admin.get("/readyz").await;
    assert_eq!(
        (ready, body.get("warnings")),
        (StatusCode::OK, None),
        "{body}"
    );
    eprintln!("new task at the cap answered in {answered:?}");

    // Unfinished junk: once no finished record is left, unfinished ones go.
    let live: Vec<Value> = (0..CAP + 100)
        .map(|i| callbacks::progress(&format!("{run}_live_{i}"), "generating", 1))
        .collect();
    post_all(&app, &live).await;
    let another = unique("task_real");
    assert_eq!(
        app.callback(&callbacks::success(&another)).await,
        StatusCode::OK
    );
    let status = app.outbox.status().unwrap();
    assert!(status.tasks_tracked <= CAP, "{}", status.tasks_tracked);
    assert!(status.counters["evictedUnfinished"].as_u64().unwrap() >= 1);
    let (ready, body) = app.admin.get("/readyz").await;
    assert_eq!(ready, StatusCode::OK, "{body}");
    assert_eq!(
        body["warnings"][0],
        serde_json::json!({"component": "task-records", "problem": "evicting"})
    );
    let metrics = app.admin.try_request("GET", "/metrics", "").await.unwrap();
    let metrics = metrics.json.as_str().expect("a text body").to_string();
    assert!(
        metrics.contains(r#"hookbridge_task_records_evicted_total{task="unfinished"}"#),
        "{metrics}"
    );
    let stored = nats::read_stream(&url, &stream, 2 * CAP + 102, WAIT, secs(1)).await;
    assert!(stored.iter().any(|m| m.value["taskId"] == another.as_str()));
    app.stop().await;
}
