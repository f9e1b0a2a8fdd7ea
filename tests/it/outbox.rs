//! The outbox's promises, checked on real brokers: a 200 means the event
//! reaches the broker even if the broker is down for a while, the process is
//! SIGKILLed or stopped; per-task order survives; a refused event becomes a
//! dead letter without blocking the rest; a full backlog answers 503.
//!
//! Each test owns its topic or stream, its data dir and, where it stops the
//! broker, a private broker. Every wait is bounded; timings are printed, not
//! asserted (the machine is shared).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::join_all;
use hyper::StatusCode;
use serde_json::{json, Value};

use crate::kafka::kafka_publisher;
use crate::nats::jetstream_publisher;
use crate::support::app::{config, free_port, temp_dir, ChildApp, Http, TestApp};
use crate::support::brokers::{self, PrivateBroker};
use crate::support::{callbacks, eventually, kafka, nats, secs, unique};

/// `updateTime` of a task's first callback; later ones count up from here,
/// so the update time doubles as the task's sequence number.
const BASE_TIME: i64 = 1_735_599_634_000;

/// Posts every task's callbacks in order, all tasks at once (as the provider
/// would), asserts each answer is 200 and returns the answer latencies.
async fn post_in_task_order(http: &Http, tasks: Vec<Vec<Value>>) -> Vec<Duration> {
    let per_task = join_all(tasks.into_iter().map(|bodies| {
        let http = http.clone();
        async move {
            let mut latencies = Vec::with_capacity(bodies.len());
            for body in bodies {
                let started = Instant::now();
                let status = http.callback(&body).await;
                latencies.push(started.elapsed());
                assert_eq!(status, StatusCode::OK, "callback refused: {body}");
            }
            latencies
        }
    }))
    .await;
    per_task.into_iter().flatten().collect()
}

fn report_latencies(what: &str, latencies: &[Duration]) {
    let mut sorted = latencies.to_vec();
    sorted.sort();
    let avg = sorted.iter().sum::<Duration>() / sorted.len().max(1) as u32;
    let p99 = sorted[(sorted.len() * 99 / 100).min(sorted.len() - 1)];
    eprintln!(
        "{what}: {} answers, max {:?}, avg {avg:?}, p99 {p99:?}",
        sorted.len(),
        sorted.last().unwrap()
    );
}

/// Pending entries of an in-process app.
fn pending(app: &TestApp) -> u64 {
    app.outbox.status().unwrap().pending
}

/// Waits until the relay has failed at least `n` publishes, so the outage
/// covers retries and not only the first attempt.
async fn retried(app: &TestApp, n: u64, limit: Duration) {
    let stats = app.outbox.stats().clone();
    eventually(limit, "the relay to retry during the outage", || {
        let retries = stats.publish_retries.load(Ordering::Relaxed);
        async move { (retries >= n).then_some(()) }
    })
    .await;
}

/// Dedup is off here on purpose: Kafka keeps repeated event ids, so each task
/// can carry ten events (states alternating, `updateTime` counting up), a
/// longer per-key sequence to keep in order than the four distinct states a
/// deduplicating bridge would let through. (JetStream drops repeated
/// `Nats-Msg-Id`s, so the NATS twin keeps dedup on instead.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_outage_loses_nothing_and_keeps_task_order() {
    const TASKS: usize = 100;
    const PER_TASK: i64 = 10;
    let mut broker = PrivateBroker::kafka();
    broker.start().await;
    let bootstrap = broker.kafka_bootstrap();
    let topic = unique("outage");
    kafka::create_topic(&bootstrap, &topic, 3, &[]).await;
    broker.kill().await;

    let dir = temp_dir();
    let mut config = config(dir.path(), kafka_publisher(&bootstrap, &topic));
    config.outbox.dedup = false;
    let app = TestApp::start(config).await;

    let run = unique("task");
    let tasks: Vec<Vec<Value>> = (0..TASKS)
        .map(|t| {
            let id = format!("{run}_{t:03}");
            (1..=PER_TASK)
                .map(|n| {
                    let state = if n % 2 == 1 { "waiting" } else { "generating" };
                    callbacks::progress(&id, state, BASE_TIME + n)
                })
                .collect()
        })
        .collect();
    let latencies = post_in_task_order(&app.http, tasks).await;
    report_latencies("kafka outage", &latencies);
    let total = TASKS * PER_TASK as usize;
    assert_eq!(pending(&app), total as u64, "nothing can be published yet");
    // One failed attempt takes `message_timeout_ms` (10 s).
    retried(&app, TASKS as u64, Duration::from_secs(60)).await;

    let restarted = Instant::now();
    broker.start().await;
    let ready = restarted.elapsed();
    app.drained(Duration::from_secs(180)).await;
    eprintln!(
        "kafka outage: broker ready after {ready:?}, outbox drained {:?} after the restart began",
        restarted.elapsed()
    );

    let records = kafka::consume(&bootstrap, &topic, total, secs(120), secs(3)).await;
    assert_eq!(records.len(), total, "every accepted callback exactly once");
    let mut by_key: BTreeMap<&str, Vec<&kafka::Record>> = BTreeMap::new();
    for r in &records {
        assert_eq!(r.value["taskId"], r.key.as_str(), "keyed by taskId");
        by_key.entry(r.key.as_str()).or_default().push(r);
    }
    assert_eq!(by_key.len(), TASKS);
    for (key, mut list) in by_key {
        let partitions: HashSet<i32> = list.iter().map(|r| r.partition).collect();
        assert_eq!(partitions.len(), 1, "task {key} spread over {partitions:?}");
        list.sort_by_key(|r| r.offset);
        let times: Vec<i64> = list
            .iter()
            .map(|r| r.value["updateTime"].as_i64().unwrap())
            .collect();
        let expected: Vec<i64> = (1..=PER_TASK).map(|n| BASE_TIME + n).collect();
        assert_eq!(
            times, expected,
            "task {key}: each update once, in the order posted"
        );
    }
    app.stop().await;
    broker.kill().await;
}

