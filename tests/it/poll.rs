//! Fallback polling, task registration and verify mode, against the
//! in-process provider simulator (`hookbridge::sim`) and real brokers.

use std::time::Duration;

use futures::StreamExt;

use hookbridge::event::{event_id, State};
use hookbridge::sim::{Faults, Variant};
use hyper::StatusCode;
use serde_json::{json, Value};

use crate::support::app::{temp_dir, TestApp};
use crate::support::sim::{
    create_task, drop_all, dropped, file_publisher, lines, poll_config, poll_status, record_infos,
    send, sim_create, start_sim, TASKS_TOKEN, WAIT,
};
use crate::support::{assert_valid_event, brokers, eventually, kafka, nats, secs, unique};

/// Test 1: the callback is lost; polling publishes the terminal event, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_callback_is_published_by_polling_exactly_once() {
    let (bootstrap, topic) = kafka::new_topic("polled", 1).await;
    let sim = start_sim(drop_all()).await;
    let dir = temp_dir();
    let publisher = crate::kafka::kafka_publisher(&bootstrap, &topic);
    let app = TestApp::start(poll_config(dir.path(), &sim, publisher)).await;

    let task_id = create_task(&app, "a lighthouse at dusk").await;
    dropped(&sim, &task_id).await;
    let records = kafka::consume(&bootstrap, &topic, 1, WAIT, secs(2)).await;
    assert_eq!(records.len(), 1, "exactly one event: {records:?}");
    let r = &records[0];
    assert_valid_event(&r.value);
    assert_eq!(r.key, task_id);
    assert_eq!(r.value["source"], "poll");
    assert_eq!(r.state(), "success");
    assert_eq!(r.event_id(), event_id(&task_id, State::Success));
    assert!(r.value["outputs"][0]["url"]
        .as_str()
        .unwrap()
        .ends_with(".mp4"));

    // The reconciler stores the event, then saves the task as done: the
    // relay may publish the event before that save lands.
    let poll = eventually(WAIT, "the task to be done", || async {
        let poll = poll_status(&app).await;
        (poll["activeTasks"] == 0).then_some(poll)
    })
    .await;
    assert!(poll["counters"]["polls"].as_u64().unwrap() >= 1, "{poll}");
    assert_eq!(record_infos(&sim, &task_id).last(), Some(&200));
    app.stop().await;
}

/// Test 2: polling publishes first; the late callback adds nothing.
///
/// The provider's own delivery is dropped and the test sends the same
/// callback (its URL with the task's token, the provider's body) once the
/// poll's event is on the stream: "late" by construction, not by a delay
/// that a slow poll could outlast.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_callback_after_a_poll_publishes_nothing_more() {
    let url = brokers::nats().await;
    let (stream, prefix) = (unique("P").to_uppercase(), unique("polled"));
    let subject = nats::create_stream(&url, &stream, &prefix, Duration::from_secs(1)).await;
    let sim = start_sim(drop_all()).await;
    let dir = temp_dir();
    let publisher = crate::nats::jetstream_publisher(&url, &subject, None);
    let app = TestApp::start(poll_config(dir.path(), &sim, publisher)).await;

    let task_id = create_task(&app, "a slow courier").await;
    let polled = nats::read_stream(&url, &stream, 1, WAIT, Duration::ZERO).await;
    assert_eq!(polled[0].value["source"], "poll", "{polled:?}");
    // Outlive the stream's own dedup window (1 s), so that a second copy
    // would show (a precondition, not a wait for an outcome).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let callback = sim
        .callback_url(&task_id)
        .expect("created with a callback URL");
    let path = callback.trim_start_matches(&format!("http://{}", app.addr));
    let late = sim.record(&task_id, "success", Variant::default()).unwrap();
    assert_eq!(app.http.post_json(path, &late).await.0, StatusCode::OK);
    app.drained(WAIT).await;

    let stored = nats::read_stream(&url, &stream, 1, WAIT, secs(2)).await;
    assert_eq!(stored.len(), 1, "one event for the task: {stored:?}");
    assert_eq!(stored[0].value["source"], "poll", "the poll came first");
    assert_eq!(stored[0].value["taskId"], task_id.as_str());
    assert_eq!(app.outbox.status().unwrap().counters["duplicates"], 1);
    app.stop().await;
}

