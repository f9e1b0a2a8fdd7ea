use super::*;
use crate::event::State;

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
    crate::event::testing::callback_at(task_id, state, 5)
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

fn held(task_id: &str, state: &str, from: &str, now: i64) -> Held {
    Held::new(&callback(task_id, state), from, b"{}", now)
}

fn limits(entries: u64) -> HeldLimits {
    HeldLimits {
        entries,
        bytes: u64::MAX,
        per_address: u64::MAX,
    }
}

#[test]
fn held_callbacks_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (
        held("task_1", "success", "", 100),
        held("task_2", "success", "", 200),
    );
    {
        let registry = open(dir.path());
        assert_eq!(registry.hold(&one, limits(10)).unwrap(), Holding::Held(1));
        assert_eq!(registry.hold(&two, limits(10)).unwrap(), Holding::Held(2));
    }
    let registry = open(dir.path());
    let due = registry.held_due(150, 10).unwrap();
    assert_eq!(due.held.len(), 1);
    assert_eq!(due.held[0], Held { seq: 1, ..one });
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
    let generating = held("task_1", "generating", "", 1);
    assert_eq!(
        registry.hold(&generating, limits(3)).unwrap(),
        Holding::Held(1)
    );
    for _ in 0..100 {
        assert_eq!(
            registry.hold(&generating, limits(3)).unwrap(),
            Holding::Duplicate
        );
    }
    assert_eq!(
        registry
            .hold(&held("task_1", "success", "", 1), limits(3))
            .unwrap(),
        Holding::Held(2)
    );
    assert_eq!(
        registry
            .hold(&held("task_2", "fail", "", 1), limits(3))
            .unwrap(),
        Holding::Held(3)
    );
    assert_eq!(
        registry
            .hold(&held("task_3", "fail", "", 1), limits(3))
            .unwrap(),
        Holding::Full(HeldCap::Entries)
    );
    assert_eq!(
        registry.hold(&generating, limits(3)).unwrap(),
        Holding::Duplicate,
        "a repeat is not refused when full"
    );
    let due = registry.held_due(10, 10).unwrap();
    let seqs: Vec<u64> = due.held.iter().map(|h| h.seq).collect();
    assert_eq!(seqs, [1, 3], "task_1's success waits for its generating");

    // Released: the same state may be held again.
    registry.settle_held(&[1], &[]).unwrap();
    assert!(matches!(
        registry.hold(&generating, limits(3)).unwrap(),
        Holding::Held(_)
    ));
    assert_eq!(due.held[0].state, State::Generating);
}

/// A held entry keeps the task id, the state, the receive time, the
/// address and a cut of the body; the queue is capped in bytes and per
/// address, and its byte count comes back to zero once it is empty.
#[test]
fn held_callbacks_are_small_and_capped_in_bytes_and_per_address() {
    let dir = tempfile::tempdir().unwrap();
    let registry = open(dir.path());
    let big = vec![b'x'; 1 << 20];
    let entry = Held::new(&callback("task_big", "success"), "10.0.0.9", &big, 1);
    assert_eq!(
        (entry.excerpt.len(), entry.body_bytes),
        (held::EXCERPT, 1 << 20)
    );
    let limits = HeldLimits {
        entries: 1000,
        bytes: 64 * 1024,
        per_address: 3,
    };
    assert_eq!(registry.hold(&entry, limits).unwrap(), Holding::Held(1));
    let (_, one) = registry.held_size().unwrap();
    assert!(one < 1024, "one held 1 MiB callback costs {one} bytes");
    for i in 0..2 {
        let h = Held::new(&callback(&format!("t{i}"), "success"), "10.0.0.9", &big, 1);
        assert!(matches!(
            registry.hold(&h, limits).unwrap(),
            Holding::Held(_)
        ));
    }
    let fourth = Held::new(&callback("t9", "success"), "10.0.0.9", &big, 1);
    assert_eq!(
        registry.hold(&fourth, limits).unwrap(),
        Holding::Full(HeldCap::Address)
    );
    let elsewhere = Held::new(&callback("t9", "success"), "10.0.0.7", &big, 1);
    assert!(matches!(
        registry.hold(&elsewhere, limits).unwrap(),
        Holding::Held(_)
    ));
    // Bytes: ids long enough that few fit in 64 KiB.
    let mut refused = None;
    for i in 0..200 {
        let id = format!("{i:0>500}");
        let h = Held::new(&callback(&id, "success"), &format!("10.1.{i}.1"), &big, 1);
        if let Holding::Full(cap) = registry.hold(&h, limits).unwrap() {
            refused = Some((i, cap));
            break;
        }
    }
    let (at, cap) = refused.expect("the byte cap is reached");
    assert_eq!(cap, HeldCap::Bytes);
    assert!(at > 30, "after {at}");
    let (count, bytes) = registry.held_size().unwrap();
    assert!(bytes <= limits.bytes, "{bytes}");
    let due = registry.held_due(10, 10_000).unwrap();
    let seqs: Vec<u64> = due.held.iter().map(|h| h.seq).collect();
    assert_eq!(seqs.len() as u64, count);
    registry.settle_held(&seqs, &[]).unwrap();
    assert_eq!(registry.held_size().unwrap(), (0, 0));
    assert!(
        matches!(registry.hold(&fourth, limits).unwrap(), Holding::Held(_)),
        "the address's share is free again"
    );
}

