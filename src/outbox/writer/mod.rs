//! The single writer thread that owns every write to the outbox.
//!
//! All mutations (appends, acks after publish, dead letters, pruning) go
//! through one thread, which takes whatever is queued as one group:
//!
//! 1. It decides every append of the group (dedup record, state guard,
//!    backlog cap), in order, and builds the group's log records.
//! 2. It writes them to the pending log with one `write` and one
//!    `fdatasync` (see `log/`). Appends are answered only after that, and
//!    if it fails every append of the group gets the error (never a success
//!    for something not on disk).
//! 3. Only when the group needs it, one redb transaction (durable) holds
//!    what lives in the task store: dead letters, requeues, pruning, and a
//!    checkpoint of the dedup records changed since the last one.
//!
//! The dedup records are thus written to redb's copy-on-write B-tree about
//! once a second in bulk, not once per group: until then they live in
//! memory ([`Shared::dirty`]) and, durably, in the log records that carry
//! them, which a restart reads back. A log segment is deleted only once its
//! records are in the task store and none of its events is pending.
//!
//! Here: the commands and the group-commit loop (`run`, `apply`, the log
//! write). By job: `recover` (start-up: the task store, migration of older
//! versions, the log read back, damage), `decide` (each command's
//! decision: dedup, state guard, backlog cap), `checkpoint` (the thread
//! that writes dedup records, deleting segments), `store` (the task
//! store's transaction: dead letters, requeue, prune, evict).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redb::{Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata};
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot, Notify};

use super::log::{Damage, Log, Record, Slot};
use super::store::{
    record_bytes, slot, DbCell, TaskRecord, DEAD, DEAD_BYTES, EXPIRY, META, PENDING, REJECTED,
    STORED_THROUGH, TASKS,
};
use super::{AppendError, Appended, DeadLetter, OutboxError, Shared, Stats};
use crate::clock::now_ms;
use crate::config::OutboxConfig;
use crate::event::EventMeta;
use crate::event::TaskEvent;
use crate::sync::lock;

/// Most commands taken as one group.
const MAX_GROUP: usize = 4096;
/// Most task records looked at by one prune step's read (off the writer),
/// so that a step's deletions stay small.
/// (A few in the unit tests, so that they cross step boundaries.)
pub(super) const PRUNE_SCAN: usize = if cfg!(test) { 3 } else { 20_000 };
/// Most task records looked at by one eviction step: eviction takes the
/// oldest among them (all of them when fewer are tracked).
const EVICT_SCAN: usize = if cfg!(test) { 8 } else { 100_000 };
/// Dedup records are checkpointed into the task store this often...
/// (Never by time in the unit tests, which check the log's copy.)
const CHECKPOINT_EVERY: Duration = Duration::from_secs(if cfg!(test) { 3600 } else { 1 });
/// ...or once this many are waiting, whichever comes first.
/// (A few in the unit tests, which write few.)
const CHECKPOINT_RECORDS: usize = if cfg!(test) { 50 } else { 50_000 };

pub(super) enum Command {
    Append {
        event: Box<TaskEvent>,
        /// The event serialized on the caller's thread, off the single writer.
        payload: Vec<u8>,
        /// See [`super::Outbox::append_trusted`].
        trusted: bool,
        reply: oneshot::Sender<Result<Appended, AppendError>>,
    },
    Complete {
        delivered: Vec<u64>,
        dead: Vec<(u64, String)>,
        reply: oneshot::Sender<Result<(), OutboxError>>,
    },
    Requeue {
        /// The dead letters to move (their sequence numbers); `None`: all.
        only: Option<Vec<u64>>,
        /// The sequence numbers moved.
        reply: oneshot::Sender<Result<Vec<u64>, OutboxError>>,
    },
    /// Delete dead letters for good (an operator's "bury").
    Delete {
        /// The dead letters to delete (sorted, without repeats).
        seqs: Vec<u64>,
        /// The sequence numbers deleted.
        reply: oneshot::Sender<Result<Vec<u64>, OutboxError>>,
    },
    Bury {
        /// The dead letter; the writer gives it its number and time.
        letter: Box<DeadLetter>,
        reply: oneshot::Sender<Result<u64, OutboxError>>,
    },
    /// One step of a pass over the task records: deletes those of
    /// `expired` that are still expired once the changed records are
    /// checkpointed (in the same transaction); answers how many went. With
    /// none, only the checkpoint (a pass starts with one, so that its
    /// reads off the writer see every record).
    Prune {
        expired: Vec<String>,
        reply: Option<oneshot::Sender<Result<u64, OutboxError>>>,
    },
    /// Commit what was queued before, then end the thread.
    Stop,
}

