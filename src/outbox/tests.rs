//! The outbox on real files: what damage costs and how it is reported,
//! the dead letters' caps, and the log giving its space back.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use super::*;
use crate::event::{parse, Source};

use crate::event::testing::callback;

fn config(dir: &Path) -> OutboxConfig {
    OutboxConfig {
        data_dir: dir.to_path_buf(),
        ..OutboxConfig::default()
    }
}

/// An outbox in a new temporary dir (kept while the first value lives),
/// with `change` made to the default configuration.
fn fresh(change: impl FnOnce(&mut OutboxConfig)) -> (tempfile::TempDir, Outbox) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    change(&mut config);
    let outbox = Outbox::open(&config).unwrap();
    (dir, outbox)
}

/// Appends `generating` of `task-0`..`task-{n-1}`; returns their numbers.
async fn fill(outbox: &Outbox, n: usize) -> Vec<u64> {
    let mut seqs = Vec::new();
    for i in 0..n {
        match outbox
            .append(callback(&format!("task-{i}"), "generating"))
            .await
        {
            Ok(Appended::New { seq }) => seqs.push(seq),
            other => panic!("task-{i}: {other:?}"),
        }
    }
    seqs
}

/// The task ids pending, oldest first.
fn pending_tasks(outbox: &Outbox) -> Vec<String> {
    let batch = outbox.read_batch(10_000, 10_000).unwrap();
    assert!(batch.unreadable.is_empty(), "{:?}", batch.unreadable);
    batch.ready.into_iter().map(|o| o.meta.task_id).collect()
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join("pending"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

/// Flips `n` bytes of `path` from where `needle` first occurs.
fn flip_at(path: &Path, needle: &str, n: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle.as_bytes())
        .unwrap_or_else(|| panic!("{needle} in {}", path.display()));
    for b in &mut bytes[at..at + n] {
        *b ^= 0xff;
    }
    std::fs::write(path, bytes).unwrap();
}

/// Which segment holds `task`'s record.
fn segment_of(dir: &Path, task: &str) -> PathBuf {
    let needle = format!("\"{task}\"");
    segments(dir)
        .into_iter()
        .find(|p| {
            let bytes = std::fs::read(p).unwrap();
            bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
        })
        .unwrap()
}

#[tokio::test]
async fn damaged_ranges_cost_their_events_only_and_are_kept_once_as_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(&config(dir.path())).unwrap();
    fill(&outbox, 60).await;
    outbox.close().await;
    assert!(
        segments(dir.path()).len() >= 4,
        "{:?}",
        segments(dir.path())
    );

    // Two events hit in two different segments, inside their JSON.
    for task in ["task-7", "task-41"] {
        let segment = segment_of(dir.path(), task);
        flip_at(&segment, &format!("\"{task}\""), 3);
    }
    let outbox = Outbox::open(&config(dir.path())).unwrap();
    let expect: Vec<String> = (0..60)
        .filter(|i| *i != 7 && *i != 41)
        .map(|i| format!("task-{i}"))
        .collect();
    assert_eq!(pending_tasks(&outbox), expect);
    let stats = outbox.stats();
    assert_eq!(stats.log_damaged_ranges.load(Ordering::Relaxed), 2);
    assert!(stats.log_damaged_bytes.load(Ordering::Relaxed) > 0);
    let status = outbox.status().unwrap();
    assert_eq!(status.damage.len(), 2, "{:?}", status.damage);
    assert!(status.damage[0].starts_with("pending log damaged: pending/"));
    let letters = outbox.dead_letters(10).unwrap();
    assert_eq!(letters.len(), 2);
    for letter in &letters {
        assert!(
            letter.reason.starts_with("damaged pending log"),
            "{}",
            letter.reason
        );
        let raw = letter.raw_hex.as_deref().unwrap();
        assert!(raw.len() > 100, "the record's raw bytes");
        assert_eq!(letter.truncated_from, None);
    }
    // Requeueing never takes bytes nobody can vouch for.
    assert_eq!(outbox.requeue_dead().await.unwrap(), 0);
    outbox.close().await;

    // Found again at the next start, but kept only once.
    let outbox = Outbox::open(&config(dir.path())).unwrap();
    assert_eq!(pending_tasks(&outbox).len(), 58);
    assert_eq!(outbox.dead_letters(10).unwrap().len(), 2);
    assert_eq!(
        outbox.stats().log_damaged_ranges.load(Ordering::Relaxed),
        2,
        "still reported while the damaged segments exist"
    );
    outbox.close().await;
}

