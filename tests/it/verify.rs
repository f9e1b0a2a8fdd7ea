//! Verify mode under attack (`provider.verify = true`): forged callbacks
//! from one address neither bury a real one nor fill the disk. Against the
//! provider simulator and real storage.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use futures::StreamExt;
use hookbridge::sim::{Faults, Variant};
use hyper::StatusCode;
use serde_json::Value;

use crate::support::app::{temp_dir, TestApp};
use crate::support::sim::{file_publisher, lines, poll_config, poll_status, sim_create, start_sim};
use crate::support::{callbacks, eventually, unique};

const WAIT: Duration = Duration::from_secs(60);

/// A client whose connections come from `from` (any 127.0.0.0/8 address
/// reaches a server on 127.0.0.1 on Linux).
fn client_from(from: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(from.parse::<IpAddr>().unwrap())
        .build()
        .unwrap()
}

/// Posts every body from `client`, 16 at a time; the statuses.
async fn post_all(client: &reqwest::Client, app: &TestApp, bodies: Vec<Vec<u8>>) -> Vec<u16> {
    let url = format!("http://{}/webhooks/kinovi", app.addr);
    futures::stream::iter(bodies)
        .map(|body| {
            let request = client
                .post(&url)
                .header("content-type", "application/json")
                .body(body);
            async move { request.send().await.map_or(0, |r| r.status().as_u16()) }
        })
        .buffer_unordered(16)
        .collect()
        .await
}

/// A task created straight at the simulator, once it is finished there.
async fn finished_task(sim: &hookbridge::sim::Simulator) -> String {
    let task_id = sim_create(sim).await;
    eventually(WAIT, "the task to finish at the provider", || async {
        (sim.state(&task_id) == Some("success")).then_some(())
    })
    .await;
    task_id
}

/// 3,000 forged callbacks (tasks the provider does not know, kept held
/// through a long grace period) from 127.0.0.2, at the default provider
/// budget of 10 requests a second; then a genuine callback from 127.0.0.1
/// is published within seconds. (Before: still unpublished after 240 s,
/// behind the whole flood.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_forged_callbacks_delays_a_real_one_by_a_bounded_time() {
    const FORGED: usize = 3_000;
    let sim = start_sim(Faults::default()).await;
    let dir = temp_dir();
    let (publisher, out) = file_publisher(dir.path());
    let mut c = poll_config(&dir.path().join("data"), &sim, publisher);
    c.provider.verify = true;
    c.provider.requests_per_sec = 10;
    c.reconcile.enabled = false;
    c.reconcile.unknown_task_grace_secs = 3600; // forged callbacks stay held
    let app = TestApp::start(c).await;

    let run = unique("forged");
    let forged: Vec<Vec<u8>> = (0..FORGED)
        .map(|i| serde_json::to_vec(&callbacks::success(&format!("{run}_{i}"))).unwrap())
        .collect();
    let started = Instant::now();
    let answers = post_all(&client_from("127.0.0.2"), &app, forged).await;
    assert!(answers.iter().all(|s| *s == 200), "all held");
    eprintln!("{FORGED} forged callbacks held in {:?}", started.elapsed());
    assert_eq!(poll_status(&app).await["awaitingVerification"], FORGED);

    let task_id = finished_task(&sim).await;
    let genuine = sim.record(&task_id, "success", Variant::Envelope).unwrap();
    let sent = Instant::now();
    assert_eq!(app.callback(&genuine).await, StatusCode::OK);
    eventually(WAIT, "the genuine callback to be published", || async {
        lines(&out)
            .iter()
            .any(|e| e["taskId"] == task_id.as_str())
            .then_some(())
    })
    .await;
    let delay = sent.elapsed();
    eprintln!("genuine callback published {delay:?} after it was sent, behind {FORGED} forged");
    // One step (16 callbacks at 10/s) plus a turn per address: ~2 s.
    assert!(delay < Duration::from_secs(10), "{delay:?}");
    let poll = poll_status(&app).await;
    assert_eq!(poll["counters"]["verified"], 1, "{poll}");
    assert_eq!(lines(&out).len(), 1, "nothing forged was published");
    app.stop().await;
}