/// With dedup on, each task walks pending -> waiting -> generating -> success:
/// four distinct event ids, so JetStream's `Nats-Msg-Id` window keeps all four
/// while still absorbing the relay's retries of one event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_outage_loses_nothing_and_keeps_task_order() {
    const TASKS: usize = 250;
    const STATES: [&str; 4] = ["pending", "waiting", "generating", "success"];
    let mut broker = PrivateBroker::nats();
    broker.start().await;
    let url = broker.nats_url();
    let (stream, prefix) = (unique("OUTAGE").to_uppercase(), unique("outage"));
    let subject = nats::create_stream(&url, &stream, &prefix, Duration::from_secs(120)).await;
    broker.kill().await;

    let dir = temp_dir();
    let app = TestApp::start(config(
        dir.path(),
        jetstream_publisher(&url, &subject, None),
    ))
    .await;

    let run = unique("task");
    let tasks: Vec<Vec<Value>> = (0..TASKS)
        .map(|t| {
            let id = format!("{run}_{t:03}");
            STATES
                .iter()
                .zip(1..)
                .map(|(state, n)| callbacks::progress(&id, state, BASE_TIME + n))
                .collect()
        })
        .collect();
    let latencies = post_in_task_order(&app.http, tasks).await;
    report_latencies("nats outage", &latencies);
    let total = TASKS * STATES.len();
    assert_eq!(pending(&app), total as u64, "nothing can be published yet");
    retried(&app, 2 * TASKS as u64, Duration::from_secs(60)).await;

    let restarted = Instant::now();
    broker.start().await;
    let ready = restarted.elapsed();
    app.drained(Duration::from_secs(120)).await;
    eprintln!(
        "nats outage: broker ready after {ready:?}, outbox drained {:?} after the restart began",
        restarted.elapsed()
    );

    let stored = nats::read_stream(&url, &stream, total as u64, secs(60), secs(2)).await;
    assert_eq!(stored.len(), total, "every accepted callback exactly once");
    let ids: HashSet<&str> = stored.iter().map(|m| m.event_id()).collect();
    assert_eq!(ids.len(), total, "no event stored twice");
    let mut by_task: BTreeMap<&str, Vec<&nats::Stored>> = BTreeMap::new();
    for m in &stored {
        assert_eq!(m.headers["Nats-Msg-Id"], m.event_id());
        assert_eq!(
            m.subject,
            format!("{prefix}.{}", m.value["state"].as_str().unwrap())
        );
        by_task
            .entry(m.value["taskId"].as_str().unwrap())
            .or_default()
            .push(m);
    }
    assert_eq!(by_task.len(), TASKS);
    for (task, mut list) in by_task {
        list.sort_by_key(|m| m.seq);
        let seen: Vec<(&str, i64)> = list
            .iter()
            .map(|m| {
                (
                    m.value["state"].as_str().unwrap(),
                    m.value["updateTime"].as_i64().unwrap(),
                )
            })
            .collect();
        let expected: Vec<(&str, i64)> = STATES
            .iter()
            .copied()
            .zip(1..)
            .map(|(s, n)| (s, BASE_TIME + n))
            .collect();
        assert_eq!(seen, expected, "task {task}: each state once, in order");
    }
    app.stop().await;
    broker.kill().await;
}

