//! Deduplication and the per-task state guard, end to end: what a storm of
//! repeated, late and contradicting callbacks leaves on the brokers.
//!
//! The guard's precedence (`TaskRecord::decide`) matters for the counters: a
//! state already accepted within the window is a *duplicate* even when it is
//! also behind the task's furthest state; only a state never accepted and
//! behind the furthest one counts as *stale*.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use futures::StreamExt;
use hookbridge::config::{FileConfig, PublisherConfig};
use hookbridge::event::{event_id, State};
use hyper::StatusCode;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::Value;

use crate::kafka::kafka_publisher;
use crate::nats::jetstream_publisher;
use crate::support::app::{config, free_port, temp_dir, Http, TestApp};
use crate::support::kafka::Record;
use crate::support::{assert_valid_event, brokers, callbacks, kafka, nats, unique};

const CONSUME_LIMIT: Duration = Duration::from_secs(90);
/// Long enough after the expected count for a stray extra copy to show.
const QUIET: Duration = Duration::from_secs(3);

fn counter(app: &TestApp, name: &str) -> u64 {
    let status = app.outbox.status().unwrap();
    status.counters[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name} in {}", status.counters))
}

/// Posts every body with up to `concurrency` requests in flight, in the
/// order given; every answer must be 200.
async fn post_concurrently(http: &Http, bodies: &[&Value], concurrency: usize) {
    let answers: Vec<StatusCode> = futures::stream::iter(bodies)
        .map(|body| http.callback(body))
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let failed = answers.iter().filter(|s| **s != StatusCode::OK).count();
    assert_eq!(failed, 0, "{failed} of {} callbacks not 200", answers.len());
}

/// Posts each task's callbacks in order (the next only after the previous
/// was answered), up to `concurrency` tasks at a time, so tasks interleave.
async fn post_tasks(http: &Http, tasks: &[Vec<Value>], concurrency: usize) {
    futures::stream::iter(tasks)
        .for_each_concurrent(concurrency, |steps| async move {
            for body in steps {
                let status = http.callback(body).await;
                assert_eq!(status, StatusCode::OK, "callback {body}");
            }
        })
        .await;
}

fn task_of(body: &Value) -> &str {
    body["data"]["taskId"].as_str().unwrap()
}

fn state_of(body: &Value) -> State {
    State::normalize(body["data"]["state"].as_str().unwrap())
}

fn expected_id(body: &Value) -> String {
    event_id(task_of(body), state_of(body))
}

/// Records grouped by key, each group in partition-offset order; also checks
/// that a key never spans two partitions.
fn by_key(records: &[Record]) -> BTreeMap<String, Vec<&Record>> {
    let mut sorted: Vec<&Record> = records.iter().collect();
    sorted.sort_by_key(|r| (r.partition, r.offset));
    let mut out: BTreeMap<String, Vec<&Record>> = BTreeMap::new();
    for r in sorted {
        assert_eq!(r.value["taskId"], r.key.as_str(), "key is the taskId");
        out.entry(r.key.clone()).or_default().push(r);
    }
    for (key, group) in &out {
        let partitions: HashSet<i32> = group.iter().map(|r| r.partition).collect();
        assert_eq!(partitions.len(), 1, "{key} spans partitions {partitions:?}");
    }
    out
}

