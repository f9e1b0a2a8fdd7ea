//! Recovery at start-up: what the task store holds (migrating the
//! tables of older versions), what the log holds, and the damage found.

use super::*;
use crate::outbox::log::Opened;

/// What the task store holds at start-up.
pub(super) struct StoreState {
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
pub(super) fn read_store(db: &redb::Database) -> Result<StoreState, OutboxError> {
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
pub(super) fn damage_key(damage: &Damage) -> String {
    format!("damage:{:020}:{:020}", damage.segment, damage.offset)
}

/// What the task records in `tasks` (`count` of them) cost
/// ([`record_bytes`]): exact up to `SAMPLE` records, else estimated from
/// the first `SAMPLE` (their average size), so that a start-up never reads
/// a store of millions of records whole.
pub(super) fn stored_bytes(
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

/// What the log holds, read back at start-up.
pub(super) struct Replayed {
    pub(super) log: Log,
    pub(super) opened: Opened,
    /// Dedup records newer than the task store's (`stored_through`).
    pub(super) records: HashMap<String, TaskRecord>,
    pub(super) last_seq: u64,
}

/// Opens the log and reads it back: the pending events into the index,
/// the dedup records the task store does not have yet, the last sequence
/// number used.
pub(super) fn replay(
    log_dir: &std::path::Path,
    segment_bytes: u64,
    shared: &Shared,
    stored_through: u64,
) -> Result<Replayed, OutboxError> {
    let mut replayed: HashMap<String, TaskRecord> = HashMap::new();
    let mut last_seq = 0u64;
    let (log, opened) = {
        let mut index = lock(&shared.index);
        Log::open(log_dir, segment_bytes, |record, slot| match record {
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
        })
        .map_err(|source| OutboxError::DataDir {
            path: log_dir.display().to_string(),
            source,
        })?
    };
    Ok(Replayed {
        log,
        opened,
        records: replayed,
        last_seq,
    })
}

/// Logs and counts what opening the log found cut or damaged.
pub(super) fn note_log_damage(opened: &Opened, stats: &Stats) {
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
}

/// Older versions kept pending events in redb: moves them into the log,
/// then drops the table (a crash in between moves them again, skipping
/// those already moved).
pub(super) fn move_old_pending(
    db: &DbCell,
    shared: &Shared,
    log: &mut Log,
    log_dir: &std::path::Path,
    old_pending: &[(u64, Vec<u8>)],
    last_seq: &mut u64,
) -> Result<(), OutboxError> {
    let moved: Vec<&(u64, Vec<u8>)> = old_pending
        .iter()
        .filter(|(seq, _)| *seq > *last_seq)
        .collect();
    if !moved.is_empty() {
        let mut slots = Vec::new();
        for (seq, bytes) in &moved {
            let event = serde_json::from_slice::<TaskEvent>(bytes).ok();
            let (task, at) = event
                .as_ref()
                .map_or(("", 0), |e| (e.task_id.as_str(), e.received_at));
            slots.push(log.append(*seq, at, task, None, None, bytes));
            *last_seq = (*last_seq).max(*seq);
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
    Ok(())
}

/// How many of the `replayed` records' tasks the task store does not hold,
/// and what they cost.
pub(super) fn unstored_size(
    db: &DbCell,
    replayed: &HashMap<String, TaskRecord>,
) -> Result<(u64, u64), OutboxError> {
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
    Ok((new_tasks, new_bytes))
}

impl Writer {
    /// Opens the log and the task store, reads back what an earlier run
    /// left (pending events, dedup records not yet checkpointed), moves the
    /// pending entries of older versions (kept in redb) into the log, and
    /// starts the thread.
    pub(in crate::outbox) fn start(
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
        let Replayed {
            mut log,
            opened,
            records: replayed,
            mut last_seq,
        } = replay(&log_dir, config.segment_bytes, &shared, stored_through)?;
        note_log_damage(&opened, &stats);

        move_old_pending(
            &db,
            &shared,
            &mut log,
            &log_dir,
            &old_pending,
            &mut last_seq,
        )?;

        // Dedup records the task store does not have yet.
        let (new_tasks, new_bytes) = unstored_size(&db, &replayed)?;
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
        let stats_for_checkpoints = stats.clone();
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
            evict_from: None,
            checkpointer: Checkpointer::start(db_for_checkpoints, stats_for_checkpoints)?,
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

    /// Keeps each damaged range of the log that the task store does not
    /// hold yet as a dead letter: its bytes (bounded), where it was, and
    /// the event it held if its frame still reads. A failure is logged: the
    /// ranges are found again at the next start.
    pub(super) fn bury_damage(&mut self, damaged: &[Damage]) {
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
                raw_hex: Some(crate::outbox::hex(bytes)),
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