/// The real binary, SIGKILLed while callbacks are in flight: every callback
/// that got a 200 reaches Kafka once the binary is back on the same data dir.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_200_loses_nothing() {
    const KILL_AFTER: usize = 300;
    const LOOPS: usize = 3;
    let (bootstrap, topic) = kafka::new_topic("crash", 3).await;
    let env = [
        ("HOOKBRIDGE_PUBLISHER__TYPE", "kafka".to_string()),
        ("HOOKBRIDGE_PUBLISHER__BROKERS", bootstrap.clone()),
        ("HOOKBRIDGE_PUBLISHER__TOPIC", topic.clone()),
    ];
    let dir = temp_dir();
    let child = ChildApp::start(dir.path(), free_port(), &env).await;

    let run = unique("task");
    let accepted = Arc::new(Mutex::new(Vec::<String>::new()));
    let count = Arc::new(AtomicUsize::new(0));
    let loops: Vec<_> = (0..LOOPS)
        .map(|l| {
            let (http, run) = (child.http.clone(), run.clone());
            let (accepted, count) = (accepted.clone(), count.clone());
            tokio::spawn(async move {
                // Posts until the service is gone; returns how the loop ended.
                for i in 0.. {
                    let task = format!("{run}_{l}_{i:05}");
                    match http.try_callback(&callbacks::success(&task)).await {
                        Ok(a) if a.status == StatusCode::OK => {
                            accepted.lock().unwrap().push(task);
                            count.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(a) => panic!("{task}: {} {} before the kill", a.status, a.json),
                        Err(e) => return e,
                    }
                }
                unreachable!()
            })
        })
        .collect();
    eventually(Duration::from_secs(60), "300 accepted callbacks", || {
        let n = count.load(Ordering::SeqCst);
        async move { (n >= KILL_AFTER).then_some(()) }
    })
    .await;
    let (_, status) = child.admin.get("/admin/status").await;
    eprintln!(
        "crash: killing with {} entries pending",
        status["outbox"]["pending"]
    );
    child.kill().await;
    for l in loops {
        let ended = tokio::time::timeout(Duration::from_secs(60), l)
            .await
            .expect("posting loop ends after the kill")
            .expect("posting loop did not panic");
        eprintln!("crash: a posting loop ended with: {ended}");
    }
    let accepted = accepted.lock().unwrap().clone();
    eprintln!(
        "crash: {} callbacks got 200 before the kill",
        accepted.len()
    );

    let child = ChildApp::start(dir.path(), free_port(), &env).await;
    eprintln!("crash: restarted on {}", child.addr);
    let started = Instant::now();
    eventually(
        Duration::from_secs(120),
        "the restarted outbox to drain",
        || {
            let http = child.admin.clone();
            async move {
                let (status, body) = http.get("/admin/status").await;
                assert_eq!(status, StatusCode::OK, "{body}");
                (body["outbox"]["pending"] == 0).then_some(())
            }
        },
    )
    .await;
    eprintln!("crash: drained {:?} after the restart", started.elapsed());

    let records = kafka::consume(&bootstrap, &topic, accepted.len(), secs(60), secs(3)).await;
    let mut copies: HashMap<&str, usize> = HashMap::new();
    for r in &records {
        assert_eq!(r.value["taskId"], r.key.as_str(), "keyed by taskId");
        *copies.entry(r.key.as_str()).or_default() += 1;
    }
    let missing: Vec<&String> = accepted
        .iter()
        .filter(|t| !copies.contains_key(t.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged callbacks never reached Kafka, e.g. {:?}",
        missing.len(),
        accepted.len(),
        &missing[..missing.len().min(5)]
    );
    let accepted_set: HashSet<&str> = accepted.iter().map(String::as_str).collect();
    let duplicates: usize = copies.values().map(|n| n - 1).sum();
    let unanswered = copies.keys().filter(|t| !accepted_set.contains(*t)).count();
    eprintln!(
        "crash: {} records, {duplicates} duplicate copies (at-least-once republish), \
         {unanswered} tasks stored but whose 200 was lost in the kill",
        records.len()
    );
    child.kill().await;
}

/// An event the topic can never take (over its `max.message.bytes`) is kept
/// as a dead letter with the reason; the events around it still flow.
///
/// The broker refuses a whole produce batch as too large, so the small
/// events sent together with the big one fail too: the relay retries each
/// permanently failed message alone before burying it, and only the big one
/// ends up a dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_error_goes_to_dead_letters_and_the_rest_flows() {
    let (bootstrap, topic) = kafka::new_topic("limited", 1).await;
    let dir = temp_dir();
    let app = TestApp::start(config(dir.path(), kafka_publisher(&bootstrap, &topic))).await;
    // Lowered after the start, which refuses a topic smaller than the body limit.
    kafka::limit_message_bytes(&bootstrap, &topic, 2000).await;

    let run = unique("task");
    let small = |n: usize| format!("{run}_small_{n}");
    let big_task = format!("{run}_big");
    let mut big = callbacks::success(&big_task);
    big["data"]["output"][0]["url"] = json!(format!(
        "https://static.kinovi.ai/{}.mp4",
        "a".repeat(10 * 1024)
    ));
    assert_eq!(
        app.callback(&callbacks::success(&small(0))).await,
        StatusCode::OK
    );
    assert_eq!(app.callback(&big).await, StatusCode::OK);
    for n in 1..=5 {
        assert_eq!(
            app.callback(&callbacks::success(&small(n))).await,
            StatusCode::OK
        );
    }

    app.drained(Duration::from_secs(60)).await;

    // Each small event fits the topic on its own: none may be a dead letter,
    // even when librdkafka packed several into one produce request.
    let letters = dead_letters(&app.admin).await;
    let buried: Vec<(&Value, &Value)> = letters
        .iter()
        .map(|l| (&l["event"]["taskId"], &l["reason"]))
        .collect();
    assert_eq!(letters.len(), 1, "exactly the big event: {buried:#?}");
    let letter = &letters[0];
    assert_eq!(letter["event"]["taskId"], big_task.as_str());
    assert_eq!(
        letter["event"]["outputs"], big["data"]["output"],
        "kept whole"
    );
    let reason = letter["reason"].as_str().unwrap().to_lowercase();
    assert!(reason.contains("size"), "reason names the size: {reason}");

    let records = kafka::consume(&bootstrap, &topic, 6, secs(30), secs(2)).await;
    let keys: Vec<&str> = records.iter().map(|r| r.key.as_str()).collect();
    let expected: Vec<String> = (0..=5).map(small).collect();
    assert_eq!(keys, expected, "the small events, once each, in order");

    // Requeue sends it again; the topic still refuses it, so it comes back
    // as the one dead letter (under a new sequence number) and never arrives.
    let (status, answer) = app
        .admin
        .post_json("/admin/dead-letters/requeue", &json!({}))
        .await;
    assert_eq!((status, &answer["requeued"]), (StatusCode::OK, &json!(1)));
    let first_seq = letter["seq"].clone();
    let again = eventually(
        Duration::from_secs(30),
        "the requeued event to fail again",
        || {
            let http = app.admin.clone();
            let first_seq = first_seq.clone();
            async move {
                let letters = dead_letters(&http).await;
                (letters.len() == 1 && letters[0]["seq"] != first_seq).then_some(letters)
            }
        },
    )
    .await;
    assert_eq!(again[0]["event"]["taskId"], big_task.as_str());
    assert_eq!(pending(&app), 0);
    assert_eq!(app.outbox.status().unwrap().dead_letters, 1);
    app.stop().await;
}

