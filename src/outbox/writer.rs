//! The single writer thread that owns every write to the outbox.
//!
//! All mutations (appends, deletes after publish, dead letters, pruning)
//! go through one thread, which commits whatever is queued in one
//! transaction: one fsync serves many requests, and the dedup check and the
//! insert it guards can never interleave with another writer. Replies are
//! sent only after the commit succeeded; if it fails, every request of the
//! group gets the error (never a success for something not on disk), and the
//! database is re-opened before the next group.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redb::{Durability, ReadableTable, ReadableTableMetadata};
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot, Notify};

use super::store::{slot, DbCell, TaskRecord, DEAD, EXPIRY, PENDING, REJECTED, TASKS};
use super::{now_ms, AppendError, Appended, DeadLetter, OutboxError, Stats};
use crate::config::OutboxConfig;
use crate::event::TaskEvent;

/// Most commands committed in one transaction.
const MAX_GROUP: usize = 4096;
/// Least time between two attempts to re-open a failing database.
const REOPEN_EVERY: Duration = Duration::from_millis(250);
/// Most task records looked at by one prune transaction, so pruning never
/// stalls appends for long.
/// (A few in the unit tests, so that they cross step boundaries.)
const PRUNE_SCAN: usize = if cfg!(test) { 3 } else { 20_000 };

pub(super) enum Command {
    Append {
        event: Box<TaskEvent>,
        /// The event serialized on the caller's thread, off the single writer.
        payload: Vec<u8>,
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
        /// The event as JSON (`null` when the stored bytes are not JSON).
        event: serde_json::Value,
        /// The stored bytes, hex-encoded, when they are not a readable event.
        raw_hex: Option<String>,
        reason: String,
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

/// The tables one append touches, open in the current write transaction.
struct Tables<'t> {
    pending: redb::Table<'t, u64, &'static [u8]>,
    dead: redb::Table<'t, u64, &'static [u8]>,
    tasks: redb::Table<'t, &'static str, &'static [u8]>,
}

pub(super) struct Writer {
    db: Arc<DbCell>,
    /// A commit failed: re-open before the next one.
    broken: bool,
    last_reopen: Option<Instant>,
    config: OutboxConfig,
    stats: Arc<Stats>,
    notify: Arc<Notify>,
    next_seq: u64,
    /// Where the current prune pass resumes (the next task id to look at);
    /// `None` starts a new pass from the first.
    prune_from: Option<String>,
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
}

type Reply = Box<dyn FnOnce(Option<&OutboxError>) + Send>;

impl Writer {
    pub(super) fn start(
        db: Arc<DbCell>,
        config: OutboxConfig,
        stats: Arc<Stats>,
        notify: Arc<Notify>,
        rx: mpsc::Receiver<Command>,
    ) -> Result<std::thread::JoinHandle<()>, OutboxError> {
        let next_seq;
        let txn = db.get()?.begin_write()?;
        {
            let pending = txn.open_table(PENDING)?;
            let dead = txn.open_table(DEAD)?;
            txn.open_table(TASKS)?;
            // Rejected bodies are kept in memory now, and the task records
            // carry their own expiry: free what older versions stored.
            txn.delete_table(REJECTED)?;
            txn.delete_table(EXPIRY)?;
            let (mut count, mut bytes) = (0u64, 0u64);
            for entry in pending.iter()? {
                let (_, v) = entry?;
                count += 1;
                bytes += v.value().len() as u64;
            }
            stats.pending.store(count, Ordering::Relaxed);
            stats.pending_bytes.store(bytes, Ordering::Relaxed);
            stats.dead.store(dead.len()?, Ordering::Relaxed);
            let last_pending = pending.last()?.map_or(0, |(k, _)| k.value());
            let last_dead = dead.last()?.map_or(0, |(k, _)| k.value());
            next_seq = last_pending.max(last_dead) + 1;
        }
        txn.commit()?;
        let writer = Writer {
            db,
            broken: false,
            last_reopen: None,
            config,
            stats,
            notify,
            next_seq,
            prune_from: None,
        };
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
            if !group.is_empty() {
                self.apply_supervised(&mut group);
            }
            if stop {
                tracing::debug!("outbox writer stopped");
                return;
            }
        }
    }

