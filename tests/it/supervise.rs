//! One bad event or one crashing worker never stops the flow, checked on
//! real brokers: an encoding fault dead-letters only its event, a worker
//! that panics is restarted (and `/readyz` says so meanwhile), a worker that
//! cannot be kept alive stops the app with an error, and a stopped app
//! frees its data dir at once.
//!
//! Faults come from [`Faulty`], a wrapper around the real publisher that
//! misbehaves for one chosen task and delegates everything else.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use hookbridge::config::PublisherConfig;
use hookbridge::outbox::Outbox;
use hookbridge::publish::{EncodeError, Encoded, Outgoing, Published, Publisher};
use hookbridge::App;
use hyper::StatusCode;
use serde_json::{json, Value};

use crate::kafka::kafka_publisher;
use crate::nats::jetstream_publisher;
use crate::support::app::{config, file_config, temp_dir, Http, TestApp};
use crate::support::faults::Faults;
use crate::support::{brokers, callbacks, eventually, kafka, nats, secs, unique};

/// What [`Faulty`] does to the chosen task's events.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// `encode` panics.
    EncodePanic,
    /// `encode` returns an error.
    EncodeError,
    /// The first `publish` of a batch holding it panics (a crash of the
    /// relay itself, not attributable to one event).
    PublishPanicOnce,
    /// Every `publish` panics.
    PublishPanic,
    /// `publish` never answers (a hung client).
    PublishHangs,
}

/// `fault` for the events of `task`, in front of the real publisher.
struct Faulty {
    faults: Vec<(String, Fault)>,
    fired: AtomicBool,
}

impl Faulty {
    async fn wrap(config: &PublisherConfig, faults: &[(&str, Fault)]) -> Arc<dyn Publisher> {
        let faults = Self {
            faults: faults.iter().map(|(t, f)| (t.to_string(), *f)).collect(),
            fired: AtomicBool::new(false),
        };
        crate::support::faults::wrap(config, faults).await
    }

    fn fault(&self, task_id: &str) -> Option<Fault> {
        self.faults
            .iter()
            .find(|(t, _)| t == task_id)
            .map(|(_, f)| *f)
    }
}

impl Faults for Faulty {
    fn encode(&self, message: &Outgoing) -> Option<Result<Encoded, EncodeError>> {
        match self.fault(&message.meta.task_id) {
            Some(Fault::EncodePanic) => panic!("injected encoding panic"),
            Some(Fault::EncodeError) => Some(Err(EncodeError::Header {
                name: "fault",
                problem: "injected encoding error",
            })),
            _ => None,
        }
    }

    fn publish<'a>(&'a self, batch: &'a [Encoded]) -> Option<BoxFuture<'a, Vec<Published>>> {
        for m in batch {
            match self.fault(&m.key) {
                Some(Fault::PublishPanic) => panic!("injected relay panic"),
                Some(Fault::PublishHangs) => return Some(Box::pin(std::future::pending())),
                Some(Fault::PublishPanicOnce) if !self.fired.swap(true, Ordering::SeqCst) => {
                    panic!("injected relay panic")
                }
                _ => {}
            }
        }
        None
    }
}

/// 25 tasks x 4 states, each task's states in order.
fn hundred_events(run: &str) -> Vec<(String, &'static str, Value)> {
    let mut out = Vec::new();
    for (step, state) in ["pending", "waiting", "generating", "success"]
        .into_iter()
        .enumerate()
    {
        for task in 0..25 {
            let task_id = format!("{run}_{task:02}");
            let body = callbacks::progress(&task_id, state, 1_735_599_634_000 + step as i64);
            out.push((task_id, state, body));
        }
    }
    out
}