pub(super) struct Writer {
    db: Arc<DbCell>,
    log: Log,
    shared: Arc<Shared>,
    config: OutboxConfig,
    stats: Arc<Stats>,
    notify: Arc<Notify>,
    next_seq: u64,
    /// Every append up to this sequence number has its dedup record in the
    /// task store.
    stored_through: u64,
    last_checkpoint: Instant,
    /// Acks of events that became dead letters, for the next log write.
    deferred_acks: Vec<u64>,
    /// Where the next eviction step starts looking (see `evict_step`).
    evict_from: Option<String>,
    /// Writes checkpoints of the dedup records off this thread.
    checkpointer: Checkpointer,
    /// Bytes of the dead letters in the task store, as stored.
    dead_bytes: u64,
    /// The last log write found the disk full: recycle the segment being
    /// written as soon as it allows, whatever its size.
    short_of_space: bool,
}

mod checkpoint;
mod decide;
mod recover;
mod store;
#[cfg(test)]
mod tests;

use checkpoint::{begin_durable, no_space, put_records, Checkpointer, Records};
pub(super) use store::expired_after;

/// Changes to the in-memory counters, applied only once a commit succeeded.
#[derive(Default)]
struct Delta {
    pending: i64,
    pending_bytes: i64,
    dead: i64,
    accepted: u64,
    duplicates: u64,
    stale: u64,
    conflicts: u64,
    refused_full: u64,
    published: u64,
    dead_lettered: u64,
    dead_dropped: u64,
    dead_deleted: u64,
}

/// A reply, called with the error of the step it depends on (if any).
type Reply = Box<dyn FnOnce(Option<&OutboxError>, &StoreWork) + Send>;

/// Which step of the group a command's answer waits for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Needs {
    /// The log write (appends, acks of published events).
    Log,
    /// The log write and then the task store's transaction.
    Store,
}

/// What a group does in the task store, after its log write.
#[derive(Default)]
struct StoreWork {
    /// New dead letters: from failed publishes (with the pending slot they
    /// leave) and buried events.
    letters: Vec<(DeadLetter, Option<Slot>)>,
    /// Dead letters requeued into the log by this group.
    requeued: Vec<u64>,
    /// Dead letters deleted for good by this group.
    deleted: Vec<u64>,
    /// A prune step: the task records that were expired when read.
    prune: Option<Vec<String>>,
    /// How many of them the step deleted.
    pruned: Option<u64>,
    /// What the pruned records cost.
    pruned_bytes: u64,
    /// The task records are over a cap: evict some.
    evict: bool,
    evicted: Evicted,
    /// Damaged log ranges kept by this group's letters (see [`damage_key`]).
    damage_keys: Vec<String>,
    /// Oldest dead letters deleted to stay under the caps.
    dropped: u64,
    /// The dead letters' bytes once the transaction commits.
    dead_bytes: u64,
}

/// What an eviction step took.
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
struct Evicted {
    finished: u64,
    unfinished: u64,
    bytes: u64,
}

impl StoreWork {
    fn is_empty(&self) -> bool {
        self.letters.is_empty()
            && self.requeued.is_empty()
            && self.deleted.is_empty()
            && self.prune.is_none()
            && !self.evict
    }
}

/// What a group adds to the log and to memory once the write succeeded.
#[derive(Default)]
struct Staged {
    slots: Vec<Slot>,
    /// Dedup records decided by this group (the latest per task).
    records: HashMap<String, TaskRecord>,
    new_tasks: u64,
    /// What the new tasks' records cost.
    new_bytes: u64,
    /// Published events leaving the queue.
    acked: Vec<u64>,
    /// Acks taken from `deferred_acks` into this group's write.
    deferred: Vec<u64>,
}