/// Test 3, verify on: forged callbacks (unknown task, wrong state) are kept
/// as dead letters with the reason; a genuine one is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_callbacks_with_verify_on_become_dead_letters() {
    let sim = start_sim(Faults::default()).await;
    let dir = temp_dir();
    let (publisher, out) = file_publisher(dir.path());
    let mut c = poll_config(&dir.path().join("data"), &sim, publisher);
    c.provider.verify = true;
    c.reconcile.enabled = false; // only the verifier may publish here
    let app = TestApp::start(c).await;

    let genuine = create_task(&app, "a genuine cat").await;
    let stuck = create_task(&app, "[stuck] forever rendering").await;
    let never = unique("task_never_created");
    let forged_unknown = sim.record(&genuine, "success", Variant::Envelope).unwrap();
    let forged_unknown = serde_json::to_string(&forged_unknown)
        .unwrap()
        .replace(&genuine, &never);
    let (status, _) = app
        .http
        .request("POST", "/webhooks/kinovi", forged_unknown)
        .await;
    assert_eq!(status, StatusCode::OK, "held, not yet judged");
    // A wrong state for a real task, with its genuine token.
    let url = sim.callback_url(&stuck).unwrap();
    let path = url.trim_start_matches(&format!("http://{}", app.addr));
    let forged_state = sim.record(&stuck, "success", Variant::Bare).unwrap();
    assert_eq!(
        app.http.post_json(path, &forged_state).await.0,
        StatusCode::OK
    );

    let letters = eventually(WAIT, "two dead letters", || async {
        let letters = app.outbox.dead_letters(10).unwrap();
        (letters.len() == 2).then_some(letters)
    })
    .await;
    let reason_for = |id: &str| {
        letters
            .iter()
            .find(|l| l.event["taskId"] == id)
            .map(|l| l.reason.clone())
            .unwrap_or_else(|| panic!("no dead letter for {id}: {letters:?}"))
    };
    assert!(
        reason_for(&never).contains("does not know this task"),
        "{letters:?}"
    );
    assert!(
        reason_for(&stuck)
            .starts_with("not confirmed: the callback says success, the provider says"),
        "{letters:?}"
    );
    eventually(WAIT, "the genuine callback to be published", || async {
        (lines(&out).len() == 1).then_some(())
    })
    .await;
    let events = lines(&out);
    assert_eq!(events[0]["taskId"], genuine.as_str());
    assert_eq!(events[0]["source"], "webhook");
    assert_eq!(events[0]["state"], "success");
    // The held callback is released just after its event is stored.
    let poll = eventually(WAIT, "no callback awaiting verification", || async {
        let poll = poll_status(&app).await;
        (poll["awaitingVerification"] == 0).then_some(poll)
    })
    .await;
    assert_eq!(poll["counters"]["verified"], 1, "{poll}");
    assert_eq!(poll["counters"]["unconfirmed"], 2, "{poll}");
    app.drained(WAIT).await;
    assert_eq!(lines(&out).len(), 1, "nothing forged was published");
    app.stop().await;
}

/// Test 3, verify off (the documented default): a callback for a task that
/// is not registered is trusted on its shape and published as is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_verify_off_unregistered_callbacks_are_published_unverified() {
    let sim = start_sim(Faults::default()).await;
    let dir = temp_dir();
    let (publisher, out) = file_publisher(dir.path());
    let app = TestApp::start(poll_config(&dir.path().join("data"), &sim, publisher)).await;
    let never = unique("task_never_created");
    let forged = crate::support::callbacks::success(&never);
    assert_eq!(app.callback(&forged).await, StatusCode::OK);
    app.drained(WAIT).await;
    let events = lines(&out);
    assert_eq!(events.len(), 1);
    assert_eq!(
        (events[0]["taskId"].as_str(), events[0]["source"].as_str()),
        (Some(never.as_str()), Some("webhook"))
    );
    assert!(
        record_infos(&sim, &never).is_empty(),
        "not registered: never polled"
    );
    app.stop().await;
}