/// 500 distinct callbacks, each posted 3 times in a shuffled storm, to a
/// Kafka app and a JetStream app at once: each lands exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_storm_publishes_each_state_once() {
    let (bootstrap, url) = (brokers::kafka().await, brokers::nats().await);
    let topic = unique("storm");
    kafka::create_topic(&bootstrap, &topic, 3, &[]).await;
    // JetStream's shortest window (100 ms): the stream must not hide repeats
    // hookbridge would have sent, so the count below is hookbridge's own dedup.
    let (stream, prefix) = (unique("STORM").to_uppercase(), unique("storm"));
    let subject = nats::create_stream(&url, &stream, &prefix, Duration::from_millis(100)).await;
    let (kdir, ndir) = (temp_dir(), temp_dir());
    let to_kafka = TestApp::start(config(kdir.path(), kafka_publisher(&bootstrap, &topic))).await;
    let to_nats = TestApp::start(config(
        ndir.path(),
        jetstream_publisher(&url, &subject, None),
    ))
    .await;

    // One callback per task, in every state, so nothing is stale.
    let run = unique("t");
    let bodies: Vec<Value> = (0..500)
        .map(|i| {
            let task = format!("{run}_{i}");
            match i % 4 {
                0 => callbacks::progress(&task, "waiting", 1_735_599_700_000),
                1 => callbacks::progress(&task, "generating", 1_735_599_700_000),
                2 => callbacks::success(&task),
                _ => callbacks::failure(&task),
            }
        })
        .collect();
    let mut storm: Vec<&Value> = bodies.iter().chain(&bodies).chain(&bodies).collect();
    storm.shuffle(&mut StdRng::seed_from_u64(0x5eed));
    // Copies closer than the in-flight bound race each other, often inside
    // one group commit.
    tokio::join!(
        post_concurrently(&to_kafka.http, &storm, 96),
        post_concurrently(&to_nats.http, &storm, 96),
    );
    for app in [&to_kafka, &to_nats] {
        assert_eq!(counter(app, "accepted"), 500);
        assert_eq!(counter(app, "duplicates"), 1000);
        assert_eq!(counter(app, "stale"), 0);
    }

    let expected: HashSet<String> = bodies.iter().map(expected_id).collect();
    let (records, stored) = tokio::join!(
        kafka::consume(&bootstrap, &topic, 500, CONSUME_LIMIT, QUIET),
        nats::read_stream(&url, &stream, 500, CONSUME_LIMIT, QUIET),
    );
    assert_eq!(records.len(), 500, "each state once on Kafka");
    let kafka_ids: HashSet<String> = records.iter().map(|r| r.event_id().to_string()).collect();
    assert_eq!(kafka_ids, expected, "every eventId once on Kafka");
    for r in &records {
        assert_eq!(r.value["taskId"], r.key.as_str());
    }
    assert_eq!(stored.len(), 500, "each state once in the stream");
    let nats_ids: HashSet<String> = stored.iter().map(|m| m.event_id().to_string()).collect();
    assert_eq!(nats_ids, expected, "every eventId once in the stream");
    for m in &stored {
        assert_eq!(m.headers["Nats-Msg-Id"], m.event_id());
    }
    for app in [&to_kafka, &to_nats] {
        app.drained(Duration::from_secs(30)).await;
        assert_eq!(counter(app, "published"), 500);
    }
    to_kafka.stop().await;
    to_nats.stop().await;
}

/// The dedup records are on disk: a restarted instance still knows every
/// (taskId, state) it accepted before and publishes none of them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_inside_the_window_publishes_nothing_new() {
    let (bootstrap, topic) = kafka::new_topic("restart", 1).await;
    let dir = temp_dir();
    let cfg = config(dir.path(), kafka_publisher(&bootstrap, &topic));
    let run = unique("t");
    // 50 tasks x (generating, success) = 100 callbacks.
    let tasks: Vec<Vec<Value>> = (0..50)
        .map(|i| {
            let task = format!("{run}_{i}");
            vec![
                callbacks::progress(&task, "generating", 1_735_599_700_000),
                callbacks::success(&task),
            ]
        })
        .collect();

    let first = TestApp::start(cfg.clone()).await;
    post_tasks(&first.http, &tasks, 16).await;
    assert_eq!(counter(&first, "accepted"), 100);
    first.drained(Duration::from_secs(30)).await;
    first.stop().await;

    let second = TestApp::start(cfg).await;
    assert_eq!(second.outbox.status().unwrap().tasks_tracked, 50);
    post_tasks(&second.http, &tasks, 16).await;
    assert_eq!(counter(&second, "duplicates"), 100);
    assert_eq!(counter(&second, "accepted"), 0, "nothing stored again");
    assert_eq!(second.outbox.status().unwrap().pending, 0);

    let records = kafka::consume(&bootstrap, &topic, 100, CONSUME_LIMIT, QUIET).await;
    assert_eq!(records.len(), 100, "no record from the second instance");
    let ids: HashSet<&str> = records.iter().map(|r| r.event_id()).collect();
    assert_eq!(ids.len(), 100, "each eventId once");
    let expected: HashSet<String> = tasks.iter().flatten().map(expected_id).collect();
    assert_eq!(ids, expected.iter().map(String::as_str).collect());
    second.stop().await;
}