async fn dead_letters(http: &Http) -> Vec<Value> {
    let (status, body) = http.get("/admin/dead-letters").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["deadLetters"].as_array().unwrap().clone()
}

/// Past `max_pending` the ingress refuses (503 backlog_full, Retry-After)
/// and stores nothing; once the broker is back the backlog drains and
/// callbacks are accepted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_cap_answers_503_then_recovers() {
    const CAP: usize = 50;
    let mut broker = PrivateBroker::nats();
    broker.start().await;
    let url = broker.nats_url();
    let (stream, prefix) = (unique("CAP").to_uppercase(), unique("cap"));
    let subject = nats::create_stream(&url, &stream, &prefix, Duration::from_secs(120)).await;
    broker.kill().await;

    let dir = temp_dir();
    let mut config = config(dir.path(), jetstream_publisher(&url, &subject, None));
    config.outbox.max_pending = CAP as u64;
    let app = TestApp::start(config).await;

    let run = unique("task");
    let task = |n: usize| format!("{run}_{n:02}");
    for n in 0..CAP + 10 {
        let answer = app
            .http
            .try_callback(&callbacks::success(&task(n)))
            .await
            .expect("an answer");
        if n < CAP {
            assert_eq!(
                answer.status,
                StatusCode::OK,
                "callback {n}: {}",
                answer.json
            );
        } else {
            assert_eq!(
                answer.status,
                StatusCode::SERVICE_UNAVAILABLE,
                "callback {n}: {}",
                answer.json
            );
            assert_eq!(answer.json["error"], "backlog_full");
            assert!(
                answer.headers.contains_key("retry-after"),
                "503 tells when to retry"
            );
        }
    }
    assert_eq!(
        pending(&app),
        CAP as u64,
        "the refused callbacks were not stored"
    );

    let restarted = Instant::now();
    broker.start().await;
    app.drained(Duration::from_secs(60)).await;
    eprintln!(
        "backlog: drained {:?} after the restart began",
        restarted.elapsed()
    );
    let later: Vec<String> = (0..5).map(|n| format!("{run}_later_{n}")).collect();
    for t in &later {
        assert_eq!(app.callback(&callbacks::success(t)).await, StatusCode::OK);
    }

    let stored =
        nats::read_stream(&url, &stream, (CAP + later.len()) as u64, secs(60), secs(2)).await;
    let got: Vec<&str> = stored
        .iter()
        .map(|m| m.value["taskId"].as_str().unwrap())
        .collect();
    let got_set: HashSet<&str> = got.iter().copied().collect();
    assert_eq!(got.len(), got_set.len(), "no event twice: {got:?}");
    let expected: HashSet<String> = (0..CAP).map(task).chain(later).collect();
    let expected: HashSet<&str> = expected.iter().map(String::as_str).collect();
    assert_eq!(got_set, expected, "the accepted ones, not the refused ones");
    app.stop().await;
    broker.kill().await;
}