impl Writer {
    /// Until `Stop` or the last handle is gone.
    fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut group = Vec::with_capacity(MAX_GROUP);
        while let Some(first) = rx.blocking_recv() {
            let mut stop = matches!(first, Command::Stop);
            if !stop {
                group.push(first);
            }
            while !stop && group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(Command::Stop) => stop = true,
                    Ok(command) => group.push(command),
                    Err(_) => break,
                }
            }
            if !group.is_empty() || stop {
                self.apply_supervised(&mut group, stop);
            }
            if stop {
                break;
            }
        }
        self.checkpointer.stop();
        tracing::debug!("outbox writer stopped");
    }

    /// A panic while applying a group (a bug, or redb refusing a damaged
    /// file) must not end the thread that every write depends on: the
    /// group is refused, and the writer starts again from a re-opened
    /// database after `REOPEN_EVERY`, as after a storage error.
    fn apply_supervised(&mut self, group: &mut Vec<Command>, last: bool) {
        let seq_before = self.next_seq;
        let applied =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.apply(group, last)));
        if let Err(panic) = applied {
            tracing::error!(
                cause = %crate::sync::panic_message(&*panic),
                "outbox writer panicked; the group is refused and the database re-opened"
            );
            // Dropping the group's replies answers its callers "closed".
            group.clear();
            self.log.discard();
            self.next_seq = seq_before;
            self.db.set_broken(true, true);
            self.stats.storage_failing.store(true, Ordering::Relaxed);
            Stats::add(&self.stats.storage_errors, 1);
        }
    }

    fn apply(&mut self, group: &mut Vec<Command>, last: bool) {
        let seq_before = self.next_seq;
        let mut replies: Vec<(Needs, Reply)> = Vec::with_capacity(group.len());
        let mut delta = Delta::default();
        let mut staged = Staged::default();
        let mut work = StoreWork::default();
        let commands = group.len();
        let mut queued = group.drain(..);
        let built = self.repair().and_then(|()| {
            self.build(
                &mut queued,
                &mut replies,
                &mut delta,
                &mut staged,
                &mut work,
            )
        });
        // Requests of a group that failed before or part way through still
        // need their answer: the group's error.
        for command in queued {
            replies.push((Needs::Log, command.into_reply()));
        }
        let written = built.is_ok();
        let logged = built.and_then(|()| self.write_log(&mut staged, commands));
        let log_error = logged.err();
        let mut store_error = None;
        if let Some(e) = &log_error {
            if !matches!(e, OutboxError::Reopening) {
                tracing::error!(error = %e, "outbox commit failed; the group is refused");
            }
            self.log.discard();
            // Nothing of the group was written: reuse its sequence numbers.
            // (After a failed write they are skipped: a record may remain
            // in a segment that could not be cut back.)
            if !written {
                self.next_seq = seq_before;
            }
            self.deferred_acks.append(&mut staged.deferred);
            Stats::add(&self.stats.storage_errors, 1);
        } else {
            self.publish_staged(staged, &mut delta);
            self.checkpoint_done(false);
            if last || !work.is_empty() {
                // Synchronous, after any checkpoint in flight: the store's
                // records must never go back to an older value.
                self.checkpoint_done(true);
                if let Err(e) = self.store(&mut work, &mut delta) {
                    tracing::error!(error = %e, "outbox task store commit failed");
                    Stats::add(&self.stats.storage_errors, 1);
                    store_error = Some(e);
                }
            } else if let Err(e) = self.start_checkpoint(&mut delta) {
                tracing::error!(error = %e, "outbox task store commit failed");
                Stats::add(&self.stats.storage_errors, 1);
                store_error = Some(e);
            }
            self.recycle();
        }
        // A failed log write cuts the log back by itself; only the task
        // store needs re-opening after an error (and a full disk then
        // refuses only while it stays full, not for `REOPEN_EVERY`).
        let log_only = matches!(log_error, Some(OutboxError::Log(_)));
        self.db.set_broken(
            (log_error.is_some() && !log_only) || store_error.is_some(),
            false,
        );
        self.stats.storage_failing.store(
            log_error.is_some() || store_error.is_some(),
            Ordering::Relaxed,
        );
        if log_error.is_none() {
            self.apply_delta(&delta);
        }
        for (needs, reply) in replies {
            let error = log_error
                .as_ref()
                .or(store_error.as_ref().filter(|_| needs == Needs::Store));
            reply(error, &work);
        }
    }

    /// Re-opens a database that failed, at most every `REOPEN_EVERY`, so a
    /// disk that stays full costs little; requests meanwhile fail at once.
    fn repair(&mut self) -> Result<(), OutboxError> {
        Ok(self.db.repair()?)
    }

    fn apply_delta(&self, d: &Delta) {
        let s = &self.stats;
        let shift = |c: &std::sync::atomic::AtomicU64, by: i64| {
            if by >= 0 {
                c.fetch_add(by as u64, Ordering::Relaxed);
            } else {
                c.fetch_sub(by.unsigned_abs(), Ordering::Relaxed);
            }
        };
        shift(&s.pending, d.pending);
        shift(&s.pending_bytes, d.pending_bytes);
        shift(&s.dead, d.dead);
        Stats::add(&s.accepted, d.accepted);
        Stats::add(&s.duplicates, d.duplicates);
        Stats::add(&s.stale, d.stale);
        Stats::add(&s.conflicts, d.conflicts);
        Stats::add(&s.refused_full, d.refused_full);
        Stats::add(&s.published, d.published);
        Stats::add(&s.dead_lettered, d.dead_lettered);
        Stats::add(&s.dead_dropped, d.dead_dropped);
        Stats::add(&s.dead_buried, d.dead_deleted);
        if d.accepted > 0 || d.pending > 0 {
            self.notify.notify_one();
        }
    }

    fn window_ms(&self) -> i64 {
        (self.config.dedup_window_secs as i64).saturating_mul(1000)
    }

    fn one_off_ms(&self) -> i64 {
        (self.config.one_off_window_secs as i64).saturating_mul(1000)
    }

    /// Writes and syncs the group's records. On a full disk, the log
    /// segments nothing needs are recycled and the write tried once more,
    /// so a callback is refused only while there is truly no room.
    fn write_log(&mut self, staged: &mut Staged, commands: usize) -> Result<(), OutboxError> {
        if !self.log.has_group() {
            return Ok(());
        }
        // Acks need no sync of their own: losing one in a crash only
        // republishes its events, and the next append's sync covers it.
        let sync = !staged.slots.is_empty();
        let written = self.commit_log(sync, commands);
        match written {
            // Acks alone: the events leave the queue in memory all the same
            // and the acks wait for the next write that fits (losing them
            // in a crash only republishes), so that a full disk never stops
            // the relay from draining it, which is what frees the space.
            Err(e) if no_space(&e) && !sync => {
                self.short_of_space = true;
                self.log.discard();
                self.deferred_acks.append(&mut staged.deferred);
                self.deferred_acks.extend_from_slice(&staged.acked);
                tracing::debug!("the disk is full: acks kept in memory until a write fits");
                Ok(())
            }
            Err(e) if no_space(&e) && self.log.has_group() => {
                self.short_of_space = true;
                // The task store may still have room in its own pages: a
                // checkpoint now lets the used segments go.
                // (It covers what is written: not this group's numbers.)
                self.checkpoint_done(true);
                let next = self.next_seq;
                if let Some(first) = staged.slots.first() {
                    self.next_seq = first.seq;
                }
                let mut delta = Delta::default();
                if let Err(e) = self.store(&mut StoreWork::default(), &mut delta) {
                    tracing::debug!(error = %e, "no checkpoint on the full disk");
                }
                self.next_seq = next;
                self.apply_delta(&delta);
                let active = self.log.active_id();
                let freed = self.recycle();
                // The group's places were counted from the segment's old
                // end: move them by what was emptied before it.
                for slot in staged.slots.iter_mut().filter(|s| s.segment == active) {
                    slot.offset -= freed;
                }
                tracing::debug!(
                    freed,
                    "the disk is full; used log segments recycled, writing again"
                );
                self.commit_log(sync, commands).map_err(OutboxError::Log)
            }
            written => written.map_err(OutboxError::Log),
        }
    }

    fn commit_log(&mut self, sync: bool, commands: usize) -> std::io::Result<()> {
        let log = &mut self.log;
        if sync {
            self.stats
                .metrics
                .time_commit(commands, || log.commit(true))
        } else {
            log.commit(false)
        }
    }

    /// Makes a written group visible: pending slots, dedup records, acks.
    fn publish_staged(&mut self, staged: Staged, delta: &mut Delta) {
        let mut index = lock(&self.shared.index);
        for slot in staged.slots {
            index.push(slot);
        }
        for seq in staged.acked {
            if let Some(slot) = index.remove(seq) {
                delta.pending -= 1;
                delta.pending_bytes -= slot.len as i64;
                delta.published += 1;
            }
        }
        drop(index);
        if !staged.records.is_empty() {
            lock(&self.shared.dirty).extend(staged.records);
        }
        self.shared
            .tracked
            .fetch_add(staged.new_tasks, Ordering::Relaxed);
        self.shared
            .tracked_bytes
            .fetch_add(staged.new_bytes, Ordering::Relaxed);
    }
}