/// 200 tasks interleaved on a 3-partition topic, each followed by late
/// repeats of earlier states, a late `pending` and (20 tasks) a contradicting
/// `fail` after `success`: per key, exactly the forward states in order,
/// then the conflict, all on one partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_task_order_with_stale_and_conflicting_callbacks() {
    let (bootstrap, topic) = kafka::new_topic("order", 3).await;
    let dir = temp_dir();
    let app = TestApp::start(config(dir.path(), kafka_publisher(&bootstrap, &topic))).await;

    let run = unique("t");
    let conflicting = |i: usize| i < 40 && i.is_multiple_of(2);
    let mut expected: HashMap<String, Vec<(&str, Option<&str>)>> = HashMap::new();
    let tasks: Vec<Vec<Value>> = (0..200usize)
        .map(|i| {
            let task = format!("{run}_{i}");
            let t0 = 1_735_599_700_000 + i as i64;
            let succeeds = i.is_multiple_of(2);
            let terminal = if succeeds { "success" } else { "fail" };
            let mut steps = vec![
                callbacks::progress(&task, "waiting", t0),
                callbacks::progress(&task, "generating", t0 + 1000),
                if succeeds {
                    callbacks::success(&task)
                } else {
                    callbacks::failure(&task)
                },
                // Late repeats of accepted states: duplicates (dedup first).
                callbacks::progress(&task, "generating", t0 + 1000),
                callbacks::progress(&task, "waiting", t0),
                // Behind the furthest state and never accepted: stale.
                callbacks::progress(&task, "pending", t0 - 1000),
            ];
            let mut states = vec![("waiting", None), ("generating", None), (terminal, None)];
            if conflicting(i) {
                // Published once with the earlier verdict; its repeat is a duplicate.
                steps.push(callbacks::failure(&task));
                steps.push(callbacks::failure(&task));
                states.push(("fail", Some("success")));
            }
            expected.insert(task, states);
            steps
        })
        .collect();
    post_tasks(&app.http, &tasks, 50).await;

    assert_eq!(counter(&app, "accepted"), 620);
    assert_eq!(counter(&app, "stale"), 200, "the late pending of each task");
    assert_eq!(
        counter(&app, "duplicates"),
        420,
        "late generating + waiting of each task, and each repeated conflict"
    );
    assert_eq!(counter(&app, "conflicts"), 20);

    let records = kafka::consume(&bootstrap, &topic, 620, CONSUME_LIMIT, QUIET).await;
    assert_eq!(records.len(), 620);
    let grouped = by_key(&records);
    assert_eq!(grouped.len(), 200);
    let partitions: HashSet<i32> = records.iter().map(|r| r.partition).collect();
    assert!(partitions.len() > 1, "200 keys use more than one partition");
    for (task, want) in &expected {
        let got: Vec<(&str, Option<&str>)> = grouped[task]
            .iter()
            .map(|r| {
                (
                    r.state(),
                    r.value.get("conflictsWith").and_then(Value::as_str),
                )
            })
            .collect();
        assert_eq!(&got, want, "records of {task} in partition order");
        for r in &grouped[task] {
            assert_valid_event(&r.value);
            assert_eq!(
                r.event_id(),
                event_id(task, State::normalize(r.state())),
                "eventId of {task} {}",
                r.state()
            );
        }
    }
    // The first terminal state stays the task's verdict after a conflict.
    let record = app.outbox.task(&format!("{run}_0")).unwrap().unwrap();
    assert_eq!(record.furthest, Some(State::Success));
    app.stop().await;
}