/// Test 4: tasks registered before a restart are polled after it, and a
/// finished task is not polled again after another restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_resumes_after_a_restart() {
    let sim = start_sim(drop_all()).await;
    let dir = temp_dir();
    let (publisher, out) = file_publisher(dir.path());
    let data = dir.path().join("data");
    let mut first = poll_config(&data, &sim, publisher.clone());
    first.reconcile.enabled = false;
    let app = TestApp::start(first).await;
    let tasks = [
        create_task(&app, "one").await,
        create_task(&app, "[fail] two").await,
    ];
    assert_eq!(poll_status(&app).await["activeTasks"], 2);
    app.stop().await;
    assert!(
        tasks.iter().all(|t| record_infos(&sim, t).is_empty()),
        "no poll before the restart"
    );

    let app = TestApp::start(poll_config(&data, &sim, publisher.clone())).await;
    eventually(WAIT, "both tasks published after the restart", || async {
        (lines(&out).len() >= 2).then_some(())
    })
    .await;
    app.drained(WAIT).await;
    let events = lines(&out);
    assert_eq!(events.len(), 2, "{events:?}");
    for (task, state) in tasks.iter().zip(["success", "fail"]) {
        let e = events
            .iter()
            .find(|e| e["taskId"] == task.as_str())
            .unwrap();
        assert_eq!(
            (e["state"].as_str(), e["source"].as_str()),
            (Some(state), Some("poll"))
        );
    }
    app.stop().await;

    // Once more: finished tasks stay finished. A freshly watched task shows
    // that the reconciler ran meanwhile.
    let polls_before: Vec<usize> = tasks.iter().map(|t| record_infos(&sim, t).len()).collect();
    let app = TestApp::start(poll_config(&data, &sim, publisher)).await;
    let direct = sim_create(&sim).await;
    let (status, _) = send(
        &app,
        &format!("/tasks/{direct}/watch"),
        Some(TASKS_TOKEN),
        &json!({}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    eventually(WAIT, "the watched task to be published", || async {
        (lines(&out).len() == 3).then_some(())
    })
    .await;
    let polls_after: Vec<usize> = tasks.iter().map(|t| record_infos(&sim, t).len()).collect();
    assert_eq!(
        polls_before, polls_after,
        "finished tasks are not polled again"
    );
    app.stop().await;
}

/// Test 5: 429 and 500 answers are retried with growing delays until the
/// provider recovers; the event is published once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_and_server_errors_back_off_then_recover() {
    let sim = start_sim(drop_all()).await;
    let dir = temp_dir();
    let (publisher, out) = file_publisher(dir.path());
    let app = TestApp::start(poll_config(&dir.path().join("data"), &sim, publisher)).await;
    // Armed before the task is registered, so its first poll meets them
    // however long the registration takes.
    let task_id = finished_task(&sim).await;
    sim.fail_next(429, 3);
    sim.fail_next(500, 3);
    watch(&app, &task_id).await;
    eventually(WAIT, "the event after the errors", || async {
        (!lines(&out).is_empty()).then_some(())
    })
    .await;
    app.drained(WAIT).await;
    let events = lines(&out);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["source"], "poll");
    assert_eq!(
        record_infos(&sim, &task_id),
        [429, 429, 429, 500, 500, 500, 200]
    );
    // Within one poll (an attempt and three retries): 50, 100, 200 ms at least.
    let at: Vec<_> = sim
        .requests()
        .into_iter()
        .filter(|r| r.endpoint == "recordInfo")
        .map(|r| r.at)
        .collect();
    for (i, min) in [50, 100, 200].into_iter().enumerate() {
        let gap = at[i + 1] - at[i];
        assert!(gap >= Duration::from_millis(min), "retry {i} after {gap:?}");
    }
    let poll = poll_status(&app).await;
    assert_eq!(poll["counters"]["pollErrors"], 6, "{poll}");
    assert_eq!(poll["halted"], Value::Null);
    app.stop().await;
}

