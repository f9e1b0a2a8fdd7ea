//! The decision for each command of a group: dedup record, state guard,
//! backlog cap, and the log records it adds.

use super::*;

/// One append, as the caller sent it.
pub(super) struct Request {
    pub(super) event: TaskEvent,
    /// The event serialized on the caller's thread.
    pub(super) payload: Vec<u8>,
    /// See [`crate::outbox::Outbox::append_trusted`].
    pub(super) trusted: bool,
}

/// Where the group's appends are decided: the task store as of the group,
/// what the group staged so far, its counters, its time.
pub(super) struct Place<'g> {
    pub(super) db: &'g redb::Database,
    pub(super) tasks: &'g mut Option<redb::ReadOnlyTable<&'static str, &'static [u8]>>,
    pub(super) staged: &'g mut Staged,
    pub(super) delta: &'g mut Delta,
    pub(super) now: i64,
}

/// Answers `reply` with `value` once the task store's transaction
/// committed, or with its error.
fn after_store<T: Send + 'static>(
    reply: oneshot::Sender<Result<T, OutboxError>>,
    value: T,
) -> Reply {
    Box::new(move |err, _| {
        let _ = reply.send(err.map_or(Ok(value), |e| Err(OutboxError::Db(redb_copy(e)))));
    })
}

/// Why an append was not stored: refused (the caller's answer, the group
/// goes on), or a storage error (the whole group fails).
pub(super) enum Failure {
    Refused(AppendError),
    Storage(OutboxError),
}

impl Writer {
    /// Decides every command of the group and builds its log records.
    pub(super) fn build(
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
                    let request = Request {
                        event: *event,
                        payload,
                        trusted,
                    };
                    let mut at = Place {
                        db: &db,
                        tasks: &mut tasks,
                        staged: &mut *staged,
                        delta: &mut *delta,
                        now,
                    };
                    self.decide_append(&mut at, request, reply, replies)?;
                }
                Command::Complete {
                    delivered,
                    dead,
                    reply,
                } => {
                    let read = self.complete(delivered, dead, now, staged, work);
                    replies.push((Needs::Store, after_store(reply, ())));
                    read?;
                }
                Command::Requeue { only, reply } => {
                    let moved = self.requeue(&db, staged, work, only.as_deref(), delta);
                    let seqs = moved.as_ref().ok().cloned().unwrap_or_default();
                    replies.push((Needs::Store, after_store(reply, seqs)));
                    moved?;
                }
                Command::Delete { seqs, reply } => {
                    let found = self.deletable(&db, work, &seqs);
                    let deleted = found.as_ref().ok().cloned().unwrap_or_default();
                    work.deleted.extend_from_slice(&deleted);
                    replies.push((Needs::Store, after_store(reply, deleted)));
                    found?;
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
                    replies.push((Needs::Store, after_store(reply, seq)));
                }
                Command::Stop => {}
                Command::Prune { expired, reply } => {
                    work.prune.get_or_insert_with(Vec::new).extend(expired);
                    // The step's figures are known once the store committed.
                    replies.push((
                        Needs::Store,
                        Box::new(move |err, work| {
                            let step = work.pruned.unwrap_or(0);
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

    /// Decides one append and queues its answer: the decision once the
    /// group's log write succeeded, or the group's error. A storage error
    /// fails the group (after the answer is queued).
    fn decide_append(
        &mut self,
        at: &mut Place<'_>,
        request: Request,
        reply: oneshot::Sender<Result<Appended, AppendError>>,
        replies: &mut Vec<(Needs, Reply)>,
    ) -> Result<(), OutboxError> {
        // Faults for the tests below.
        #[cfg(test)]
        let injected = request.event.task_id == tests::FAIL_TASK;
        #[cfg(test)]
        assert!(
            request.event.task_id != tests::PANIC_TASK,
            "injected writer panic"
        );
        let outcome = self.append(at, request);
        #[cfg(test)]
        let outcome = if injected {
            Err(Failure::Storage(tests::injected()))
        } else {
            outcome
        };
        // Each reply is queued before the error is returned: the
        // command in flight when a step fails gets the error too.
        let (stored, failed) = match outcome {
            Ok(appended) => (Some(Ok(appended)), None),
            Err(Failure::Refused(e)) => (Some(Err(e)), None),
            Err(Failure::Storage(e)) => (None, Some(e)),
        };
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
        if let Some(e) = failed {
            return Err(e);
        }
        Ok(())
    }

    /// The task records (with this group's new ones) are over a cap.
    pub(super) fn over_cap(&self, staged: &Staged) -> bool {
        let count = self.shared.tracked.load(Ordering::Relaxed) + staged.new_tasks;
        let bytes = self.shared.tracked_bytes.load(Ordering::Relaxed) + staged.new_bytes;
        self.config.dedup
            && (count > self.config.max_tracked_tasks || bytes > self.config.max_tracked_bytes)
    }

    /// The dedup record of `task_id`: this group's, then the one not yet
    /// checkpointed, then the task store's.
    pub(super) fn lookup(
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
    pub(super) fn append(
        &mut self,
        at: &mut Place<'_>,
        Request {
            mut event,
            payload,
            trusted,
        }: Request,
    ) -> Result<Appended, Failure> {
        let old = if self.config.dedup {
            self.lookup(at.db, at.tasks, at.staged, &event.task_id)
                .map_err(Failure::Storage)?
        } else {
            None
        };
        let mut record = old.unwrap_or_default();
        let decision = record.decide(event.state, at.now, self.window_ms());
        tracing::debug!(task_id = %event.task_id, state = event.state.as_str(), ?decision, "append");
        let previous = match decision {
            Appended::Duplicate => {
                at.delta.duplicates += 1;
                return Ok(decision);
            }
            Appended::Stale { .. } => {
                at.delta.stale += 1;
                return Ok(decision);
            }
            Appended::Conflict { previous, .. } => Some(previous),
            Appended::New { .. } => None,
        };
        self.room_for(&payload, at.delta)
            .map_err(Failure::Refused)?;
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
        at.delta.pending += 1;
        at.delta.pending_bytes += payload.len() as i64;
        at.delta.accepted += 1;
        if previous.is_some() {
            at.delta.conflicts += 1;
        }
        let kept = if self.config.dedup {
            record.accepted_at[slot(event.state)] = at.now;
            if record
                .furthest
                .is_none_or(|f| event.state.rank() > f.rank())
            {
                record.furthest = Some(event.state);
            }
            record.last_seen = at.now;
            record.trusted |= trusted;
            if old.is_none() {
                at.staged.new_tasks += 1;
                at.staged.new_bytes += record_bytes(&event.task_id);
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
        at.staged.slots.push(slot);
        if let Some(record) = kept {
            at.staged.records.insert(event.task_id, record);
        }
        Ok(match previous {
            Some(previous) => Appended::Conflict { seq, previous },
            None => Appended::New { seq },
        })
    }

    /// The backlog cap (`max_pending`, `max_pending_bytes`, with what this
    /// group added) and the largest record: a refusal says which.
    fn room_for(&self, payload: &[u8], delta: &mut Delta) -> Result<(), AppendError> {
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
            return Err(AppendError::Full(which));
        }
        if payload.len() > crate::outbox::log::MAX_EVENT {
            return Err(AppendError::Storage(
                "the event is larger than an outbox record may be".into(),
            ));
        }
        Ok(())
    }

    /// Published events are acked in the log; refused ones are read back
    /// to become dead letters in the task store.
    pub(super) fn complete(
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
}
