//! The registry's database: the shared re-openable cell (`crate::db`),
//! marked for re-opening whenever a call fails on I/O.

use std::path::PathBuf;

use redb::Database;

use super::RegistryError;
use crate::db::{Cell, CellError};

pub(super) struct DbCell(Cell);

impl From<CellError> for RegistryError {
    fn from(e: CellError) -> Self {
        match e {
            CellError::Closed => Self::Closed,
            CellError::Reopening => Self::Reopening,
            CellError::Db(e) => Self::Db(e),
        }
    }
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
        let (cell, set_aside) = Cell::open(path, cache_bytes, "task registry", probe)?;
        Ok((Self(cell), set_aside))
    }

    /// Runs `f` on the database, re-opening it first if an earlier call
    /// failed on I/O; an I/O error from `f` marks it for re-opening.
    pub(super) fn with<T>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, RegistryError>,
    ) -> Result<T, RegistryError> {
        self.0.repair()?;
        let db = self.0.get()?;
        let result = f(&db);
        if let Err(RegistryError::Db(e)) = &result {
            if matches!(e, redb::Error::Io(_) | redb::Error::PreviousIo) {
                tracing::error!(error = %e, "task registry storage error; re-opening the database");
                self.0.set_broken(true, false);
            }
        }
        result
    }

    /// As after a storage error: re-opened no sooner than `REOPEN_EVERY`
    /// from now.
    #[cfg(test)]
    pub(super) fn break_now(&self) {
        self.0.set_broken(true, true);
    }
}