/// Test 5: a 401 stops polling, visibly; the task stays registered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthorized_stops_polling_with_a_counter() {
    let sim = start_sim(drop_all()).await;
    let dir = temp_dir();
    let (publisher, out) = file_publisher(dir.path());
    let app = TestApp::start(poll_config(&dir.path().join("data"), &sim, publisher)).await;
    // Armed before the task is registered (see above).
    let task_id = finished_task(&sim).await;
    sim.fail_next(401, 1);
    watch(&app, &task_id).await;
    let poll = eventually(WAIT, "polling to stop", || async {
        let poll = poll_status(&app).await;
        (!poll["halted"].is_null()).then_some(poll)
    })
    .await;
    assert_eq!(poll["counters"]["authFailures"], 1, "{poll}");
    assert!(poll["halted"].as_str().unwrap().contains("401"), "{poll}");
    assert_eq!(
        poll["activeTasks"], 1,
        "not given up: resumes after a restart"
    );
    // A quiet period long enough for several polls at the test's pace.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(record_infos(&sim, &task_id), [401], "no poll after the 401");
    assert!(lines(&out).is_empty());
    app.stop().await;
}

/// Test 6: a callback for a task created through `POST /tasks` needs its
/// token, else nothing is stored; the endpoints need the tasks token. The
/// answer is the one of any accepted callback: it does not tell which task
/// ids were created through hookbridge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_without_the_right_token_are_rejected() {
    let sim = start_sim(drop_all()).await;
    let dir = temp_dir();
    let (publisher, out) = file_publisher(dir.path());
    let mut c = poll_config(&dir.path().join("data"), &sim, publisher);
    c.reconcile.enabled = false;
    let app = TestApp::start(c).await;
    let body = json!({"model": "seedance-20"});
    assert_eq!(
        send(&app, "/tasks", None, &body).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        send(&app, "/tasks", Some("not-the-token-at-all"), &body)
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        send(&app, "/tasks/x/watch", None, &body).await.0,
        StatusCode::UNAUTHORIZED
    );

    let task_id = create_task(&app, "guarded").await;
    let url = sim.callback_url(&task_id).unwrap();
    let (path, token) = url.split_once("?token=").unwrap();
    assert_eq!(token.len(), 64, "32 random bytes, hex");
    let path = path.trim_start_matches(&format!("http://{}", app.addr));
    dropped(&sim, &task_id).await;
    let genuine = sim.record(&task_id, "success", Variant::Envelope).unwrap();
    for query in [
        "",
        "?token=",
        "?token=0000",
        &format!("?token={}", &token[..63]),
    ] {
        let (status, answer) = app
            .http
            .post_json(&format!("{path}{query}"), &genuine)
            .await;
        assert_eq!(
            (status, &answer),
            (StatusCode::OK, &json!({"message": "ok"})),
            "query {query:?}: the same answer as for an unknown task"
        );
    }
    let unknown = crate::support::callbacks::success(&unique("task_unknown"));
    let (status, answer) = app.http.post_json(path, &unknown).await;
    assert_eq!((status, answer), (StatusCode::OK, json!({"message": "ok"})));
    // Rejected bodies are kept best effort, off the request path.
    let reasons: Vec<String> = eventually(WAIT, "four rejected bodies", || async {
        let (_, rejected) = app.admin.get("/admin/rejected").await;
        let reasons: Vec<String> = rejected["rejected"]
            .as_array()?
            .iter()
            .filter_map(|r| r["reason"].as_str().map(str::to_owned))
            .collect();
        (reasons.len() == 4).then_some(reasons)
    })
    .await;
    assert!(
        reasons
            .iter()
            .all(|r| r.contains("token") && r.contains(&task_id)),
        "{reasons:?}"
    );
    app.drained(WAIT).await;
    let published = lines(&out);
    assert!(
        published.iter().all(|e| e["taskId"] != task_id.as_str()),
        "nothing published without the token: {published:?}"
    );

    assert_eq!(
        app.http
            .post_json(&format!("{path}?token={token}"), &genuine)
            .await
            .0,
        StatusCode::OK
    );
    app.drained(WAIT).await;
    assert_eq!(
        lines(&out).len(),
        2,
        "the unknown task's and the genuine one"
    );
    app.stop().await;
}

