//! The dedup records at their caps: eviction instead of refusal, finished
//! tasks first, the byte cap, and the shorter window of one-off tasks.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{Appended, Outbox};
use crate::clock::now_ms;
use crate::config::OutboxConfig;

use crate::event::testing::callback;

fn open(dir: &std::path::Path, change: impl FnOnce(&mut OutboxConfig)) -> Outbox {
    let mut config = OutboxConfig {
        data_dir: dir.to_path_buf(),
        ..OutboxConfig::default()
    };
    change(&mut config);
    Outbox::open(&config).unwrap()
}

async fn stored(outbox: &Outbox, task: &str, state: &str) {
    let appended = outbox.append(callback(task, state)).await.unwrap();
    assert!(
        matches!(appended, Appended::New { .. }),
        "{task}: {appended:?}"
    );
}

/// Stores each group `(prefix, n, state)` in turn: `state` for the tasks
/// `{prefix}_00`.. (`n` of them).
async fn stored_groups(outbox: &Outbox, groups: &[(&str, usize, &str)]) {
    for (prefix, n, state) in groups {
        for i in 0..*n {
            stored(outbox, &format!("{prefix}_{i:02}"), state).await;
        }
    }
}

/// At the cap a new task is stored, never refused; the records that go
/// are those of finished tasks, oldest first, counted.
#[tokio::test]
async fn at_the_cap_new_tasks_are_stored_and_finished_records_go_first() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = open(dir.path(), |c| c.max_tracked_tasks = 20);
    stored_groups(
        &outbox,
        &[
            ("done", 10, "success"),
            ("live", 10, "generating"),
            ("new", 30, "generating"),
        ],
    )
    .await;
    let stats = outbox.stats();
    let status = outbox.status().unwrap();
    assert!(status.tasks_tracked <= 20, "{}", status.tasks_tracked);
    let finished = stats.evicted_finished.load(Ordering::Relaxed);
    let unfinished = stats.evicted_unfinished.load(Ordering::Relaxed);
    assert_eq!(finished + unfinished, 50 - status.tasks_tracked);
    assert_eq!(finished, 10, "every finished record went");
    assert!(unfinished > 0 && stats.evicted_unfinished_at.load(Ordering::Relaxed) > 0);
    assert_eq!(status.counters["refusedFull"], 0);
    assert!(outbox.task("new_29").unwrap().is_some(), "the newest stays");
    assert!(outbox.task("done_00").unwrap().is_none());
    outbox.close().await;
}

/// While records of finished tasks are there, no unfinished one goes.
#[tokio::test]
async fn unfinished_records_stay_while_finished_ones_can_go() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = open(dir.path(), |c| c.max_tracked_tasks = 100);
    stored_groups(
        &outbox,
        &[
            ("a_done", 60, "fail"),
            ("b_live", 40, "waiting"),
            ("c_new", 20, "success"),
        ],
    )
    .await;
    let stats = outbox.stats();
    assert_eq!(stats.evicted_unfinished.load(Ordering::Relaxed), 0);
    assert!(stats.evicted_finished.load(Ordering::Relaxed) >= 20);
    for i in 0..40 {
        assert!(outbox.task(&format!("b_live_{i:02}")).unwrap().is_some());
    }
    outbox.close().await;
}

/// The byte cap evicts like the count cap: long task ids fill it first.
#[tokio::test]
async fn the_byte_cap_evicts_too() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = open(dir.path(), |c| c.max_tracked_bytes = 64 * 1024);
    for i in 0..300 {
        stored(&outbox, &format!("{i:0>500}"), "success").await;
    }
    let status = outbox.status().unwrap();
    assert!(status.tasks_tracked < 130, "{}", status.tasks_tracked);
    let bytes = outbox.inner.shared.tracked_bytes.load(Ordering::Relaxed);
    assert!(bytes <= 64 * 1024, "{bytes}");
    assert!(outbox.stats().evicted_finished.load(Ordering::Relaxed) >= 170);
    // The count survives a restart.
    outbox.close().await;
    let outbox = open(dir.path(), |c| c.max_tracked_bytes = 64 * 1024);
    let reopened = outbox.inner.shared.tracked_bytes.load(Ordering::Relaxed);
    assert_eq!(reopened, bytes);
    outbox.close().await;
}

/// A task seen once and not known to be real is forgotten after the
/// one-off window; a trusted one, or one seen twice, keeps the full window.
#[tokio::test]
async fn one_off_tasks_are_pruned_after_their_shorter_window() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = open(dir.path(), |c| {
        c.dedup_window_secs = 3600;
        c.one_off_window_secs = 0;
    });
    stored(&outbox, "junk", "success").await;
    stored(&outbox, "twice", "generating").await;
    stored(&outbox, "twice", "success").await;
    let trusted = outbox.append_trusted(callback("registered", "success"));
    assert!(trusted.await.unwrap().is_stored());
    // A zero window expires a record once the clock has moved past it.
    let seen = now_ms();
    let deadline = Instant::now() + Duration::from_secs(5);
    while now_ms() <= seen && Instant::now() < deadline {
        tokio::task::yield_now().await;
    }
    assert_eq!(outbox.prune().await.unwrap(), 1);
    assert!(outbox.task("junk").unwrap().is_none());
    assert!(outbox.task("twice").unwrap().is_some());
    let record = outbox.task("registered").unwrap().unwrap();
    assert!(record.trusted);
    assert_eq!(outbox.status().unwrap().tasks_tracked, 2);
    outbox.close().await;
}
