//! A full disk: never a 200 for an event that was not stored, and the
//! bridge recovers by itself once there is space again.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use hookbridge::publish::{Encoded, PublishError, Published, Publisher};
use serde_json::Value;

use hookbridge::config::{FileConfig, NatsConfig, PublisherConfig};
use hookbridge::event::{parse, Source};
use hookbridge::outbox::Outbox;
use hyper::StatusCode;
use serde_json::json;

use crate::support::app::{config, temp_dir, TestApp};
use crate::support::brokers::PrivateBroker;
use crate::support::faults::Faults;
use crate::support::{nats, secs, unique};

/// A small tmpfs, unmounted on drop. Mounting needs root (or
/// CAP_SYS_ADMIN), which the project's test machines and CI have.
pub(crate) struct SmallDisk {
    pub(crate) path: PathBuf,
}

impl SmallDisk {
    pub(crate) fn mount(at: &Path, size: &str) -> Self {
        std::fs::create_dir_all(at).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "this test fills a small tmpfs and needs to mount one: run the suite as root (as scripts/test.sh does in CI)"
        );
        Self {
            path: at.to_path_buf(),
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_answers_503_never_200_and_recovers_when_space_returns() {
    let dir = temp_dir();
    let disk = SmallDisk::mount(&dir.path().join("disk"), "4m");
    let ballast = disk.path.join("ballast");
    std::fs::write(&ballast, vec![7u8; 1536 * 1024]).unwrap();

    // JetStream that is down for now, so accepted events pile up on the disk.
    let mut broker = PrivateBroker::nats();
    broker.start().await;
    let (stream, prefix) = (unique("FULL").to_uppercase(), unique("full"));
    let subject = nats::create_stream(
        &broker.nats_url(),
        &stream,
        &prefix,
        Duration::from_secs(120),
    )
    .await;
    broker.kill().await;

    let publisher = PublisherConfig::Nats(NatsConfig {
        url: broker.nats_url(),
        subject,
        jetstream: true,
        ack_timeout_ms: 1000,
        token: None,
        stream: None,
        models: Vec::new(),
    });
    let app = TestApp::start(config(&disk.path.join("data"), publisher)).await;
    let url = format!("https://static.kinovi.ai/{}", "v".repeat(1500));
    let body = |task: &str| json!({"taskId": task, "state": "success", "output": [{"url": url}]});

    let mut accepted = Vec::new();
    let mut refused = 0;
    for i in 0..5000 {
        let task = format!("full_{i}");
        let (status, answer) = app.http.post_json("/webhooks/kinovi", &body(&task)).await;
        match status {
            StatusCode::OK => accepted.push(task),
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(answer["error"], "storage_unavailable");
                refused += 1;
                if refused >= 20 {
                    break;
                }
            }
            other => panic!("unexpected answer {other}: {answer}"),
        }
    }
    assert!(refused >= 20, "the disk never filled up");
    assert!(
        !accepted.is_empty(),
        "some callbacks fit before the disk filled"
    );
    eprintln!(
        "accepted {} callbacks before the disk was full",
        accepted.len()
    );
    app.http.assert_healthy().await;

    // Space comes back and the broker too: new callbacks are accepted again
    // and everything that got a 200 reaches the stream, once.
    std::fs::remove_file(&ballast).unwrap();
    broker.start().await;
    let late = "full_after_recovery".to_string();
    crate::support::eventually(
        Duration::from_secs(30),
        "a callback to be accepted again",
        || {
            let (http, body) = (app.http.clone(), body(&late));
            async move { (http.callback(&body).await == StatusCode::OK).then_some(()) }
        },
    )
    .await;
    accepted.push(late);
    let stored = nats::read_stream(
        &broker.nats_url(),
        &stream,
        accepted.len() as u64,
        secs(60),
        secs(1),
    )
    .await;
    let seen: Vec<String> = stored
        .iter()
        .map(|m| m.value["taskId"].as_str().unwrap().to_string())
        .collect();
    let unique_seen: HashSet<&String> = seen.iter().collect();
    assert_eq!(seen.len(), unique_seen.len(), "each event once");
    for task in &accepted {
        assert!(
            unique_seen.contains(task),
            "{task} got a 200 but never reached the broker"
        );
    }
    assert_eq!(seen.len(), accepted.len(), "nothing refused was published");
    app.stop().await;
}

/// What the file publisher wrote: the task ids, in order.
fn published(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|line| {
            let event: serde_json::Value = serde_json::from_str(line).unwrap();
            event["taskId"].as_str().unwrap().to_string()
        })
        .collect()
}