/// 7,000 callbacks with a wrong token for a created task are answered 200
/// and stored nowhere; the few invalid bodies sent before them are still
/// under `/admin/rejected` (one kind of rejection pushes out its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_wrong_tokens_keeps_other_rejections_visible() {
    let sim = start_sim(drop_all()).await;
    let dir = temp_dir();
    let (publisher, out) = file_publisher(dir.path());
    let mut c = poll_config(&dir.path().join("data"), &sim, publisher);
    c.reconcile.enabled = false;
    let app = TestApp::start(c).await;
    let task_id = create_task(&app, "flooded").await;
    for i in 0..3 {
        let body = format!("not json {i}");
        let (status, _) = app.http.request("POST", "/webhooks/kinovi", body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
    }
    let forged = crate::support::callbacks::success(&task_id);
    let path = "/webhooks/kinovi?token=0000";
    let answers: Vec<StatusCode> = futures::stream::iter(0..7_000)
        .map(|_| async { app.http.post_json(path, &forged).await.0 })
        .buffer_unordered(16)
        .collect()
        .await;
    assert!(answers.iter().all(|s| *s == StatusCode::OK));
    let (_, kept) = app.admin.get("/admin/rejected?limit=1000").await;
    let reasons: Vec<&str> = kept["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["reason"].as_str())
        .collect();
    assert_eq!(reasons.len(), 1000, "the keep is full");
    let invalid = reasons.iter().filter(|r| !r.contains("token")).count();
    assert_eq!(invalid, 3, "{:?}", &reasons[..3]);
    let status = app.outbox.status().unwrap();
    assert_eq!(status.counters["rejected"], 7_003);
    assert_eq!(status.counters["accepted"], 0);
    app.drained(WAIT).await;
    assert!(lines(&out).is_empty(), "nothing stored, nothing published");
    app.stop().await;
}

/// The provider's refusals reach the caller unchanged and register nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_task_answers_what_the_provider_answered() {
    let sim = start_sim(Faults::default()).await;
    let dir = temp_dir();
    let (publisher, _) = file_publisher(dir.path());
    let app = TestApp::start(poll_config(&dir.path().join("data"), &sim, publisher)).await;
    let (status, answer) = send(&app, "/tasks", Some(TASKS_TOKEN), &json!({"inputs": {}})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(answer["errors"][0], "model is required");
    sim.fail_next(429, 1);
    let (status, answer) = send(&app, "/tasks", Some(TASKS_TOKEN), &json!({"model": "m"})).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(answer["limit"], 3);
    let (status, _) = send(&app, "/tasks", Some(TASKS_TOKEN), &json!([1])).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "not a createTask body");
    let poll = poll_status(&app).await;
    assert_eq!(
        (
            poll["activeTasks"].as_u64(),
            poll["counters"]["registered"].as_u64()
        ),
        (Some(0), Some(0))
    );
    app.stop().await;
}

/// No registered task is silently forgotten: one that never finishes, and
/// one the provider does not know, end as dead letters with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_that_never_finish_or_do_not_exist_become_dead_letters() {
    let sim = start_sim(Faults::default()).await;
    let dir = temp_dir();
    let (publisher, out) = file_publisher(dir.path());
    let mut c = poll_config(&dir.path().join("data"), &sim, publisher);
    c.reconcile.deadline_secs = 1;
    let app = TestApp::start(c).await;
    let stuck = create_task(&app, "[stuck] an endless render").await;
    let ghost = unique("task_ghost");
    let (status, answer) = send(
        &app,
        &format!("/tasks/{ghost}/watch"),
        Some(TASKS_TOKEN),
        &json!({}),
    )
    .await;
    assert_eq!(
        (status, answer["registered"].as_bool()),
        (StatusCode::OK, Some(true))
    );

    let letters = eventually(WAIT, "two dead letters", || async {
        let letters = app.outbox.dead_letters(10).unwrap();
        (letters.len() == 2).then_some(letters)
    })
    .await;
    let stuck_letter = letters
        .iter()
        .find(|l| l.event["taskId"] == stuck.as_str())
        .unwrap();
    assert_eq!(stuck_letter.reason, "stuck: no terminal state after 1 s");
    assert_eq!(
        stuck_letter.event["state"], "generating",
        "the last polled record"
    );
    let ghost_letter = letters
        .iter()
        .find(|l| l.event["taskId"] == ghost.as_str())
        .unwrap();
    assert!(
        ghost_letter.reason.starts_with("unknown task"),
        "{}",
        ghost_letter.reason
    );
    assert_eq!(ghost_letter.event["state"], "pending");
    // The reconciler stores the dead letter, then marks the task done: the
    // counters follow the letters by a moment.
    let poll = eventually(WAIT, "the poll counters to count both", || async {
        let poll = poll_status(&app).await;
        let counted = poll["counters"]["stuck"].as_u64().unwrap_or(0)
            + poll["counters"]["unknownTasks"].as_u64().unwrap_or(0);
        (poll["activeTasks"] == 0 && counted >= 2).then_some(poll)
    })
    .await;
    assert_eq!(
        (
            poll["counters"]["stuck"].as_u64(),
            poll["counters"]["unknownTasks"].as_u64()
        ),
        (Some(1), Some(1))
    );
    assert!(lines(&out).is_empty(), "nothing published");
    app.stop().await;
}

