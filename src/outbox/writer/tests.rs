use super::*;
use crate::event::testing::callback;
use crate::event::{parse, Source};

/// An append of this task fails as a write error would, after its
/// command was taken from the group.
pub(super) const FAIL_TASK: &str = "fail-in-the-middle";
/// An append of this task panics inside the transaction.
pub(super) const PANIC_TASK: &str = "panic-in-the-middle";

pub(super) fn injected() -> OutboxError {
    OutboxError::Db(redb::Error::from(redb::StorageError::from(
        std::io::Error::other("injected write error"),
    )))
}

type Answer = oneshot::Receiver<Result<Appended, AppendError>>;

/// An append of `task`'s `generating`, and where its answer comes.
fn append_command(task: &str) -> (Command, Answer) {
    let event = callback(task, "generating");
    let (reply, answer) = oneshot::channel();
    let payload = serde_json::to_vec(&event).unwrap();
    let event = Box::new(event);
    let command = Command::Append {
        event,
        payload,
        trusted: false,
        reply,
    };
    (command, answer)
}

fn append(tx: &mpsc::Sender<Command>, task: &str) -> Answer {
    let (command, answer) = append_command(task);
    tx.blocking_send(command).unwrap();
    answer
}

/// A writer thread on the outbox in `dir` (default settings), fed by
/// `rx`, with its counters and its database.
fn start_writer(
    dir: &std::path::Path,
    rx: mpsc::Receiver<Command>,
) -> (std::thread::JoinHandle<()>, Arc<Stats>, Arc<DbCell>) {
    let config = OutboxConfig {
        data_dir: dir.to_path_buf(),
        ..OutboxConfig::default()
    };
    let db = Arc::new(
        DbCell::open(
            dir.join("outbox.redb"),
            1 << 20,
            "outbox",
            super::super::store::probe,
        )
        .unwrap()
        .0,
    );
    let stats = Arc::new(Stats::default());
    let shared = Arc::new(Shared::new(dir));
    let writer = Writer::start(
        db.clone(),
        config,
        stats.clone(),
        Arc::default(),
        shared,
        rx,
    )
    .unwrap();
    (writer, stats, db)
}

#[test]
fn the_writer_survives_a_panicking_group() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, rx) = mpsc::channel(16);
    let (writer, stats, _) = start_writer(dir.path(), rx);
    assert!(append(&tx, PANIC_TASK).blocking_recv().is_err(), "refused");
    // Refused at once until the database is re-opened, then stored.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match append(&tx, "after").blocking_recv() {
            Ok(Ok(Appended::New { seq })) => {
                assert_eq!(seq, 1, "the refused group used no sequence number");
                break;
            }
            Ok(Err(AppendError::Storage(_))) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            other => panic!("stored after the restart, got {other:?}"),
        }
    }
    assert!(!stats.storage_failing.load(Ordering::Relaxed));
    tx.blocking_send(Command::Stop).unwrap();
    writer.join().unwrap();
}

#[test]
fn a_group_that_fails_part_way_answers_every_command_with_the_error() {
    let dir = tempfile::tempdir().unwrap();
    // Queued before the thread starts, so they form one group.
    let (tx, rx) = mpsc::channel(16);
    let mut appends = Vec::new();
    for task in ["before", FAIL_TASK, "after"] {
        let (command, answer) = append_command(task);
        tx.try_send(command).unwrap();
        appends.push(answer);
    }
    let (reply, completed) = oneshot::channel();
    let complete = Command::Complete {
        delivered: vec![],
        dead: vec![],
        reply,
    };
    tx.try_send(complete).unwrap();
    tx.try_send(Command::Stop).unwrap();
    let (writer, stats, _) = start_writer(dir.path(), rx);
    writer.join().unwrap();

    for answer in appends {
        match answer.blocking_recv() {
            Ok(Err(AppendError::Storage(m))) => assert!(m.contains("injected"), "{m}"),
            other => panic!("every append gets the storage error, got {other:?}"),
        }
    }
    assert!(matches!(
        completed.blocking_recv(),
        Ok(Err(OutboxError::Db(_)))
    ));
    assert_eq!(stats.pending.load(Ordering::Relaxed), 0, "nothing counted");
    assert!(stats.storage_failing.load(Ordering::Relaxed));
}

fn outbox_in(dir: &std::path::Path, window_secs: u64) -> super::super::Outbox {
    super::super::Outbox::open(&OutboxConfig {
        data_dir: dir.to_path_buf(),
        dedup_window_secs: window_secs,
        ..OutboxConfig::default()
    })
    .unwrap()
}

/// Stores `state` for the tasks `t0`.. (`n` of them).
async fn stored_tasks(outbox: &super::super::Outbox, n: usize, state: &str) {
    for i in 0..n {
        let event = callback(&format!("t{i}"), state);
        assert!(outbox.append(event).await.unwrap().is_stored());
    }
}

