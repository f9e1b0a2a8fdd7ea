//! The registry's database, re-openable in place. After an I/O error (a
//! full disk, say) redb refuses every later write ("previous I/O error")
//! until the file is closed and opened again, which also recovers it to its
//! last commit. The outbox does the same for its own file.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use redb::Database;

use super::RegistryError;
use crate::sync::lock;

/// Least time between two attempts to re-open a failing database, so a
/// disk that stays full costs little; requests meanwhile fail at once.
const REOPEN_EVERY: Duration = Duration::from_millis(250);
/// Longest wait for readers of the old database before re-opening.
const READERS_GRACE: Duration = Duration::from_secs(2);

pub(super) struct DbCell {
    path: PathBuf,
    cache_bytes: usize,
    db: RwLock<Option<Arc<Database>>>,
    /// An I/O error was seen: re-open before the next use.
    broken: AtomicBool,
    last_reopen: Mutex<Option<Instant>>,
}

impl DbCell {
    /// Opens (or creates) the file; `probe` reads what the start reads. A
    /// damaged file is repaired or set aside for a fresh one (see
    /// `redb_file`): then the second value says so.
    pub(super) fn open(
        path: PathBuf,
        cache_bytes: usize,
        probe: impl Fn(&Database) -> Result<(), redb::Error>,
    ) -> Result<(Self, Option<crate::redb_file::SetAside>), RegistryError> {
        let (db, set_aside) = crate::redb_file::open(&path, cache_bytes, probe)?;
        let cell = Self {
            path,
            cache_bytes,
            db: RwLock::new(Some(Arc::new(db))),
            broken: AtomicBool::new(false),
            last_reopen: Mutex::new(None),
        };
        Ok((cell, set_aside))
    }

    fn create(path: &std::path::Path, cache_bytes: usize) -> Result<Database, RegistryError> {
        Ok(Database::builder()
            .set_cache_size(cache_bytes)
            .create(path)?)
    }

    /// Runs `f` on the database, re-opening it first if an earlier call
    /// failed on I/O; an I/O error from `f` marks it for re-opening.
    pub(super) fn with<T>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, RegistryError>,
    ) -> Result<T, RegistryError> {
        if self.broken.load(Ordering::Acquire) {
            self.repair()?;
        }
        let db = self
            .db
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(RegistryError::Reopening)?;
        let result = f(&db);
        if let Err(RegistryError::Db(e)) = &result {
            if matches!(e, redb::Error::Io(_) | redb::Error::PreviousIo) {
                tracing::error!(error = %e, "task registry storage error; re-opening the database");
                self.broken.store(true, Ordering::Release);
            }
        }
        result
    }

    fn repair(&self) -> Result<(), RegistryError> {
        let mut last = lock(&self.last_reopen);
        if !self.broken.load(Ordering::Acquire) {
            return Ok(()); // another thread repaired it meanwhile
        }
        if last.is_some_and(|at| at.elapsed() < REOPEN_EVERY) {
            return Err(RegistryError::Reopening);
        }
        *last = Some(Instant::now());
        let old = self.db.write().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(old) = old {
            // Readers hold the database for one short transaction only.
            let deadline = Instant::now() + READERS_GRACE;
            while Arc::strong_count(&old) > 1 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let db = Self::create(&self.path, self.cache_bytes)?;
        *self.db.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(db));
        self.broken.store(false, Ordering::Release);
        tracing::info!(path = %self.path.display(), "task registry database re-opened");
        Ok(())
    }
}