fn file_publisher(path: &Path) -> PublisherConfig {
    PublisherConfig::File(FileConfig {
        path: path.display().to_string(),
        fsync: true,
    })
}

/// Flips `n` bytes of `path` at `at` (from the end when negative).
fn flip(path: &Path, at: i64, n: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    let at = if at < 0 {
        bytes.len() - at.unsigned_abs() as usize
    } else {
        at as usize
    };
    for b in &mut bytes[at..at + n] {
        *b ^= 0xa5;
    }
    std::fs::write(path, bytes).unwrap();
}

/// The offset of `needle` in `path`.
fn find(path: &Path, needle: &str) -> Option<usize> {
    let bytes = std::fs::read(path).unwrap();
    bytes
        .windows(needle.len())
        .position(|w| w == needle.as_bytes())
}

fn segments(data: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(data.join("pending"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

/// Bytes flipped at several places in several log segments and in both
/// database files: the start is not stopped, every acknowledged event
/// outside the damaged records reaches the broker (exactly those, in
/// order, once), and the damage is counted, listed and kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_costs_only_the_damaged_records() {
    let dir = temp_dir();
    let data = dir.path().join("data");
    let out = dir.path().join("events.jsonl");
    let mut config = config(&data, file_publisher(&out));
    config.outbox.segment_bytes = 8192;

    // 120 acknowledged events, pending (no relay runs), in many segments;
    // the two database files exist with content.
    let outbox = Outbox::open(&config.outbox).unwrap();
    let mut acknowledged = Vec::new();
    for i in 0..120 {
        let body = json!({"taskId": format!("dmg_{i:03}"), "state": "generating"});
        let event = parse(body.to_string().as_bytes(), Source::Webhook, 1).unwrap();
        assert!(outbox.append(event).await.unwrap().is_stored());
        acknowledged.push(format!("dmg_{i:03}"));
    }
    let buried = parse(br#"{"taskId":"gone","state":"fail"}"#, Source::Webhook, 1).unwrap();
    outbox.bury(buried, "refused".into()).await.unwrap();
    outbox.close().await;
    drop(hookbridge::poll::Tasks::open(&config).unwrap());
    let files = segments(&data);
    assert!(files.len() >= 5, "{files:?}");

    // In the log: one event's record (dmg_010), two neighbours in one
    // stroke (dmg_050's end and dmg_051's start), one segment's header
    // (costs nothing but the header), and the last event's checksum
    // (its frame is whole: damage, never cut as a torn write): four
    // damaged ranges.
    // Where a task's record is: its segment, and its frame's start (the
    // head's task id, its first occurrence, comes after the 8 bytes of the
    // frame, the 67 fixed ones and the id's 2-byte length).
    let record_of = |task: &str| {
        files
            .iter()
            .find_map(|f| find(f, task).map(|at| (f.clone(), at - 2 - 67 - 8)))
            .unwrap()
    };
    let (f, frame) = record_of("dmg_010");
    flip(&f, frame as i64 + 100, 2);
    let (f, frame) = record_of("dmg_051");
    assert_eq!(f, record_of("dmg_050").0, "neighbours in one segment");
    flip(&f, frame as i64 - 6, 12);
    let (f, _) = record_of("dmg_090");
    flip(&f, 0, 4);
    let (f, frame) = record_of("dmg_119");
    flip(&f, frame as i64 + 4, 1);
    let lost = ["dmg_010", "dmg_050", "dmg_051", "dmg_119"];
    // Both database files: their headers and a byte in the middle.
    for name in ["outbox.redb", "tasks.redb"] {
        let path = data.join(name);
        let len = std::fs::metadata(&path).unwrap().len() as i64;
        flip(&path, 0, 64);
        flip(&path, len / 2, 8);
    }

    // A look at the stopped data dir lists the damage.
    let look = hookbridge::outbox::inspect::inspect(&data).unwrap();
    let log_damage = |lines: &[String]| {
        lines
            .iter()
            .filter(|l| l.starts_with("pending log damaged"))
            .count()
    };
    assert_eq!(
        log_damage(&look.outbox.damage),
        4,
        "{:?}",
        look.outbox.damage
    );
    assert_eq!(look.outbox.pending, 116);

    let app = TestApp::start(config.clone()).await;
    app.drained(Duration::from_secs(30)).await;
    let expect: Vec<String> = acknowledged
        .iter()
        .filter(|t| !lost.contains(&t.as_str()))
        .cloned()
        .collect();
    assert_eq!(
        published(&out),
        expect,
        "exactly the undamaged ones, in order, once"
    );

    // Reported: a warning in /readyz (ready all the same), the status, the
    // metrics, and each damaged range a dead letter with its raw bytes.
    let (status, ready) = app.admin.get("/readyz").await;
    assert_eq!(status, StatusCode::OK, "{ready}");
    let warnings = ready["warnings"].as_array().unwrap();
    assert_eq!(warnings.len(), 2, "{ready}");
    let (_, status) = app.admin.get("/admin/status").await;
    let damage: Vec<String> = serde_json::from_value(status["outbox"]["damage"].clone()).unwrap();
    assert_eq!(log_damage(&damage), 4, "{damage:?}");
    assert!(damage.iter().any(|l| l.starts_with("outbox.redb damaged")));
    assert!(damage.iter().any(|l| l.starts_with("tasks.redb damaged")));
    let (_, metrics) = app.admin.request("GET", "/metrics", Vec::new()).await;
    let metrics = metrics.as_str().unwrap_or_default().to_string();
    assert!(
        metrics.contains("hookbridge_log_damaged_ranges_total 4"),
        "{metrics}"
    );
    assert!(metrics.contains("hookbridge_storage_files_set_aside_total 2"));
    let (_, letters) = app.admin.get("/admin/dead-letters?limit=10").await;
    let letters = letters["deadLetters"].as_array().unwrap().clone();
    assert_eq!(
        letters.len(),
        4,
        "the buried one was in the damaged file: {letters:?}"
    );
    let mut raw: Vec<usize> = letters
        .iter()
        .map(|letter| {
            assert!(letter["reason"]
                .as_str()
                .unwrap()
                .starts_with("damaged pending log"));
            letter["rawHex"].as_str().unwrap().len() / 2
        })
        .collect();
    raw.sort_unstable();
    assert_eq!(raw[0], 8, "the segment header, exactly: {raw:?}");
    assert!(raw[1..].iter().all(|n| *n > 100), "whole records: {raw:?}");
    let aside: Vec<String> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".damaged-"))
        .collect();
    assert_eq!(aside.len(), 2, "both files kept for recovery: {aside:?}");
    app.stop().await;

    // A restart keeps each damaged range once, publishes nothing again.
    let app = TestApp::start(config).await;
    let (_, letters) = app.admin.get("/admin/dead-letters?limit=10").await;
    assert_eq!(letters["deadLetters"].as_array().unwrap().len(), 4);
    app.drained(Duration::from_secs(10)).await;
    assert_eq!(published(&out), expect);
    app.stop().await;
}

/// The file publisher behind a gate: while closed, every publish fails as a
/// broker outage would.
struct Gated {
    open: Arc<AtomicBool>,
}

impl Faults for Gated {
    fn publish<'a>(&'a self, batch: &'a [Encoded]) -> Option<BoxFuture<'a, Vec<Published>>> {
        if self.open.load(Ordering::SeqCst) {
            return None;
        }
        let failed = batch
            .iter()
            .map(|_| Err(PublishError::Transient("the gate is closed".into())))
            .collect();
        Some(Box::pin(async move { failed }))
    }
}

async fn gated(config: &PublisherConfig, open: &Arc<AtomicBool>) -> Arc<dyn Publisher> {
    crate::support::faults::wrap(config, Gated { open: open.clone() }).await
}

/// Free bytes of the file system holding `path`.
fn free_bytes(path: &Path) -> u64 {
    let stat = rustix::fs::statvfs(path).unwrap();
    stat.f_bavail * stat.f_frsize
}

/// Posts `body(task)` for `prefix_0`, `prefix_1`, ... until the bridge
/// answers 503 three times; returns the tasks answered 200.
async fn fill_until_refused(
    app: &TestApp,
    prefix: &str,
    body: &dyn Fn(&str) -> Value,
) -> Vec<String> {
    let mut accepted = Vec::new();
    let mut refused = 0;
    for i in 0..100_000 {
        let task = format!("{prefix}_{i}");
        let (status, answer) = app.http.post_json("/webhooks/kinovi", &body(&task)).await;
        match status {
            StatusCode::OK => accepted.push(task),
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(answer["error"], "storage_unavailable", "{answer}");
                refused += 1;
                if refused == 3 {
                    return accepted;
                }
            }
            other => panic!("unexpected answer {other}: {answer}"),
        }
    }
    panic!("the disk never filled up");
}