#[tokio::test]
async fn pruning_passes_over_every_task_record_in_steps() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = outbox_in(dir.path(), 0);
    stored_tasks(&outbox, 10, "generating").await;
    // A zero window expires a record once the clock has moved past it.
    let seen = now_ms();
    let deadline = Instant::now() + Duration::from_secs(5);
    while now_ms() <= seen && Instant::now() < deadline {
        tokio::task::yield_now().await;
    }
    assert_eq!(outbox.status().unwrap().tasks_tracked, 10);
    assert_eq!(outbox.prune().await.unwrap(), 10, "more than one step");
    assert_eq!(outbox.status().unwrap().tasks_tracked, 0);
    assert_eq!(outbox.prune().await.unwrap(), 0, "a new pass finds none");
    outbox.close().await;
}

/// The records a prune step read as expired (off the writer) are looked at
/// again in the writer's transaction: one seen again since, or never
/// expired, keeps its record.
#[tokio::test]
async fn a_prune_step_deletes_only_records_still_expired() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = outbox_in(dir.path(), 3600);
    stored_tasks(&outbox, 2, "generating").await;
    let named = vec!["t0".to_string(), "missing".to_string()];
    assert_eq!(outbox.prune_step(named).await.unwrap(), 0);
    assert!(outbox.task("t0").unwrap().is_some());
    assert_eq!(outbox.status().unwrap().tasks_tracked, 2);
    outbox.close().await;

    let outbox = outbox_in(dir.path(), 0);
    let seen = now_ms();
    let deadline = Instant::now() + Duration::from_secs(5);
    while now_ms() <= seen && Instant::now() < deadline {
        tokio::task::yield_now().await;
    }
    assert_eq!(outbox.prune_step(vec!["t1".into()]).await.unwrap(), 1);
    assert!(outbox.task("t1").unwrap().is_none());
    assert!(outbox.task("t0").unwrap().is_some(), "not named: kept");
    outbox.close().await;
}

#[tokio::test]
async fn records_within_the_window_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = outbox_in(dir.path(), 3600);
    stored_tasks(&outbox, 7, "waiting").await;
    assert_eq!(outbox.prune().await.unwrap(), 0);
    assert_eq!(outbox.status().unwrap().tasks_tracked, 7);
    outbox.close().await;
}

#[tokio::test]
async fn a_data_dir_with_the_old_expiry_index_opens_and_drops_it() {
    use redb::{ReadableDatabase, TableHandle};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.redb");
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut tasks = txn.open_table(TASKS).unwrap();
            let record = TaskRecord {
                furthest: Some(crate::event::State::Waiting),
                accepted_at: [0, now_ms(), 0, 0, 0],
                last_seen: now_ms(),
                trusted: false,
            };
            tasks.insert("old", record.encode().as_slice()).unwrap();
            let mut expiry = txn.open_table(EXPIRY).unwrap();
            expiry.insert((now_ms() as u64, "old"), ()).unwrap();
        }
        txn.commit().unwrap();
    }
    let outbox = outbox_in(dir.path(), 3600);
    let old = outbox.task("old").unwrap().unwrap();
    assert_eq!(old.furthest, Some(crate::event::State::Waiting));
    let event = callback("old", "waiting");
    assert_eq!(outbox.append(event).await.unwrap(), Appended::Duplicate);
    outbox.close().await;
    let db = redb::Database::open(&path).unwrap();
    let txn = db.begin_read().unwrap();
    let names: Vec<String> = txn
        .list_tables()
        .unwrap()
        .map(|t| t.name().to_string())
        .collect();
    assert!(!names.iter().any(|n| n == "task_expiry"), "{names:?}");
}

/// A crash before the checkpoint loses no dedup record: the log
/// records carry them, and a restart reads them back.
#[tokio::test]
async fn dedup_records_not_yet_in_the_task_store_come_back_from_the_log() {
    use redb::ReadableDatabase;
    let dir = tempfile::tempdir().unwrap();
    let config = OutboxConfig {
        data_dir: dir.path().to_path_buf(),
        ..OutboxConfig::default()
    };
    let dir_path = dir.path().to_path_buf();
    tokio::task::spawn_blocking(move || {
        let (tx, rx) = mpsc::channel(16);
        let (writer, _, db) = start_writer(&dir_path, rx);
        let answer = append(&tx, "remembered").blocking_recv().unwrap().unwrap();
        assert!(answer.is_stored());
        // The thread ends without `Stop`, as in a crash: no checkpoint.
        drop(tx);
        writer.join().unwrap();
        let txn = db.get().unwrap().begin_read().unwrap();
        let tasks = txn.open_table(TASKS).unwrap();
        assert!(
            tasks.get("remembered").unwrap().is_none(),
            "not checkpointed"
        );
        drop((tasks, txn));
        db.close();
    })
    .await
    .unwrap();

    let outbox = super::super::Outbox::open(&config).unwrap();
    let record = outbox
        .task("remembered")
        .unwrap()
        .expect("read back from the log");
    assert_eq!(record.furthest, Some(crate::event::State::Generating));
    assert_eq!(outbox.status().unwrap().tasks_tracked, 1);
    let event = callback("remembered", "generating");
    assert_eq!(outbox.append(event).await.unwrap(), Appended::Duplicate);
    assert_eq!(outbox.status().unwrap().pending, 1);
    outbox.close().await;
}

