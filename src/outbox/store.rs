//! The redb tables, the per-task dedup record, and the read side.
//!
//! Every write goes through the single writer thread in `writer/`; the
//! functions here only read, each in its own short read transaction, so
//! they never wait for the writer.

use redb::{Database, ReadableDatabase, TableDefinition};

use super::{Appended, DeadLetter, OutboxError};
pub(super) use crate::db::Cell as DbCell;
use crate::event::State;
use crate::publish::Outgoing;

/// seq -> serialized TaskEvent: where older versions kept pending events
/// (now in the log, `log/`); moved into the log at start-up.
pub(super) const PENDING: TableDefinition<u64, &[u8]> = TableDefinition::new("pending");
/// seq -> serialized DeadLetter.
pub(super) const DEAD: TableDefinition<u64, &[u8]> = TableDefinition::new("dead");
/// taskId -> encoded TaskRecord.
pub(super) const TASKS: TableDefinition<&str, &[u8]> = TableDefinition::new("tasks");
/// (last_seen ms, taskId): TASKS in expiry order, written by older versions;
/// dropped at start-up (each task record carries its own `last_seen`).
pub(super) const EXPIRY: TableDefinition<(u64, &str), ()> = TableDefinition::new("task_expiry");
/// Bookkeeping of the task store.
pub(super) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Every append up to this sequence number has its dedup record in TASKS.
pub(super) const STORED_THROUGH: &str = "tasks_stored_through";
/// Bytes of the values in DEAD (for `outbox.max_dead_letter_bytes`).
pub(super) const DEAD_BYTES: &str = "dead_letter_bytes";
/// seq -> serialized Rejected: no longer written; dropped at start-up.
pub(super) const REJECTED: TableDefinition<u64, &[u8]> = TableDefinition::new("rejected");

/// What hookbridge remembers of one task within the dedup window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TaskRecord {
    /// The furthest state accepted (the first terminal one wins).
    pub furthest: Option<State>,
    /// When each state was accepted (ms), indexed by [`slot`]; 0 = never.
    pub accepted_at: [i64; 5],
    pub last_seen: i64,
    /// The task is known not to be junk: registered with hookbridge, polled,
    /// or confirmed by the provider. Only an untrusted task seen once is a
    /// one-off (kept for `outbox.one_off_window_secs`).
    pub trusted: bool,
}

/// What a record costs in the task store, for `outbox.max_tracked_bytes`:
/// the key, the 49-byte value and the B-tree's per-entry offsets.
pub(super) fn record_bytes(task_id: &str) -> u64 {
    task_id.len() as u64 + 49 + RECORD_OVERHEAD
}

/// The B-tree's bookkeeping per entry, counted with each record.
const RECORD_OVERHEAD: u64 = 16;

/// Set in the state byte of an encoded record: [`TaskRecord::trusted`].
/// (255, no state, never carries it.)
const TRUSTED: u8 = 0x40;

pub(super) const STATES: [State; 5] = [
    State::Pending,
    State::Waiting,
    State::Generating,
    State::Success,
    State::Fail,
];

pub(super) fn slot(state: State) -> usize {
    STATES.iter().position(|s| *s == state).unwrap_or(0)
}

impl TaskRecord {
    pub(super) fn encode(&self) -> [u8; 49] {
        let mut out = [0u8; 49];
        out[0] = self.furthest.map_or(255, |s| {
            slot(s) as u8 | if self.trusted { TRUSTED } else { 0 }
        });
        for (i, at) in self.accepted_at.iter().enumerate() {
            out[1 + i * 8..9 + i * 8].copy_from_slice(&at.to_le_bytes());
        }
        out[41..49].copy_from_slice(&self.last_seen.to_le_bytes());
        out
    }

    pub(super) fn decode(bytes: &[u8]) -> Self {
        if bytes.len() != 49 {
            return Self::default();
        }
        let int = |at: usize| i64::from_le_bytes(bytes[at..at + 8].try_into().unwrap_or_default());
        let mut accepted_at = [0; 5];
        for (i, a) in accepted_at.iter_mut().enumerate() {
            *a = int(1 + i * 8);
        }
        let trusted = bytes[0] != 255 && bytes[0] & TRUSTED != 0;
        Self {
            furthest: STATES.get((bytes[0] & !TRUSTED) as usize).copied(),
            accepted_at,
            last_seen: int(41),
            trusted,
        }
    }

    /// Seen in one callback only, and not known to be a real task.
    pub(super) fn one_off(&self) -> bool {
        !self.trusted && self.accepted_at.iter().filter(|at| **at > 0).count() <= 1
    }

    /// A terminal state was accepted: what eviction takes first.
    pub(super) fn finished(&self) -> bool {
        self.furthest.is_some_and(|s| s.is_terminal())
    }

    /// When the record may be pruned: `window_ms` after it was last seen,
    /// `one_off_ms` for a one-off.
    pub(super) fn expires_at(&self, window_ms: i64, one_off_ms: i64) -> i64 {
        let keep = if self.one_off() {
            one_off_ms.min(window_ms)
        } else {
            window_ms
        };
        self.last_seen.saturating_add(keep)
    }