/// One address with many callbacks due cannot keep another's out of the
/// next step: due entries are taken round-robin across addresses.
#[test]
fn held_callbacks_are_taken_round_robin_across_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let registry = open(dir.path());
    for i in 0..50 {
        let h = held(&format!("forged_{i}"), "success", "10.0.0.66", 1);
        registry.hold(&h, limits(1000)).unwrap();
    }
    registry
        .hold(&held("real", "success", "10.0.0.1", 1), limits(1000))
        .unwrap();
    let due = registry.held_due(10, 4).unwrap();
    let ids: Vec<&str> = due.held.iter().map(|h| h.task_id.as_str()).collect();
    assert_eq!(ids, ["real", "forged_0", "forged_1", "forged_2"]);
}

/// Writes `entries` into the held table of a new `tasks.redb` in `dir`, as
/// an earlier version or a damaged file would have them.
fn write_held(dir: &Path, entries: &[(u64, &[u8])]) {
    let db = Database::create(dir.join("tasks.redb")).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let mut held = txn.open_table(HELD).unwrap();
        for (seq, bytes) in entries {
            held.insert(*seq, *bytes).unwrap();
        }
    }
    txn.commit().unwrap();
}

/// Entries stored by earlier versions (the whole callback) still verify.
#[test]
fn held_entries_of_earlier_versions_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let old = serde_json::json!({"event": callback("task_old", "success"),
        "attempts": 2, "nextAt": 7});
    write_held(dir.path(), &[(4, &serde_json::to_vec(&old).unwrap())]);
    let registry = open(dir.path());
    let due = registry.held_due(10, 10).unwrap();
    assert_eq!(due.held.len(), 1);
    let h = &due.held[0];
    assert_eq!(
        (h.task_id.as_str(), h.state, h.attempts, h.received_at),
        ("task_old", State::Success, 2, 5)
    );
    assert!(registry.held_size().unwrap().1 > 0);
    registry.settle_held(&[4], &[]).unwrap();
    assert_eq!(registry.held_size().unwrap(), (0, 0));
}

#[test]
fn unreadable_held_entries_are_reported_not_skipped() {
    let dir = tempfile::tempdir().unwrap();
    write_held(dir.path(), &[(7, b"\xffnot json"), (8, br#"{"event": 1}"#)]);
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

#[test]
fn an_ipv6_sender_is_its_64() {
    let key = |ip: &str| held::sender_of(ip.parse().unwrap());
    assert_eq!(key("192.0.2.7"), "192.0.2.7");
    assert_eq!(key("::ffff:192.0.2.7"), "192.0.2.7");
    assert_eq!(key("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64");
    assert_eq!(key("2001:db8:1:2:bbbb::9"), key("2001:db8:1:2::1"));
}

/// Concurrent holds share commits and each gets its own answer: distinct
/// sequence numbers, and one place for copies of the same (taskId, state).
#[test]
fn concurrent_holds_are_committed_together_and_each_answered() {
    let dir = tempfile::tempdir().unwrap();
    let registry = open(dir.path());
    let outcomes: Vec<Holding> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..32)
            .map(|i| {
                let registry = &registry;
                scope.spawn(move || {
                    // Threads 16..32 repeat 0..16's callbacks.
                    let h = held(&format!("task_{}", i % 16), "success", "10.0.0.1", 1);
                    registry.hold(&h, limits(1000)).unwrap()
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let mut seqs: Vec<u64> = outcomes
        .iter()
        .filter_map(|o| match o {
            Holding::Held(seq) => Some(*seq),
            _ => None,
        })
        .collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=16).collect::<Vec<u64>>());
    let duplicates = outcomes
        .iter()
        .filter(|o| **o == Holding::Duplicate)
        .count();
    assert_eq!(duplicates, 16);
    assert_eq!(registry.counts().unwrap(), (0, 16));
}

/// A panic in a blocking call is reported as a panic, with its message,
/// never as "shutting down".
#[tokio::test]
async fn a_panicking_blocking_call_is_reported_as_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let registry = open(dir.path());
    let failed = registry
        .blocking(|_| -> Result<(), RegistryError> { panic!("a bug in the call") })
        .await;
    match failed {
        Err(RegistryError::Panicked(message)) => assert_eq!(message, "a bug in the call"),
        other => panic!("{other:?}"),
    }
    assert!(
        registry.blocking(|r| r.counts()).await.is_ok(),
        "usable after"
    );
}

/// A registry that cannot be read answers its counts with the error, never
/// with 0 (what /readyz and /admin/status show), and counts again once the
/// database is re-opened.
#[test]
fn counts_of_a_broken_database_are_an_error_not_zero() {
    let dir = tempfile::tempdir().unwrap();
    let registry = open(dir.path());
    registry.register("t1", registration(1, 2)).unwrap();
    registry.db.break_now();
    assert!(
        matches!(registry.counts(), Err(RegistryError::Reopening)),
        "{:?}",
        registry.counts()
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let counts = loop {
        match registry.counts() {
            Err(RegistryError::Reopening) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => break other,
        }
    };
    assert_eq!(counts.unwrap(), (1, 0));
}