/// 300 forged callbacks of 1 MiB each: held entries keep 256 bytes of the
/// body, the held bytes stay under `provider.max_held_bytes`, one address
/// gets at most `provider.max_held_per_address` (then 503) while another
/// is still held and published, and the dead letters of the forged ones
/// keep a bounded copy. (Before: 300 of them took tasks.redb to 555 MB.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_1_mib_callbacks_cost_a_few_hundred_bytes_each() {
    const FORGED: usize = 300;
    const PER_ADDRESS: u64 = 250;
    const MAX_BYTES: u64 = 256 * 1024;
    let sim = start_sim(Faults::default()).await;
    let dir = temp_dir();
    let data = dir.path().join("data");
    let (publisher, out) = file_publisher(dir.path());
    let mut c = poll_config(&data, &sim, publisher);
    c.provider.verify = true;
    c.provider.max_held_bytes = MAX_BYTES;
    c.provider.max_held_per_address = PER_ADDRESS;
    c.reconcile.enabled = false;
    c.reconcile.unknown_task_grace_secs = 3600;
    let app = TestApp::start(c).await;

    let run = unique("big");
    let padding = "x".repeat(1_000_000);
    let forged: Vec<Vec<u8>> = (0..FORGED)
        .map(|i| {
            let mut body = callbacks::success(&format!("{run}_{i}"));
            body["padding"] = Value::String(padding.clone());
            serde_json::to_vec(&body).unwrap()
        })
        .collect();
    let answers = post_all(&client_from("127.0.0.3"), &app, forged).await;
    let held = answers.iter().filter(|s| **s == 200).count() as u64;
    let refused = answers.iter().filter(|s| **s == 503).count() as u64;
    assert_eq!(
        (held, refused),
        (PER_ADDRESS, FORGED as u64 - PER_ADDRESS),
        "{answers:?}"
    );

    let poll = poll_status(&app).await;
    assert_eq!(poll["awaitingVerification"], PER_ADDRESS, "{poll}");
    let bytes = poll["awaitingVerificationBytes"].as_u64().unwrap();
    assert!(bytes <= MAX_BYTES, "{bytes}");
    let file = std::fs::metadata(data.join("tasks.redb")).unwrap().len();
    eprintln!("{PER_ADDRESS} held 1 MB callbacks: {bytes} bytes held, tasks.redb {file} bytes");
    assert!(file < 16 << 20, "tasks.redb is {file} bytes");

    // Another address is not held to the first one's share.
    let task_id = finished_task(&sim).await;
    let genuine = sim.record(&task_id, "success", Variant::Envelope).unwrap();
    let genuine = serde_json::to_vec(&genuine).unwrap();
    assert_eq!(
        post_all(&client_from("127.0.0.4"), &app, vec![genuine]).await,
        [200]
    );
    eventually(WAIT, "the genuine callback to be published", || async {
        (lines(&out).len() == 1).then_some(())
    })
    .await;
    assert_eq!(lines(&out)[0]["taskId"], task_id.as_str());
    app.stop().await;
}

/// Forged callbacks whose task the provider does not know become dead
/// letters holding the task id, the state, the time and 256 bytes of the
/// body, not the megabyte that was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_of_forged_callbacks_keep_a_bounded_copy() {
    let sim = start_sim(Faults::default()).await;
    let dir = temp_dir();
    let data = dir.path().join("data");
    let (publisher, _out) = file_publisher(dir.path());
    let mut c = poll_config(&data, &sim, publisher);
    c.provider.verify = true;
    c.reconcile.enabled = false;
    let app = TestApp::start(c).await;
    let run = unique("ghost");
    let padding = "y".repeat(1_000_000);
    let forged: Vec<Vec<u8>> = (0..20)
        .map(|i| {
            let mut body = callbacks::success(&format!("{run}_{i}"));
            body["padding"] = Value::String(padding.clone());
            serde_json::to_vec(&body).unwrap()
        })
        .collect();
    let answers = post_all(&client_from("127.0.0.5"), &app, forged).await;
    assert!(answers.iter().all(|s| *s == 200), "{answers:?}");
    let letters = eventually(WAIT, "20 dead letters", || async {
        let letters = app.outbox.dead_letters(100).unwrap();
        (letters.len() == 20).then_some(letters)
    })
    .await;
    for letter in &letters {
        let size = serde_json::to_vec(letter).unwrap().len();
        assert!(size < 4096, "{size} bytes: {letter:?}");
        assert!(letter.reason.contains("not kept"), "{}", letter.reason);
        assert!(
            letter.reason.contains("from 127.0.0.5"),
            "{}",
            letter.reason
        );
        assert_eq!(letter.event["state"], "success");
        assert!(letter.event["taskId"].as_str().unwrap().starts_with(&run));
    }
    let size = std::fs::metadata(data.join("outbox.redb")).unwrap().len();
    eprintln!("20 forged 1 MB callbacks buried: outbox.redb {size} bytes");
    eventually(WAIT, "the held queue to empty", || async {
        (poll_status(&app).await["awaitingVerification"] == 0).then_some(())
    })
    .await;
    app.stop().await;
}
