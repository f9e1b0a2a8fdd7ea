//! Cluster mode: two replicas (two data dirs) as one bridge, on the real
//! brokers. Duplicates sent to different replicas arrive once, a state
//! older than one another replica published is suppressed, and a task's
//! guard survives its partition moving to another replica.

use std::collections::BTreeMap;
use std::time::Duration;

use hookbridge::config::{ClusterConfig, Config, KafkaConfig, PublisherConfig};
use hyper::StatusCode;
use serde_json::Value;

use crate::nats::jetstream_publisher;
use crate::support::app::{config, free_port, temp_dir, TestApp};
use crate::support::kafka::{self, create_topic, Record};
use crate::support::{brokers, callbacks, eventually, nats, secs, unique};

const LIMIT: Duration = Duration::from_secs(60);

fn clustered(mut config: Config, cluster: ClusterConfig) -> Config {
    config.cluster = cluster;
    config
}

fn jetstream_cluster() -> ClusterConfig {
    ClusterConfig {
        enabled: true,
        drain_ms: 100,
        ..ClusterConfig::default()
    }
}

/// Two JetStream replicas publishing to one stream; `subject` is
/// `<prefix>.{state}`, each task gets its own token after it.
async fn jetstream_pair(url: &str, subject: &str) -> (TestApp, TestApp, [tempfile::TempDir; 2]) {
    let subject = format!("{subject}.{{task}}");
    hookbridge::telemetry::init(&Default::default());
    let dirs = [temp_dir(), temp_dir()];
    let start = |dir: &tempfile::TempDir| {
        TestApp::start(clustered(
            config(dir.path(), jetstream_publisher(url, &subject, None)),
            jetstream_cluster(),
        ))
    };
    let a = start(&dirs[0]).await;
    let b = start(&dirs[1]).await;
    (a, b, dirs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_a_duplicate_on_another_replica_is_published_once() {
    let url = brokers::nats().await;
    let (stream, prefix) = (unique("S").to_uppercase(), unique("tasks"));
    // A one-second duplicate window: past it, only the task's last message
    // on the stream can drop the copy.
    let subject = nats::create_stream(&url, &stream, &prefix, Duration::from_secs(1)).await;
    let (a, b, _dirs) = jetstream_pair(&url, &subject).await;
    let task = unique("task");

    assert_eq!(a.callback(&callbacks::success(&task)).await, StatusCode::OK);
    let first = nats::read_stream(&url, &stream, 1, LIMIT, Duration::ZERO).await;
    assert_eq!(first.len(), 1);
    // Outlive the stream's duplicate window (a precondition, not a wait for
    // an outcome).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(b.callback(&callbacks::success(&task)).await, StatusCode::OK);
    b.drained(LIMIT).await;

    let stored = nats::read_stream(&url, &stream, 1, LIMIT, secs(1)).await;
    assert_eq!(
        stored.len(),
        1,
        "the duplicate on replica B is dropped: {stored:?}"
    );
    assert_eq!(stored[0].value["taskId"], task.as_str());
    assert_eq!(
        stored[0].subject,
        format!(
            "{prefix}.success.{}",
            hookbridge::publish::task_token(&task)
        ),
        "each task has its own subject token"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_replicas_racing_the_states_of_the_same_tasks_publish_each_in_order() {
    let url = brokers::nats().await;
    let (stream, prefix) = (unique("S").to_uppercase(), unique("tasks"));
    let subject = nats::create_stream(&url, &stream, &prefix, Duration::from_secs(120)).await;
    let (a, b, _dirs) = jetstream_pair(&url, &subject).await;
    let tasks: Vec<String> = (0..40).map(|t| format!("{}-{t}", unique("race"))).collect();
    // Every state of every task to both replicas at once, in both orders:
    // the replicas' relays race each other on every write.
    let mut sends = Vec::new();
    for (n, state) in ["waiting", "generating", "success"].into_iter().enumerate() {
        for (t, task) in tasks.iter().enumerate() {
            let body = callbacks::progress(task, state, 1_735_599_000_000 + n as i64 * 1000);
            let (first, second) = if t % 2 == 0 { (&a, &b) } else { (&b, &a) };
            for app in [first, second] {
                let (http, body) = (app.http.clone(), body.clone());
                sends.push(tokio::spawn(async move { http.callback(&body).await }));
            }
        }
    }
    for send in sends {
        assert_eq!(send.await.unwrap(), StatusCode::OK);
    }
    a.drained(LIMIT).await;
    b.drained(LIMIT).await;
    let stored = nats::read_stream(&url, &stream, 1, LIMIT, secs(1)).await;
    let mut by_task: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for m in &stored {
        by_task
            .entry(m.value["taskId"].as_str().unwrap().to_string())
            .or_default()
            .push(m.value["state"].as_str().unwrap().to_string());
    }
    let rank = |s: &str| {
        ["waiting", "generating", "success"]
            .iter()
            .position(|x| *x == s)
    };
    for task in &tasks {
        let states = by_task.get(task).cloned().unwrap_or_default();
        assert!(
            states.windows(2).all(|w| rank(&w[0]) < rank(&w[1])),
            "{task}: each state once and in order: {states:?}"
        );
        assert_eq!(
            states.last().map(String::as_str),
            Some("success"),
            "{task}: {states:?}"
        );
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_a_stale_state_on_another_replica_is_suppressed() {
    let url = brokers::nats().await;
    let (stream, prefix) = (unique("S").to_uppercase(), unique("tasks"));
    let subject = nats::create_stream(&url, &stream, &prefix, Duration::from_secs(120)).await;
    let (a, b, _dirs) = jetstream_pair(&url, &subject).await;
    let task = unique("task");

    let success = callbacks::progress(&task, "success", 1_735_599_754_000);
    assert_eq!(b.callback(&success).await, StatusCode::OK);
    nats::read_stream(&url, &stream, 1, LIMIT, Duration::ZERO).await;
    let generating = callbacks::progress(&task, "generating", 1_735_599_700_000);
    assert_eq!(a.callback(&generating).await, StatusCode::OK);
    // Suppressed means done: it leaves A's outbox without a publish.
    a.drained(LIMIT).await;

    let stored = nats::read_stream(&url, &stream, 1, LIMIT, secs(1)).await;
    let states: Vec<&Value> = stored.iter().map(|m| &m.value["state"]).collect();
    assert_eq!(states, ["success"], "generating after success is stale");
    a.stop().await;
    b.stop().await;
}

/// Cluster settings for one Kafka replica of a test's group.
fn kafka_cluster(prefix: &str, replica: &str) -> ClusterConfig {
    ClusterConfig {
        enabled: true,
        internal_topic: format!("{prefix}.internal"),
        changelog_topic: format!("{prefix}.changelog"),
        group_id: format!("{prefix}.owners"),
        transactional_id: format!("{prefix}.{replica}"),
        partitions: 4,
        replication_factor: 1,
        drain_ms: 100,
    }
}

fn kafka_publisher(bootstrap: &str, topic: &str) -> PublisherConfig {
    PublisherConfig::Kafka(KafkaConfig {
        brokers: bootstrap.to_string(),
        topic: topic.to_string(),
        models: Vec::new(),
        message_timeout_ms: 10_000,
        options: Default::default(),
    })
}

async fn kafka_replica(
    bootstrap: &str,
    topic: &str,
    prefix: &str,
    replica: &str,
    dir: &tempfile::TempDir,
) -> TestApp {
    TestApp::start(clustered(
        config(dir.path(), kafka_publisher(bootstrap, topic)),
        kafka_cluster(prefix, replica),
    ))
    .await
}

/// Reads `topic` with `isolation.level=read_committed` until `expected`
/// records arrived, then `quiet` longer so that extra copies would show.
pub async fn consume_committed(
    bootstrap: &str,
    topic: &str,
    expected: usize,
    quiet: Duration,
) -> Vec<Record> {
    let committed = [("isolation.level", "read_committed")];
    kafka::consume_with(bootstrap, topic, expected, LIMIT, quiet, &committed).await
}

/// The states each task's records carry, in partition order.
fn states_by_task(records: &[Record]) -> BTreeMap<String, Vec<String>> {
    let mut by_task: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut sorted: Vec<&Record> = records.iter().collect();
    sorted.sort_by_key(|r| (r.partition, r.offset));
    for r in sorted {
        by_task
            .entry(r.key.clone())
            .or_default()
            .push(r.state().to_string());
    }
    by_task
}

fn rank(state: &str) -> u8 {
    match state {
        "pending" => 0,
        "waiting" => 1,
        "generating" => 2,
        _ => 3,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_duplicates_across_replicas_commit_once_in_state_order() {
    let bootstrap = brokers::kafka().await;
    let (prefix, topic) = (unique("cl"), unique("events"));
    create_topic(&bootstrap, &topic, 3, &[]).await;
    let dirs = [temp_dir(), temp_dir()];
    let a = kafka_replica(&bootstrap, &topic, &prefix, "a", &dirs[0]).await;
    let b = kafka_replica(&bootstrap, &topic, &prefix, "b", &dirs[1]).await;

    // Each state of each task to both replicas, the replicas alternating
    // which one sees it first.
    let tasks: Vec<String> = (0..20).map(|i| format!("{prefix}-t{i}")).collect();
    for (n, state) in ["waiting", "generating", "success"].into_iter().enumerate() {
        for (i, task) in tasks.iter().enumerate() {
            let body = callbacks::progress(task, state, 1_735_599_000_000 + n as i64);
            let (first, second) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
            assert_eq!(first.callback(&body).await, StatusCode::OK);
            assert_eq!(second.callback(&body).await, StatusCode::OK);
        }
    }
    a.drained(LIMIT).await;
    b.drained(LIMIT).await;

    // Every success at least; earlier states may be stale by the time the
    // slower replica relays them.
    let records = consume_committed(&bootstrap, &topic, tasks.len(), Duration::from_secs(5)).await;
    let by_task = states_by_task(&records);
    for task in &tasks {
        let states = by_task
            .get(task)
            .unwrap_or_else(|| panic!("no events for {task}"));
        assert_eq!(
            states.last().map(String::as_str),
            Some("success"),
            "{task}: {states:?}"
        );
        assert!(
            states.windows(2).all(|w| rank(&w[0]) < rank(&w[1])),
            "{task}: each state once, in order: {states:?}"
        );
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_a_moved_partition_keeps_its_guard() {
    let bootstrap = brokers::kafka().await;
    let (prefix, topic) = (unique("cl"), unique("events"));
    create_topic(&bootstrap, &topic, 3, &[]).await;
    let dirs = [temp_dir(), temp_dir()];
    let a = kafka_replica(&bootstrap, &topic, &prefix, "a", &dirs[0]).await;
    let b = kafka_replica(&bootstrap, &topic, &prefix, "b", &dirs[1]).await;

    let tasks: Vec<String> = (0..20).map(|i| format!("{prefix}-t{i}")).collect();
    for task in &tasks {
        let body = callbacks::progress(task, "success", 1_735_599_754_000);
        assert_eq!(b.callback(&body).await, StatusCode::OK);
    }
    consume_committed(&bootstrap, &topic, tasks.len(), Duration::ZERO).await;
    // B leaves: its partitions move to A, which must read their guards
    // from the changelog.
    b.stop().await;
    for task in &tasks {
        let stale = callbacks::progress(task, "generating", 1_735_599_700_000);
        assert_eq!(a.callback(&stale).await, StatusCode::OK);
        let again = callbacks::progress(task, "success", 1_735_599_754_000);
        assert_eq!(a.callback(&again).await, StatusCode::OK);
    }
    // A fresh task proves A owns partitions and processes again.
    let fresh = format!("{prefix}-fresh");
    let body = callbacks::progress(&fresh, "success", 1_735_599_754_000);
    assert_eq!(a.callback(&body).await, StatusCode::OK);
    a.drained(LIMIT).await;

    let records =
        consume_committed(&bootstrap, &topic, tasks.len() + 1, Duration::from_secs(5)).await;
    let by_task = states_by_task(&records);
    assert_eq!(by_task.get(&fresh).map(Vec::len), Some(1));
    for task in &tasks {
        assert_eq!(by_task[task], ["success"], "{task}: nothing after success");
    }
    assert_eq!(records.len(), tasks.len() + 1);
    a.stop().await;
}

/// The problems `/readyz` lists, or `None` when it answers 200.
async fn readiness(app: &TestApp) -> Option<Value> {
    let (status, body) = app.admin.get("/readyz").await;
    (status != StatusCode::OK).then(|| body["problems"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_cannot_reach_the_stream_is_not_ready_but_keeps_accepting() {
    let url = format!("nats://127.0.0.1:{}", free_port());
    let dir = temp_dir();
    let app = TestApp::start(clustered(
        config(
            dir.path(),
            jetstream_publisher(&url, "kinovi.{state}.{task}", None),
        ),
        jetstream_cluster(),
    ))
    .await;
    let problems = eventually(LIMIT, "readiness to name the cluster", || async {
        readiness(&app).await
    })
    .await;
    assert!(
        problems
            .as_array()
            .unwrap()
            .contains(&serde_json::json!({"component": "cluster", "problem": "unreachable"})),
        "{problems}"
    );
    // The outbox still takes what comes: a callback is never lost to it.
    let task = unique("task");
    assert_eq!(
        app.callback(&callbacks::success(&task)).await,
        StatusCode::OK
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_shutdown_readiness_fails_while_callbacks_are_still_taken() {
    let url = brokers::nats().await;
    let dir = temp_dir();
    let mut cluster = jetstream_cluster();
    // The window in which the test must see "draining" and then have a
    // callback taken: wide enough for a loaded machine (the stop waits it out).
    cluster.drain_ms = 10_000;
    let subject = format!("{}.{{state}}.{{task}}", unique("tasks"));
    let app = TestApp::start(clustered(
        config(dir.path(), jetstream_publisher(&url, &subject, None)),
        cluster,
    ))
    .await;
    eventually(LIMIT, "the replica to be ready", || async {
        readiness(&app).await.is_none().then_some(())
    })
    .await;
    let (public, admin) = (app.http.clone(), app.admin.clone());
    let stopping = tokio::spawn(app.stop());
    eventually(LIMIT, "readiness to say draining", || async {
        let (status, body) = admin.get("/readyz").await;
        (status == StatusCode::SERVICE_UNAVAILABLE
            && body["problems"].as_array().is_some_and(|p| {
                p.contains(&serde_json::json!({"component": "server", "problem": "draining"}))
            }))
        .then_some(())
    })
    .await;
    // Draining: not ready, still serving.
    assert_eq!(
        public.callback(&callbacks::success(&unique("task"))).await,
        StatusCode::OK
    );
    stopping.await.unwrap();
}
