//! Registered tasks and callbacks awaiting verification, in their own redb
//! file (`<outbox.data_dir>/tasks.redb`), apart from the outbox so that the
//! outbox's single writer never waits for polling bookkeeping.
//!
//! Tables: `tasks` (taskId -> [`Registration`] as JSON), `due`
//! ((next_poll_at, taskId) for every task not done: the reconciler reads it
//! in order), `by_age` ((registered_at, taskId), for pruning) and `held`
//! (seq -> [`Held`]: callbacks stored for the verifier).
//!
//! Registrations and held callbacks are committed with fsync before the HTTP
//! answer; so is every change that ends a task or releases a held callback
//! (repeating one would bury a second dead letter). Plain schedule updates
//! are committed without fsync.
//!
//! Every method blocks on disk I/O: async callers go through
//! [`Registry::blocking`].

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::event::TaskEvent;

const TASKS: TableDefinition<&str, &[u8]> = TableDefinition::new("tasks");
const DUE: TableDefinition<(u64, &str), ()> = TableDefinition::new("due");
const BY_AGE: TableDefinition<(u64, &str), ()> = TableDefinition::new("by_age");
const HELD: TableDefinition<u64, &[u8]> = TableDefinition::new("held");

/// How the task came to hookbridge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// Created through `POST /tasks`: its callbacks must carry the token.
    Created,
    /// Registered through `POST /tasks/{taskId}/watch`: no token.
    Watched,
}

/// One registered task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Registration {
    /// The secret of the task's `callBackUrl` (tasks created through hookbridge).
    pub token: Option<String>,
    pub origin: Origin,
    /// Milliseconds since the epoch.
    pub registered_at: i64,
    pub next_poll_at: i64,
    /// Polls so far that found the task unfinished or failed.
    pub attempts: u32,
    /// Terminal event seen, or given up (dead letter): never polled again.
    pub done: bool,
    /// The last record polled, kept for the dead letter of a stuck task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_event: Option<Box<TaskEvent>>,
    /// The last polling error, for the same dead letter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

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

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot use data dir {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("task registry database: {0}")]
    Db(#[from] redb::Error),
    #[error("the task registry is shutting down")]
    Closed,
}

