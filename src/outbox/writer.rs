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
use tokio::sync::{mpsc, oneshot, Notify};

use super::store::{slot, DbCell, TaskRecord, DEAD, EXPIRY, PENDING, REJECTED, TASKS};
use super::{now_ms, AppendError, Appended, DeadLetter, OutboxError, Stats};
use crate::config::OutboxConfig;
use crate::event::TaskEvent;

/// Most commands committed in one transaction.
const MAX_GROUP: usize = 4096;
/// Least time between two attempts to re-open a failing database.
const REOPEN_EVERY: Duration = Duration::from_millis(250);
/// Most task records pruned per transaction, so pruning never stalls appends.
pub(super) const PRUNE_BATCH: usize = 10_000;

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
        reply: oneshot::Sender<Result<u64, OutboxError>>,
    },
    Bury {
        event: Box<TaskEvent>,
        reason: String,
        reply: oneshot::Sender<Result<u64, OutboxError>>,
    },
    Prune {
        reply: Option<oneshot::Sender<Result<u64, OutboxError>>>,
    },
}

/// The tables one append touches, open in the current write transaction.
struct Tables<'t> {
    pending: redb::Table<'t, u64, &'static [u8]>,
    dead: redb::Table<'t, u64, &'static [u8]>,
    tasks: redb::Table<'t, &'static str, &'static [u8]>,
    expiry: redb::Table<'t, (u64, &'static str), ()>,
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
    ) -> Result<(), OutboxError> {
        let next_seq;
        let txn = db.get()?.begin_write()?;
        {
            let pending = txn.open_table(PENDING)?;
            let dead = txn.open_table(DEAD)?;
            txn.open_table(TASKS)?;
            txn.open_table(EXPIRY)?;
            // Rejected bodies are kept in memory now; free what older
            // versions stored.
            txn.delete_table(REJECTED)?;
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
        };
        std::thread::Builder::new()
            .name("outbox-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|source| OutboxError::DataDir {
                path: "outbox writer thread".into(),
                source,
            })?;
        Ok(())
    }

    fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut group = Vec::with_capacity(MAX_GROUP);
        while let Some(first) = rx.blocking_recv() {
            group.push(first);
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(command) => group.push(command),
                    Err(_) => break,
                }
            }
            self.apply(&mut group);
        }
    }

    fn apply(&mut self, group: &mut Vec<Command>) {
        let seq_before = self.next_seq;
        let mut replies: Vec<Reply> = Vec::with_capacity(group.len());
        let mut delta = Delta::default();
        let result = self
            .repair()
            .and_then(|()| self.transaction(group.drain(..), &mut replies, &mut delta));
        // Requests of a group that failed before the transaction ran still
        // need their answer.
        for command in group.drain(..) {
            replies.push(command.into_reply());
        }
        let error = result.err();
        self.broken = error.is_some();
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
            if let Some(old) = old {
                t.expiry.remove((old.last_seen as u64, task_id.as_str()))?;
            }
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
            t.expiry.insert((now as u64, task_id.as_str()), ())?;
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
                expiry: txn.open_table(EXPIRY)?,
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
                        let outcome = self.append(&mut tables, *event, payload, now, delta)?;
                        replies.push(Box::new(move |err| {
                            let _ = reply.send(match err {
                                Some(e) => Err(AppendError::Storage(e.to_string())),
                                None => outcome,
                            });
                        }));
                    }
                    Command::Complete {
                        delivered,
                        dead: failed,
                        reply,
                    } => {
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
                            let letter = DeadLetter {
                                seq,
                                reason,
                                failed_at: now,
                                event: serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                                    String::from_utf8_lossy(&bytes).into_owned().into()
                                }),
                            };
                            tables.dead.insert(
                                seq,
                                serde_json::to_vec(&letter).unwrap_or_default().as_slice(),
                            )?;
                            delta.pending -= 1;
                            delta.pending_bytes -= bytes.len() as i64;
                            delta.dead += 1;
                            delta.dead_lettered += 1;
                        }
                        replies.push(Box::new(move |err| {
                            let _ = reply
                                .send(err.map_or(Ok(()), |e| Err(OutboxError::Db(redb_copy(e)))));
                        }));
                    }
                    Command::Requeue { reply } => {
                        let mut moved = 0;
                        while let Some((_, v)) = tables.dead.pop_first()? {
                            let letter: Option<DeadLetter> = serde_json::from_slice(v.value()).ok();
                            drop(v);
                            let Some(letter) = letter else { continue };
                            let payload = serde_json::to_vec(&letter.event).unwrap_or_default();
                            tables.pending.insert(self.next_seq, payload.as_slice())?;
                            self.next_seq += 1;
                            delta.pending += 1;
                            delta.pending_bytes += payload.len() as i64;
                            delta.dead -= 1;
                            moved += 1;
                        }
                        replies.push(Box::new(move |err| {
                            let _ = reply.send(
                                err.map_or(Ok(moved), |e| Err(OutboxError::Db(redb_copy(e)))),
                            );
                        }));
                    }
                    Command::Bury {
                        event,
                        reason,
                        reply,
                    } => {
                        let seq = self.next_seq;
                        self.next_seq += 1;
                        let letter = DeadLetter {
                            seq,
                            reason,
                            failed_at: now,
                            event: serde_json::to_value(&*event).unwrap_or_default(),
                        };
                        tables.dead.insert(
                            seq,
                            serde_json::to_vec(&letter).unwrap_or_default().as_slice(),
                        )?;
                        delta.dead += 1;
                        delta.dead_lettered += 1;
                        replies.push(Box::new(move |err| {
                            let _ = reply
                                .send(err.map_or(Ok(seq), |e| Err(OutboxError::Db(redb_copy(e)))));
                        }));
                    }
                    Command::Prune { reply } => {
                        let cutoff = (now - window_ms).max(0) as u64;
                        let mut expired = Vec::new();
                        for entry in tables
                            .expiry
                            .range::<(u64, &str)>(..(cutoff, ""))?
                            .take(PRUNE_BATCH)
                        {
                            let (k, _) = entry?;
                            let (at, task) = k.value();
                            expired.push((at, task.to_string()));
                        }
                        for (at, task) in &expired {
                            tables.expiry.remove((*at, task.as_str()))?;
                            tables.tasks.remove(task.as_str())?;
                        }
                        let pruned = expired.len() as u64;
                        if pruned > 0 {
                            tracing::debug!(pruned, "pruned expired task records");
                        }
                        replies.push(Box::new(move |err| {
                            if let Some(reply) = reply {
                                let _ =
                                    reply.send(err.map_or(Ok(pruned), |e| {
                                        Err(OutboxError::Db(redb_copy(e)))
                                    }));
                            }
                        }));
                    }
                }
            }
        }
        txn.commit()?;
        Ok(())
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
            Command::Complete { reply, .. } => fail(reply),
            Command::Requeue { reply } | Command::Bury { reply, .. } => fail(reply),
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