/// A callback's model can be longer than a record's head holds: the
/// event and the ones after it are kept whole, and the relay reads the
/// model from the event's JSON, also after a restart.
#[tokio::test]
async fn a_model_longer_than_the_head_holds_comes_back_whole() {
    let dir = tempfile::tempdir().unwrap();
    // 80,000 bytes of two-byte characters.
    let model = "é".repeat(40_000);
    let body = format!(r#"{{"taskId":"long","state":"generating","model":"{model}"}}"#);
    let outbox = outbox_in(dir.path(), 3600);
    for event in [
        parse(body.as_bytes(), Source::Webhook, 1).unwrap(),
        callback("after", "generating"),
    ] {
        let answer = outbox.append(event).await.unwrap();
        assert!(matches!(answer, Appended::New { .. }), "{answer:?}");
    }
    let read = |outbox: &super::super::Outbox| {
        let batch = outbox.read_batch(10, 10).unwrap();
        assert!(batch.unreadable.is_empty(), "{:?}", batch.unreadable);
        batch.ready.into_iter().map(|o| o.meta).collect::<Vec<_>>()
    };
    let before = read(&outbox);
    assert_eq!(before.len(), 2);
    assert_eq!(before[0].task_id, "long");
    assert_eq!(before[0].model.as_deref(), Some(model.as_str()));
    outbox.close().await;
    let outbox = outbox_in(dir.path(), 3600);
    let after = read(&outbox);
    let ids = |metas: &[EventMeta]| metas.iter().map(|m| m.task_id.clone()).collect::<Vec<_>>();
    assert!(after == before, "{:?} after the restart", ids(&after));
    outbox.close().await;
}

/// Published events leave the disk: once acked and checkpointed, the
/// segments that held them are deleted, and what is still pending stays.
#[tokio::test]
async fn segments_are_deleted_once_their_events_are_published() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = outbox_in(dir.path(), 3600);
    let segments = || {
        std::fs::read_dir(dir.path().join("pending"))
            .unwrap()
            .count()
    };
    let mut seqs = Vec::new();
    for i in 0..200 {
        let event = callback(&format!("t{i}"), "generating");
        match outbox.append(event).await.unwrap() {
            Appended::New { seq } => seqs.push(seq),
            other => panic!("{other:?}"),
        }
    }
    let before = segments();
    assert!(before > 3, "{before} segments of 4096 bytes");
    let (published, kept) = seqs.split_at(190);
    outbox.complete(published.to_vec(), vec![]).await.unwrap();
    // A prune step checkpoints the dedup records first.
    outbox.prune().await.unwrap();
    let after = segments();
    assert!(after <= 2, "{before} segments before, {after} after");
    let batch = outbox.read_batch(100, 100).unwrap();
    let left: Vec<u64> = batch.ready.iter().map(|o| o.seq).collect();
    assert_eq!(left, kept);
    outbox.close().await;
    let outbox = outbox_in(dir.path(), 3600);
    assert_eq!(outbox.status().unwrap().pending, 10);
    assert_eq!(outbox.status().unwrap().tasks_tracked, 200);
    outbox.close().await;
}

/// Checkpoints run beside the appends: whatever layer holds a task's
/// record at a given moment (this group, the changed ones, the
/// checkpoint in flight, the store), every repeat is caught.
#[tokio::test]
async fn checkpoints_in_the_background_lose_no_record() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = outbox_in(dir.path(), 3600);
    let event = |i: usize| callback(&format!("t{i}"), "generating");
    let stored = |outbox: &super::super::Outbox| {
        use redb::{ReadableDatabase, ReadableTableMetadata};
        let db = outbox.inner.db.get().unwrap();
        let txn = db.begin_read().unwrap();
        txn.open_table(TASKS).unwrap().len().unwrap()
    };
    for round in 0..3 {
        for i in 0..400 {
            let answer = outbox.append(event(i)).await.unwrap();
            match round {
                0 => assert!(answer.is_stored(), "t{i}: {answer:?}"),
                _ => assert_eq!(answer, Appended::Duplicate, "t{i}, round {round}"),
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while stored(&outbox) < CHECKPOINT_RECORDS as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let in_store = stored(&outbox);
    assert!(
        in_store >= CHECKPOINT_RECORDS as u64,
        "{in_store} in the store"
    );
    assert_eq!(outbox.status().unwrap().tasks_tracked, 400);
    outbox.close().await;
    let outbox = outbox_in(dir.path(), 3600);
    assert_eq!(outbox.status().unwrap().tasks_tracked, 400);
    assert_eq!(stored(&outbox), 400, "the last checkpoint at close");
    for i in 0..400 {
        assert_eq!(outbox.append(event(i)).await.unwrap(), Appended::Duplicate);
    }
    outbox.close().await;
}
