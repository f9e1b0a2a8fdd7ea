//! A read-only look at a stopped instance's data dir, for
//! `hookbridge outbox inspect`.
//!
//! The files are opened with redb's `ReadOnlyDatabase`, which never writes
//! and takes a shared lock: while a running hookbridge holds its exclusive
//! lock the open fails at once ([`InspectError::Locked`]) instead of
//! waiting or touching the file. A file left by a crash needs recovery,
//! which only a writer may do, so it is refused too.

use std::path::Path;

use redb::{
    ReadOnlyDatabase, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition, TableError,
};
use serde::Serialize;

use super::now_ms;
use super::store::{DEAD, PENDING, TASKS};
use crate::event::TaskEvent;

/// What a data dir holds.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Inspection {
    pub pending: u64,
    pub pending_bytes: u64,
    /// When the oldest pending event was received (ms since the epoch).
    pub oldest_pending_received_at: Option<i64>,
    pub oldest_pending_age_ms: Option<i64>,
    pub dead_letters: u64,
    /// Tasks with a dedup record (within the dedup window when it stopped).
    pub tasks_tracked: u64,
    /// Tasks registered for polling (`tasks.redb`; `None` when there is none).
    pub registered_tasks: Option<u64>,
    /// Callbacks held for verification (`tasks.redb`).
    pub held_callbacks: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("no hookbridge outbox at {0}")]
    Missing(String),
    #[error(
        "{0} is in use: a running hookbridge holds its lock. Stop it first, \
         or ask the running instance with `hookbridge status`"
    )]
    Locked(String),
    #[error(
        "{0} was not shut down cleanly and needs a recovery that a read-only \
         look cannot do: start hookbridge on it once, then stop it"
    )]
    NeedsRecovery(String),
    #[error("cannot read {path}: {source}")]
    Db { path: String, source: redb::Error },
}

/// Opens `path` read-only, with the refusals above.
pub fn open_read_only(path: &Path) -> Result<ReadOnlyDatabase, InspectError> {
    let name = path.display().to_string();
    if !path.is_file() {
        return Err(InspectError::Missing(name));
    }
    ReadOnlyDatabase::open(path).map_err(|e| match e {
        redb::DatabaseError::DatabaseAlreadyOpen => InspectError::Locked(name),
        redb::DatabaseError::RepairAborted => InspectError::NeedsRecovery(name),
        other => InspectError::Db {
            path: name,
            source: other.into(),
        },
    })
}

/// How many entries `table` holds; 0 when it was never created.
pub fn table_len<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &ReadTransaction,
    table: TableDefinition<K, V>,
) -> Result<u64, redb::Error> {
    match txn.open_table(table) {
        Ok(t) => Ok(t.len()?),
        Err(TableError::TableDoesNotExist(_)) => Ok(0),
        Err(e) => Err(e.into()),
    }
}

/// Counts what `<dir>/outbox.redb` holds (and `<dir>/tasks.redb`, if there).
pub fn inspect(dir: &Path) -> Result<Inspection, InspectError> {
    let path = dir.join("outbox.redb");
    let db = open_read_only(&path)?;
    let fail = |source: redb::Error| InspectError::Db {
        path: path.display().to_string(),
        source,
    };
    let (pending, pending_bytes, oldest, dead_letters, tasks_tracked) =
        outbox_counts(&db).map_err(fail)?;
    let registry = dir.join("tasks.redb");
    let (registered_tasks, held_callbacks) = if registry.is_file() {
        let (tasks, held) =
            crate::poll::registry::sizes(&open_read_only(&registry)?).map_err(|source| {
                InspectError::Db {
                    path: registry.display().to_string(),
                    source,
                }
            })?;
        (Some(tasks), Some(held))
    } else {
        (None, None)
    };
    Ok(Inspection {
        pending,
        pending_bytes,
        oldest_pending_received_at: oldest,
        oldest_pending_age_ms: oldest.map(|at| (now_ms() - at).max(0)),
        dead_letters,
        tasks_tracked,
        registered_tasks,
        held_callbacks,
    })
}

type Counts = (u64, u64, Option<i64>, u64, u64);

fn outbox_counts(db: &ReadOnlyDatabase) -> Result<Counts, redb::Error> {
    let txn = db.begin_read()?;
    let (mut pending, mut bytes, mut oldest) = (0, 0, None);
    match txn.open_table(PENDING) {
        Ok(table) => {
            for entry in table.iter()? {
                let (_, v) = entry?;
                if pending == 0 {
                    oldest = serde_json::from_slice::<TaskEvent>(v.value())
                        .ok()
                        .map(|e| e.received_at);
                }
                pending += 1;
                bytes += v.value().len() as u64;
            }
        }
        Err(TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(e.into()),
    }
    let dead = table_len(&txn, DEAD)?;
    let tasks = table_len(&txn, TASKS)?;
    Ok((pending, bytes, oldest, dead, tasks))
}