/// Registers `task_id` (created elsewhere) for polling.
async fn watch(app: &TestApp, task_id: &str) {
    let path = format!("/tasks/{task_id}/watch");
    let (status, answer) = send(app, &path, Some(TASKS_TOKEN), &json!({})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
}

/// A task created straight at the simulator, once the provider reports it
/// finished.
async fn finished_task(sim: &hookbridge::sim::Simulator) -> String {
    let task_id = sim_create(sim).await;
    eventually(WAIT, "the task to finish at the provider", || async {
        (sim.state(&task_id) == Some("success")).then_some(())
    })
    .await;
    task_id
}

/// Verify mode: the sender of an unsigned callback is untrusted. Forged
/// `generating` and `success` callbacks for a real task are published (the
/// provider confirms those states) with the provider's fields: none of the
/// sender's output URLs, error, model or orderId reach Kafka.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verified_callbacks_are_published_with_the_providers_fields() {
    let (bootstrap, topic) = kafka::new_topic("verified", 1).await;
    let sim = start_sim(Faults::default()).await;
    let dir = temp_dir();
    let publisher = crate::kafka::kafka_publisher(&bootstrap, &topic);
    let mut c = poll_config(dir.path(), &sim, publisher);
    c.provider.verify = true;
    c.reconcile.enabled = false; // only the verifier may publish here
    let app = TestApp::start(c).await;

    let task_id = finished_task(&sim).await;
    let forged = |state: &str| {
        json!({"code": 200, "msg": "success", "data": {
            "taskId": task_id, "state": state, "model": "attacker-model",
            "orderId": "attacker-order", "creditsUsed": 999,
            "output": [{"url": "https://attacker.example/malware.mp4"}],
            "error": {"code": "500", "message": "visit https://attacker.example"},
        }})
    };
    for state in ["generating", "success"] {
        assert_eq!(
            app.callback(&forged(state)).await,
            StatusCode::OK,
            "{state}"
        );
    }

    let records = kafka::consume(&bootstrap, &topic, 2, WAIT, secs(2)).await;
    let states: Vec<&str> = records.iter().map(|r| r.state()).collect();
    assert_eq!(states, ["generating", "success"], "{records:?}");
    for r in &records {
        assert_valid_event(&r.value);
        let text = r.value.to_string();
        assert!(
            !text.contains("attacker"),
            "a forged field was published: {text}"
        );
        assert_eq!(r.key, task_id);
        assert_eq!(r.value["source"], "webhook");
        assert_eq!(r.value["model"], "seedance-20", "the provider's model");
        assert_eq!(r.value["orderId"], format!("order_{task_id}"));
        assert!(r.value["error"].is_null(), "{text}");
    }
    assert_eq!(records[0].value["outputs"], json!([]), "no outputs yet");
    assert_eq!(
        records[1].value["outputs"][0]["url"],
        format!("https://static.kinovi.ai/generated/{task_id}.mp4"),
        "the provider's output"
    );
    eventually(WAIT, "both callbacks counted as verified", || async {
        (poll_status(&app).await["counters"]["verified"] == 2).then_some(())
    })
    .await;
    app.stop().await;
}