    /// A panic while applying a group (a bug, or redb refusing a damaged
    /// file) must not end the thread that every write depends on: the
    /// group is refused, and the writer starts again from a re-opened
    /// database after `REOPEN_EVERY`, as after a storage error.
    fn apply_supervised(&mut self, group: &mut Vec<Command>) {
        let seq_before = self.next_seq;
        let applied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.apply(group)));
        if let Err(panic) = applied {
            tracing::error!(
                cause = %crate::supervise::panic_message(&*panic),
                "outbox writer panicked; the group is refused and the database re-opened"
            );
            // Dropping the group's replies answers its callers "closed".
            group.clear();
            self.next_seq = seq_before;
            self.broken = true;
            self.last_reopen = Some(Instant::now());
            self.stats.storage_failing.store(true, Ordering::Relaxed);
            Stats::add(&self.stats.storage_errors, 1);
        }
    }

    fn apply(&mut self, group: &mut Vec<Command>) {
        let seq_before = self.next_seq;
        let mut replies: Vec<Reply> = Vec::with_capacity(group.len());
        let mut delta = Delta::default();
        let mut queued = group.drain(..);
        let result = self
            .repair()
            .and_then(|()| self.transaction(&mut queued, &mut replies, &mut delta));
        // Requests of a group that failed before or part way through the
        // transaction still need their answer: the group's error.
        for command in queued {
            replies.push(command.into_reply());
        }
        let error = result.err();
        self.broken = error.is_some();
        self.stats
            .storage_failing
            .store(self.broken, Ordering::Relaxed);
        if let Some(e) = &error {
            if !matches!(e, OutboxError::Reopening) {
                tracing::error!(error = %e, "outbox commit failed; the group is refused");
            }
            // Nothing of the group is on disk: reuse its sequence numbers.
            self.next_seq = seq_before;
            Stats::add(&self.stats.storage_errors, 1);
        } else {
            self.apply_delta(&delta);
        }
        for reply in replies {
            reply(error.as_ref());
        }
    }

    /// Re-opens a database that failed, at most every `REOPEN_EVERY`, so a
    /// disk that stays full costs little; requests meanwhile fail at once.
    fn repair(&mut self) -> Result<(), OutboxError> {
        if !self.broken {
            return Ok(());
        }
        if self
            .last_reopen
            .is_some_and(|at| at.elapsed() < REOPEN_EVERY)
        {
            return Err(OutboxError::Reopening);
        }
        self.last_reopen = Some(Instant::now());
        self.db.reopen()
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
        if d.accepted > 0 || d.pending > 0 {
            self.notify.notify_one();
        }
    }

    fn window_ms(&self) -> i64 {
        (self.config.dedup_window_secs as i64).saturating_mul(1000)
    }

    /// Dedup and state guard first (a repeat is answered 200 even when the
    /// backlog is full), then the backlog cap, then the insert.
    fn append(
        &mut self,
        t: &mut Tables<'_>,
        mut event: TaskEvent,
        payload: Vec<u8>,
        now: i64,
        delta: &mut Delta,
    ) -> Result<Result<Appended, AppendError>, OutboxError> {
        let task_id = event.task_id.clone();
        let old = if self.config.dedup {
            t.tasks
                .get(task_id.as_str())?
                .map(|v| TaskRecord::decode(v.value()))
        } else {
            None
        };
        let mut record = old.unwrap_or_default();
        let decision = record.decide(event.state, now, self.window_ms());
        tracing::debug!(%task_id, state = event.state.as_str(), ?decision, "append");
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
        // A new task needs a dedup record: bounded like the backlog.
        if self.config.dedup && old.is_none() && t.tasks.len()? >= self.config.max_tracked_tasks {
            delta.refused_full += 1;
            return Ok(Err(AppendError::Full("max_tracked_tasks")));
        }
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
        t.pending.insert(seq, payload.as_slice())?;
        delta.pending += 1;
        delta.pending_bytes += payload.len() as i64;
        delta.accepted += 1;
        if previous.is_some() {
            delta.conflicts += 1;
        }
        if self.config.dedup {
            record.accepted_at[slot(event.state)] = now;
            if record
                .furthest
                .is_none_or(|f| event.state.rank() > f.rank())
            {
                record.furthest = Some(event.state);
            }
            record.last_seen = now;
            t.tasks
                .insert(task_id.as_str(), record.encode().as_slice())?;
        }
        Ok(Ok(match previous {
            Some(previous) => Appended::Conflict { seq, previous },
            None => Appended::New { seq },
        }))
    }

    fn transaction(
        &mut self,
        group: impl Iterator<Item = Command>,
        replies: &mut Vec<Reply>,
        delta: &mut Delta,
    ) -> Result<(), OutboxError> {
        let db = self.db.get()?;
        let mut txn = db.begin_write()?;
        txn.set_durability(Durability::Immediate).map_err(|e| {
            OutboxError::Db(redb::Error::from(redb::StorageError::from(
                std::io::Error::other(e),
            )))
        })?;
        {
            let mut tables = Tables {
                pending: txn.open_table(PENDING)?,
                dead: txn.open_table(DEAD)?,
                tasks: txn.open_table(TASKS)?,
            };
            let now = now_ms();
            let window_ms = self.window_ms();
            for command in group {
                match command {
                    Command::Append {
                        event,
                        payload,
                        reply,
                    } => {
                        // Faults for the tests below.
                        #[cfg(test)]
                        let injected = event.task_id == tests::FAIL_TASK;
                        #[cfg(test)]
                        assert!(event.task_id != tests::PANIC_TASK, "injected writer panic");
                        let outcome = self.append(&mut tables, *event, payload, now, delta);
                        #[cfg(test)]
                        let outcome = if injected {
                            Err(tests::injected())
                        } else {
                            outcome
                        };
                        // Each reply is queued before `?`: the command in
                        // flight when a write fails gets the error too.
                        let stored = outcome.as_ref().ok().cloned();
                        replies.push(Box::new(move |err| {
                            let _ = reply.send(match (err, stored) {
                                (None, Some(stored)) => stored,
                                (Some(e), _) => Err(AppendError::Storage(e.to_string())),
                                (None, None) => Err(AppendError::Storage("not stored".into())),
                            });
                        }));
                        let _answered_above = outcome?;
                    }
                    Command::Complete {
                        delivered,
                        dead: failed,
                        reply,
                    } => {
                        let done = (|| {
                            for seq in delivered {
                                if let Some(v) = tables.pending.remove(seq)? {
                                    delta.pending -= 1;
                                    delta.pending_bytes -= v.value().len() as i64;
                                    delta.published += 1;
                                }
                            }
                            for (seq, reason) in failed {
                                let Some(v) = tables.pending.remove(seq)? else {
                                    continue;
                                };
                                let bytes = v.value().to_vec();
                                drop(v);
                                let letter = DeadLetter::of_stored(seq, reason, now, &bytes);
                                tables.dead.insert(
                                    seq,
                                    serde_json::to_vec(&letter).unwrap_or_default().as_slice(),
                                )?;
                                delta.pending -= 1;
                                delta.pending_bytes -= bytes.len() as i64;
                                delta.dead += 1;
                                delta.dead_lettered += 1;
                            }
                            Ok::<_, OutboxError>(())
                        })();
                        replies.push(Box::new(move |err| {
                            let _ = reply
                                .send(err.map_or(Ok(()), |e| Err(OutboxError::Db(redb_copy(e)))));
                        }));
                        done?;
                    }
                    Command::Requeue { only, reply } => {
                        let moved = self.requeue(&mut tables, delta, only.as_deref());
                        let seqs = moved.as_ref().ok().cloned().unwrap_or_default();
                        replies.push(Box::new(move |err| {
                            let _ = reply
                                .send(err.map_or(Ok(seqs), |e| Err(OutboxError::Db(redb_copy(e)))));
                        }));
                        moved?;
                    }
                    Command::Bury {
                        event,
                        raw_hex,
                        reason,
                        reply,
                    } => {
                        let seq = self.next_seq;
                        self.next_seq += 1;
                        let letter = DeadLetter {
                            seq,
                            reason,
                            failed_at: now,
                            event,
                            raw_hex,
                        };
                        let stored = tables.dead.insert(
                            seq,
                            serde_json::to_vec(&letter).unwrap_or_default().as_slice(),
                        );
                        delta.dead += 1;
                        delta.dead_lettered += 1;
                        replies.push(Box::new(move |err| {
                            let _ = reply
                                .send(err.map_or(Ok(seq), |e| Err(OutboxError::Db(redb_copy(e)))));
                        }));
                        stored?;
                    }
                    Command::Stop => {}
                    Command::Prune { reply } => {
                        let cutoff = now - window_ms;
                        let pruned = self.prune_step(&mut tables, cutoff);
                        let step = pruned.as_ref().ok().copied().unwrap_or((0, false));
                        if step.0 > 0 {
                            tracing::debug!(pruned = step.0, "pruned expired task records");
                        }
                        replies.push(Box::new(move |err| {
                            if let Some(reply) = reply {
                                let _ = reply.send(
                                    err.map_or(Ok(step), |e| Err(OutboxError::Db(redb_copy(e)))),
                                );
                            }
                        }));
                        pruned?;
                    }
                }
            }
        }
        self.stats
            .metrics
            .time_commit(replies.len(), || txn.commit())?;
        Ok(())
    }
}

