//! The crate's clock: wall time in milliseconds since the Unix epoch, the
//! unit every record, guard and deadline on disk uses. Imports nothing of
//! the crate.

/// Now, in ms since the Unix epoch (0 if the system clock is before it).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