crate::redb_errors!(
    RegistryError:
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

/// Handle to the registry; cheap to clone.
#[derive(Clone)]
pub struct Registry {
    db: Arc<Database>,
    tasks_added: Arc<Notify>,
    held_added: Arc<Notify>,
    /// Registrations on disk (approximate after pruning): lets the webhook
    /// skip the lookup entirely where no task was ever registered.
    known: Arc<AtomicU64>,
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

impl Registry {
    pub fn open(dir: &Path) -> Result<Self, RegistryError> {
        let io_err = |source| RegistryError::DataDir {
            path: dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io_err)?;
        let db = Database::create(dir.join("tasks.redb"))?;
        let txn = db.begin_write()?;
        let known = txn.open_table(TASKS)?.len()?;
        txn.open_table(DUE)?;
        txn.open_table(BY_AGE)?;
        txn.open_table(HELD)?;
        txn.commit()?;
        Ok(Self {
            db: Arc::new(db),
            tasks_added: Arc::new(Notify::new()),
            held_added: Arc::new(Notify::new()),
            known: Arc::new(AtomicU64::new(known)),
        })
    }

    /// No task was ever registered (cheap: no disk access).
    pub fn is_empty(&self) -> bool {
        self.known.load(Ordering::Relaxed) == 0
    }

    /// Runs `f` on the blocking thread pool.
    pub async fn blocking<T, F>(&self, f: F) -> Result<T, RegistryError>
    where
        T: Send + 'static,
        F: FnOnce(&Registry) -> Result<T, RegistryError> + Send + 'static,
    {
        let this = self.clone();
        tokio::task::spawn_blocking(move || f(&this))
            .await
            .map_err(|_| RegistryError::Closed)?
    }

    fn write(&self, durable: bool) -> Result<redb::WriteTransaction, RegistryError> {
        let mut txn = self.db.begin_write()?;
        if !durable {
            txn.set_durability(Durability::None)?;
        }
        Ok(txn)
    }

    /// Registers a task unless it already is; returns the registration in
    /// force and whether it is new. Durable when it returns.
    pub fn register(
        &self,
        task_id: &str,
        registration: Registration,
    ) -> Result<(Registration, bool), RegistryError> {
        let txn = self.write(true)?;
        let outcome = {
            let mut tasks = txn.open_table(TASKS)?;
            let existing = tasks
                .get(task_id)?
                .and_then(|v| serde_json::from_slice::<Registration>(v.value()).ok());
            match existing {
                Some(existing) => (existing, false),
                None => {
                    tasks.insert(task_id, encode(&registration).as_slice())?;
                    let mut due = txn.open_table(DUE)?;
                    due.insert((registration.next_poll_at.max(0) as u64, task_id), ())?;
                    let mut by_age = txn.open_table(BY_AGE)?;
                    by_age.insert((registration.registered_at.max(0) as u64, task_id), ())?;
                    (registration, true)
                }
            }
        };
        txn.commit()?;
        if outcome.1 {
            self.known.fetch_add(1, Ordering::Relaxed);
            self.tasks_added.notify_one();
        }
        Ok(outcome)
    }

    pub fn get(&self, task_id: &str) -> Result<Option<Registration>, RegistryError> {
        let txn = self.db.begin_read()?;
        let tasks = txn.open_table(TASKS)?;
        Ok(tasks
            .get(task_id)?
            .and_then(|v| serde_json::from_slice(v.value()).ok()))
    }

    /// Tasks not done whose next poll is at or before `now`, earliest first.
    pub fn due(
        &self,
        now: i64,
        limit: usize,
    ) -> Result<Vec<(String, Registration)>, RegistryError> {
        let txn = self.db.begin_read()?;
        let (due, tasks) = (txn.open_table(DUE)?, txn.open_table(TASKS)?);
        let mut out = Vec::new();
        for entry in due.range::<(u64, &str)>(..=(now.max(0) as u64, "\u{10ffff}"))? {
            let (key, _) = entry?;
            let (_, task_id) = key.value();
            if let Some(r) = tasks.get(task_id)? {
                if let Ok(registration) = serde_json::from_slice(r.value()) {
                    out.push((task_id.to_string(), registration));
                }
            }
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// The earliest next poll of a task not done.
    pub fn next_due(&self) -> Result<Option<i64>, RegistryError> {
        let txn = self.db.begin_read()?;
        let due = txn.open_table(DUE)?;
        let first = due.first()?.map(|(k, _)| k.value().0 as i64);
        Ok(first)
    }

    /// Writes back what the reconciler decided. Fsynced only if a task ended.
    pub fn save(&self, updates: &[(String, Registration)]) -> Result<(), RegistryError> {
        if updates.is_empty() {
            return Ok(());
        }
        let txn = self.write(updates.iter().any(|(_, r)| r.done))?;
        {
            let mut tasks = txn.open_table(TASKS)?;
            let mut due = txn.open_table(DUE)?;
            for (task_id, registration) in updates {
                let old = tasks
                    .get(task_id.as_str())?
                    .and_then(|v| serde_json::from_slice::<Registration>(v.value()).ok());
                // Pruned meanwhile: nothing to update.
                let Some(old) = old else { continue };
                if !old.done {
                    due.remove((old.next_poll_at.max(0) as u64, task_id.as_str()))?;
                }
                if !registration.done {
                    due.insert(
                        (registration.next_poll_at.max(0) as u64, task_id.as_str()),
                        (),
                    )?;
                }
                tasks.insert(task_id.as_str(), encode(registration).as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Stores a callback for the verifier. Durable when it returns.
    pub fn hold(&self, event: &TaskEvent, now: i64) -> Result<u64, RegistryError> {
        let txn = self.write(true)?;
        let seq = {
            let mut held = txn.open_table(HELD)?;
            let seq = held.last()?.map_or(1, |(k, _)| k.value() + 1);
            let entry = Held {
                seq,
                event: event.clone(),
                attempts: 0,
                next_at: now,
            };
            held.insert(seq, encode(&entry).as_slice())?;
            seq
        };
        txn.commit()?;
        self.held_added.notify_one();
        Ok(seq)
    }

    /// Held callbacks due for verification, oldest first.
    pub fn held_due(&self, now: i64, limit: usize) -> Result<Vec<Held>, RegistryError> {
        let txn = self.db.begin_read()?;
        let held = txn.open_table(HELD)?;
        let mut out = Vec::new();
        for entry in held.iter()? {
            let (k, v) = entry?;
            if let Ok(mut h) = serde_json::from_slice::<Held>(v.value()) {
                if h.next_at <= now {
                    h.seq = k.value();
                    out.push(h);
                    if out.len() >= limit {
                        break;
                    }
                }
            }
        }
        Ok(out)
    }

    /// The earliest next verification attempt.
    pub fn next_held(&self) -> Result<Option<i64>, RegistryError> {
        let txn = self.db.begin_read()?;
        let held = txn.open_table(HELD)?;
        let mut next = None;
        for entry in held.iter()? {
            let (_, v) = entry?;
            if let Ok(h) = serde_json::from_slice::<Held>(v.value()) {
                next = Some(next.map_or(h.next_at, |n: i64| n.min(h.next_at)));
            }
        }
        Ok(next)
    }

    /// Deletes settled held callbacks and reschedules the others.
    pub fn settle_held(&self, released: &[u64], retry: &[Held]) -> Result<(), RegistryError> {
        if released.is_empty() && retry.is_empty() {
            return Ok(());
        }
        let txn = self.write(!released.is_empty())?;
        {
            let mut held = txn.open_table(HELD)?;
            for seq in released {
                held.remove(*seq)?;
            }
            for h in retry {
                held.insert(h.seq, encode(h).as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// (tasks not done, callbacks awaiting verification).
    pub fn counts(&self) -> Result<(u64, u64), RegistryError> {
        let txn = self.db.begin_read()?;
        Ok((txn.open_table(DUE)?.len()?, txn.open_table(HELD)?.len()?))
    }

    /// Forgets registrations older than `before` (ms), done or not: by then
    /// every deadline has passed and the outbox's dedup window is over.
    pub fn prune(&self, before: i64, limit: usize) -> Result<u64, RegistryError> {
        let txn = self.write(false)?;
        let pruned = {
            let mut tasks = txn.open_table(TASKS)?;
            let mut due = txn.open_table(DUE)?;
            let mut by_age = txn.open_table(BY_AGE)?;
            let mut old = Vec::new();
            for entry in by_age
                .range::<(u64, &str)>(..(before.max(0) as u64, ""))?
                .take(limit)
            {
                let (k, _) = entry?;
                let (at, task_id) = k.value();
                old.push((at, task_id.to_string()));
            }
            for (at, task_id) in &old {
                by_age.remove((*at, task_id.as_str()))?;
                let removed = tasks
                    .remove(task_id.as_str())?
                    .and_then(|v| serde_json::from_slice::<Registration>(v.value()).ok());
                if let Some(r) = removed.filter(|r| !r.done) {
                    due.remove((r.next_poll_at.max(0) as u64, task_id.as_str()))?;
                }
            }
            old.len() as u64
        };
        txn.commit()?;
        Ok(pruned)
    }

    /// Resolves when a task was registered since the last call.
    pub async fn task_added(&self) {
        self.tasks_added.notified().await
    }

    /// Resolves when a callback was held since the last call.
    pub async fn callback_held(&self) {
        self.held_added.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn due_order_updates_and_pruning() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::open(dir.path()).unwrap();
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
        assert_eq!(registry.prune(3, 100).unwrap(), 1);
        assert_eq!(registry.counts().unwrap(), (0, 0));
        assert_eq!(registry.next_due().unwrap(), None);
    }

    #[test]
    fn held_callbacks_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let event = crate::poll::synthetic_pending("task_1", 5);
        {
            let registry = Registry::open(dir.path()).unwrap();
            assert_eq!(registry.hold(&event, 100).unwrap(), 1);
            assert_eq!(registry.hold(&event, 200).unwrap(), 2);
        }
        let registry = Registry::open(dir.path()).unwrap();
        let due = registry.held_due(150, 10).unwrap();
        assert_eq!(due.len(), 1);
        assert_eq!((due[0].seq, &due[0].event), (1, &event));
        let mut retry = due[0].clone();
        retry.next_at = 500;
        registry.settle_held(&[2], &[retry]).unwrap();
        assert_eq!(registry.next_held().unwrap(), Some(500));
        assert_eq!(registry.counts().unwrap(), (0, 1));
    }
}
