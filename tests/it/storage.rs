//! A full disk: never a 200 for an event that was not stored, and the
//! bridge recovers by itself once there is space again.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hookbridge::config::{NatsConfig, PublisherConfig};
use hyper::StatusCode;
use serde_json::json;

use crate::support::app::{config, temp_dir, TestApp};
use crate::support::brokers::PrivateBroker;
use crate::support::{nats, unique};

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
        Duration::from_secs(60),
        Duration::from_secs(1),
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
