//! The single writer thread that owns every write to the outbox.
//!
//! All mutations (appends, acks after publish, dead letters, pruning) go
//! through one thread, which takes whatever is queued as one group:
//!
//! 1. It decides every append of the group (dedup record, state guard,
//!    backlog cap), in order, and builds the group's log records.
//! 2. It writes them to the pending log with one `write` and one
//!    `fdatasync` (see `log.rs`). Appends are answered only after that, and
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
use crate::event::TaskEvent;
use crate::publish::EventMeta;
use crate::sync::lock;

/// Most commands taken as one group.
const MAX_GROUP: usize = 4096;
/// Most task records looked at by one prune transaction, so pruning never
/// stalls appends for long.
/// (A few in the unit tests, so that they cross step boundaries.)
const PRUNE_SCAN: usize = if cfg!(test) { 3 } else { 20_000 };
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
    Bury {
        /// The dead letter; the writer gives it its number and time.
        letter: Box<DeadLetter>,
        reply: oneshot::Sender<Result<u64, OutboxError>>,
    },
    /// One step of a pass over the task records: how many were deleted,
    /// and whether the pass goes on.
    Prune {
        reply: Option<oneshot::Sender<Result<(u64, bool), OutboxError>>>,
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
    /// Where the current prune pass resumes (the next task id to look at);
    /// `None` starts a new pass from the first.
    prune_from: Option<String>,
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

/// What the task store holds at start-up.
struct StoreState {
    stored_through: u64,
    /// Pending events an older version kept in redb.
    old_pending: Vec<(u64, Vec<u8>)>,
    last_dead: u64,
    dead_count: u64,
    tasks_stored: u64,
    /// What the stored task records cost (estimated from a sample).
    bytes_stored: u64,
    dead_bytes: u64,
}

/// Reads what the task store holds. Only a new file (or one of an older
/// version) is written to here: opening an existing data dir must not need
/// free space.
fn read_store(db: &redb::Database) -> Result<StoreState, OutboxError> {
    use redb::TableHandle;
    let names: Vec<String> = db
        .begin_read()?
        .list_tables()?
        .map(|t| t.name().to_string())
        .collect();
    let has = |table: &str| names.iter().any(|n| n == table);
    let complete = [DEAD.name(), TASKS.name(), META.name()]
        .iter()
        .all(|t| has(t));
    if !complete || has(REJECTED.name()) || has(EXPIRY.name()) {
        let txn = db.begin_write()?;
        txn.open_table(DEAD)?;
        txn.open_table(TASKS)?;
        txn.open_table(META)?;
        // Rejected bodies are kept in memory now, and the task records
        // carry their own expiry: free what older versions stored.
        txn.delete_table(REJECTED)?;
        txn.delete_table(EXPIRY)?;
        txn.commit()?;
    }
    let txn = db.begin_read()?;
    let mut old_pending = Vec::new();
    if has(PENDING.name()) {
        for entry in txn.open_table(PENDING)?.iter()? {
            let (k, v) = entry?;
            old_pending.push((k.value(), v.value().to_vec()));
        }
    }
    let dead = txn.open_table(DEAD)?;
    let meta = txn.open_table(META)?;
    let dead_bytes = match meta.get(DEAD_BYTES)? {
        Some(v) => v.value(),
        // Written by an older version, which did not count them.
        None => {
            let mut bytes = 0;
            for entry in dead.iter()? {
                bytes += entry?.1.value().len() as u64;
            }
            bytes
        }
    };
    let last_dead = dead.last()?.map_or(0, |(k, _)| k.value());
    let tasks = txn.open_table(TASKS)?;
    let tasks_stored = tasks.len()?;
    let bytes_stored = stored_bytes(&tasks, tasks_stored)?;
    Ok(StoreState {
        stored_through: meta.get(STORED_THROUGH)?.map_or(0, |v| v.value()),
        old_pending,
        last_dead,
        dead_count: dead.len()?,
        tasks_stored,
        bytes_stored,
        dead_bytes,
    })
}

/// The task store's note that a damaged range of the log is kept as a dead
/// letter already (so a restart does not keep it twice).
fn damage_key(damage: &Damage) -> String {
    format!("damage:{:020}:{:020}", damage.segment, damage.offset)
}

/// The thread that writes the dedup records to the task store, so that a
/// checkpoint (tens of thousands of B-tree inserts and a sync) never holds
/// up a group of appends. Owned by the writer, which joins it.
struct Checkpointer {
    jobs: Option<std::sync::mpsc::Sender<(Arc<Records>, u64)>>,
    done: std::sync::mpsc::Receiver<Result<u64, OutboxError>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The sequence number the checkpoint in flight covers.
    in_flight: Option<u64>,
}

type Records = HashMap<String, TaskRecord>;

impl Checkpointer {
    fn start(db: Arc<DbCell>) -> Result<Self, OutboxError> {
        let (jobs, inbox) = std::sync::mpsc::channel::<(Arc<Records>, u64)>();
        let (report, done) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("outbox-checkpoint".into())
            .spawn(move || {
                for (records, through) in inbox {
                    let written = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        write_records(&db, &records, through)
                    }))
                    .unwrap_or_else(|panic| {
                        Err(OutboxError::Log(std::io::Error::other(format!(
                            "checkpoint panicked: {}",
                            crate::sync::panic_message(&*panic)
                        ))))
                    });
                    if report.send(written.map(|()| through)).is_err() {
                        return;
                    }
                }
            })
            .map_err(|source| OutboxError::DataDir {
                path: "outbox checkpoint thread".into(),
                source,
            })?;
        Ok(Self {
            jobs: Some(jobs),
            done,
            thread: Some(thread),
            in_flight: None,
        })
    }

    fn stop(&mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            if let Err(panic) = thread.join() {
                tracing::error!(cause = %crate::sync::panic_message(&*panic), "outbox checkpoint thread panicked");
            }
        }
    }
}

/// What the task records in `tasks` (`count` of them) cost
/// ([`record_bytes`]): exact up to `SAMPLE` records, else estimated from
/// the first `SAMPLE` (their average size), so that a start-up never reads
/// a store of millions of records whole.
fn stored_bytes(
    tasks: &impl ReadableTable<&'static str, &'static [u8]>,
    count: u64,
) -> Result<u64, OutboxError> {
    const SAMPLE: usize = 10_000;
    let (mut seen, mut bytes) = (0u64, 0u64);
    for entry in tasks.iter()?.take(SAMPLE) {
        let (k, _) = entry?;
        seen += 1;
        bytes += record_bytes(k.value());
    }
    Ok(match seen {
        0 => 0,
        _ if seen >= count => bytes,
        _ => bytes / seen * count,
    })
}

/// One durable transaction with `records` and the sequence number they
/// cover.
fn write_records(db: &DbCell, records: &Records, through: u64) -> Result<(), OutboxError> {
    let db = db.get()?;
    let txn = begin_durable(&db)?;
    put_records(&txn, records, through)?;
    txn.commit()?;
    Ok(())
}

