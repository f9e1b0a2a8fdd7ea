//! The checkpoint thread, which writes the dedup records into the task
//! store off the writer, and the deletion of log segments it allows.

use super::*;

/// The thread that writes the dedup records to the task store, so that a
/// checkpoint (tens of thousands of B-tree inserts and a sync) never holds
/// up a group of appends. Owned by the writer, which joins it.
pub(super) struct Checkpointer {
    jobs: Option<std::sync::mpsc::Sender<(Arc<Records>, u64)>>,
    done: std::sync::mpsc::Receiver<Result<u64, OutboxError>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The sequence number the checkpoint in flight covers.
    in_flight: Option<u64>,
}

pub(super) type Records = HashMap<String, TaskRecord>;

impl Checkpointer {
    /// `stats` times each checkpoint (`hookbridge_outbox_checkpoint_duration_seconds`).
    pub(super) fn start(db: Arc<DbCell>, stats: Arc<Stats>) -> Result<Self, OutboxError> {
        let (jobs, inbox) = std::sync::mpsc::channel::<(Arc<Records>, u64)>();
        let (report, done) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("outbox-checkpoint".into())
            .spawn(move || {
                for (records, through) in inbox {
                    let written = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        stats
                            .metrics
                            .time_checkpoint(|| write_records(&db, &records, through))
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

    pub(super) fn stop(&mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            if let Err(panic) = thread.join() {
                tracing::error!(cause = %crate::sync::panic_message(&*panic), "outbox checkpoint thread panicked");
            }
        }
    }
}

/// One durable transaction with `records` and the sequence number they
/// cover.
pub(super) fn write_records(
    db: &DbCell,
    records: &Records,
    through: u64,
) -> Result<(), OutboxError> {
    let db = db.get()?;
    let txn = begin_durable(&db)?;
    put_records(&txn, records, through)?;
    txn.commit()?;
    Ok(())
}

/// A write transaction that is synced when it commits.
pub(super) fn begin_durable(db: &redb::Database) -> Result<redb::WriteTransaction, OutboxError> {
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
pub(super) fn put_records(
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

impl Writer {
    /// Moves the changed dedup records to `frozen` (lookups still see them
    /// there) for a checkpoint, with the sequence number they cover.
    pub(super) fn freeze(&mut self) -> (Arc<Records>, u64) {
        let records = Arc::new(std::mem::take(&mut *lock(&self.shared.dirty)));
        *lock(&self.shared.frozen) = Some(records.clone());
        self.last_checkpoint = Instant::now();
        (records, self.next_seq - 1)
    }

    /// Hands the dedup records changed since the last checkpoint to the
    /// checkpoint thread, when one is due and none is in flight.
    pub(super) fn start_checkpoint(&mut self, delta: &mut Delta) -> Result<(), OutboxError> {
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
    pub(super) fn checkpoint_done(&mut self, wait: bool) {
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
    pub(super) fn unfreeze(&mut self) {
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
    pub(super) fn recycle(&mut self) -> u64 {
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
}

/// Records in the segment being written that make it worth emptying once
/// nothing is pending (see [`Writer::recycle`]): emptying drops its
/// reservation, which the next write takes again.
pub(super) const EMPTY_ACTIVE_AT: u64 = if cfg!(test) { 1024 } else { 4 << 20 };

/// Whether an I/O error says the file system is full.
pub(super) fn no_space(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull || e.kind() == std::io::ErrorKind::QuotaExceeded
}