    /// The state guard and the dedup check, in that order of precedence.
    pub(super) fn decide(&self, state: State, now: i64, window_ms: i64) -> Appended {
        let at = self.accepted_at[slot(state)];
        if at > 0 && now - at < window_ms {
            return Appended::Duplicate;
        }
        match self.furthest {
            Some(f) if f.is_terminal() && state.is_terminal() && f != state => Appended::Conflict {
                seq: 0,
                previous: f,
            },
            Some(f) if state.rank() < f.rank() => Appended::Stale { furthest: f },
            _ => Appended::New { seq: 0 },
        }
    }
}

/// Reads what the writer reads at start-up.
pub(super) fn probe(db: &Database) -> Result<(), redb::Error> {
    use crate::redb_file::probe_table;
    let txn = db.begin_read()?;
    probe_table(&txn, PENDING)?;
    probe_table(&txn, DEAD)?;
    probe_table(&txn, TASKS)?;
    probe_table(&txn, META)
}

/// What the relay reads in one step.
#[derive(Debug, Default)]
pub struct Batch {
    /// The oldest entries, at most one per task, in sequence order.
    pub ready: Vec<Outgoing>,
    /// Entries that do not decode (only a foreign write or a format change
    /// could cause this), with the reason: the relay dead-letters them with
    /// their raw bytes so they neither block the queue nor stay forever.
    pub unreadable: Vec<(u64, String)>,
}

/// Up to `limit` dead letters in sequence order, after `after` if given.
pub(super) fn dead_letters(
    db: &Database,
    after: Option<u64>,
    limit: usize,
) -> Result<Vec<DeadLetter>, OutboxError> {
    let txn = db.begin_read()?;
    let table = txn.open_table(DEAD)?;
    let mut out = Vec::new();
    let Some(start) = after.map_or(Some(0), |seq| seq.checked_add(1)) else {
        return Ok(out);
    };
    for entry in table.range(start..)?.take(limit) {
        let (k, v) = entry?;
        out.push(decode_letter(k.value(), v.value()));
    }
    Ok(out)
}

pub(super) fn dead_letter(db: &Database, seq: u64) -> Result<Option<DeadLetter>, OutboxError> {
    let txn = db.begin_read()?;
    let table = txn.open_table(DEAD)?;
    Ok(table.get(seq)?.map(|v| decode_letter(seq, v.value())))
}

/// A record that does not decode is shown with its bytes, never hidden.
fn decode_letter(seq: u64, bytes: &[u8]) -> DeadLetter {
    serde_json::from_slice(bytes).unwrap_or_else(|e| DeadLetter {
        seq,
        reason: format!("unreadable dead letter: {e}"),
        failed_at: 0,
        event: serde_json::Value::Null,
        raw_hex: Some(super::hex(bytes)),
        truncated_from: None,
    })
}

pub(super) fn task(db: &Database, task_id: &str) -> Result<Option<TaskRecord>, OutboxError> {
    let txn = db.begin_read()?;
    let table = txn.open_table(TASKS)?;
    Ok(table.get(task_id)?.map(|v| TaskRecord::decode(v.value())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_record_round_trips() {
        let mut r = TaskRecord {
            furthest: Some(State::Generating),
            accepted_at: [0, 5, 7, 0, 0],
            last_seen: 7,
            trusted: false,
        };
        assert_eq!(TaskRecord::decode(&r.encode()), r);
        r.trusted = true;
        r.furthest = Some(State::Fail);
        assert_eq!(TaskRecord::decode(&r.encode()), r);
        assert!(!r.one_off() && r.finished());
        assert_eq!(
            TaskRecord::decode(&TaskRecord::default().encode()),
            TaskRecord::default()
        );
    }

    #[test]
    fn guard_rules() {
        let w = 1000;
        let mut r = TaskRecord::default();
        assert_eq!(r.decide(State::Waiting, 10, w), Appended::New { seq: 0 });
        r.accepted_at[slot(State::Generating)] = 10;
        r.furthest = Some(State::Generating);
        assert_eq!(r.decide(State::Generating, 20, w), Appended::Duplicate);
        assert_eq!(
            r.decide(State::Generating, 2000, w),
            Appended::New { seq: 0 },
            "after the window"
        );
        assert_eq!(
            r.decide(State::Waiting, 20, w),
            Appended::Stale {
                furthest: State::Generating
            }
        );
        assert_eq!(r.decide(State::Success, 20, w), Appended::New { seq: 0 });
        r.furthest = Some(State::Success);
        r.accepted_at[slot(State::Success)] = 30;
        assert_eq!(
            r.decide(State::Pending, 40, w),
            Appended::Stale {
                furthest: State::Success
            }
        );
        assert_eq!(
            r.decide(State::Generating, 40, w),
            Appended::Duplicate,
            "dedup wins over the guard"
        );
        assert_eq!(
            r.decide(State::Fail, 40, w),
            Appended::Conflict {
                seq: 0,
                previous: State::Success
            }
        );
    }
}