/// A write transaction that is synced when it commits.
fn begin_durable(db: &redb::Database) -> Result<redb::WriteTransaction, OutboxError> {
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate).map_err(|e| {
        OutboxError::Db(redb::Error::from(redb::StorageError::from(
            std::io::Error::other(e),
        )))
    })?;
    Ok(txn)
}

/// Writes a checkpoint's `records` into `txn`, and the sequence number
/// they cover.
fn put_records(
    txn: &redb::WriteTransaction,
    records: &Records,
    through: u64,
) -> Result<(), OutboxError> {
    let mut tasks = txn.open_table(TASKS)?;
    for (task, record) in records {
        tasks.insert(task.as_str(), record.encode().as_slice())?;
    }
    txn.open_table(META)?.insert(STORED_THROUGH, through)?;
    Ok(())
}

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
    prune: bool,
    pruned: Option<(u64, bool)>,
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
        self.letters.is_empty() && self.requeued.is_empty() && !self.prune && !self.evict
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
    /// Opens the log and the task store, reads back what an earlier run
    /// left (pending events, dedup records not yet checkpointed), moves the
    /// pending entries of older versions (kept in redb) into the log, and
    /// starts the thread.
    pub(super) fn start(
        db: Arc<DbCell>,
        config: OutboxConfig,
        stats: Arc<Stats>,
        notify: Arc<Notify>,
        shared: Arc<Shared>,
        rx: mpsc::Receiver<Command>,
    ) -> Result<std::thread::JoinHandle<()>, OutboxError> {
        let StoreState {
            stored_through,
            old_pending,
            last_dead,
            dead_count,
            tasks_stored,
            bytes_stored,
            dead_bytes,
        } = read_store(&*db.get()?)?;

        let log_dir = config.data_dir.join("pending");
        let mut replayed: HashMap<String, TaskRecord> = HashMap::new();
        let mut last_seq = 0u64;
        let (mut log, opened) = {
            let mut index = lock(&shared.index);
            Log::open(
                &log_dir,
                config.segment_bytes,
                |record, slot| match record {
                    Record::Append {
                        seq,
                        task_id,
                        record,
                        ..
                    } => {
                        last_seq = last_seq.max(seq);
                        if let Some(record) = record.filter(|_| seq > stored_through) {
                            replayed.insert(task_id.to_string(), record);
                        }
                        if !index.push(slot) {
                            tracing::warn!(
                                seq,
                                "a repeated sequence number in the pending log is skipped"
                            );
                        }
                    }
                    Record::Ack(seqs) => {
                        for seq in seqs {
                            index.remove(seq);
                        }
                    }
                    // In log order: a later append of the task overrides them.
                    Record::Records { seq, records } => {
                        last_seq = last_seq.max(seq);
                        if seq > stored_through {
                            for (task, record) in records {
                                replayed.insert(task.to_string(), record);
                            }
                        }
                    }
                },
            )
            .map_err(|source| OutboxError::DataDir {
                path: log_dir.display().to_string(),
                source,
            })?
        };
        if opened.torn_bytes > 0 {
            tracing::warn!(
                bytes = opened.torn_bytes,
                "the pending log ended in a torn write (a crash during a commit, never answered 2xx); cut back"
            );
            Stats::add(&stats.log_torn_bytes, opened.torn_bytes);
        }
        for damage in &opened.damaged {
            tracing::error!(
                damage = %damage.place(),
                "the pending log is damaged: bytes that were written whole (maybe answered 2xx) hold no valid record; \
                 skipped to the next valid one, the bytes kept as a dead letter"
            );
            Stats::add(&stats.log_damaged_ranges, 1);
            Stats::add(&stats.log_damaged_bytes, damage.len);
            stats.note_damage(format!("pending log damaged: {}", damage.place()));
        }

        // Older versions kept pending events in redb: move them into the
        // log, then drop the table (a crash in between moves them again,
        // skipping those already moved).
        let moved: Vec<&(u64, Vec<u8>)> = old_pending
            .iter()
            .filter(|(seq, _)| *seq > last_seq)
            .collect();
        if !moved.is_empty() {
            let mut slots = Vec::new();
            for (seq, bytes) in &moved {
                let event = serde_json::from_slice::<TaskEvent>(bytes).ok();
                let (task, at) = event
                    .as_ref()
                    .map_or(("", 0), |e| (e.task_id.as_str(), e.received_at));
                slots.push(log.append(*seq, at, task, None, None, bytes));
                last_seq = last_seq.max(*seq);
            }
            log.commit(true).map_err(|source| OutboxError::DataDir {
                path: log_dir.display().to_string(),
                source,
            })?;
            let mut index = lock(&shared.index);
            for slot in slots {
                index.push(slot);
            }
            tracing::info!(
                moved = moved.len(),
                "pending events of an older version moved into the log"
            );
        }
        if !old_pending.is_empty() {
            let txn = db.get()?.begin_write()?;
            txn.delete_table(PENDING)?;
            txn.commit()?;
        }

        // Dedup records the task store does not have yet.
        let (mut new_tasks, mut new_bytes) = (0, 0);
        if !replayed.is_empty() {
            let txn = db.get()?.begin_read()?;
            let tasks = txn.open_table(TASKS)?;
            for task in replayed.keys() {
                if tasks.get(task.as_str())?.is_none() {
                    new_tasks += 1;
                    new_bytes += record_bytes(task);
                }
            }
        }
        {
            let index = lock(&shared.index);
            stats.pending.store(index.len(), Ordering::Relaxed);
            stats.pending_bytes.store(index.bytes(), Ordering::Relaxed);
        }
        stats.dead.store(dead_count, Ordering::Relaxed);
        shared
            .tracked
            .store(tasks_stored + new_tasks, Ordering::Relaxed);
        shared
            .tracked_bytes
            .store(bytes_stored + new_bytes, Ordering::Relaxed);
        *lock(&shared.dirty) = replayed;
        tracing::info!(
            segments = opened.segments,
            records = opened.records,
            pending = stats.pending.load(Ordering::Relaxed),
            "outbox opened"
        );

        let db_for_checkpoints = db.clone();
        let mut writer = Writer {
            db,
            log,
            shared,
            config,
            stats,
            notify,
            next_seq: last_seq.max(last_dead).max(stored_through) + 1,
            stored_through,
            last_checkpoint: Instant::now(),
            deferred_acks: Vec::new(),
            prune_from: None,
            evict_from: None,
            checkpointer: Checkpointer::start(db_for_checkpoints)?,
            dead_bytes,
            short_of_space: false,
        };
        writer.bury_damage(&opened.damaged);
        std::thread::Builder::new()
            .name("outbox-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|source| OutboxError::DataDir {
                path: "outbox writer thread".into(),
                source,
            })
    }

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

    /// Decides every command of the group and builds its log records.
    fn build(
        &mut self,
        group: impl Iterator<Item = Command>,
        replies: &mut Vec<(Needs, Reply)>,
        delta: &mut Delta,
        staged: &mut Staged,
        work: &mut StoreWork,
    ) -> Result<(), OutboxError> {
        self.log.roll_if_full().map_err(OutboxError::Log)?;
        if !self.deferred_acks.is_empty() {
            staged.deferred = std::mem::take(&mut self.deferred_acks);
            self.log.ack(&staged.deferred);
        }
        let db = self.db.get()?;
        let mut tasks = None;
        let now = now_ms();
        for command in group {
            match command {
                Command::Append {
                    event,
                    payload,
                    trusted,
                    reply,
                } => {
                    // Faults for the tests below.
                    #[cfg(test)]
                    let injected = event.task_id == tests::FAIL_TASK;
                    #[cfg(test)]
                    assert!(event.task_id != tests::PANIC_TASK, "injected writer panic");
                    let outcome = self.append(
                        &db,
                        &mut tasks,
                        staged,
                        (*event, trusted),
                        payload,
                        now,
                        delta,
                    );
                    #[cfg(test)]
                    let outcome = if injected {
                        Err(tests::injected())
                    } else {
                        outcome
                    };
                    // Each reply is queued before `?`: the command in flight
                    // when a step fails gets the error too.
                    let stored = outcome.as_ref().ok().cloned();
                    replies.push((
                        Needs::Log,
                        Box::new(move |err, _| {
                            let _ = reply.send(match (err, stored) {
                                (None, Some(stored)) => stored,
                                (Some(e), _) => Err(AppendError::Storage(e.to_string())),
                                (None, None) => Err(AppendError::Storage("not stored".into())),
                            });
                        }),
                    ));
                    let _answered_above = outcome?;
                }
                Command::Complete {
                    delivered,
                    dead,
                    reply,
                } => {
                    let read = self.complete(delivered, dead, now, staged, work);
                    replies.push((
                        Needs::Store,
                        Box::new(move |err, _| {
                            let _ = reply
                                .send(err.map_or(Ok(()), |e| Err(OutboxError::Db(redb_copy(e)))));
                        }),
                    ));
                    read?;
                }
                Command::Requeue { only, reply } => {
                    let moved = self.requeue(&db, staged, work, only.as_deref(), delta);
                    let seqs = moved.as_ref().ok().cloned().unwrap_or_default();
                    replies.push((
                        Needs::Store,
                        Box::new(move |err, _| {
                            let _ = reply
                                .send(err.map_or(Ok(seqs), |e| Err(OutboxError::Db(redb_copy(e)))));
                        }),
                    ));
                    moved?;
                }
                Command::Bury { letter, reply } => {
                    let seq = self.next_seq;
                    self.next_seq += 1;
                    let letter = DeadLetter {
                        seq,
                        failed_at: now,
                        ..*letter
                    };
                    work.letters.push((letter, None));
                    replies.push((
                        Needs::Store,
                        Box::new(move |err, _| {
                            let _ = reply
                                .send(err.map_or(Ok(seq), |e| Err(OutboxError::Db(redb_copy(e)))));
                        }),
                    ));
                }
                Command::Stop => {}
                Command::Prune { reply } => {
                    work.prune = true;
                    // The step's figures are known once the store committed.
                    replies.push((
                        Needs::Store,
                        Box::new(move |err, work| {
                            let step = work.pruned.unwrap_or((0, false));
                            if let Some(reply) = reply {
                                let _ = reply.send(
                                    err.map_or(Ok(step), |e| Err(OutboxError::Db(redb_copy(e)))),
                                );
                            }
                        }),
                    ));
                }
            }
        }
        work.evict |= self.over_cap(staged);
        Ok(())
    }

    /// The task records (with this group's new ones) are over a cap.
    fn over_cap(&self, staged: &Staged) -> bool {
        let count = self.shared.tracked.load(Ordering::Relaxed) + staged.new_tasks;
        let bytes = self.shared.tracked_bytes.load(Ordering::Relaxed) + staged.new_bytes;
        self.config.dedup
            && (count > self.config.max_tracked_tasks || bytes > self.config.max_tracked_bytes)
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

    /// The dedup record of `task_id`: this group's, then the one not yet
    /// checkpointed, then the task store's.
    fn lookup(
        &self,
        db: &redb::Database,
        tasks: &mut Option<redb::ReadOnlyTable<&'static str, &'static [u8]>>,
        staged: &Staged,
        task_id: &str,
    ) -> Result<Option<TaskRecord>, OutboxError> {
        if let Some(record) = staged.records.get(task_id) {
            return Ok(Some(*record));
        }
        if let Some(record) = self.shared.unstored(task_id) {
            return Ok(Some(record));
        }
        if tasks.is_none() {
            *tasks = Some(db.begin_read()?.open_table(TASKS)?);
        }
        match tasks {
            Some(table) => Ok(table.get(task_id)?.map(|v| TaskRecord::decode(v.value()))),
            None => Ok(None),
        }
    }

    /// Dedup and state guard first (a repeat is answered 200 even when the
    /// backlog is full), then the backlog cap, then the log record. A new
    /// task is never refused for want of a dedup record: past
    /// `max_tracked_tasks` the group evicts old ones (`evict_step`).
    #[allow(clippy::too_many_arguments)]
    fn append(
        &mut self,
        db: &redb::Database,
        tasks: &mut Option<redb::ReadOnlyTable<&'static str, &'static [u8]>>,
        staged: &mut Staged,
        (mut event, trusted): (TaskEvent, bool),
        payload: Vec<u8>,
        now: i64,
        delta: &mut Delta,
    ) -> Result<Result<Appended, AppendError>, OutboxError> {
        let old = if self.config.dedup {
            self.lookup(db, tasks, staged, &event.task_id)?
        } else {
            None
        };
        let mut record = old.unwrap_or_default();
        let decision = record.decide(event.state, now, self.window_ms());
        tracing::debug!(task_id = %event.task_id, state = event.state.as_str(), ?decision, "append");
        let previous = match decision {
            Appended::Duplicate => {
                delta.duplicates += 1;
                return Ok(Ok(decision));
            }
            Appended::Stale { .. } => {
                delta.stale += 1;
                return Ok(Ok(decision));
            }
            Appended::Conflict { previous, .. } => Some(previous),
            Appended::New { .. } => None,
        };
        let count =
            (self.stats.pending.load(Ordering::Relaxed) as i64 + delta.pending).max(0) as u64;
        let bytes = (self.stats.pending_bytes.load(Ordering::Relaxed) as i64 + delta.pending_bytes)
            .max(0) as u64;
        let full = if count >= self.config.max_pending {
            Some("max_pending")
        } else if bytes >= self.config.max_pending_bytes {
            Some("max_pending_bytes")
        } else {
            None
        };
        if let Some(which) = full {
            delta.refused_full += 1;
            return Ok(Err(AppendError::Full(which)));
        }
        if payload.len() > super::log::MAX_EVENT {
            return Ok(Err(AppendError::Storage(
                "the event is larger than an outbox record may be".into(),
            )));
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        // Serialized by the caller; only a conflict (rare) changes the body.
        let payload = match previous {
            Some(previous) => {
                event.conflicts_with = Some(previous);
                serde_json::to_vec(&event).unwrap_or_default()
            }
            None => payload,
        };
        delta.pending += 1;
        delta.pending_bytes += payload.len() as i64;
        delta.accepted += 1;
        if previous.is_some() {
            delta.conflicts += 1;
        }
        let kept = if self.config.dedup {
            record.accepted_at[slot(event.state)] = now;
            if record
                .furthest
                .is_none_or(|f| event.state.rank() > f.rank())
            {
                record.furthest = Some(event.state);
            }
            record.last_seen = now;
            record.trusted |= trusted;
            if old.is_none() {
                staged.new_tasks += 1;
                staged.new_bytes += record_bytes(&event.task_id);
            }
            Some(record)
        } else {
            None
        };
        let slot = self.log.append(
            seq,
            event.received_at,
            &event.task_id,
            kept.as_ref(),
            Some(&EventMeta::of(&event)),
            &payload,
        );
        staged.slots.push(slot);
        if let Some(record) = kept {
            staged.records.insert(event.task_id, record);
        }
        Ok(Ok(match previous {
            Some(previous) => Appended::Conflict { seq, previous },
            None => Appended::New { seq },
        }))
    }

    /// Published events are acked in the log; refused ones are read back
    /// to become dead letters in the task store.
    fn complete(
        &mut self,
        delivered: Vec<u64>,
        dead: Vec<(u64, String)>,
        now: i64,
        staged: &mut Staged,
        work: &mut StoreWork,
    ) -> Result<(), OutboxError> {
        self.log.ack(&delivered);
        staged.acked.extend(delivered);
        if dead.is_empty() {
            return Ok(());
        }
        let index = lock(&self.shared.index);
        for (seq, reason) in dead {
            let Some(slot) = index.get(seq) else { continue };
            let bytes = self
                .shared
                .segments
                .payload(&slot)
                .map_err(OutboxError::Log)?;
            let keep = self.config.dead_letter_keep_bytes as usize;
            let letter = DeadLetter::of_stored(seq, reason, now, &bytes, keep);
            work.letters.push((letter, Some(slot)));
        }
        Ok(())
    }

    /// The task store's part of a group, in one durable transaction: dead
    /// letters, requeues, the checkpoint of the dedup records, a prune step.
    fn store(&mut self, work: &mut StoreWork, delta: &mut Delta) -> Result<(), OutboxError> {
        let (records, through) = self.freeze();
        let written = self.store_txn(work, &records, through);
        if let Err(e) = written {
            self.unfreeze();
            return Err(e);
        }
        // Committed: the checkpointed records leave memory, dead letters
        // leave the queue and are acked with the next write.
        *lock(&self.shared.frozen) = None;
        self.stored_through = through;
        self.dead_bytes = work.dead_bytes;
        let mut index = lock(&self.shared.index);
        for (letter, slot) in work.letters.drain(..) {
            if let Some(slot) = slot {
                if index.remove(slot.seq).is_some() {
                    delta.pending -= 1;
                    delta.pending_bytes -= slot.len as i64;
                    self.deferred_acks.push(letter.seq);
                }
            }
            delta.dead += 1;
            delta.dead_lettered += 1;
        }
        delta.dead -= work.requeued.len() as i64 + work.dropped as i64;
        delta.dead_dropped += work.dropped;
        if work.dropped > 0 {
            tracing::warn!(
                dropped = work.dropped,
                "dead letters at their cap (outbox.max_dead_letters / max_dead_letter_bytes): the oldest were deleted"
            );
        }
        let evicted = work.evicted;
        let mut gone = evicted.finished + evicted.unfinished;
        let mut gone_bytes = evicted.bytes + work.pruned_bytes;
        if let Some((pruned, _)) = work.pruned {
            if pruned > 0 {
                tracing::debug!(pruned, "pruned expired task records");
            }
            gone += pruned;
        }
        if evicted.finished + evicted.unfinished > 0 {
            let stats = &self.stats;
            Stats::add(&stats.evicted_finished, evicted.finished);
            Stats::add(&stats.evicted_unfinished, evicted.unfinished);
            if evicted.unfinished > 0 {
                stats
                    .evicted_unfinished_at
                    .store(now_ms(), Ordering::Relaxed);
                tracing::warn!(
                    finished = evicted.finished,
                    unfinished = evicted.unfinished,
                    "dedup records at outbox.max_tracked_tasks/max_tracked_bytes: evicted the \
                     oldest, some of tasks not finished (a repeat of those may be published again)"
                );
            } else {
                tracing::info!(
                    finished = evicted.finished,
                    "dedup records at outbox.max_tracked_tasks/max_tracked_bytes: evicted the \
                     oldest records of finished tasks"
                );
            }
        }
        let shared = &self.shared;
        gone = gone.min(shared.tracked.load(Ordering::Relaxed));
        shared.tracked.fetch_sub(gone, Ordering::Relaxed);
        gone_bytes = gone_bytes.min(shared.tracked_bytes.load(Ordering::Relaxed));
        shared
            .tracked_bytes
            .fetch_sub(gone_bytes, Ordering::Relaxed);
        Ok(())
    }

    /// The transaction of [`Writer::store`].
    fn store_txn(
        &mut self,
        work: &mut StoreWork,
        records: &Records,
        through: u64,
    ) -> Result<(), OutboxError> {
        let db = self.db.get()?;
        let txn = begin_durable(&db)?;
        {
            let mut dead = txn.open_table(DEAD)?;
            let mut bytes = self.dead_bytes;
            for (letter, _) in &work.letters {
                let stored = serde_json::to_vec(letter).unwrap_or_default();
                bytes += stored.len() as u64;
                if let Some(old) = dead.insert(letter.seq, stored.as_slice())? {
                    bytes = bytes.saturating_sub(old.value().len() as u64);
                }
            }
            for seq in &work.requeued {
                if let Some(old) = dead.remove(*seq)? {
                    bytes = bytes.saturating_sub(old.value().len() as u64);
                }
            }
            // At a cap the oldest go, so the newest failures stay to be seen.
            let mut count = dead.len()?;
            work.dropped = 0;
            while count > self.config.max_dead_letters || bytes > self.config.max_dead_letter_bytes
            {
                let Some((_, old)) = dead.pop_first()? else {
                    break;
                };
                bytes = bytes.saturating_sub(old.value().len() as u64);
                count -= 1;
                work.dropped += 1;
            }
            let mut meta = txn.open_table(META)?;
            meta.insert(DEAD_BYTES, bytes)?;
            work.dead_bytes = bytes;
            for key in &work.damage_keys {
                meta.insert(key.as_str(), 1)?;
            }
            drop(meta);
            put_records(&txn, records, through)?;
            if work.prune || work.evict {
                let mut tasks = txn.open_table(TASKS)?;
                let now = now_ms();
                if work.prune {
                    let (pruned, bytes, more) = self.prune_step(&mut tasks, now)?;
                    work.pruned = Some((pruned, more));
                    work.pruned_bytes = bytes;
                }
                if work.evict {
                    let pruned = work.pruned.map_or(0, |(n, _)| n);
                    work.evicted = self.evict_step(&mut tasks, pruned, work.pruned_bytes)?;
                }
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Moves the changed dedup records to `frozen` (lookups still see them
    /// there) for a checkpoint, with the sequence number they cover.
    fn freeze(&mut self) -> (Arc<Records>, u64) {
        let records = Arc::new(std::mem::take(&mut *lock(&self.shared.dirty)));
        *lock(&self.shared.frozen) = Some(records.clone());
        self.last_checkpoint = Instant::now();
        (records, self.next_seq - 1)
    }

    /// Hands the dedup records changed since the last checkpoint to the
    /// checkpoint thread, when one is due and none is in flight.
    fn start_checkpoint(&mut self, delta: &mut Delta) -> Result<(), OutboxError> {
        if self.checkpointer.in_flight.is_some() {
            return Ok(());
        }
        let due = {
            let dirty = lock(&self.shared.dirty);
            !dirty.is_empty()
                && (dirty.len() >= CHECKPOINT_RECORDS
                    || self.last_checkpoint.elapsed() >= CHECKPOINT_EVERY)
        };
        if !due {
            return Ok(());
        }
        if self.checkpointer.jobs.is_none() {
            // The thread is gone (that was logged): checkpoint here.
            return self.store(&mut StoreWork::default(), delta);
        }
        let (records, through) = self.freeze();
        let sent = self
            .checkpointer
            .jobs
            .as_ref()
            .is_some_and(|jobs| jobs.send((records, through)).is_ok());
        if sent {
            self.checkpointer.in_flight = Some(through);
        } else {
            tracing::error!(
                "the outbox checkpoint thread is gone; checkpoints are written by the writer"
            );
            Stats::add(&self.stats.storage_errors, 1);
            self.checkpointer.jobs = None;
            self.unfreeze();
        }
        Ok(())
    }

    /// Takes the result of the checkpoint in flight, if it is there (or,
    /// with `wait`, once it is).
    fn checkpoint_done(&mut self, wait: bool) {
        if self.checkpointer.in_flight.is_none() {
            return;
        }
        let result = if wait {
            self.checkpointer.done.recv().ok()
        } else {
            match self.checkpointer.done.try_recv() {
                Ok(result) => Some(result),
                Err(std::sync::mpsc::TryRecvError::Empty) => return,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => None,
            }
        };
        self.checkpointer.in_flight = None;
        match result {
            Some(Ok(through)) => {
                self.stored_through = through;
                *lock(&self.shared.frozen) = None;
            }
            Some(Err(e)) => {
                tracing::error!(error = %e, "outbox checkpoint failed; its records stay in memory and in the log");
                Stats::add(&self.stats.storage_errors, 1);
                self.unfreeze();
            }
            None => {
                tracing::error!("the outbox checkpoint thread ended");
                Stats::add(&self.stats.storage_errors, 1);
                self.checkpointer.jobs = None;
                self.unfreeze();
            }
        }
    }

    /// Puts the records of a checkpoint that did not happen back with the
    /// changed ones (a newer record of the same task wins).
    fn unfreeze(&mut self) {
        let frozen = lock(&self.shared.frozen).take();
        if let Some(frozen) = frozen {
            let mut dirty = lock(&self.shared.dirty);
            for (task, record) in frozen.iter() {
                dirty.entry(task.clone()).or_insert(*record);
            }
        }
    }

    /// Deletes the log segments nothing needs any more, and empties the
    /// one being written once nothing at all is pending (when it holds a
    /// reservation step's worth of records, or at once when the disk was
    /// found full). Returns the bytes of records freed in the latter.
    fn recycle(&mut self) -> u64 {
        let first = lock(&self.shared.index).first_segment();
        if let Err(e) = self
            .log
            .recycle(first, self.stored_through, &self.shared.segments)
        {
            tracing::warn!(error = %e, "cannot delete a used log segment; trying again later");
            return 0;
        }
        let worth = self.short_of_space || self.log.active_bytes() >= EMPTY_ACTIVE_AT;
        if first.is_some() || !worth || !self.log.only_active() {
            return 0;
        }
        // What the task store lacks goes back into the emptied segment:
        // settle the checkpoint in flight first (done, or back in `dirty`).
        self.checkpoint_done(true);
        let carry: Vec<(String, TaskRecord)> = lock(&self.shared.dirty)
            .iter()
            .map(|(task, record)| (task.clone(), *record))
            .collect();
        match self
            .log
            .empty_active(&carry, self.next_seq.saturating_sub(1))
        {
            Ok(freed) => {
                if freed > 0 {
                    // Their appends are gone with the segment.
                    self.deferred_acks.clear();
                    tracing::debug!(
                        freed,
                        "the log segment being written was emptied: nothing in it is pending"
                    );
                    self.short_of_space = false;
                }
                freed
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot empty the log segment being written; trying again later");
                0
            }
        }
    }

    /// Keeps each damaged range of the log that the task store does not
    /// hold yet as a dead letter: its bytes (bounded), where it was, and
    /// the event it held if its frame still reads. A failure is logged: the
    /// ranges are found again at the next start.
    fn bury_damage(&mut self, damaged: &[Damage]) {
        if damaged.is_empty() {
            return;
        }
        let fresh = || -> Result<Vec<&Damage>, OutboxError> {
            let db = self.db.get()?;
            let txn = db.begin_read()?;
            let meta = txn.open_table(META)?;
            let mut fresh = Vec::new();
            for damage in damaged {
                if meta.get(damage_key(damage).as_str())?.is_none() {
                    fresh.push(damage);
                }
            }
            Ok(fresh)
        };
        let fresh = match fresh() {
            Ok(fresh) => fresh,
            Err(e) => {
                tracing::error!(error = %e, "cannot keep the damaged log ranges as dead letters now");
                return;
            }
        };
        let now = now_ms();
        let mut work = StoreWork::default();
        for damage in fresh {
            let seq = self.next_seq;
            self.next_seq += 1;
            let bytes = &damage.bytes[..damage
                .bytes
                .len()
                .min(self.config.dead_letter_keep_bytes as usize)];
            let kept = bytes.len() as u64;
            let letter = DeadLetter {
                seq,
                reason: format!(
                    "damaged pending log: {} hold no valid record (length or checksum does not \
                     match); the events stored there left the queue, their bytes are kept here{}",
                    damage.place(),
                    if kept < damage.len {
                        format!(" (the first {kept})")
                    } else {
                        String::new()
                    }
                ),
                failed_at: now,
                event: damage.readable_event().unwrap_or_default(),
                raw_hex: Some(super::hex(bytes)),
                truncated_from: (kept < damage.len).then_some(damage.len),
            };
            work.letters.push((letter, None));
            work.damage_keys.push(damage_key(damage));
        }
        if work.letters.is_empty() {
            return;
        }
        let mut delta = Delta::default();
        match self.store(&mut work, &mut delta) {
            Ok(()) => self.apply_delta(&delta),
            Err(e) => {
                tracing::error!(error = %e, "cannot keep the damaged log ranges as dead letters now; they are found again at the next start");
                Stats::add(&self.stats.storage_errors, 1);
            }
        }
    }
}

/// Records in the segment being written that make it worth emptying once
/// nothing is pending (see [`Writer::recycle`]): emptying drops its
/// reservation, which the next write takes again.
const EMPTY_ACTIVE_AT: u64 = if cfg!(test) { 1024 } else { 4 << 20 };

/// Whether an I/O error says the file system is full.
fn no_space(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull || e.kind() == std::io::ErrorKind::QuotaExceeded
}

impl Writer {
    /// Deletes the task records expired at `now` (`TaskRecord::expires_at`:
    /// the dedup window, or the shorter one of one-off tasks) among the next
    /// `PRUNE_SCAN` in key order, from where the last step stopped. The
    /// records hold their own expiry: no second index is written per event,
    /// at the price of a pass over every record per pruning round. Called
    /// right after a checkpoint, so the task store has every record.
    /// Returns (deleted, their bytes, whether the pass goes on).
    fn prune_step(
        &mut self,
        tasks: &mut redb::Table<'_, &'static str, &'static [u8]>,
        now: i64,
    ) -> Result<(u64, u64, bool), OutboxError> {
        let (window, one_off) = (self.window_ms(), self.one_off_ms());
        let mut expired = Vec::new();
        let mut next = None;
        {
            let from = self.prune_from.as_deref().unwrap_or("");
            for (i, entry) in tasks.range::<&str>(from..)?.enumerate() {
                let (k, v) = entry?;
                if i == PRUNE_SCAN {
                    next = Some(k.value().to_string());
                    break;
                }
                if TaskRecord::decode(v.value()).expires_at(window, one_off) < now {
                    expired.push(k.value().to_string());
                }
            }
        }
        let mut bytes = 0;
        for task in &expired {
            tasks.remove(task.as_str())?;
            bytes += record_bytes(task);
        }
        let more = next.is_some();
        self.prune_from = next;
        Ok((expired.len() as u64, bytes, more))
    }

    /// Brings the task records under their caps, with some room (so that
    /// eviction runs once per many new tasks, not once per group): among
    /// the next `EVICT_SCAN` records in key order from where the last step
    /// stopped (wrapping round), those of finished tasks go first, then
    /// those of unfinished ones, oldest (`last_seen`) first in each class.
    /// With more records than that, at most half of those looked at go in
    /// one step, so what goes is the older half; the next group goes on.
    /// `pruned` records (`bytes`) just went by expiry in the same
    /// transaction.
    fn evict_step(
        &mut self,
        tasks: &mut redb::Table<'_, &'static str, &'static [u8]>,
        pruned: u64,
        bytes: u64,
    ) -> Result<Evicted, OutboxError> {
        let (cap, cap_bytes) = (self.config.max_tracked_tasks, self.config.max_tracked_bytes);
        let count = self
            .shared
            .tracked
            .load(Ordering::Relaxed)
            .saturating_sub(pruned);
        let held = self
            .shared
            .tracked_bytes
            .load(Ordering::Relaxed)
            .saturating_sub(bytes);
        let room = (cap / 32).clamp(1, EVICT_SCAN as u64 / 4);
        let room_bytes = (cap_bytes / 32).min(4 << 20);
        let mut need = count.saturating_sub(cap.saturating_sub(room));
        let mut need_bytes = held.saturating_sub(cap_bytes.saturating_sub(room_bytes));
        let mut evicted = Evicted::default();
        if need == 0 && need_bytes == 0 {
            return Ok(evicted);
        }
        // (unfinished, last_seen, task id)
        let mut seen: Vec<(bool, i64, String)> = Vec::new();
        let from = self.evict_from.take().unwrap_or_default();
        let mut whole = true;
        for range in [
            tasks.range::<&str>(from.as_str()..)?,
            tasks.range::<&str>(..from.as_str())?,
        ] {
            for entry in range {
                let (k, v) = entry?;
                if seen.len() == EVICT_SCAN {
                    self.evict_from = Some(k.value().to_string());
                    whole = false;
                    break;
                }
                let record = TaskRecord::decode(v.value());
                seen.push((!record.finished(), record.last_seen, k.value().to_string()));
            }
            if !whole {
                break;
            }
        }
        seen.sort_unstable();
        let most = if whole { seen.len() } else { seen.len() / 2 };
        for (unfinished, _, task) in seen.into_iter().take(most) {
            if need == 0 && need_bytes == 0 {
                break;
            }
            tasks.remove(task.as_str())?;
            let cost = record_bytes(&task);
            need = need.saturating_sub(1);
            need_bytes = need_bytes.saturating_sub(cost);
            evicted.bytes += cost;
            if unfinished {
                evicted.unfinished += 1;
            } else {
                evicted.finished += 1;
            }
        }
        Ok(evicted)
    }

    /// Appends every dead letter (or those in `only`) that holds a readable
    /// event to the log again, as a new pending event; the task store drops
    /// the letters once that write is durable. Returns their former
    /// sequence numbers. A letter that cannot be decoded, or whose event is
    /// not readable, stays where it is: requeueing never deletes.
    fn requeue(
        &mut self,
        db: &redb::Database,
        staged: &mut Staged,
        work: &mut StoreWork,
        only: Option<&[u64]>,
        delta: &mut Delta,
    ) -> Result<Vec<u64>, OutboxError> {
        let txn = db.begin_read()?;
        let dead = txn.open_table(DEAD)?;
        let mut movable = Vec::new();
        let mut kept = 0u64;
        // The event goes back as it was stored, once it is known to be
        // readable.
        let mut consider = |seq: u64, stored: &[u8]| {
            let event = serde_json::from_slice::<DeadLetter>(stored)
                .ok()
                .filter(|letter| letter.raw_hex.is_none())
                .map(|letter| letter.event)
                .and_then(|json| {
                    let event = TaskEvent::deserialize(&json).ok()?;
                    Some((serde_json::to_vec(&json).ok()?, event))
                });
            match event {
                Some((payload, event)) => movable.push((seq, payload, event)),
                None => kept += 1,
            }
        };
        match only {
            None => {
                for entry in dead.iter()? {
                    let (k, v) = entry?;
                    consider(k.value(), v.value());
                }
            }
            // Sorted and without repeats (see `Outbox::requeue_dead_letters`).
            Some(seqs) => {
                for &seq in seqs {
                    if let Some(v) = dead.get(seq)? {
                        consider(seq, v.value());
                    }
                }
            }
        }
        if kept > 0 {
            tracing::warn!(
                kept,
                "dead letters without a readable event stay where they are"
            );
        }
        let mut moved = Vec::with_capacity(movable.len());
        for (old, payload, event) in movable {
            let seq = self.next_seq;
            self.next_seq += 1;
            let slot = self.log.append(
                seq,
                event.received_at,
                &event.task_id,
                None,
                Some(&EventMeta::of(&event)),
                &payload,
            );
            staged.slots.push(slot);
            delta.pending += 1;
            delta.pending_bytes += payload.len() as i64;
            work.requeued.push(old);
            moved.push(old);
        }
        Ok(moved)
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
            Command::Prune { reply } => match reply {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{parse, Source};

    /// An append of this task fails as a write error would, after its
    /// command was taken from the group.
    pub(super) const FAIL_TASK: &str = "fail-in-the-middle";
    /// An append of this task panics inside the transaction.
    pub(super) const PANIC_TASK: &str = "panic-in-the-middle";

    pub(super) fn injected() -> OutboxError {
        OutboxError::Db(redb::Error::from(redb::StorageError::from(
            std::io::Error::other("injected write error"),
        )))
    }

    type Answer = oneshot::Receiver<Result<Appended, AppendError>>;

    /// A webhook callback of `task` in `state`, parsed.
    fn callback(task: &str, state: &str) -> TaskEvent {
        let body = format!(r#"{{"taskId":"{task}","state":"{state}"}}"#);
        parse(body.as_bytes(), Source::Webhook, 1).unwrap()
    }

    /// An append of `task`'s `generating`, and where its answer comes.
    fn append_command(task: &str) -> (Command, Answer) {
        let event = callback(task, "generating");
        let (reply, answer) = oneshot::channel();
        let payload = serde_json::to_vec(&event).unwrap();
        let event = Box::new(event);
        let command = Command::Append {
            event,
            payload,
            trusted: false,
            reply,
        };
        (command, answer)
    }

    fn append(tx: &mpsc::Sender<Command>, task: &str) -> Answer {
        let (command, answer) = append_command(task);
        tx.blocking_send(command).unwrap();
        answer
    }

    /// A writer thread on the outbox in `dir` (default settings), fed by
    /// `rx`, with its counters and its database.
    fn start_writer(
        dir: &std::path::Path,
        rx: mpsc::Receiver<Command>,
    ) -> (std::thread::JoinHandle<()>, Arc<Stats>, Arc<DbCell>) {
        let config = OutboxConfig {
            data_dir: dir.to_path_buf(),
            ..OutboxConfig::default()
        };
        let db = Arc::new(
            DbCell::open(
                dir.join("outbox.redb"),
                1 << 20,
                "outbox",
                super::super::store::probe,
            )
            .unwrap()
            .0,
        );
        let stats = Arc::new(Stats::default());
        let shared = Arc::new(Shared::new(dir));
        let writer = Writer::start(
            db.clone(),
            config,
            stats.clone(),
            Arc::default(),
            shared,
            rx,
        )
        .unwrap();
        (writer, stats, db)
    }

    #[test]
    fn the_writer_survives_a_panicking_group() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, rx) = mpsc::channel(16);
        let (writer, stats, _) = start_writer(dir.path(), rx);
        assert!(append(&tx, PANIC_TASK).blocking_recv().is_err(), "refused");
        // Refused at once until the database is re-opened, then stored.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match append(&tx, "after").blocking_recv() {
                Ok(Ok(Appended::New { seq })) => {
                    assert_eq!(seq, 1, "the refused group used no sequence number");
                    break;
                }
                Ok(Err(AppendError::Storage(_))) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                other => panic!("stored after the restart, got {other:?}"),
            }
        }
        assert!(!stats.storage_failing.load(Ordering::Relaxed));
        tx.blocking_send(Command::Stop).unwrap();
        writer.join().unwrap();
    }

    #[test]
    fn a_group_that_fails_part_way_answers_every_command_with_the_error() {
        let dir = tempfile::tempdir().unwrap();
        // Queued before the thread starts, so they form one group.
        let (tx, rx) = mpsc::channel(16);
        let mut appends = Vec::new();
        for task in ["before", FAIL_TASK, "after"] {
            let (command, answer) = append_command(task);
            tx.try_send(command).unwrap();
            appends.push(answer);
        }
        let (reply, completed) = oneshot::channel();
        let complete = Command::Complete {
            delivered: vec![],
            dead: vec![],
            reply,
        };
        tx.try_send(complete).unwrap();
        tx.try_send(Command::Stop).unwrap();
        let (writer, stats, _) = start_writer(dir.path(), rx);
        writer.join().unwrap();

        for answer in appends {
            match answer.blocking_recv() {
                Ok(Err(AppendError::Storage(m))) => assert!(m.contains("injected"), "{m}"),
                other => panic!("every append gets the storage error, got {other:?}"),
            }
        }
        assert!(matches!(
            completed.blocking_recv(),
            Ok(Err(OutboxError::Db(_)))
        ));
        assert_eq!(stats.pending.load(Ordering::Relaxed), 0, "nothing counted");
        assert!(stats.storage_failing.load(Ordering::Relaxed));
    }

    fn outbox_in(dir: &std::path::Path, window_secs: u64) -> super::super::Outbox {
        super::super::Outbox::open(&OutboxConfig {
            data_dir: dir.to_path_buf(),
            dedup_window_secs: window_secs,
            ..OutboxConfig::default()
        })
        .unwrap()
    }

    #[tokio::test]
    async fn pruning_passes_over_every_task_record_in_steps() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = outbox_in(dir.path(), 0);
        for i in 0..10 {
            let event = callback(&format!("t{i}"), "generating");
            assert!(outbox.append(event).await.unwrap().is_stored());
        }
        // A zero window expires a record once the clock has moved past it.
        let seen = now_ms();
        let deadline = Instant::now() + Duration::from_secs(5);
        while now_ms() <= seen && Instant::now() < deadline {
            tokio::task::yield_now().await;
        }
        assert_eq!(outbox.status().unwrap().tasks_tracked, 10);
        assert_eq!(outbox.prune().await.unwrap(), 10, "more than one step");
        assert_eq!(outbox.status().unwrap().tasks_tracked, 0);
        assert_eq!(outbox.prune().await.unwrap(), 0, "a new pass finds none");
        outbox.close().await;
    }

    #[tokio::test]
    async fn records_within_the_window_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = outbox_in(dir.path(), 3600);
        for i in 0..7 {
            let event = callback(&format!("t{i}"), "waiting");
            outbox.append(event).await.unwrap();
        }
        assert_eq!(outbox.prune().await.unwrap(), 0);
        assert_eq!(outbox.status().unwrap().tasks_tracked, 7);
        outbox.close().await;
    }

    #[tokio::test]
    async fn a_data_dir_with_the_old_expiry_index_opens_and_drops_it() {
        use redb::{ReadableDatabase, TableHandle};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.redb");
        {
            let db = redb::Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut tasks = txn.open_table(TASKS).unwrap();
                let record = TaskRecord {
                    furthest: Some(crate::event::State::Waiting),
                    accepted_at: [0, now_ms(), 0, 0, 0],
                    last_seen: now_ms(),
                    trusted: false,
                };
                tasks.insert("old", record.encode().as_slice()).unwrap();
                let mut expiry = txn.open_table(EXPIRY).unwrap();
                expiry.insert((now_ms() as u64, "old"), ()).unwrap();
            }
            txn.commit().unwrap();
        }
        let outbox = outbox_in(dir.path(), 3600);
        let old = outbox.task("old").unwrap().unwrap();
        assert_eq!(old.furthest, Some(crate::event::State::Waiting));
        let event = callback("old", "waiting");
        assert_eq!(outbox.append(event).await.unwrap(), Appended::Duplicate);
        outbox.close().await;
        let db = redb::Database::open(&path).unwrap();
        let txn = db.begin_read().unwrap();
        let names: Vec<String> = txn
            .list_tables()
            .unwrap()
            .map(|t| t.name().to_string())
            .collect();
        assert!(!names.iter().any(|n| n == "task_expiry"), "{names:?}");
    }

    /// A crash before the checkpoint loses no dedup record: the log
    /// records carry them, and a restart reads them back.
    #[tokio::test]
    async fn dedup_records_not_yet_in_the_task_store_come_back_from_the_log() {
        use redb::ReadableDatabase;
        let dir = tempfile::tempdir().unwrap();
        let config = OutboxConfig {
            data_dir: dir.path().to_path_buf(),
            ..OutboxConfig::default()
        };
        let dir_path = dir.path().to_path_buf();
        tokio::task::spawn_blocking(move || {
            let (tx, rx) = mpsc::channel(16);
            let (writer, _, db) = start_writer(&dir_path, rx);
            let answer = append(&tx, "remembered").blocking_recv().unwrap().unwrap();
            assert!(answer.is_stored());
            // The thread ends without `Stop`, as in a crash: no checkpoint.
            drop(tx);
            writer.join().unwrap();
            let txn = db.get().unwrap().begin_read().unwrap();
            let tasks = txn.open_table(TASKS).unwrap();
            assert!(
                tasks.get("remembered").unwrap().is_none(),
                "not checkpointed"
            );
            drop((tasks, txn));
            db.close();
        })
        .await
        .unwrap();

        let outbox = super::super::Outbox::open(&config).unwrap();
        let record = outbox
            .task("remembered")
            .unwrap()
            .expect("read back from the log");
        assert_eq!(record.furthest, Some(crate::event::State::Generating));
        assert_eq!(outbox.status().unwrap().tasks_tracked, 1);
        let event = callback("remembered", "generating");
        assert_eq!(outbox.append(event).await.unwrap(), Appended::Duplicate);
        assert_eq!(outbox.status().unwrap().pending, 1);
        outbox.close().await;
    }

    /// A callback's model can be longer than a record's head holds: the
    /// event and the ones after it are kept whole, and the relay reads the
    /// model from the event's JSON, also after a restart.
    #[tokio::test]
    async fn a_model_longer_than_the_head_holds_comes_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        // 80,000 bytes of two-byte characters.
        let model = "é".repeat(40_000);
        let body = format!(r#"{{"taskId":"long","state":"generating","model":"{model}"}}"#);
        let outbox = outbox_in(dir.path(), 3600);
        for event in [
            parse(body.as_bytes(), Source::Webhook, 1).unwrap(),
            callback("after", "generating"),
        ] {
            let answer = outbox.append(event).await.unwrap();
            assert!(matches!(answer, Appended::New { .. }), "{answer:?}");
        }
        let read = |outbox: &super::super::Outbox| {
            let batch = outbox.read_batch(10, 10).unwrap();
            assert!(batch.unreadable.is_empty(), "{:?}", batch.unreadable);
            batch.ready.into_iter().map(|o| o.meta).collect::<Vec<_>>()
        };
        let before = read(&outbox);
        assert_eq!(before.len(), 2);
        assert_eq!(before[0].task_id, "long");
        assert_eq!(before[0].model.as_deref(), Some(model.as_str()));
        outbox.close().await;
        let outbox = outbox_in(dir.path(), 3600);
        let after = read(&outbox);
        let ids = |metas: &[EventMeta]| metas.iter().map(|m| m.task_id.clone()).collect::<Vec<_>>();
        assert!(after == before, "{:?} after the restart", ids(&after));
        outbox.close().await;
    }

    /// Published events leave the disk: once acked and checkpointed, the
    /// segments that held them are deleted, and what is still pending stays.
    #[tokio::test]
    async fn segments_are_deleted_once_their_events_are_published() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = outbox_in(dir.path(), 3600);
        let segments = || {
            std::fs::read_dir(dir.path().join("pending"))
                .unwrap()
                .count()
        };
        let mut seqs = Vec::new();
        for i in 0..200 {
            let event = callback(&format!("t{i}"), "generating");
            match outbox.append(event).await.unwrap() {
                Appended::New { seq } => seqs.push(seq),
                other => panic!("{other:?}"),
            }
        }
        let before = segments();
        assert!(before > 3, "{before} segments of 4096 bytes");
        let (published, kept) = seqs.split_at(190);
        outbox.complete(published.to_vec(), vec![]).await.unwrap();
        // A prune step checkpoints the dedup records first.
        outbox.prune().await.unwrap();
        let after = segments();
        assert!(after <= 2, "{before} segments before, {after} after");
        let batch = outbox.read_batch(100, 100).unwrap();
        let left: Vec<u64> = batch.ready.iter().map(|o| o.seq).collect();
        assert_eq!(left, kept);
        outbox.close().await;
        let outbox = outbox_in(dir.path(), 3600);
        assert_eq!(outbox.status().unwrap().pending, 10);
        assert_eq!(outbox.status().unwrap().tasks_tracked, 200);
        outbox.close().await;
    }

    /// Checkpoints run beside the appends: whatever layer holds a task's
    /// record at a given moment (this group, the changed ones, the
    /// checkpoint in flight, the store), every repeat is caught.
    #[tokio::test]
    async fn checkpoints_in_the_background_lose_no_record() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = outbox_in(dir.path(), 3600);
        let event = |i: usize| callback(&format!("t{i}"), "generating");
        let stored = |outbox: &super::super::Outbox| {
            use redb::{ReadableDatabase, ReadableTableMetadata};
            let db = outbox.inner.db.get().unwrap();
            let txn = db.begin_read().unwrap();
            txn.open_table(TASKS).unwrap().len().unwrap()
        };
        for round in 0..3 {
            for i in 0..400 {
                let answer = outbox.append(event(i)).await.unwrap();
                match round {
                    0 => assert!(answer.is_stored(), "t{i}: {answer:?}"),
                    _ => assert_eq!(answer, Appended::Duplicate, "t{i}, round {round}"),
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while stored(&outbox) < CHECKPOINT_RECORDS as u64 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let in_store = stored(&outbox);
        assert!(
            in_store >= CHECKPOINT_RECORDS as u64,
            "{in_store} in the store"
        );
        assert_eq!(outbox.status().unwrap().tasks_tracked, 400);
        outbox.close().await;
        let outbox = outbox_in(dir.path(), 3600);
        assert_eq!(outbox.status().unwrap().tasks_tracked, 400);
        assert_eq!(stored(&outbox), 400, "the last checkpoint at close");
        for i in 0..400 {
            assert_eq!(outbox.append(event(i)).await.unwrap(), Appended::Duplicate);
        }
        outbox.close().await;
    }
}
