//! The held queue of verify mode: callbacks stored for the verifier
//! (`held`: seq -> [`Held`]), at most one per (taskId, state)
//! (`held_keys`), capped, and never clogged by an entry that cannot be read.

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata};
use serde::{Deserialize, Serialize};

use super::{encode, write, Registry, RegistryError, HELD, HELD_KEYS};
use crate::event::TaskEvent;

/// A callback stored for the verifier.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Held {
    #[serde(skip)]
    pub seq: u64,
    pub event: TaskEvent,
    pub attempts: u32,
    pub next_at: i64,
}

/// A held entry that cannot be decoded (written by another version, or
/// damaged): the verifier buries it with `error` as the reason.
#[derive(Debug, Clone, PartialEq)]
pub struct Unreadable {
    pub seq: u64,
    /// The stored bytes, whole.
    pub raw: Vec<u8>,
    pub error: String,
}

/// What [`Registry::held_due`] found.
#[derive(Debug, Default)]
pub struct HeldDue {
    /// Due callbacks, oldest first, at most one per task.
    pub held: Vec<Held>,
    pub unreadable: Vec<Unreadable>,
}

/// What became of a callback offered to [`Registry::hold`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holding {
    /// Stored (durably) under this sequence number.
    Held(u64),
    /// The same (taskId, state) is already awaiting verification.
    Duplicate,
    /// The held queue is at its cap; nothing stored.
    Full,
}

impl Registry {
    /// Stores a callback for the verifier unless the same (taskId, state)
    /// is already held or `max` callbacks are (in that order: a repeat is
    /// answered as held even when the queue is full). Durable when it
    /// returns `Held`.
    pub fn hold(&self, event: &TaskEvent, now: i64, max: u64) -> Result<Holding, RegistryError> {
        let outcome = self.db.with(|db| {
            let txn = write(db, true)?;
            let outcome = {
                let mut held = txn.open_table(HELD)?;
                let mut keys = txn.open_table(HELD_KEYS)?;
                let key = (event.task_id.as_str(), event.state.as_str());
                let existing = keys.get(key)?.map(|seq| seq.value());
                // A key whose entry was released some other way is stale.
                if let Some(seq) = existing {
                    if held.get(seq)?.is_some() {
                        return Ok(Holding::Duplicate);
                    }
                }
                if held.len()? >= max {
                    return Ok(Holding::Full);
                }
                let seq = held.last()?.map_or(1, |(k, _)| k.value() + 1);
                let entry = Held {
                    seq,
                    event: event.clone(),
                    attempts: 0,
                    next_at: now,
                };
                held.insert(seq, encode(&entry).as_slice())?;
                keys.insert(key, seq)?;
                Holding::Held(seq)
            };
            txn.commit()?;
            Ok(outcome)
        })?;
        if matches!(outcome, Holding::Held(_)) {
            self.held_added.notify_one();
        }
        Ok(outcome)
    }

    /// Held callbacks due for verification, oldest first, at most one per
    /// task (so a task's callbacks are appended in the order they came), and
    /// every entry met that cannot be read.
    pub fn held_due(&self, now: i64, limit: usize) -> Result<HeldDue, RegistryError> {
        self.db.with(|db| {
            let txn = db.begin_read()?;
            let held = txn.open_table(HELD)?;
            let mut out = HeldDue::default();
            let mut tasks = std::collections::HashSet::new();
            for entry in held.iter()? {
                if out.held.len() + out.unreadable.len() >= limit {
                    break;
                }
                let (k, v) = entry?;
                match serde_json::from_slice::<Held>(v.value()) {
                    Ok(mut h) => {
                        // A task's later callback waits for its earlier one.
                        if tasks.insert(h.event.task_id.clone()) && h.next_at <= now {
                            h.seq = k.value();
                            out.held.push(h);
                        }
                    }
                    Err(e) => out.unreadable.push(Unreadable {
                        seq: k.value(),
                        raw: v.value().to_vec(),
                        error: e.to_string(),
                    }),
                }
            }
            Ok(out)
        })
    }

    /// The earliest next verification attempt (an unreadable entry is due
    /// at once).
    pub fn next_held(&self) -> Result<Option<i64>, RegistryError> {
        self.db.with(|db| {
            let txn = db.begin_read()?;
            let held = txn.open_table(HELD)?;
            let mut next = None;
            for entry in held.iter()? {
                let (_, v) = entry?;
                let at = serde_json::from_slice::<Held>(v.value()).map_or(0, |h| h.next_at);
                next = Some(next.map_or(at, |n: i64| n.min(at)));
            }
            Ok(next)
        })
    }

    /// Deletes settled held callbacks (by sequence number) and reschedules
    /// the others.
    pub fn settle_held(&self, released: &[u64], retry: &[Held]) -> Result<(), RegistryError> {
        if released.is_empty() && retry.is_empty() {
            return Ok(());
        }
        self.db.with(|db| {
            let txn = write(db, !released.is_empty())?;
            {
                let mut held = txn.open_table(HELD)?;
                let mut keys = txn.open_table(HELD_KEYS)?;
                for seq in released {
                    let removed = held
                        .remove(*seq)?
                        .and_then(|v| serde_json::from_slice::<Held>(v.value()).ok());
                    if let Some(h) = removed {
                        let key = (h.event.task_id.as_str(), h.event.state.as_str());
                        if keys.get(key)?.is_some_and(|s| s.value() == *seq) {
                            keys.remove(key)?;
                        }
                    }
                }
                for h in retry {
                    held.insert(h.seq, encode(h).as_slice())?;
                }
            }
            txn.commit()?;
            Ok(())
        })
    }
}