/// Two poisoned events (one whose encoding panics, one whose encoding
/// fails) are sent first, then 100 good ones. Asserts the poison ended as
/// dead letters, and returns the good events.
async fn poison_then_hundred(app: &TestApp, run: &str) -> Vec<(String, &'static str, Value)> {
    for task in [format!("{run}_panics"), format!("{run}_fails")] {
        assert_eq!(
            app.callback(&callbacks::success(&task)).await,
            StatusCode::OK
        );
    }
    let good = hundred_events(run);
    for (_, _, body) in &good {
        assert_eq!(app.callback(body).await, StatusCode::OK);
    }
    app.drained(Duration::from_secs(60)).await;
    let (status, body) = app.admin.get("/admin/dead-letters").await;
    assert_eq!(status, StatusCode::OK);
    let letters: BTreeMap<String, String> = body["deadLetters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["event"]["taskId"].as_str().unwrap().to_string(),
                l["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        letters.len(),
        2,
        "only the two poisoned events: {letters:#?}"
    );
    let panicked = &letters[&format!("{run}_panics")];
    assert!(panicked.contains("injected encoding panic"), "{panicked}");
    let failed = &letters[&format!("{run}_fails")];
    assert!(failed.contains("injected encoding error"), "{failed}");
    good
}

/// The good events arrived once each, each task's states in order.
fn assert_in_task_order(got: &[(String, String)], sent: &[(String, &'static str, Value)]) {
    fn by_task<'a>(
        events: impl Iterator<Item = (&'a str, &'a str)>,
    ) -> BTreeMap<&'a str, Vec<&'a str>> {
        let mut map: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (task, state) in events {
            map.entry(task).or_default().push(state);
        }
        map
    }
    let got = by_task(got.iter().map(|(t, s)| (t.as_str(), s.as_str())));
    let want = by_task(sent.iter().map(|(t, s, _)| (t.as_str(), *s)));
    assert_eq!(
        got, want,
        "each event once, in task order, and nothing else"
    );
}

fn poison(run: &str) -> [(String, Fault); 2] {
    [
        (format!("{run}_panics"), Fault::EncodePanic),
        (format!("{run}_fails"), Fault::EncodeError),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encoding_fault_dead_letters_one_event_and_the_next_100_reach_kafka_in_order() {
    let (bootstrap, topic) = kafka::new_topic("poison", 1).await;
    let run = unique("task");
    let faults = poison(&run);
    let faults: Vec<(&str, Fault)> = faults.iter().map(|(t, f)| (t.as_str(), *f)).collect();
    let publisher = kafka_publisher(&bootstrap, &topic);
    let dir = temp_dir();
    let app = TestApp::start_with(
        config(dir.path(), publisher.clone()),
        Faulty::wrap(&publisher, &faults).await,
    )
    .await;

    let good = poison_then_hundred(&app, &run).await;
    let records = kafka::consume(&bootstrap, &topic, 100, secs(60), secs(2)).await;
    let got: Vec<(String, String)> = records
        .iter()
        .map(|r| (r.key.clone(), r.state().to_string()))
        .collect();
    assert_in_task_order(&got, &good);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encoding_fault_dead_letters_one_event_and_the_next_100_reach_jetstream_in_order() {
    let url = brokers::nats().await;
    let (stream, prefix) = (unique("POISON").to_uppercase(), unique("poison"));
    let subject = nats::create_stream(&url, &stream, &prefix, Duration::from_secs(120)).await;
    let run = unique("task");
    let faults = poison(&run);
    let faults: Vec<(&str, Fault)> = faults.iter().map(|(t, f)| (t.as_str(), *f)).collect();
    let publisher = jetstream_publisher(&url, &subject, None);
    let dir = temp_dir();
    let app = TestApp::start_with(
        config(dir.path(), publisher.clone()),
        Faulty::wrap(&publisher, &faults).await,
    )
    .await;

    let good = poison_then_hundred(&app, &run).await;
    let stored = nats::read_stream(&url, &stream, 100, secs(60), secs(2)).await;
    let got: Vec<(String, String)> = stored
        .iter()
        .map(|m| {
            let task = m.value["taskId"].as_str().unwrap().to_string();
            (task, m.value["state"].as_str().unwrap().to_string())
        })
        .collect();
    assert_in_task_order(&got, &good);
    app.stop().await;
}

async fn readyz(http: &Http) -> (StatusCode, Value) {
    http.get("/readyz").await
}

/// The relay panics once (outside any one event's encoding): the supervisor
/// logs it and restarts the relay after its backoff, `/readyz` answers 503
/// naming the relay meanwhile and 200 again after, and every event still
/// arrives once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_relay_is_restarted_readyz_goes_503_and_back_and_nothing_is_lost() {
    let url = brokers::nats().await;
    let (stream, prefix) = (unique("CRASH").to_uppercase(), unique("crash"));
    let subject = nats::create_stream(&url, &stream, &prefix, Duration::from_secs(120)).await;
    let run = unique("task");
    let boom = format!("{run}_boom");
    let publisher = jetstream_publisher(&url, &subject, None);
    let dir = temp_dir();
    let mut config = config(dir.path(), publisher.clone());
    // The window in which a 50 ms poll of /readyz must see the restart:
    // wide enough for a loaded machine (the test waits it out).
    config.health.restart_backoff_ms = 8_000;
    let app = TestApp::start_with(
        config,
        Faulty::wrap(&publisher, &[(&boom, Fault::PublishPanicOnce)]).await,
    )
    .await;
    let http = app.admin.clone();
    eventually(Duration::from_secs(60), "/readyz to answer 200", || {
        let http = http.clone();
        async move { (readyz(&http).await.0 == StatusCode::OK).then_some(()) }
    })
    .await;

    let mut tasks = vec![boom.clone()];
    tasks.extend((0..10).map(|n| format!("{run}_{n:02}")));
    for task in &tasks {
        assert_eq!(
            app.callback(&callbacks::success(task)).await,
            StatusCode::OK
        );
    }
    let down = eventually(
        Duration::from_secs(20),
        "/readyz to report the relay restarting",
        || {
            let http = http.clone();
            async move {
                let (status, body) = readyz(&http).await;
                (status == StatusCode::SERVICE_UNAVAILABLE).then_some(body)
            }
        },
    )
    .await;
    assert_eq!(down["status"], "unavailable");
    assert!(
        down["problems"]
            .as_array()
            .unwrap()
            .contains(&json!({"component": "relay", "problem": "restarting"})),
        "{down}"
    );
    app.http.assert_healthy().await;
    eventually(
        Duration::from_secs(60),
        "/readyz to answer 200 again",
        || {
            let http = http.clone();
            async move { (readyz(&http).await.0 == StatusCode::OK).then_some(()) }
        },
    )
    .await;

    app.drained(Duration::from_secs(60)).await;
    let stored = nats::read_stream(&url, &stream, tasks.len() as u64, secs(60), secs(2)).await;
    let mut got: Vec<&str> = stored
        .iter()
        .map(|m| m.value["taskId"].as_str().unwrap())
        .collect();
    got.sort_unstable();
    tasks.sort_unstable();
    assert_eq!(got, tasks, "every event once, the one in the crash too");
    assert_eq!(app.outbox.status().unwrap().dead_letters, 0);
    app.stop().await;
}

/// A relay that panics on every batch cannot be kept alive: after
/// `max_restarts` restarts `run` stops the app and returns the error, which
/// `main` turns into a non-zero exit. What was accepted stays pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_cannot_be_kept_alive_stops_the_app_with_an_error() {
    let dir = temp_dir();
    let mut config = file_config(dir.path());
    config.health.restart_backoff_ms = 1;
    config.health.max_restarts = 3;
    let publisher = Faulty::wrap(&config.publisher, &[("doomed", Fault::PublishPanic)]).await;
    let app = App::with_publisher(config.clone(), publisher)
        .await
        .unwrap();
    let http = Http::new(app.local_addr());
    let running = tokio::spawn(app.run(std::future::pending()));
    assert_eq!(
        http.callback(&callbacks::success("doomed")).await,
        StatusCode::OK
    );
    let ended = tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("the app stops by itself")
        .unwrap();
    let error = format!("{:#}", ended.expect_err("run ends with an error"));
    assert!(
        error.contains("relay cannot be kept alive") && error.contains("injected relay panic"),
        "{error}"
    );
    // Read on the outbox alone: a restarted app's relay (with the healthy
    // publisher) could publish the event before a status is read.
    let outbox = Outbox::open(&config.outbox).expect("reopen the outbox");
    assert_eq!(outbox.status().unwrap().pending, 1, "still pending");
    outbox.close().await;
    // And a restart with a working publisher delivers it.
    let app = TestApp::start(config).await;
    app.drained(Duration::from_secs(30)).await;
    app.stop().await;
    let lines = std::fs::read_to_string(dir.path().join("events.jsonl")).unwrap();
    let delivered: Vec<Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(delivered.len(), 1, "{lines}");
    assert_eq!(delivered[0]["taskId"], "doomed");
}

/// Stop and start again on the same data dir, at once and many times: the
/// previous instance has let go of its database when `stop` returns, so no
/// start needs to wait or retry, and every accepted event is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_and_start_on_the_same_data_dir_at_once() {
    let dir = temp_dir();
    let config = file_config(dir.path());
    let run = unique("task");
    let mut sent = Vec::new();
    for round in 0..10 {
        let app = TestApp::start(config.clone()).await;
        let task = format!("{run}_{round:02}");
        assert_eq!(
            app.callback(&callbacks::success(&task)).await,
            StatusCode::OK
        );
        sent.push(task);
        app.stop().await;
    }
    let app = TestApp::start(config).await;
    app.drained(Duration::from_secs(30)).await;
    app.stop().await;
    let lines = std::fs::read_to_string(dir.path().join("events.jsonl")).unwrap();
    let mut got: Vec<String> = lines
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["taskId"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    got.sort_unstable();
    got.dedup();
    assert_eq!(got, sent, "every accepted event delivered");
}

/// A relay that hangs with events pending while nothing says the broker is
/// down is reported as stalled after `health.stall_secs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_moves_nothing_is_reported_stalled() {
    let dir = temp_dir();
    let mut config = file_config(dir.path());
    config.health.stall_secs = 1;
    config.outbox.shutdown_grace_ms = 100;
    let publisher = Faulty::wrap(&config.publisher, &[("hung", Fault::PublishHangs)]).await;
    let app = TestApp::start_with(config, publisher).await;
    let (status, _) = readyz(&app.admin).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        app.callback(&callbacks::success("hung")).await,
        StatusCode::OK
    );
    let http = app.admin.clone();
    let body = eventually(Duration::from_secs(20), "/readyz to report a stall", || {
        let http = http.clone();
        async move {
            let (status, body) = readyz(&http).await;
            (status == StatusCode::SERVICE_UNAVAILABLE).then_some(body)
        }
    })
    .await;
    assert_eq!(
        body["problems"],
        json!([{"component": "relay", "problem": "stalled"}])
    );
    app.http.assert_healthy().await;
    app.stop().await;
}
