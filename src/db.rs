//! What both databases (the outbox's `outbox.redb` and the poller's
//! `tasks.redb`) share: the conversion of redb's errors, counting a table,
//! and a handle that re-opens the file in place after a storage error.
//!
//! After an I/O error (a full disk, say) redb refuses every later write
//! ("previous I/O error") until the file is closed and opened again, which
//! also recovers it to its last commit. [`Cell`] does that, at most every
//! [`REOPEN_EVERY`], so a disk that stays full costs little.
//!
//! It also holds the read-only look at a stopped instance's files that
//! `hookbridge outbox inspect` takes.
//!
//! Imports nothing of the crate but `redb_file` (opening a damaged file)
//! and the helpers of `sync`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use redb::{
    Database, ReadOnlyDatabase, ReadTransaction, ReadableDatabase, ReadableTableMetadata,
    TableDefinition, TableError,
};

use crate::redb_file::SetAside;
use crate::sync::lock;

/// `crate::db::redb_errors!(MyError: redb::TableError, ...)` converts each
/// of redb's error types into `MyError::Db(redb::Error)`, so that `?` works
/// on every redb call.
macro_rules! redb_errors {
    ($error:ident: $($t:ty),* $(,)?) => {$(
        impl From<$t> for $error {
            fn from(e: $t) -> Self { Self::Db(e.into()) }
        }
    )*};
}
pub(crate) use redb_errors;

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

/// Why a stopped instance's file cannot be looked at (`hookbridge outbox
/// inspect`).
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

/// Opens `path` read-only, with the refusals above. redb's
/// `ReadOnlyDatabase` never writes and takes a shared lock: while a running
/// hookbridge holds its exclusive lock the open fails at once
/// ([`InspectError::Locked`]) instead of waiting or touching the file.
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

/// Opens `path` read-only; the inner error says it is damaged (what
/// hookbridge would set aside), the outer one that it cannot be looked at
/// now (missing, locked, needs the recovery of a start).
pub fn readable(path: &Path) -> Result<Result<ReadOnlyDatabase, String>, InspectError> {
    let opened = std::panic::catch_unwind(|| {
        let db = open_read_only(path)?;
        let probe = db.begin_read().map_err(redb::Error::from).and_then(|txn| {
            txn.list_tables()?.count();
            Ok(())
        });
        Ok((db, probe))
    });
    match opened {
        Ok(Ok((db, Ok(())))) => Ok(Ok(db)),
        Ok(Ok((_, Err(e)))) | Ok(Err(InspectError::Db { source: e, .. })) => Ok(Err(e.to_string())),
        Ok(Err(e)) => Err(e),
        Err(panic) => Ok(Err(crate::sync::panic_message(&*panic))),
    }
}

/// Least time between two attempts to re-open a failing database, so a
/// disk that stays full costs little; requests meanwhile fail at once.
pub const REOPEN_EVERY: Duration = Duration::from_millis(250);
/// Longest wait for readers of the old database before re-opening.
const READERS_GRACE: Duration = Duration::from_secs(2);

/// Why the database cannot be used now.
#[derive(Debug, thiserror::Error)]
pub enum CellError {
    /// Closed for good.
    #[error("the database is closed")]
    Closed,
    /// Being re-opened after a storage error (or waiting to be).
    #[error("the database is being re-opened after a storage error")]
    Reopening,
    #[error(transparent)]
    Db(#[from] redb::Error),
}

/// A database file, re-openable in place.
pub struct Cell {
    path: PathBuf,
    cache_bytes: usize,
    /// For the logs: "outbox", "task registry".
    name: &'static str,
    db: RwLock<Option<Arc<Database>>>,
    closed: AtomicBool,
    /// A storage error was seen: re-open before the next use.
    broken: AtomicBool,
    last_reopen: Mutex<Option<Instant>>,
}

impl Cell {
    /// Opens (or creates) the file; `probe` reads what the start reads. A
    /// damaged file is repaired or set aside for a fresh one (see
    /// `redb_file`): then the second value says so.
    pub fn open(
        path: PathBuf,
        cache_bytes: usize,
        name: &'static str,
        probe: impl Fn(&Database) -> Result<(), redb::Error>,
    ) -> Result<(Self, Option<SetAside>), redb::Error> {
        let (db, set_aside) = crate::redb_file::open(&path, cache_bytes, probe)?;
        let cell = Self {
            path,
            cache_bytes,
            name,
            db: RwLock::new(Some(Arc::new(db))),
            closed: AtomicBool::new(false),
            broken: AtomicBool::new(false),
            last_reopen: Mutex::new(None),
        };
        Ok((cell, set_aside))
    }