impl Writer {
    /// Deletes the task records last seen before `cutoff` among the next
    /// `PRUNE_SCAN` in key order, from where the last step stopped. The
    /// records hold their own expiry: no second index is written per event,
    /// at the price of a pass over every record per pruning round.
    fn prune_step(&mut self, t: &mut Tables<'_>, cutoff: i64) -> Result<(u64, bool), OutboxError> {
        let mut expired = Vec::new();
        let mut next = None;
        {
            let from = self.prune_from.as_deref().unwrap_or("");
            for (i, entry) in t.tasks.range::<&str>(from..)?.enumerate() {
                let (k, v) = entry?;
                if i == PRUNE_SCAN {
                    next = Some(k.value().to_string());
                    break;
                }
                if TaskRecord::decode(v.value()).last_seen < cutoff {
                    expired.push(k.value().to_string());
                }
            }
        }
        for task in &expired {
            t.tasks.remove(task.as_str())?;
        }
        let more = next.is_some();
        self.prune_from = next;
        Ok((expired.len() as u64, more))
    }

    /// Moves every dead letter (or those in `only`) that holds a readable
    /// event back to the end of the pending queue, and returns their former
    /// sequence numbers. A letter that cannot be decoded, or whose event is
    /// not readable, stays where it is: requeueing never deletes.
    fn requeue(
        &mut self,
        t: &mut Tables<'_>,
        delta: &mut Delta,
        only: Option<&[u64]>,
    ) -> Result<Vec<u64>, OutboxError> {
        let mut movable = Vec::new();
        let mut kept = 0u64;
        // The event goes back as it was stored, once it is known to be
        // readable.
        let mut consider = |seq: u64, stored: &[u8]| {
            let event = serde_json::from_slice::<DeadLetter>(stored)
                .ok()
                .filter(|letter| letter.raw_hex.is_none())
                .map(|letter| letter.event)
                .filter(|event| TaskEvent::deserialize(event).is_ok());
            match event.and_then(|e| serde_json::to_vec(&e).ok()) {
                Some(payload) => movable.push((seq, payload)),
                None => kept += 1,
            }
        };
        match only {
            None => {
                for entry in t.dead.iter()? {
                    let (k, v) = entry?;
                    consider(k.value(), v.value());
                }
            }
            // Sorted and without repeats (see `Outbox::requeue_dead_letters`).
            Some(seqs) => {
                for &seq in seqs {
                    if let Some(v) = t.dead.get(seq)? {
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
        for (seq, payload) in &movable {
            t.dead.remove(*seq)?;
            t.pending.insert(self.next_seq, payload.as_slice())?;
            self.next_seq += 1;
            delta.pending += 1;
            delta.pending_bytes += payload.len() as i64;
            delta.dead -= 1;
        }
        Ok(movable.into_iter().map(|(seq, _)| seq).collect())
    }
}

impl Command {
    /// The reply of a command that never reached a transaction; it is only
    /// ever called with the group's error.
    fn into_reply(self) -> Reply {
        fn fail<T: Send + 'static>(reply: oneshot::Sender<Result<T, OutboxError>>) -> Reply {
            Box::new(move |err| {
                let e = err.map_or(OutboxError::Reopening, |e| OutboxError::Db(redb_copy(e)));
                let _ = reply.send(Err(e));
            })
        }
        match self {
            Command::Append { reply, .. } => Box::new(move |err| {
                let message = err.map_or_else(|| "not stored".to_string(), |e| e.to_string());
                let _ = reply.send(Err(AppendError::Storage(message)));
            }),
            Command::Stop => Box::new(|_| {}),
            Command::Complete { reply, .. } => fail(reply),
            Command::Requeue { reply, .. } => fail(reply),
            Command::Bury { reply, .. } => fail(reply),
            Command::Prune { reply } => match reply {
                Some(reply) => fail(reply),
                None => Box::new(|_| {}),
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

    /// An append of `task`'s `generating`, and where its answer comes.
    fn append_command(task: &str) -> (Command, Answer) {
        let body = format!(r#"{{"taskId":"{task}","state":"generating"}}"#);
        let event = parse(body.as_bytes(), Source::Webhook, 1).unwrap();
        let (reply, answer) = oneshot::channel();
        let payload = serde_json::to_vec(&event).unwrap();
        let event = Box::new(event);
        let command = Command::Append {
            event,
            payload,
            reply,
        };
        (command, answer)
    }

    fn append(tx: &mpsc::Sender<Command>, task: &str) -> Answer {
        let (command, answer) = append_command(task);
        tx.blocking_send(command).unwrap();
        answer
    }

    #[test]
    fn the_writer_survives_a_panicking_group() {
        let dir = tempfile::tempdir().unwrap();
        let config = OutboxConfig {
            data_dir: dir.path().to_path_buf(),
            ..OutboxConfig::default()
        };
        let db = Arc::new(DbCell::open(dir.path().join("outbox.redb"), 1 << 20).unwrap());
        let stats = Arc::new(Stats::default());
        let (tx, rx) = mpsc::channel(16);
        let writer = Writer::start(db, config, stats.clone(), Arc::default(), rx).unwrap();
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
        let config = OutboxConfig {
            data_dir: dir.path().to_path_buf(),
            ..OutboxConfig::default()
        };
        let db = Arc::new(DbCell::open(dir.path().join("outbox.redb"), 1 << 20).unwrap());
        let stats = Arc::new(Stats::default());
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
        let writer = Writer::start(db, config, stats.clone(), Arc::default(), rx).unwrap();
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
            let body = format!(r#"{{"taskId":"t{i}","state":"generating"}}"#);
            let event = parse(body.as_bytes(), Source::Webhook, 1).unwrap();
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
            let body = format!(r#"{{"taskId":"t{i}","state":"waiting"}}"#);
            let event = parse(body.as_bytes(), Source::Webhook, 1).unwrap();
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
        let body = r#"{"taskId":"old","state":"waiting"}"#;
        let event = parse(body.as_bytes(), Source::Webhook, 1).unwrap();
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
}
