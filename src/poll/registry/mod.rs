//! Registered tasks and callbacks awaiting verification, in their own redb
//! file (`<outbox.data_dir>/tasks.redb`), apart from the outbox so that the
//! outbox's single writer never waits for polling bookkeeping.
//!
//! Tables: `tasks` (taskId -> [`Registration`] as JSON), `due`
//! ((next_poll_at, taskId) for every task not done: the reconciler reads it
//! in order), `by_age` ((registered_at, taskId), for pruning), `held`
//! (seq -> [`Held`]: callbacks stored for the verifier), `held_keys`
//! ((taskId, state) -> seq: one held callback per task state), `held_meta`
//! (the bytes held) and `held_from` (entries held per client address).
//!
//! Invariants:
//!
//! - Registrations and held callbacks are committed with fsync before the
//!   HTTP answer; so is every change that ends a task or releases a held
//!   callback (repeating one would bury a second dead letter). Plain
//!   schedule updates are committed without fsync.
//! - A registration is pruned only once finished (terminal event seen, or
//!   buried as stuck or unknown), so no retention setting can make a task
//!   vanish before its deadline, and polling halted by a revoked key still
//!   finds every task after a restart. Only when no reconciler runs (nothing
//!   would ever finish them) are unfinished ones pruned by age.
//! - The held queue is bounded and cannot be clogged: a repeated (taskId,
//!   state) is not held twice, and an entry that cannot be read is handed
//!   to the verifier as [`Unreadable`] to be buried, never skipped.
//! - A registration that cannot be read is handed to the reconciler as
//!   [`UnreadableTask`] to be buried, and the webhook fails closed on it.
//! - After an I/O error the database is re-opened (`cell.rs`, on `crate::db::Cell`).
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
pub use held::{sender_of, Held, HeldCap, HeldDue, HeldLimits, Holding, Unreadable};

mod cell;
mod held;
#[cfg(test)]
mod tests;

const TASKS: TableDefinition<&str, &[u8]> = TableDefinition::new("tasks");
const DUE: TableDefinition<(u64, &str), ()> = TableDefinition::new("due");
const BY_AGE: TableDefinition<(u64, &str), ()> = TableDefinition::new("by_age");
const HELD: TableDefinition<u64, &[u8]> = TableDefinition::new("held");
const HELD_KEYS: TableDefinition<(&str, &str), u64> = TableDefinition::new("held_keys");

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
    /// One this version cannot read (stored by another) reads as none: the
    /// registration itself must stay readable.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient_event"
    )]
    pub last_event: Option<Box<TaskEvent>>,
    /// The last polling error, for the same dead letter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// What [`Registry::due`] found.
#[derive(Debug, Default)]
pub struct Due {
    /// Tasks due for a poll, earliest first.
    pub tasks: Vec<(String, Registration)>,
    pub unreadable: Vec<UnreadableTask>,
}

/// A scheduled task whose registration cannot be read (damaged, or
/// missing): the reconciler buries it with `error` as the reason instead of
/// meeting it at the head of the schedule forever.
#[derive(Debug, Clone, PartialEq)]
pub struct UnreadableTask {
    pub task_id: String,
    due_at: u64,
    /// The stored registration, whole, if there is one.
    pub raw: Option<Vec<u8>>,
    pub error: String,
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
    #[error("the task registry database is being re-opened after a storage error")]
    Reopening,
    #[error("unreadable {0}")]
    Unreadable(String),
    /// A blocking task panicked (a bug): reported as such, never as
    /// "shutting down".
    #[error("a task registry task panicked: {0}")]
    Panicked(String),
    /// A shared transaction failed (the group commit of held callbacks):
    /// every caller in it gets this copy of the error.
    #[error("task registry database: {0}")]
    Shared(String),
}

impl RegistryError {
    /// The same error for another caller of a shared transaction.
    fn copy(&self) -> Self {
        match self {
            Self::Closed => Self::Closed,
            Self::Reopening => Self::Reopening,
            other => Self::Shared(other.to_string()),
        }
    }
}

crate::db::redb_errors!(
    RegistryError:
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

/// How the registry is opened.
#[derive(Debug, Clone, Copy)]
pub struct RegistryOptions {
    /// Memory for the database's page cache, in bytes.
    pub cache_bytes: usize,
    /// A reconciler runs and will finish every registration (terminal event,
    /// stuck or unknown): unfinished ones are then never pruned.
    pub reconciled: bool,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        Self {
            cache_bytes: 32 * 1024 * 1024,
            reconciled: true,
        }
    }
}

/// Handle to the registry; cheap to clone.
#[derive(Clone)]
pub struct Registry {
    db: Arc<cell::DbCell>,
    reconciled: bool,
    tasks_added: Arc<Notify>,
    held_added: Arc<Notify>,
    /// The group commit of held callbacks.
    holds: Arc<held::HoldQueue>,
    /// Registrations on disk (approximate after pruning): lets the webhook
    /// skip the lookup entirely where no task was ever registered.
    known: Arc<AtomicU64>,
    /// Set when the file was found damaged at start and set aside.
    set_aside: Option<Arc<crate::redb_file::SetAside>>,
}