/// Verify mode: the held queue cannot be clogged. 1,000 entries that cannot
/// be read (left by another version, or damaged) fill it to its cap: each
/// becomes a dead letter with the reason and the queue empties. 1,000
/// copies of one forged callback then take one place, and a genuine
/// callback still reaches JetStream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_held_callbacks_never_fill_the_queue() {
    const JUNK: u64 = 1_000;
    let url = brokers::nats().await;
    let (stream, prefix) = (unique("HELD").to_uppercase(), unique("held"));
    let subject = nats::create_stream(&url, &stream, &prefix, Duration::from_secs(1)).await;
    let sim = start_sim(Faults::default()).await;
    let dir = temp_dir();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    {
        let held: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("held");
        let db = redb::Database::create(data.join("tasks.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut table = txn.open_table(held).unwrap();
            for seq in 1..=JUNK {
                let junk = match seq % 3 {
                    0 => format!("\u{1}garbage {seq}").into_bytes(),
                    1 => vec![0xff, 0xfe, seq as u8],
                    _ => format!(r#"{{"event": {{"taskId": {seq}}}}}"#).into_bytes(),
                };
                table.insert(seq, junk.as_slice()).unwrap();
            }
        }
        txn.commit().unwrap();
    }
    let publisher = crate::nats::jetstream_publisher(&url, &subject, None);
    let mut c = poll_config(&data, &sim, publisher);
    c.provider.verify = true;
    c.provider.max_held = JUNK;
    c.reconcile.enabled = false;
    c.reconcile.unknown_task_grace_secs = 3600; // forged callbacks stay held
    let app = TestApp::start(c).await;

    let letters = eventually(WAIT, "every unreadable entry buried", || async {
        let letters = app.outbox.dead_letters(2 * JUNK as usize).unwrap();
        (letters.len() as u64 == JUNK).then_some(letters)
    })
    .await;
    assert!(
        letters
            .iter()
            .all(|l| l.reason.starts_with("unreadable held callback")),
        "{:?}",
        letters.first()
    );
    let garbage: String = b"garbage".iter().map(|b| format!("{b:02x}")).collect();
    assert!(
        letters.iter().all(|l| l.raw_hex.is_some())
            && letters
                .iter()
                .any(|l| l.raw_hex.as_deref().unwrap_or_default().contains(&garbage)),
        "the stored bytes are kept exactly: {:?}",
        letters.first()
    );
    eventually(WAIT, "the held queue to empty", || async {
        (poll_status(&app).await["awaitingVerification"] == 0).then_some(())
    })
    .await;

    let ghost = unique("task_forged");
    let forged = crate::support::callbacks::success(&ghost);
    for _ in 0..JUNK {
        assert_eq!(app.callback(&forged).await, StatusCode::OK);
    }
    assert_eq!(poll_status(&app).await["awaitingVerification"], 1);

    let task_id = finished_task(&sim).await;
    let genuine = sim.record(&task_id, "success", Variant::Envelope).unwrap();
    assert_eq!(app.callback(&genuine).await, StatusCode::OK);
    let stored = nats::read_stream(&url, &stream, 1, WAIT, secs(2)).await;
    assert_eq!(stored.len(), 1, "only the genuine callback: {stored:?}");
    assert_eq!(stored[0].value["taskId"], task_id.as_str());
    assert_eq!(stored[0].value["state"], "success");
    // Only the forged callback waits (its task is unknown, in the grace period).
    let poll = eventually(WAIT, "the genuine callback released", || async {
        let poll = poll_status(&app).await;
        (poll["awaitingVerification"] == 1).then_some(poll)
    })
    .await;
    assert_eq!(poll["counters"]["unconfirmed"], JUNK, "{poll}");
    assert_eq!(poll["counters"]["verified"], 1, "{poll}");
    app.stop().await;
}

/// The task registry shares the data dir with the outbox: when the disk
/// fills up, registering answers 503 (nothing registered), and once there
/// is space again the registry re-opens by itself, no restart needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_recovers_from_a_full_disk() {
    use std::io::Write;
    let (bootstrap, topic) = kafka::new_topic("regdisk", 1).await;
    let sim = start_sim(Faults::default()).await;
    let dir = temp_dir();
    let disk = crate::storage::SmallDisk::mount(&dir.path().join("disk"), "4m");
    let publisher = crate::kafka::kafka_publisher(&bootstrap, &topic);
    let mut c = poll_config(&disk.path.join("data"), &sim, publisher);
    c.reconcile.enabled = false;
    let app = TestApp::start(c).await;
    let watch = |task: String| {
        let app = &app;
        async move {
            let path = format!("/tasks/{task}/watch");
            send(app, &path, Some(TASKS_TOKEN), &json!({})).await
        }
    };

    // Fill the disk to the last byte.
    let ballast = disk.path.join("ballast");
    let mut file = std::fs::File::create(&ballast).unwrap();
    while file.write_all(&[7u8; 16 * 1024]).is_ok() {}
    while file.write_all(&[7u8; 512]).is_ok() {}
    let _ = file.sync_all();
    drop(file);

    let long = "x".repeat(400);
    let mut refused = None;
    for i in 0..5_000 {
        let (status, answer) = watch(format!("task_{i}_{long}")).await;
        if status == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(answer["error"], "storage_unavailable", "{answer}");
            refused = Some(i);
            break;
        }
        assert_eq!(status, StatusCode::OK, "{answer}");
    }
    let refused = refused.expect("the disk never filled up");
    eprintln!("{refused} registrations before the disk was full");
    app.http.assert_healthy().await;

    std::fs::remove_file(&ballast).unwrap();
    let task_id = finished_task(&sim).await;
    eventually(WAIT, "a registration to be accepted again", || async {
        (watch(task_id.clone()).await.0 == StatusCode::OK).then_some(())
    })
    .await;
    let poll = poll_status(&app).await;
    assert_eq!(poll["activeTasks"], refused + 1, "{poll}");
    // The registry answers the webhook's lookups again: a callback for the
    // watched task is published.
    let genuine = sim.record(&task_id, "success", Variant::Envelope).unwrap();
    assert_eq!(app.callback(&genuine).await, StatusCode::OK);
    let records = kafka::consume(&bootstrap, &topic, 1, WAIT, secs(1)).await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].key, task_id);
    app.stop().await;
}