    /// The database as it is now (hold it for one transaction only).
    pub fn get(&self) -> Result<Arc<Database>, CellError> {
        let guard = self.db.read().unwrap_or_else(|p| p.into_inner());
        match guard.clone() {
            Some(db) => Ok(db),
            None if self.closed.load(Ordering::Relaxed) => Err(CellError::Closed),
            None => Err(CellError::Reopening),
        }
    }

    /// Closes the file for good.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        if let Some(old) = self.take() {
            wait_for_readers(&old);
        }
    }

    /// Says whether a storage error was seen: then the next [`Cell::repair`]
    /// re-opens the file. `hold_off` also waits [`REOPEN_EVERY`] from now
    /// before that (after a panic, say).
    pub fn set_broken(&self, broken: bool, hold_off: bool) {
        if hold_off {
            *lock(&self.last_reopen) = Some(Instant::now());
        }
        self.broken.store(broken, Ordering::Release);
    }

    /// Re-opens the file if a storage error was seen, at most every
    /// [`REOPEN_EVERY`]; meanwhile [`CellError::Reopening`].
    pub fn repair(&self) -> Result<(), CellError> {
        if !self.broken.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut last = lock(&self.last_reopen);
        if !self.broken.load(Ordering::Acquire) {
            return Ok(()); // another thread repaired it meanwhile
        }
        if last.is_some_and(|at| at.elapsed() < REOPEN_EVERY) {
            return Err(CellError::Reopening);
        }
        *last = Some(Instant::now());
        self.reopen()?;
        self.broken.store(false, Ordering::Release);
        Ok(())
    }

    /// Closes and re-opens the file. Readers hold the database only for one
    /// short transaction, so waiting for them is bounded.
    fn reopen(&self) -> Result<(), redb::Error> {
        if let Some(old) = self.take() {
            wait_for_readers(&old);
        }
        let db = create(&self.path, self.cache_bytes)?;
        *self.db.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(db));
        tracing::info!(path = %self.path.display(), "{} database re-opened", self.name);
        Ok(())
    }

    fn take(&self) -> Option<Arc<Database>> {
        self.db.write().unwrap_or_else(|p| p.into_inner()).take()
    }
}

fn create(path: &Path, cache_bytes: usize) -> Result<Database, redb::Error> {
    Ok(Database::builder()
        .set_cache_size(cache_bytes)
        .create(path)?)
}

fn wait_for_readers(db: &Arc<Database>) {
    let deadline = Instant::now() + READERS_GRACE;
    while Arc::strong_count(db) > 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_cell_reopens_at_most_every_interval_and_a_closed_one_stays_closed() {
        let dir = tempfile::tempdir().unwrap();
        let (cell, aside) =
            Cell::open(dir.path().join("x.redb"), 1 << 20, "test", |_| Ok(())).unwrap();
        assert!(aside.is_none());
        cell.repair().unwrap();
        cell.set_broken(true, true);
        assert!(matches!(cell.repair(), Err(CellError::Reopening)));
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Err(CellError::Reopening) = cell.repair() {
            assert!(Instant::now() < deadline, "re-opened after REOPEN_EVERY");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(cell.get().is_ok());
        cell.close();
        assert!(matches!(cell.get(), Err(CellError::Closed)));
    }
}