/// A damaged `outbox.redb` is set aside: the pending log is delivered, the
/// dedup records of its events come back from it, and it says what is lost.
#[tokio::test]
async fn a_damaged_task_store_is_set_aside_and_the_log_still_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(&config(dir.path())).unwrap();
    fill(&outbox, 20).await;
    outbox
        .bury(callback("buried", "fail"), "refused".into())
        .await
        .unwrap();
    outbox.close().await;
    let store = dir.path().join("outbox.redb");
    let mut bytes = std::fs::read(&store).unwrap();
    for b in &mut bytes[..4096] {
        *b ^= 0x3c;
    }
    std::fs::write(&store, &bytes).unwrap();

    let outbox = Outbox::open(&config(dir.path())).unwrap();
    assert_eq!(pending_tasks(&outbox).len(), 20);
    assert_eq!(outbox.stats().stores_set_aside.load(Ordering::Relaxed), 1);
    let status = outbox.status().unwrap();
    assert_eq!(
        status.dead_letters, 0,
        "the dead letters were in the damaged file"
    );
    assert!(
        status.damage[0].starts_with("outbox.redb damaged"),
        "{:?}",
        status.damage
    );
    let aside: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("outbox.redb.damaged-"))
        .collect();
    assert_eq!(aside.len(), 1, "kept for recovery");
    assert_eq!(std::fs::read(dir.path().join(&aside[0])).unwrap(), bytes);
    // The dedup records of what is in the log are back.
    let again = outbox.append(callback("task-3", "generating")).await;
    assert_eq!(again, Ok(Appended::Duplicate));
    outbox.close().await;
}

#[tokio::test]
async fn dead_letters_are_capped_by_count_and_bytes_oldest_first() {
    let (_dir, outbox) = fresh(|c| {
        c.max_dead_letters = 3;
    });
    let mut seqs = Vec::new();
    for i in 0..5 {
        let event = callback(&format!("d{i}"), "fail");
        seqs.push(outbox.bury(event, "refused".into()).await.unwrap());
    }
    let kept: Vec<u64> = outbox
        .dead_letters(10)
        .unwrap()
        .iter()
        .map(|l| l.seq)
        .collect();
    assert_eq!(kept, seqs[2..]);
    assert_eq!(outbox.status().unwrap().dead_letters, 3);
    assert_eq!(outbox.stats().dead_dropped.load(Ordering::Relaxed), 2);
    outbox.close().await;

    // By bytes: letters of about 2 KiB (1 KiB kept, hex-encoded) under a
    // cap of 8 KiB.
    let dir = tempfile::tempdir().unwrap();
    let config = OutboxConfig {
        dead_letter_keep_bytes: 1024,
        max_dead_letter_bytes: 8192,
        ..config(dir.path())
    };
    let outbox = Outbox::open(&config).unwrap();
    for i in 0..6u8 {
        outbox
            .bury_raw(&[i; 3000], "unreadable".into())
            .await
            .unwrap();
    }
    let letters = outbox.dead_letters(10).unwrap();
    let sizes: Vec<usize> = letters
        .iter()
        .map(|l| serde_json::to_vec(l).unwrap().len())
        .collect();
    assert_eq!(letters.len(), 3, "the newest that fit: {sizes:?}");
    assert_eq!(letters[2].raw_hex.as_deref(), Some(&*"05".repeat(1024)));
    assert_eq!(letters[2].truncated_from, Some(3000));
    assert_eq!(outbox.stats().dead_dropped.load(Ordering::Relaxed), 3);
    outbox.close().await;
    // The count and the bytes carry over a restart.
    let outbox = Outbox::open(&config).unwrap();
    outbox
        .bury_raw(&[9; 3000], "unreadable".into())
        .await
        .unwrap();
    assert_eq!(outbox.dead_letters(10).unwrap().len(), 3);
    outbox.close().await;
}