/// A registration that cannot be read (damaged on disk) becomes a dead
/// letter holding what was stored, and polling goes on for the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_registration_becomes_a_dead_letter() {
    let (bootstrap, topic) = kafka::new_topic("unreadable", 1).await;
    let sim = start_sim(drop_all()).await;
    let dir = temp_dir();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    {
        let tasks: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("tasks");
        let due: redb::TableDefinition<(u64, &str), ()> = redb::TableDefinition::new("due");
        let db = redb::Database::create(data.join("tasks.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(tasks)
            .unwrap()
            .insert("task_damaged", br#"{"origin": 7}"#.as_slice())
            .unwrap();
        txn.open_table(due)
            .unwrap()
            .insert((1, "task_damaged"), ())
            .unwrap();
        txn.commit().unwrap();
    }
    let publisher = crate::kafka::kafka_publisher(&bootstrap, &topic);
    let app = TestApp::start(poll_config(&data, &sim, publisher)).await;
    let task_id = create_task(&app, "after the damaged one").await;

    let records = kafka::consume(&bootstrap, &topic, 1, WAIT, secs(1)).await;
    assert_eq!(
        records[0].key, task_id,
        "the good task is polled and published"
    );
    let letters = app.outbox.dead_letters(10).unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert!(
        letters[0]
            .reason
            .starts_with("unreadable registration of task task_damaged"),
        "{}",
        letters[0].reason
    );
    assert_eq!(letters[0].event["origin"], 7, "what was stored");
    let hex: String = br#"{"origin": 7}"#.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(letters[0].raw_hex.as_deref(), Some(hex.as_str()), "exactly");
    let poll = eventually(WAIT, "no active task left", || async {
        let poll = poll_status(&app).await;
        (poll["activeTasks"] == 0).then_some(poll)
    })
    .await;
    assert_eq!(poll["halted"], Value::Null);
    assert_eq!(
        poll["counters"]["unreadableRegistrations"], 1,
        "counted: {poll}"
    );
    app.stop().await;
}
