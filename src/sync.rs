//! Locking and panics, shared by every thread and task. Imports nothing of
//! the crate.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, going on with its data when a thread panicked while holding
/// it: every value kept behind these mutexes is whole between statements
/// (a map, a queue, a cell), and a panic elsewhere must not stop the
/// service.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The message of a caught panic, for logs and dead letters.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}