/// An event the broker refuses as too large keeps a bounded copy, says so,
/// and is never requeued cut.
#[tokio::test]
async fn an_oversize_event_keeps_a_bounded_copy_and_says_so() {
    let (_dir, outbox) = fresh(|c| {
        c.dead_letter_keep_bytes = 1024;
    });
    let body = format!(
        r#"{{"taskId":"big","state":"success","output":[{{"url":"https://x/{}"}}]}}"#,
        "v".repeat(5000)
    );
    let event = parse(body.as_bytes(), Source::Webhook, 1).unwrap();
    let Ok(Appended::New { seq }) = outbox.append(event).await else {
        panic!("stored")
    };
    let stored = outbox.read_batch(1, 1).unwrap().ready[0].payload.clone();
    outbox
        .complete(vec![], vec![(seq, "message too large".into())])
        .await
        .unwrap();
    let letter = outbox.dead_letter(seq).unwrap().unwrap();
    assert_eq!(letter.truncated_from, Some(stored.len() as u64));
    assert_eq!(letter.event, serde_json::Value::Null);
    assert_eq!(letter.raw_hex.as_deref(), Some(&*hex(&stored[..1024])));
    assert!(
        letter.reason.starts_with("message too large (the event is"),
        "{}",
        letter.reason
    );
    assert_eq!(outbox.requeue_dead().await.unwrap(), 0);
    outbox.close().await;
}

/// Once everything is acknowledged, the segment being written is emptied
/// in place; the dedup records the task store lacks are carried over into
/// it, so dedup and numbering go on across a restart.
#[tokio::test]
async fn the_segment_being_written_is_emptied_once_nothing_is_pending() {
    let dir = tempfile::tempdir().unwrap();
    let config = OutboxConfig {
        segment_bytes: 1 << 20,
        ..config(dir.path())
    };
    let outbox = Outbox::open(&config).unwrap();
    let seqs = fill(&outbox, 30).await;
    let files = segments(dir.path());
    assert_eq!(files.len(), 1);
    let records = |f: &Path| {
        let bytes = std::fs::read(f).unwrap();
        bytes.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1)
    };
    assert!(records(&files[0]) > 4096);
    outbox.complete(seqs[..29].to_vec(), vec![]).await.unwrap();
    assert!(records(&files[0]) > 4096, "one event is still pending");
    outbox.complete(seqs[29..].to_vec(), vec![]).await.unwrap();
    assert_eq!(
        segments(dir.path()),
        files,
        "emptied in place, not replaced"
    );
    let carried = std::fs::metadata(&files[0]).unwrap().len();
    // The header, then one frame of 30 dedup records (task id with its
    // length, the 49-byte record).
    let each: u64 = (0..30)
        .map(|i| 2 + format!("task-{i}").len() as u64 + 49)
        .sum();
    assert_eq!(carried, 8 + 8 + 9 + each);
    outbox.close().await;

    let outbox = Outbox::open(&config).unwrap();
    assert_eq!(outbox.status().unwrap().pending, 0);
    assert_eq!(outbox.status().unwrap().tasks_tracked, 30);
    for i in 0..30 {
        let again = outbox
            .append(callback(&format!("task-{i}"), "generating"))
            .await;
        assert_eq!(again, Ok(Appended::Duplicate), "task-{i}");
    }
    match outbox.append(callback("next", "generating")).await {
        Ok(Appended::New { seq }) => assert!(seq > seqs[29], "{seq} reuses a number"),
        other => panic!("{other:?}"),
    }
    outbox.close().await;
}

/// A dropped outbox (its start failed further on, say) is not left
/// running: the writer commits what was queued and is joined, so the data
/// dir opens again at once, with what was accepted.
#[tokio::test(flavor = "multi_thread")]
async fn dropping_the_last_handle_joins_the_writer_thread() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(&config(dir.path())).unwrap();
    fill(&outbox, 3).await;
    let stats = outbox.inner.stats.clone();
    drop(outbox);
    assert_eq!(
        Arc::strong_count(&stats),
        1,
        "the writer thread has ended and let go of its share"
    );
    let again = Outbox::open(&config(dir.path())).expect("the data dir opens again at once");
    assert_eq!(pending_tasks(&again), ["task-0", "task-1", "task-2"]);
    again.close().await;
}

/// A panic in a blocking task of the outbox (the relay's read) is reported
/// as a panic, with its message, never as "shutting down".
#[tokio::test]
async fn a_panicked_blocking_task_is_reported_as_a_panic() {
    let failed = tokio::task::spawn_blocking(|| -> u64 { panic!("a bug in the read") })
        .await
        .map_err(OutboxError::from_join);
    match failed {
        Err(OutboxError::Panicked(message)) => assert_eq!(message, "a bug in the read"),
        other => panic!("{other:?}"),
    }
}
