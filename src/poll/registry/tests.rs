use super::*;
use crate::event::{Source, State};

fn registration(at: i64, next: i64) -> Registration {
    Registration {
        token: Some("t".into()),
        origin: Origin::Created,
        registered_at: at,
        next_poll_at: next,
        attempts: 0,
        done: false,
        last_event: None,
        last_error: None,
    }
}

fn open(dir: &Path) -> Registry {
    Registry::open(dir, RegistryOptions::default()).unwrap()
}

fn callback(task_id: &str, state: &str) -> TaskEvent {
    let body = serde_json::json!({"taskId": task_id, "state": state});
    crate::event::from_value(body, Source::Webhook, 5).unwrap()
}

#[test]
fn due_order_updates_and_pruning() {
    let dir = tempfile::tempdir().unwrap();
    let registry = open(dir.path());
    assert!(registry.is_empty());
    assert!(registry.register("b", registration(1, 20)).unwrap().1);
    assert!(!registry.is_empty());
    assert!(registry.register("a", registration(2, 10)).unwrap().1);
    let (kept, new) = registry.register("a", registration(3, 99)).unwrap();
    assert!(!new, "a second registration keeps the first");
    assert_eq!(kept.next_poll_at, 10);

    let due: Vec<_> = registry
        .due(15, 10)
        .unwrap()
        .tasks
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(due, ["a"]);
    assert_eq!(registry.next_due().unwrap(), Some(10));

    let mut a = registry.get("a").unwrap().unwrap();
    a.next_poll_at = 30;
    a.attempts = 1;
    let mut b = registry.get("b").unwrap().unwrap();
    b.done = true;
    registry.save(&[("a".into(), a), ("b".into(), b)]).unwrap();
    assert_eq!(registry.next_due().unwrap(), Some(30));
    assert_eq!(registry.counts().unwrap(), (1, 0));
    assert!(registry.get("b").unwrap().unwrap().done);

    assert_eq!(registry.prune(2, 100).unwrap(), 1, "b registered at 1");
    assert!(registry.get("b").unwrap().is_none());
}

/// A registration older than the retention is kept while its task is not
/// finished (its deadline may lie further out), and pruned once it is.
#[test]
fn unfinished_registrations_are_pruned_only_once_finished() {
    let dir = tempfile::tempdir().unwrap();
    let registry = open(dir.path());
    registry.register("slow", registration(1, 50)).unwrap();
    assert_eq!(registry.prune(1_000, 100).unwrap(), 0);
    assert_eq!(
        registry.prune(1_000, 100).unwrap(),
        0,
        "set aside, not rescanned"
    );
    assert_eq!(registry.due(60, 10).unwrap().tasks.len(), 1, "still polled");

    let mut slow = registry.get("slow").unwrap().unwrap();
    slow.done = true;
    registry.save(&[("slow".into(), slow)]).unwrap();
    assert_eq!(registry.prune(1_000, 100).unwrap(), 1);
    assert!(registry.get("slow").unwrap().is_none());
    assert_eq!(registry.counts().unwrap(), (0, 0));

    // Without a reconciler nothing would ever finish them: pruned by age.
    let dir = tempfile::tempdir().unwrap();
    let options = RegistryOptions {
        reconciled: false,
        ..RegistryOptions::default()
    };
    let registry = Registry::open(dir.path(), options).unwrap();
    registry.register("idle", registration(1, 50)).unwrap();
    assert_eq!(registry.prune(1_000, 100).unwrap(), 1);
    assert_eq!(registry.counts().unwrap(), (0, 0));
    assert_eq!(registry.next_due().unwrap(), None);
}

#[test]
fn held_callbacks_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (callback("task_1", "success"), callback("task_2", "success"));
    {
        let registry = open(dir.path());
        assert_eq!(registry.hold(&one, 100, 10).unwrap(), Holding::Held(1));
        assert_eq!(registry.hold(&two, 200, 10).unwrap(), Holding::Held(2));
    }
    let registry = open(dir.path());
    let due = registry.held_due(150, 10).unwrap();
    assert_eq!(due.held.len(), 1);
    assert_eq!((due.held[0].seq, &due.held[0].event), (1, &one));
    let mut retry = due.held[0].clone();
    retry.next_at = 500;
    registry.settle_held(&[2], &[retry]).unwrap();
    assert_eq!(registry.next_held().unwrap(), Some(500));
    assert_eq!(registry.counts().unwrap(), (0, 1));
}

#[test]
fn held_callbacks_are_deduplicated_ordered_per_task_and_capped() {
    let dir = tempfile::tempdir().unwrap();
    let registry = open(dir.path());
    let generating = callback("task_1", "generating");
    assert_eq!(registry.hold(&generating, 1, 3).unwrap(), Holding::Held(1));
    for _ in 0..100 {
        assert_eq!(
            registry.hold(&generating, 1, 3).unwrap(),
            Holding::Duplicate
        );
    }
    assert_eq!(
        registry.hold(&callback("task_1", "success"), 1, 3).unwrap(),
        Holding::Held(2)
    );
    assert_eq!(
        registry.hold(&callback("task_2", "fail"), 1, 3).unwrap(),
        Holding::Held(3)
    );
    assert_eq!(
        registry.hold(&callback("task_3", "fail"), 1, 3).unwrap(),
        Holding::Full
    );
    assert_eq!(
        registry.hold(&generating, 1, 3).unwrap(),
        Holding::Duplicate,
        "a repeat is not refused when full"
    );
    let due = registry.held_due(10, 10).unwrap();
    let seqs: Vec<u64> = due.held.iter().map(|h| h.seq).collect();
    assert_eq!(seqs, [1, 3], "task_1's success waits for its generating");

    // Released: the same state may be held again.
    registry.settle_held(&[1], &[]).unwrap();
    assert!(matches!(
        registry.hold(&generating, 1, 3).unwrap(),
        Holding::Held(_)
    ));
    assert_eq!(due.held[0].event.state, State::Generating);
}