/// Two instances with their own outboxes (no shared dedup state) publish the
/// same callbacks; JetStream's `Nats-Msg-Id` window keeps one copy of each,
/// and each task's states stay in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_jetstream_dedup() {
    let url = brokers::nats().await;
    let (stream, prefix) = (unique("TWO").to_uppercase(), unique("two"));
    let subject = nats::create_stream(&url, &stream, &prefix, Duration::from_secs(120)).await;
    let (adir, bdir) = (temp_dir(), temp_dir());
    let a = TestApp::start(config(
        adir.path(),
        jetstream_publisher(&url, &subject, None),
    ))
    .await;
    let b = TestApp::start(config(
        bdir.path(),
        jetstream_publisher(&url, &subject, None),
    ))
    .await;

    let run = unique("t");
    // 50 tasks x (generating, success) = 100 callbacks.
    let tasks: Vec<Vec<Value>> = (0..50)
        .map(|i| {
            let task = format!("{run}_{i}");
            vec![
                callbacks::progress(&task, "generating", 1_735_599_700_000),
                callbacks::success(&task),
            ]
        })
        .collect();
    tokio::join!(
        post_tasks(&a.http, &tasks, 16),
        post_tasks(&b.http, &tasks, 16)
    );
    for app in [&a, &b] {
        assert_eq!(counter(app, "accepted"), 100, "each instance stores all");
    }

    let stored = nats::read_stream(&url, &stream, 100, CONSUME_LIMIT, QUIET).await;
    assert_eq!(stored.len(), 100, "one copy of each event in the stream");
    let ids: Vec<&str> = stored.iter().map(|m| m.event_id()).collect();
    let unique_ids: HashSet<&str> = ids.iter().copied().collect();
    assert_eq!(unique_ids.len(), 100, "each eventId once");
    let expected: HashSet<String> = tasks.iter().flatten().map(expected_id).collect();
    assert_eq!(unique_ids, expected.iter().map(String::as_str).collect());
    for m in &stored {
        assert_eq!(m.headers["Nats-Msg-Id"], m.event_id());
    }
    let mut seen: HashMap<&str, Vec<&str>> = HashMap::new();
    for m in &stored {
        seen.entry(m.value["taskId"].as_str().unwrap())
            .or_default()
            .push(m.value["state"].as_str().unwrap());
    }
    for (task, states) in &seen {
        assert_eq!(states, &["generating", "success"], "order of {task}");
    }
    // Both really published everything: the stream, not a lost publish,
    // removed the second copies.
    for app in [&a, &b] {
        app.drained(Duration::from_secs(30)).await;
        assert_eq!(counter(app, "published"), 100);
    }
    a.stop().await;
    b.stop().await;
}