fn lenient_event<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Box<TaskEvent>>, D::Error> {
    let value = serde_json::Value::deserialize(d)?;
    Ok(serde_json::from_value(value).ok())
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

fn write(db: &Database, durable: bool) -> Result<redb::WriteTransaction, RegistryError> {
    let mut txn = db.begin_write()?;
    if !durable {
        txn.set_durability(Durability::None)?;
    }
    Ok(txn)
}

/// How many tasks are registered and callbacks held, read from a stopped
/// instance's file (`hookbridge outbox inspect`).
pub fn sizes(db: &redb::ReadOnlyDatabase) -> Result<(u64, u64), redb::Error> {
    let txn = db.begin_read()?;
    use crate::db::table_len;
    Ok((table_len(&txn, TASKS)?, table_len(&txn, HELD)?))
}

impl Registry {
    pub fn open(dir: &Path, options: RegistryOptions) -> Result<Self, RegistryError> {
        let io_err = |source| RegistryError::DataDir {
            path: dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io_err)?;
        let path = dir.join("tasks.redb");
        let (db, set_aside) = cell::DbCell::open(path.clone(), options.cache_bytes, |db| {
            use crate::redb_file::probe_table;
            let txn = db.begin_read()?;
            probe_table(&txn, TASKS)?;
            probe_table(&txn, DUE)?;
            probe_table(&txn, BY_AGE)?;
            probe_table(&txn, HELD)?;
            probe_table(&txn, HELD_KEYS)
        })?;
        if let Some(aside) = &set_aside {
            tracing::error!(
                moved_to = %aside.moved_to.display(),
                cause = %aside.cause,
                "tasks.redb is damaged and was set aside; starting with a fresh one. LOST from \
                 the running state: the task registrations (those tasks are no longer polled, \
                 and their callbacks no longer checked against a token) and the callbacks held \
                 for verification. The damaged file is kept for recovery (see the README, \
                 \"Damage and recovery\")"
            );
        }
        let known = db.with(|db| {
            use redb::TableHandle;
            let names: Vec<String> = db
                .begin_read()?
                .list_tables()?
                .map(|t| t.name().to_string())
                .collect();
            let all = [
                TASKS.name(),
                DUE.name(),
                BY_AGE.name(),
                HELD.name(),
                HELD_KEYS.name(),
            ];
            // Only a new file is written to here: opening an existing data
            // dir must not need free space.
            if !all.iter().all(|t| names.iter().any(|n| n == t)) {
                let txn = db.begin_write()?;
                txn.open_table(TASKS)?;
                txn.open_table(DUE)?;
                txn.open_table(BY_AGE)?;
                txn.open_table(HELD)?;
                txn.open_table(HELD_KEYS)?;
                txn.commit()?;
            }
            Self::count_held_bytes(db)?;
            Ok(db.begin_read()?.open_table(TASKS)?.len()?)
        })?;
        Ok(Self {
            set_aside: set_aside.map(Arc::new),
            db: Arc::new(db),
            reconciled: options.reconciled,
            tasks_added: Arc::new(Notify::new()),
            held_added: Arc::new(Notify::new()),
            holds: Arc::default(),
            known: Arc::new(AtomicU64::new(known)),
        })
    }

    /// Where the damaged file went, when it was found damaged at start and
    /// set aside for a fresh one.
    pub fn set_aside(&self) -> Option<&crate::redb_file::SetAside> {
        self.set_aside.as_deref()
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
            .map_err(|e| match e.try_into_panic() {
                Ok(panic) => RegistryError::Panicked(crate::sync::panic_message(&*panic)),
                Err(_) => RegistryError::Closed,
            })?
    }

    /// Registers a task unless it already is; returns the registration in
    /// force and whether it is new. Durable when it returns.
    pub fn register(
        &self,
        task_id: &str,
        registration: Registration,
    ) -> Result<(Registration, bool), RegistryError> {
        let outcome = self.db.with(|db| {
            let txn = write(db, true)?;
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
            Ok(outcome)
        })?;
        if outcome.1 {
            self.known.fetch_add(1, Ordering::Relaxed);
            self.tasks_added.notify_one();
        }
        Ok(outcome)
    }

    /// The task's registration. One that cannot be read is an error, not
    /// "not registered": the webhook fails closed on it rather than skip the
    /// token check (the reconciler buries it).
    pub fn get(&self, task_id: &str) -> Result<Option<Registration>, RegistryError> {
        self.db.with(|db| {
            let txn = db.begin_read()?;
            let tasks = txn.open_table(TASKS)?;
            let Some(v) = tasks.get(task_id)? else {
                return Ok(None);
            };
            serde_json::from_slice(v.value())
                .map(Some)
                .map_err(|e| RegistryError::Unreadable(format!("registration of {task_id}: {e}")))
        })
    }

    /// Tasks not done whose next poll is at or before `now`, earliest
    /// first, and every registration met on the way that cannot be read.
    pub fn due(&self, now: i64, limit: usize) -> Result<Due, RegistryError> {
        self.db.with(|db| {
            let txn = db.begin_read()?;
            let (due, tasks) = (txn.open_table(DUE)?, txn.open_table(TASKS)?);
            let mut out = Due::default();
            for entry in due.range::<(u64, &str)>(..=(now.max(0) as u64, "\u{10ffff}"))? {
                if out.tasks.len() + out.unreadable.len() >= limit {
                    break;
                }
                let (key, _) = entry?;
                let (at, task_id) = key.value();
                let raw = tasks.get(task_id)?.map(|v| v.value().to_vec());
                let decoded = raw.as_deref().map(serde_json::from_slice::<Registration>);
                match decoded {
                    Some(Ok(registration)) => out.tasks.push((task_id.to_string(), registration)),
                    Some(Err(e)) => out.unreadable.push(UnreadableTask {
                        task_id: task_id.to_string(),
                        due_at: at,
                        raw,
                        error: e.to_string(),
                    }),
                    None => out.unreadable.push(UnreadableTask {
                        task_id: task_id.to_string(),
                        due_at: at,
                        raw: None,
                        error: "scheduled, but its registration is missing".into(),
                    }),
                }
            }
            Ok(out)
        })
    }

    /// Deletes registrations [`Registry::due`] could not read (once their
    /// dead letter is stored): they are never polled again. Durable.
    pub fn forget_unreadable(&self, entries: &[UnreadableTask]) -> Result<(), RegistryError> {
        if entries.is_empty() {
            return Ok(());
        }
        self.db.with(|db| {
            let txn = write(db, true)?;
            {
                let mut tasks = txn.open_table(TASKS)?;
                let mut due = txn.open_table(DUE)?;
                for entry in entries {
                    let id = entry.task_id.as_str();
                    due.remove((entry.due_at, id))?;
                    let readable = tasks
                        .get(id)?
                        .is_some_and(|v| serde_json::from_slice::<Registration>(v.value()).is_ok());
                    if !readable {
                        tasks.remove(id)?;
                    }
                }
            }
            txn.commit()?;
            Ok(())
        })
    }

    /// The earliest next poll of a task not done.
    pub fn next_due(&self) -> Result<Option<i64>, RegistryError> {
        self.db.with(|db| {
            let txn = db.begin_read()?;
            let due = txn.open_table(DUE)?;
            let first = due.first()?.map(|(k, _)| k.value().0 as i64);
            Ok(first)
        })
    }

    /// Writes back what the reconciler decided. Fsynced only if a task ended.
    pub fn save(&self, updates: &[(String, Registration)]) -> Result<(), RegistryError> {
        if updates.is_empty() {
            return Ok(());
        }
        self.db.with(|db| {
            let txn = write(db, updates.iter().any(|(_, r)| r.done))?;
            {
                let mut tasks = txn.open_table(TASKS)?;
                let mut due = txn.open_table(DUE)?;
                let mut by_age = txn.open_table(BY_AGE)?;
                for (task_id, registration) in updates {
                    let old = tasks
                        .get(task_id.as_str())?
                        .and_then(|v| serde_json::from_slice::<Registration>(v.value()).ok());
                    // Pruned meanwhile: nothing to update.
                    let Some(old) = old else { continue };
                    if !old.done {
                        due.remove((old.next_poll_at.max(0) as u64, task_id.as_str()))?;
                    }
                    if registration.done {
                        // Back in line for pruning (`prune` may have set an
                        // unfinished one aside).
                        by_age.insert((old.registered_at.max(0) as u64, task_id.as_str()), ())?;
                    } else {
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
        })
    }

    /// (tasks not done, callbacks awaiting verification).
    pub fn counts(&self) -> Result<(u64, u64), RegistryError> {
        self.db.with(|db| {
            let txn = db.begin_read()?;
            Ok((txn.open_table(DUE)?.len()?, txn.open_table(HELD)?.len()?))
        })
    }

    /// Forgets finished registrations older than `before` (ms), at most
    /// `limit` looked at; returns how many were forgotten. Unfinished ones
    /// are set aside until they finish (`save` puts them back in line),
    /// unless no reconciler runs.
    pub fn prune(&self, before: i64, limit: usize) -> Result<u64, RegistryError> {
        self.db.with(|db| {
            let txn = write(db, false)?;
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
                let mut pruned = 0;
                for (at, task_id) in &old {
                    by_age.remove((*at, task_id.as_str()))?;
                    let registration = tasks
                        .get(task_id.as_str())?
                        .and_then(|v| serde_json::from_slice::<Registration>(v.value()).ok());
                    if let Some(r) = &registration {
                        if !r.done {
                            if self.reconciled {
                                continue;
                            }
                            due.remove((r.next_poll_at.max(0) as u64, task_id.as_str()))?;
                        }
                    }
                    tasks.remove(task_id.as_str())?;
                    pruned += 1;
                }
                pruned
            };
            txn.commit()?;
            Ok(pruned)
        })
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