impl Command {
    /// The reply of a command that never reached a transaction; it is only
    /// ever called with the group's error.
    fn into_reply(self) -> Reply {
        fn fail<T: Send + 'static>(reply: oneshot::Sender<Result<T, OutboxError>>) -> Reply {
            Box::new(move |err, _| {
                let e = err.map_or(OutboxError::Reopening, |e| OutboxError::Db(redb_copy(e)));
                let _ = reply.send(Err(e));
            })
        }
        match self {
            Command::Append { reply, .. } => Box::new(move |err, _| {
                let message = err.map_or_else(|| "not stored".to_string(), |e| e.to_string());
                let _ = reply.send(Err(AppendError::Storage(message)));
            }),
            Command::Stop => Box::new(|_, _| {}),
            Command::Complete { reply, .. } => fail(reply),
            Command::Requeue { reply, .. } => fail(reply),
            Command::Bury { reply, .. } => fail(reply),
            Command::Delete { reply, .. } => fail(reply),
            Command::Prune { reply, .. } => match reply {
                Some(reply) => fail(reply),
                None => Box::new(|_, _| {}),
            },
        }
    }
}

/// `OutboxError` is not `Clone`; every request of a failed group gets the
/// same message.
fn redb_copy(e: &OutboxError) -> redb::Error {
    redb::Error::from(redb::StorageError::from(std::io::Error::other(
        e.to_string(),
    )))
}