/// With a 1 s window, the records expire: pruning removes them all, and the
/// same callbacks are then new events, published a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeat_after_the_window_is_published_again_and_pruning_keeps_the_store_small() {
    let (bootstrap, topic) = kafka::new_topic("window", 1).await;
    let dir = temp_dir();
    let mut cfg = config(dir.path(), kafka_publisher(&bootstrap, &topic));
    cfg.outbox.dedup_window_secs = 1;
    let app = TestApp::start(cfg).await;

    let run = unique("t");
    let bodies: Vec<Value> = (0..50)
        .map(|i| callbacks::success(&format!("{run}_{i}")))
        .collect();
    let refs: Vec<&Value> = bodies.iter().collect();
    post_concurrently(&app.http, &refs, 16).await;
    app.drained(Duration::from_secs(30)).await;
    assert_eq!(app.outbox.status().unwrap().tasks_tracked, 50);

    // The window itself has to pass; nothing to wait on instead.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(app.outbox.prune().await.unwrap(), 50);
    assert_eq!(app.outbox.status().unwrap().tasks_tracked, 0);

    post_concurrently(&app.http, &refs, 16).await;
    assert_eq!(counter(&app, "accepted"), 100);
    assert_eq!(counter(&app, "duplicates"), 0);

    let records = kafka::consume(&bootstrap, &topic, 100, CONSUME_LIMIT, QUIET).await;
    assert_eq!(records.len(), 100);
    let expected: HashSet<String> = bodies.iter().map(expected_id).collect();
    let mut ordered: Vec<&Record> = records.iter().collect();
    ordered.sort_by_key(|r| r.offset);
    let (before, after) = ordered.split_at(50);
    for half in [before, after] {
        let ids: HashSet<String> = half.iter().map(|r| r.event_id().to_string()).collect();
        assert_eq!(
            ids, expected,
            "each eventId once per round, rounds in order"
        );
    }
    app.stop().await;
}

/// `outbox.dedup = false` turns off both the dedup and the guard: every
/// callback is published as it came.
#[tokio::test]
async fn without_dedup_every_repeat_is_published() {
    let dir = temp_dir();
    let out = dir.path().join("events.jsonl");
    let publisher = PublisherConfig::File(FileConfig {
        path: out.display().to_string(),
        fsync: true,
    });
    let mut cfg = config(&dir.path().join("data"), publisher);
    cfg.outbox.dedup = false;
    let app = TestApp::start(cfg).await;

    let task = unique("t");
    let bodies = [
        callbacks::success(&task),
        callbacks::success(&task),
        callbacks::success(&task),
        callbacks::progress(&task, "generating", 1_735_599_700_000),
        callbacks::failure(&task),
    ];
    for body in &bodies {
        assert_eq!(app.callback(body).await, StatusCode::OK);
    }
    app.drained(Duration::from_secs(10)).await;
    let events: Vec<Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let states: Vec<&str> = events
        .iter()
        .map(|e| e["state"].as_str().unwrap())
        .collect();
    assert_eq!(
        states,
        ["success", "success", "success", "generating", "fail"]
    );
    assert!(events.iter().all(|e| e.get("conflictsWith").is_none()));
    for name in ["duplicates", "stale", "conflicts"] {
        assert_eq!(counter(&app, name), 0, "{name}");
    }
    assert_eq!(app.outbox.status().unwrap().tasks_tracked, 0);
    app.stop().await;
}

/// A repeat or a late state stores nothing, so a full backlog is no reason
/// to refuse it: the provider sees 200 for a repeat, whatever the backlog.
/// New events are still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeats_are_answered_200_even_when_the_backlog_is_full() {
    let dir = temp_dir();
    // Nothing listens there: the one accepted event stays pending.
    let down = format!("127.0.0.1:{}", free_port());
    let mut cfg = config(dir.path(), kafka_publisher(&down, &unique("nowhere")));
    cfg.outbox.max_pending = 1;
    cfg.outbox.shutdown_grace_ms = 200;
    let app = TestApp::start(cfg).await;
    let task = unique("t");
    assert_eq!(
        app.callback(&callbacks::success(&task)).await,
        StatusCode::OK
    );
    assert!(app.outbox.is_full());

    let repeat = app.callback(&callbacks::success(&task)).await;
    let late = app
        .callback(&callbacks::progress(&task, "waiting", 1_735_599_700_000))
        .await;
    let other = app.callback(&callbacks::success(&unique("t"))).await;
    assert_eq!(
        (repeat, late, other),
        (
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::SERVICE_UNAVAILABLE
        ),
        "(repeat, late state, new task) with a full backlog"
    );
    assert_eq!(counter(&app, "duplicates"), 1);
    assert_eq!(counter(&app, "stale"), 1);
    assert_eq!(counter(&app, "refusedFull"), 1);
    app.stop().await;
}
