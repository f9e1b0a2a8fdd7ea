//! The task store's part of a group: dead letters, requeues, pruning and
//! eviction of task records, in one durable transaction.

use super::*;

impl Writer {
    /// The task store's part of a group, in one durable transaction: dead
    /// letters, requeues, the checkpoint of the dedup records, a prune step.
    pub(super) fn store(
        &mut self,
        work: &mut StoreWork,
        delta: &mut Delta,
    ) -> Result<(), OutboxError> {
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
        delta.dead -= (work.requeued.len() + work.deleted.len()) as i64 + work.dropped as i64;
        delta.dead_deleted += work.deleted.len() as u64;
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
        if let Some(pruned) = work.pruned {
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
    pub(super) fn store_txn(
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
            for seq in work.requeued.iter().chain(&work.deleted) {
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
            if work.prune.is_some() || work.evict {
                let mut tasks = txn.open_table(TASKS)?;
                let now = now_ms();
                if let Some(expired) = &work.prune {
                    let (pruned, bytes) = self.prune_expired(&mut tasks, expired, now)?;
                    work.pruned = Some(pruned);
                    work.pruned_bytes = bytes;
                }
                if work.evict {
                    let pruned = work.pruned.unwrap_or(0);
                    work.evicted = self.evict_step(&mut tasks, pruned, work.pruned_bytes)?;
                }
            }
        }
        txn.commit()?;
        Ok(())
    }
}

impl Writer {
    /// Deletes those of `expired` (read as expired by [`expired_after`],
    /// off this thread) whose record is still expired at `now`
    /// (`TaskRecord::expires_at`: the dedup window, or the shorter one of
    /// one-off tasks), read again in this transaction, after the
    /// checkpoint it writes: a task seen again since keeps its record.
    /// Returns (deleted, their bytes).
    pub(super) fn prune_expired(
        &mut self,
        tasks: &mut redb::Table<'_, &'static str, &'static [u8]>,
        expired: &[String],
        now: i64,
    ) -> Result<(u64, u64), OutboxError> {
        let (window, one_off) = (self.window_ms(), self.one_off_ms());
        let (mut deleted, mut bytes) = (0, 0);
        for task in expired {
            let still = tasks
                .get(task.as_str())?
                .is_some_and(|v| TaskRecord::decode(v.value()).expires_at(window, one_off) < now);
            if still {
                tasks.remove(task.as_str())?;
                deleted += 1;
                bytes += record_bytes(task);
            }
        }
        Ok((deleted, bytes))
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
    pub(super) fn evict_step(
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
    pub(super) fn requeue(
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

    /// Which of `seqs` (sorted, without repeats) are dead letters that no
    /// earlier command of this group moves or deletes already.
    pub(super) fn deletable(
        &self,
        db: &redb::Database,
        work: &StoreWork,
        seqs: &[u64],
    ) -> Result<Vec<u64>, OutboxError> {
        let txn = db.begin_read()?;
        let dead = txn.open_table(DEAD)?;
        let mut found = Vec::with_capacity(seqs.len());
        for &seq in seqs {
            let taken = work.requeued.contains(&seq) || work.deleted.contains(&seq);
            if !taken && dead.get(seq)?.is_some() {
                found.push(seq);
            }
        }
        Ok(found)
    }
}

/// One prune step's read, in a read transaction of its own (never on the
/// writer, never holding it up): the task records expired at `now` among
/// the next [`PRUNE_SCAN`] in key order after `from` (from the first when
/// `None`), and where the next step starts (`None`: the pass is over).
/// The records hold their own expiry: no second index is written per
/// event, at the price of a read of every record per pruning pass.
pub(in crate::outbox) fn expired_after(
    db: &redb::Database,
    from: Option<&str>,
    now: i64,
    window_ms: i64,
    one_off_ms: i64,
) -> Result<(Vec<String>, Option<String>), OutboxError> {
    let tasks = db.begin_read()?.open_table(TASKS)?;
    let mut expired = Vec::new();
    let range = match from {
        Some(from) => {
            tasks.range::<&str>((std::ops::Bound::Excluded(from), std::ops::Bound::Unbounded))?
        }
        None => tasks.range::<&str>(..)?,
    };
    let mut last = None;
    for (i, entry) in range.enumerate() {
        let (k, v) = entry?;
        if i == PRUNE_SCAN {
            return Ok((expired, last));
        }
        if TaskRecord::decode(v.value()).expires_at(window_ms, one_off_ms) < now {
            expired.push(k.value().to_string());
        }
        last = Some(k.value().to_string());
    }
    Ok((expired, None))
}
