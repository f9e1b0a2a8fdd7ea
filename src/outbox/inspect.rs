//! A read-only look at a stopped instance's data dir, for
//! `hookbridge outbox inspect`.
//!
//! The files are opened with redb's `ReadOnlyDatabase`, which never writes
//! and takes a shared lock: while a running hookbridge holds its exclusive
//! lock the open fails at once ([`InspectError::Locked`]) instead of
//! waiting or touching the file. A file left by a crash needs recovery,
//! which only a writer may do, so it is refused too.

use std::path::Path;

use redb::{ReadableDatabase, ReadableTable, TableError};
use serde::Serialize;

use super::log::{read_only, Index, Record};
use super::store::{DEAD, META, PENDING, STORED_THROUGH, TASKS};
use super::Status;
use crate::clock::now_ms;
use crate::db::table_len;
use crate::event::TaskEvent;

/// What a data dir holds.
#[derive(Debug, Serialize)]
pub struct Inspection {
    /// As under `outbox` in `/admin/status`, without the counters (those
    /// live in memory only).
    pub outbox: Status,
    /// `tasks.redb`, when there is one (see `poll::registry::inspect`).
    pub registry: Option<RegistrySizes>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistrySizes {
    /// Tasks registered for polling.
    pub registered_tasks: u64,
    /// Callbacks held for verification.
    pub held_callbacks: u64,
}

pub use crate::db::{open_read_only, InspectError};

/// Counts what `<dir>/outbox.redb` and the pending log hold; the
/// registry's file is counted by `poll::registry::inspect` (the command
/// puts the two together). A database file that cannot be read is listed
/// as damaged (the pending log is still counted): hookbridge sets it aside
/// at its next start.
pub fn inspect(dir: &Path) -> Result<Inspection, InspectError> {
    let path = dir.join("outbox.redb");
    let mut damage = Vec::new();
    let fail = |source: redb::Error| InspectError::Db {
        path: path.display().to_string(),
        source,
    };
    let mut outbox = match crate::db::readable(&path)? {
        Ok(db) => outbox_status(&db, &dir.join("pending")).map_err(fail)?,
        Err(cause) => {
            damage.push(format!(
                "outbox.redb cannot be read ({cause}): set aside at the next start (its dead letters and older dedup records out of use)"
            ));
            let empty = redb::Database::builder()
                .create_with_backend(redb::backends::InMemoryBackend::new())
                .map_err(|e| fail(e.into()))?;
            outbox_status(&empty, &dir.join("pending")).map_err(fail)?
        }
    };
    outbox.damage.append(&mut damage);
    Ok(Inspection {
        outbox,
        registry: None,
    })
}

/// The log's pending events (and any that an older version left in redb),
/// the dead letters, and the tasks with a dedup record in the store or only
/// in the log (not checkpointed yet).
fn outbox_status(db: &impl ReadableDatabase, log_dir: &Path) -> Result<Status, redb::Error> {
    let txn = db.begin_read()?;
    let through = match txn.open_table(META) {
        Ok(meta) => meta.get(STORED_THROUGH)?.map_or(0, |v| v.value()),
        Err(TableError::TableDoesNotExist(_)) => 0,
        Err(e) => return Err(e.into()),
    };
    let mut index = Index::default();
    let mut unstored = std::collections::HashSet::new();
    let (damaged, torn) = read_only(log_dir, |record, slot| match record {
        Record::Append {
            seq,
            task_id,
            record: Some(_),
            ..
        } => {
            index.push(slot);
            if seq > through {
                unstored.insert(task_id.to_string());
            }
        }
        Record::Append { .. } => {
            index.push(slot);
        }
        Record::Ack(seqs) => {
            for seq in seqs {
                index.remove(seq);
            }
        }
        Record::Records { seq, records } if seq > through => {
            unstored.extend(records.into_iter().map(|(task, _)| task.to_string()));
        }
        Record::Records { .. } => {}
    })
    .map_err(redb::Error::Io)?;
    let mut damage: Vec<String> = damaged
        .iter()
        .map(|d| format!("pending log damaged: {}", d.place()))
        .collect();
    if torn > 0 {
        damage.push(format!(
            "pending log ends in a torn write of {torn} bytes (never answered; cut at the next start)"
        ));
    }
    let mut pending = index.len();
    let mut bytes = index.bytes();
    let mut oldest = index.first().map(|s| s.received_at);
    match txn.open_table(PENDING) {
        Ok(table) => {
            for entry in table.iter()? {
                let (_, v) = entry?;
                if oldest.is_none() {
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
    let mut tasks = table_len(&txn, TASKS)?;
    if !unstored.is_empty() {
        match txn.open_table(TASKS) {
            Ok(table) => {
                for task in &unstored {
                    if table.get(task.as_str())?.is_none() {
                        tasks += 1;
                    }
                }
            }
            Err(TableError::TableDoesNotExist(_)) => tasks += unstored.len() as u64,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Status {
        pending,
        pending_bytes: bytes,
        oldest_pending_age_ms: oldest.map(|at: i64| (now_ms() - at).max(0)),
        dead_letters: table_len(&txn, DEAD)?,
        tasks_tracked: tasks,
        damage,
        counters: serde_json::Value::Null,
    })
}