/// A graceful stop while the broker is down keeps what is pending; a new
/// process on the same data dir delivers it once the broker is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_keeps_pending_and_restart_resumes() {
    const COUNT: usize = 20;
    let mut broker = PrivateBroker::nats();
    broker.start().await;
    let url = broker.nats_url();
    let (stream, prefix) = (unique("STOP").to_uppercase(), unique("stop"));
    let subject = nats::create_stream(&url, &stream, &prefix, Duration::from_secs(120)).await;
    broker.kill().await;

    let dir = temp_dir();
    let config = config(dir.path(), jetstream_publisher(&url, &subject, None));
    let app = TestApp::start(config.clone()).await;
    let run = unique("task");
    let tasks: Vec<String> = (0..COUNT).map(|n| format!("{run}_{n:02}")).collect();
    for t in &tasks {
        assert_eq!(app.callback(&callbacks::success(t)).await, StatusCode::OK);
    }
    assert_eq!(pending(&app), COUNT as u64);
    let stopping = Instant::now();
    app.stop().await;
    eprintln!("shutdown: graceful stop took {:?}", stopping.elapsed());

    let app = TestApp::start(config).await;
    assert_eq!(pending(&app), COUNT as u64, "the restart found the backlog");
    broker.start().await;
    app.drained(Duration::from_secs(60)).await;
    let stored = nats::read_stream(&url, &stream, COUNT as u64, secs(60), secs(2)).await;
    // Different tasks may be published in any order; only counts matter here.
    let mut got: Vec<&str> = stored
        .iter()
        .map(|m| m.value["taskId"].as_str().unwrap())
        .collect();
    got.sort_unstable();
    let want: Vec<&str> = tasks.iter().map(String::as_str).collect();
    assert_eq!(got, want, "all of them, once each");
    app.stop().await;
    broker.kill().await;
}

