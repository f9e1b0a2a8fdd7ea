//! The relay against the real outbox and a scripted publisher: batches
//! bounded in bytes, and per-event refusals that never hold the others up.

use std::sync::Mutex;

use futures::future::BoxFuture;
use futures::FutureExt;

use super::*;
use crate::config::OutboxConfig;
use crate::event::{parse, Source};
use crate::publish::EncodeError;

/// Refuses (where it goes) every event whose task starts with `bad`,
/// acknowledges the others, and remembers what it was given.
#[derive(Default)]
struct Scripted {
    batches: Mutex<Vec<Vec<String>>>,
}

impl Publisher for Scripted {
    fn name(&self) -> &'static str {
        "scripted"
    }

    fn encode(&self, o: &Outgoing) -> Result<Encoded, EncodeError> {
        Ok(Encoded {
            seq: o.seq,
            destination: "d".into(),
            key: o.meta.task_id.clone(),
            id: o.meta.event_id.clone(),
            headers: Vec::new(),
            payload: o.payload.clone(),
        })
    }

    fn publish<'a>(&'a self, batch: &'a [Encoded]) -> BoxFuture<'a, Vec<Published>> {
        let keys = batch.iter().map(|m| m.key.clone()).collect();
        crate::sync::lock(&self.batches).push(keys);
        let results = batch
            .iter()
            .map(|m| {
                if m.key.starts_with("bad") {
                    Err(PublishError::Refused("no stream for the subject".into()))
                } else {
                    Ok(crate::publish::Receipt::default())
                }
            })
            .collect();
        async move { results }.boxed()
    }

    fn flush(&self, _: Duration) -> BoxFuture<'_, ()> {
        async {}.boxed()
    }
}

/// An outbox in a new temporary dir (kept while the first value lives)
/// whose relay tries a refused event `attempts` times, waiting from
/// `initial_ms` up to `max_ms` in between.
fn retrying(attempts: u32, initial_ms: u64, max_ms: u64) -> (tempfile::TempDir, Outbox) {
    let dir = tempfile::tempdir().unwrap();
    let outbox = outbox(
        dir.path(),
        OutboxConfig {
            refusal_attempts: attempts,
            retry_initial_ms: initial_ms,
            retry_max_ms: max_ms,
            ..OutboxConfig::default()
        },
    );
    (dir, outbox)
}

/// A relay of `outbox` to a [`Scripted`] publisher, and the publisher.
fn scripted_relay(outbox: &Outbox) -> (Arc<Scripted>, Relay) {
    let publisher = Arc::new(Scripted::default());
    (publisher.clone(), Relay::new(outbox.clone(), publisher))
}

fn outbox(dir: &std::path::Path, config: OutboxConfig) -> Outbox {
    Outbox::open(&OutboxConfig {
        data_dir: dir.to_path_buf(),
        ..config
    })
    .unwrap()
}

/// A callback of `task` whose JSON is about `pad` bytes long.
async fn append(outbox: &Outbox, task: &str, pad: usize) {
    let body = format!(
        r#"{{"taskId":"{task}","state":"success","output":[{{"url":"https://x.example/{}"}}]}}"#,
        "a".repeat(pad)
    );
    let event = parse(body.as_bytes(), Source::Webhook, 1).unwrap();
    outbox.append(event).await.unwrap();
}

#[tokio::test]
async fn a_batch_is_bounded_in_bytes_and_one_larger_event_goes_alone() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = outbox(dir.path(), OutboxConfig::default());
    for n in 0..6 {
        append(&outbox, &format!("t{n}"), 100_000).await;
    }
    let read = |max_bytes| {
        outbox
            .read_batch_within(100, max_bytes, 100, &HashMap::new())
            .unwrap()
            .ready
    };
    let two = read(250_000);
    assert_eq!(two.len(), 2, "two events of ~100 kB fit 250 kB");
    let bytes: usize = two.iter().map(|o| o.payload.len()).sum();
    assert!(bytes <= 250_000, "{bytes}");
    assert_eq!(
        read(1000).len(),
        1,
        "an event larger than the cap goes alone"
    );
    assert_eq!(read(u64::MAX).len(), 6);

    // The relay reads within `relay_batch_bytes`, step by step.
    outbox.close().await;
    let outbox = self::outbox(
        dir.path(),
        OutboxConfig {
            relay_batch_bytes: 250_000,
            ..OutboxConfig::default()
        },
    );
    let (_, mut relay) = scripted_relay(&outbox);
    for _ in 0..3 {
        assert_eq!(relay.run_once().await.unwrap().published, 2);
    }
    assert_eq!(outbox.status().unwrap().pending, 0);
    outbox.close().await;
}

#[tokio::test]
async fn a_refused_event_waits_alone_and_becomes_a_dead_letter_after_its_attempts() {
    let (_dir, outbox) = retrying(3, 1, 2);
    append(&outbox, "bad-1", 10).await;
    for n in 0..5 {
        append(&outbox, &format!("good-{n}"), 10).await;
    }
    let (publisher, mut relay) = scripted_relay(&outbox);

    let first = relay.run_once().await.unwrap();
    assert_eq!((first.published, first.refused), (5, 1), "{first:?}");
    assert_eq!(outbox.stats().refusing.load(Ordering::Relaxed), 1);
    // More good events while the refused one waits: they are not held up.
    for n in 5..8 {
        append(&outbox, &format!("good-{n}"), 10).await;
    }
    let next = relay.run_once().await.unwrap();
    assert_eq!(next.published, 3, "{next:?}");

    // Tried again only once due, then buried after its third refusal.
    let buried = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let step = relay.run_once().await.unwrap();
            if step.dead_lettered > 0 {
                return step;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the refused event is dead-lettered");
    assert_eq!(buried.dead_lettered, 1);
    let tries = crate::sync::lock(&publisher.batches)
        .iter()
        .flatten()
        .filter(|k| k.starts_with("bad"))
        .count();
    assert_eq!(tries, 3, "tried exactly refusal_attempts times");
    let letters = outbox.dead_letters(10).unwrap();
    assert_eq!(letters.len(), 1);
    assert!(
        letters[0].reason.contains("refused 3 times"),
        "{}",
        letters[0].reason
    );
    assert_eq!(letters[0].event["taskId"], "bad-1");
    assert_eq!(outbox.stats().refusing.load(Ordering::Relaxed), 0);
    assert_eq!(outbox.status().unwrap().pending, 0);
    outbox.close().await;
}

/// A held event keeps its task's later events back: per-task order holds.
#[tokio::test]
async fn a_held_event_keeps_its_tasks_later_events_back() {
    let (_dir, outbox) = retrying(1000, 60_000, 60_000);
    let generating = r#"{"taskId":"bad-order","state":"generating"}"#;
    let event = parse(generating.as_bytes(), Source::Webhook, 1).unwrap();
    outbox.append(event).await.unwrap();
    append(&outbox, "bad-order", 10).await;
    append(&outbox, "other", 10).await;
    let (publisher, mut relay) = scripted_relay(&outbox);
    relay.run_once().await.unwrap();
    relay.run_once().await.unwrap();
    let sent: Vec<Vec<String>> = crate::sync::lock(&publisher.batches).clone();
    assert_eq!(sent, [vec!["bad-order".to_string(), "other".into()]]);
    assert_eq!(outbox.status().unwrap().pending, 2);
    outbox.close().await;
}
