//! Opening a redb file that may be damaged, without letting the damage stop
//! the start (the pending log beside it must still be delivered).
//!
//! A file that cannot be opened or read as a database (redb reports it
//! corrupted or of an unknown format, a page does not decode, redb panics
//! on it) is opened once more with redb's integrity check, which repairs
//! what it can. If that fails too, the file is renamed to
//! `<name>.damaged-<ms since the epoch>`, kept for recovery and never
//! deleted, and a fresh, empty file takes its place: the caller says loudly
//! what that costs. Errors that say nothing about the file's contents (it
//! is locked by another process, not readable, the disk is full) are
//! returned as they are: they never set a file aside.
//!
//! Imports nothing of the crate but the panic helper.

use std::io::ErrorKind;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use redb::Database;

/// A damaged file that was moved away for a fresh one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetAside {
    /// Where the damaged file is now.
    pub moved_to: PathBuf,
    /// What was wrong with it.
    pub cause: String,
}

/// Whether an error says the file's contents are damaged.
fn is_damage(e: &redb::Error) -> bool {
    match e {
        redb::Error::Corrupted(_)
        | redb::Error::UpgradeRequired(_)
        | redb::Error::ValueTooLarge(_)
        | redb::Error::TableTypeMismatch { .. }
        | redb::Error::TableIsMultimap(_)
        | redb::Error::TableIsNotMultimap(_)
        | redb::Error::TypeDefinitionChanged { .. }
        | redb::Error::RepairAborted => true,
        redb::Error::Io(io) => {
            matches!(io.kind(), ErrorKind::InvalidData | ErrorKind::UnexpectedEof)
        }
        _ => false,
    }
}

enum Failure {
    Damage(String),
    Other(redb::Error),
}

/// Opens (or creates) `path` and runs `probe` on it, reporting a panic in
/// either as damage.
fn attempt(
    path: &Path,
    cache_bytes: usize,
    check: bool,
    probe: &dyn Fn(&Database) -> Result<(), redb::Error>,
) -> Result<Database, Failure> {
    let opened = catch_unwind(AssertUnwindSafe(|| -> Result<Database, redb::Error> {
        let db = Database::builder()
            .set_cache_size(cache_bytes)
            .set_check_integrity_on_open(check)
            .create(path)?;
        probe(&db)?;
        Ok(db)
    }));
    match opened {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(e)) if is_damage(&e) => Err(Failure::Damage(e.to_string())),
        Ok(Err(e)) => Err(Failure::Other(e)),
        Err(panic) => Err(Failure::Damage(format!(
            "reading it panicked: {}",
            crate::sync::panic_message(&*panic)
        ))),
    }
}

/// Opens (or creates) the database at `path`; `probe` reads what the
/// caller reads at start-up. A damaged file is repaired, or set aside for a
/// fresh one (see the module's notes); then the second value says where it
/// went and why.
pub fn open(
    path: &Path,
    cache_bytes: usize,
    probe: impl Fn(&Database) -> Result<(), redb::Error>,
) -> Result<(Database, Option<SetAside>), redb::Error> {
    let cause = match attempt(path, cache_bytes, false, &probe) {
        Ok(db) => return Ok((db, None)),
        Err(Failure::Other(e)) => return Err(e),
        Err(Failure::Damage(cause)) => cause,
    };
    tracing::error!(path = %path.display(), %cause, "database file damaged; checking and repairing it");
    let cause = match attempt(path, cache_bytes, true, &probe) {
        Ok(db) => {
            tracing::warn!(path = %path.display(), "database file repaired by its integrity check");
            return Ok((db, None));
        }
        Err(Failure::Other(e)) => return Err(e),
        Err(Failure::Damage(again)) => format!("{cause}; after the integrity check: {again}"),
    };
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let mut moved_to = path.as_os_str().to_owned();
    moved_to.push(format!(".damaged-{millis}"));
    let moved_to = PathBuf::from(moved_to);
    std::fs::rename(path, &moved_to)?;
    match attempt(path, cache_bytes, false, &probe) {
        Ok(db) => Ok((db, Some(SetAside { moved_to, cause }))),
        Err(Failure::Other(e)) => Err(e),
        Err(Failure::Damage(fresh)) => Err(redb::Error::Corrupted(format!(
            "a fresh database at {} does not open: {fresh}",
            path.display()
        ))),
    }
}

/// Counts what `table` holds and reads its first and last entries, so that
/// a damaged root or edge page shows now rather than on the first request.
/// A table that does not exist yet holds nothing.
pub fn probe_table<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &redb::ReadTransaction,
    table: redb::TableDefinition<K, V>,
) -> Result<(), redb::Error> {
    use redb::{ReadableTable, ReadableTableMetadata};
    match txn.open_table(table) {
        Ok(t) => {
            t.len()?;
            if let Some(first) = t.first()? {
                drop(first);
            }
            if let Some(last) = t.last()? {
                drop(last);
            }
            Ok(())
        }
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::ReadableDatabase;

    const T: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("t");

    fn probe(db: &Database) -> Result<(), redb::Error> {
        probe_table(&db.begin_read()?, T)
    }

    #[test]
    fn a_garbage_file_is_set_aside_and_a_good_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.redb");
        {
            let (db, aside) = open(&path, 1 << 20, probe).unwrap();
            assert_eq!(aside, None);
            let txn = db.begin_write().unwrap();
            txn.open_table(T).unwrap().insert(1, &b"one"[..]).unwrap();
            txn.commit().unwrap();
        }
        let (db, aside) = open(&path, 1 << 20, probe).unwrap();
        assert_eq!(aside, None, "a sound file is kept");
        drop(db);

        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        let (db, aside) = open(&path, 1 << 20, probe).unwrap();
        let aside = aside.expect("set aside");
        assert_eq!(std::fs::read(&aside.moved_to).unwrap(), vec![0x5a; 8192]);
        let txn = db.begin_read().unwrap();
        assert!(txn.open_table(T).is_err(), "a fresh, empty file");
    }
}