/// A 20 MiB disk filled by a broker outage: once the relay drains it, the
/// log gives the space back at once (its segment is far below the 64 MiB
/// at which it would close), small callbacks are accepted again, and a
/// restart on a disk full to the last byte opens the data dir and delivers
/// what is pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_given_back_once_drained_and_a_restart_needs_no_space() {
    let dir = temp_dir();
    let disk = SmallDisk::mount(&dir.path().join("disk"), "20m");
    let data = disk.path.join("data");
    let out = dir.path().join("events.jsonl");
    let config = config(&data, file_publisher(&out));
    let open = Arc::new(AtomicBool::new(false));
    let app = TestApp::start_with(config.clone(), gated(&config.publisher, &open).await).await;
    let url = format!("https://static.kinovi.ai/{}", "v".repeat(20_000));
    let big = |task: &str| json!({"taskId": task, "state": "success", "output": [{"url": url}]});
    let small = |task: &str| json!({"taskId": task, "state": "success"});

    let mut accepted = fill_until_refused(&app, "big", &big).await;
    let full = free_bytes(&disk.path);
    let (status, _) = app
        .http
        .post_json("/webhooks/kinovi", &small("small_on_full"))
        .await;
    eprintln!(
        "full disk: {} callbacks of 20 KB accepted, {full} bytes free, a small callback answered {status}",
        accepted.len()
    );
    if status == StatusCode::OK {
        accepted.push("small_on_full".into());
    }

    // The broker is back: the queue drains and the space comes back.
    open.store(true, Ordering::SeqCst);
    app.drained(Duration::from_secs(60)).await;
    let started = std::time::Instant::now();
    crate::support::eventually(Duration::from_secs(10), "a small callback accepted", || {
        let (http, body) = (app.http.clone(), small("small_after_drain"));
        async move { (http.callback(&body).await == StatusCode::OK).then_some(()) }
    })
    .await;
    accepted.push("small_after_drain".into());
    app.drained(Duration::from_secs(10)).await;
    let drained = free_bytes(&disk.path);
    eprintln!(
        "drained: a small callback accepted after {:?}, {drained} bytes free",
        started.elapsed()
    );
    assert!(
        drained > full + 10 * 1024 * 1024,
        "the log gave its space back: {full} bytes free when full, {drained} after"
    );

    // Some pending again, a stop, and the disk filled to the last byte.
    open.store(false, Ordering::SeqCst);
    for i in 0..5 {
        let task = format!("pending_{i}");
        assert_eq!(app.callback(&small(&task)).await, StatusCode::OK);
        accepted.push(task);
    }
    app.stop().await;
    let ballast = disk.path.join("ballast");
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&ballast).unwrap();
        let chunk = vec![7u8; 64 * 1024];
        while file.write_all(&chunk).is_ok() {}
        let byte = [7u8; 1];
        while file.write_all(&byte).is_ok() {}
    }
    eprintln!("before the restart: {} bytes free", free_bytes(&disk.path));
    let app = TestApp::start_with(config.clone(), gated(&config.publisher, &open).await).await;
    open.store(true, Ordering::SeqCst);
    app.drained(Duration::from_secs(30)).await;
    let seen = published(&out);
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "each event once");
    assert_eq!(
        unique,
        accepted.iter().collect::<HashSet<_>>(),
        "every 200 published, nothing else"
    );
    app.stop().await;
    std::fs::remove_file(&ballast).unwrap();
}