#[test]
fn unreadable_held_entries_are_reported_not_skipped() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = Database::create(dir.path().join("tasks.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut held = txn.open_table(HELD).unwrap();
            held.insert(7, b"\xffnot json".as_slice()).unwrap();
            held.insert(8, br#"{"event": 1}"#.as_slice()).unwrap();
        }
        txn.commit().unwrap();
    }
    let registry = open(dir.path());
    assert_eq!(registry.next_held().unwrap(), Some(0), "due at once");
    let due = registry.held_due(1, 10).unwrap();
    assert!(due.held.is_empty());
    let seqs: Vec<u64> = due.unreadable.iter().map(|u| u.seq).collect();
    assert_eq!(seqs, [7, 8]);
    assert_eq!(due.unreadable[0].raw, b"\xffnot json");
    assert!(!due.unreadable[1].error.is_empty());
    registry.settle_held(&seqs, &[]).unwrap();
    assert_eq!(registry.counts().unwrap(), (0, 0));
}

/// The page cache is the configured size, not redb's 1 GiB default: with a
/// 1 MiB cache, ~8 MiB of registrations evict pages and the cache stays
/// within its size; with 64 MiB nothing is evicted. (The counters need
/// redb's `cache_metrics` feature, enabled for tests only.)
#[test]
fn the_page_cache_has_the_configured_size() {
    let stats_with = |cache_bytes: usize| {
        let dir = tempfile::tempdir().unwrap();
        let options = RegistryOptions {
            cache_bytes,
            reconciled: true,
        };
        let registry = Registry::open(dir.path(), options).unwrap();
        let updates: Vec<_> = (0..32)
            .map(|i| {
                let mut r = registration(i, i);
                r.last_error = Some(format!("{i}{}", "e".repeat(256 * 1024)));
                (format!("task_{i}"), r)
            })
            .collect();
        for (task_id, r) in &updates {
            registry.register(task_id, r.clone()).unwrap();
        }
        registry.save(&updates).unwrap();
        assert_eq!(registry.due(i64::MAX, 1_000).unwrap().tasks.len(), 32);
        registry.db.with(|db| Ok(db.cache_stats())).unwrap()
    };
    let small = stats_with(1024 * 1024);
    assert!(small.evictions() > 0, "{small:?}");
    assert!(small.used_bytes() <= 2 * 1024 * 1024, "{small:?}");
    let large = stats_with(64 * 1024 * 1024);
    assert_eq!(large.evictions(), 0, "{large:?}");
}

/// A registration stays readable when its last polled record is not (a
/// record stored by a version whose event shape differed): the task keeps
/// its token and its place in the schedule.
#[test]
fn a_registration_with_an_unreadable_last_event_stays_readable() {
    let mut stored = serde_json::to_value(registration(1, 2)).unwrap();
    stored["lastEvent"] = serde_json::json!({"taskId": 5, "outputs": "not a list"});
    let r: Registration = serde_json::from_value(stored).unwrap();
    assert_eq!((r.token.as_deref(), r.last_event), (Some("t"), None));
    let mut with_event = registration(1, 2);
    with_event.last_event = Some(Box::new(callback("task_1", "generating")));
    let back: Registration = serde_json::from_slice(&encode(&with_event)).unwrap();
    assert_eq!(back, with_event);
}

/// A scheduled task whose registration cannot be read is reported (not met
/// at the head of the schedule forever) and can be forgotten.
#[test]
fn unreadable_registrations_are_reported_then_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    {
        let registry = open(dir.path());
        registry.register("good", registration(1, 20)).unwrap();
        registry.register("bad", registration(1, 10)).unwrap();
    }
    {
        let db = Database::create(dir.path().join("tasks.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(TASKS)
            .unwrap()
            .insert("bad", b"\x00damaged".as_slice())
            .unwrap();
        txn.commit().unwrap();
    }
    let registry = open(dir.path());
    assert!(
        matches!(registry.get("bad"), Err(RegistryError::Unreadable(_))),
        "not taken for unregistered"
    );
    let due = registry.due(100, 10).unwrap();
    assert_eq!(due.tasks.len(), 1);
    assert_eq!(due.unreadable.len(), 1);
    assert_eq!(due.unreadable[0].task_id, "bad");
    assert_eq!(
        due.unreadable[0].raw.as_deref(),
        Some(b"\x00damaged".as_slice())
    );
    registry.forget_unreadable(&due.unreadable).unwrap();
    assert_eq!(registry.next_due().unwrap(), Some(20));
    assert!(registry.get("bad").unwrap().is_none());
    assert_eq!(registry.counts().unwrap(), (1, 0));
}