/// The real binary on SIGTERM: it stops accepting, exits 0 within its grace
/// period although the broker is down, and leaves what is pending on disk
/// for the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_cleanly_and_keeps_the_backlog() {
    const COUNT: usize = 10;
    let dir = temp_dir();
    // Nothing listens there: every publish fails transiently.
    let dead_broker = format!("nats://127.0.0.1:{}", free_port());
    let env = [
        ("HOOKBRIDGE_PUBLISHER__TYPE", "nats".to_string()),
        ("HOOKBRIDGE_PUBLISHER__URL", dead_broker.clone()),
        ("HOOKBRIDGE_PUBLISHER__ACK_TIMEOUT_MS", "500".to_string()),
        ("HOOKBRIDGE_OUTBOX__SHUTDOWN_GRACE_MS", "2000".to_string()),
    ];
    let child = ChildApp::start(dir.path(), free_port(), &env).await;
    let run = unique("term");
    for n in 0..COUNT {
        let body = callbacks::success(&format!("{run}_{n}"));
        assert_eq!(child.http.callback(&body).await, StatusCode::OK);
    }
    let status = child.terminate(Duration::from_secs(20)).await;
    assert!(status.success(), "clean exit on SIGTERM, got {status}");

    let publisher = jetstream_publisher(&dead_broker, "unused.{state}", None);
    let app = TestApp::start(config(dir.path(), publisher)).await;
    assert_eq!(pending(&app), COUNT as u64, "the backlog survived the stop");
    app.stop().await;
}

/// Bytes in the outbox that do not decode (a foreign write, a format
/// change; here: pending entries left in redb by an older version, which
/// are moved into the log at start-up) neither block the queue nor stay
/// pending forever: the relay
/// turns them into a dead letter that keeps them exactly, and the events
/// behind them are published. Requeueing never deletes a dead letter it
/// cannot decode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_entries_become_dead_letters_and_requeue_keeps_them() {
    use redb::{ReadableDatabase, ReadableTableMetadata, TableDefinition};
    const PENDING: TableDefinition<u64, &[u8]> = TableDefinition::new("pending");
    const DEAD: TableDefinition<u64, &[u8]> = TableDefinition::new("dead");
    let junk: &[u8] = b"\xff\x00 not an event {";
    let bad_letter: &[u8] = b"not a dead letter";

    let url = brokers::nats().await;
    let (stream, prefix) = (unique("JUNK").to_uppercase(), unique("junk"));
    let subject = nats::create_stream(&url, &stream, &prefix, Duration::from_secs(120)).await;
    let dir = temp_dir();
    let config = config(dir.path(), jetstream_publisher(&url, &subject, None));
    // Create the tables, then write what the outbox cannot read, at the head.
    TestApp::start(config.clone()).await.stop().await;
    let file = dir.path().join("outbox.redb");
    {
        let db = redb::Database::open(&file).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(PENDING).unwrap().insert(1, junk).unwrap();
        txn.open_table(DEAD).unwrap().insert(2, bad_letter).unwrap();
        txn.commit().unwrap();
    }

    let app = TestApp::start(config.clone()).await;
    let run = unique("task");
    let tasks: Vec<String> = (0..5).map(|n| format!("{run}_{n}")).collect();
    for t in &tasks {
        assert_eq!(app.callback(&callbacks::success(t)).await, StatusCode::OK);
    }
    app.drained(Duration::from_secs(60)).await;
    let stored = nats::read_stream(&url, &stream, tasks.len() as u64, secs(60), secs(1)).await;
    let got: Vec<&str> = stored
        .iter()
        .map(|m| m.value["taskId"].as_str().unwrap())
        .collect();
    assert_eq!(
        got.len(),
        tasks.len(),
        "the events behind the junk: {got:?}"
    );

    // Both are listed with their bytes, exactly.
    let hex = |bytes: &[u8]| -> String { bytes.iter().map(|b| format!("{b:02x}")).collect() };
    let letters = dead_letters(&app.admin).await;
    let shown: Vec<(&Value, &Value)> = letters.iter().map(|l| (&l["seq"], &l["rawHex"])).collect();
    assert_eq!(
        shown,
        [
            (&json!(1), &json!(hex(junk))),
            (&json!(2), &json!(hex(bad_letter)))
        ]
    );
    let reason = letters[0]["reason"].as_str().unwrap();
    assert!(reason.contains("unreadable outbox entry"), "{reason}");

    let (status, answer) = app
        .admin
        .post_json("/admin/dead-letters/requeue", &json!({}))
        .await;
    assert_eq!((status, &answer["requeued"]), (StatusCode::OK, &json!(0)));
    app.stop().await;

    let db = redb::Database::open(&file).unwrap();
    let txn = db.begin_read().unwrap();
    let dead = txn.open_table(DEAD).unwrap();
    assert_eq!(dead.len().unwrap(), 2, "requeue deleted nothing");
    assert_eq!(dead.get(2).unwrap().unwrap().value(), bad_letter);
    assert!(
        matches!(
            txn.open_table(PENDING),
            Err(redb::TableError::TableDoesNotExist(_))
        ),
        "the pending entries moved into the log, and the table went"
    );
}
