//! The durable outbox between the ingress and the broker.
//!
//! Invariants (each one is what a 2xx from the ingress promises):
//!
//! 1. **Durable before answered.** [`Outbox::append`] returns `New` only
//!    after the event's record in the pending log (`log/`: append-only
//!    segments, checksummed records) was written and `fdatasync`ed. One
//!    writer thread writes whatever requests are queued at that moment as
//!    one group with one sync (group commit), so concurrent callbacks share
//!    it.
//! 2. **Deduplicated in the same step.** The per-task record (which states
//!    were accepted when, and the furthest state) is decided by the single
//!    writer and carried in the very log record that stores the event: two
//!    concurrent copies of one callback are serialized by the writer and
//!    only one is accepted. The records are checkpointed into the task store
//!    (redb) in bulk about once a second and read back from the log after a
//!    crash. Records older than the dedup window are pruned, so memory and
//!    disk do not grow with the number of tasks ever seen.
//! 3. **Deleted only when acknowledged.** An entry leaves `pending` only when
//!    the publisher reported it acknowledged by the broker, or moves to
//!    `dead` (with the reason, in redb) when the broker refused it permanently, when
//!    it cannot be encoded for the broker, or when its stored bytes cannot
//!    be decoded (then kept exactly, hex-encoded). Transient failures leave
//!    it in place to be retried, with no deadline. Nothing ever leaves
//!    `dead` except a requeue of a readable event.
//! 4. **Order.** Sequence numbers follow commit order. The relay always
//!    starts from the oldest pending entry and puts at most one entry per
//!    task in a batch, so a task's later event is never published before an
//!    earlier one has been acknowledged, whatever is retried.
//! 5. **Bounded.** Past `max_pending` entries or `max_pending_bytes`, appends
//!    are refused (`Full`) instead of growing without bound. Dead letters
//!    are capped by count and bytes (`max_dead_letters`,
//!    `max_dead_letter_bytes`: the oldest go first, counted), and each keeps
//!    at most `dead_letter_keep_bytes` of its event (saying so). The log
//!    gives its space back as soon as nothing in a segment is pending, the
//!    segment being written included.
//! 6. **Damage costs only what is damaged.** A range of the log that holds
//!    no valid record costs the records in it, never the ones after it; it
//!    is kept (bounded) as a dead letter and reported. Only a torn final
//!    write (never answered) is ever cut. A damaged `outbox.redb` is set
//!    aside for a fresh one at start, so the log is still delivered (see
//!    `log/`, `crate::redb_file`).
//!
//! Delivery to the broker is at least once: a crash between the broker's
//! ack and the delete republishes that batch. The deterministic `eventId`
//! (and JetStream's `Nats-Msg-Id` window) let consumers drop such repeats.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot, Notify};

use crate::clock::now_ms;
use crate::config::OutboxConfig;
use crate::event::{State, TaskEvent};
use crate::sync::lock;
use crate::trace::{CallbackEntry, Caller, Decision, TraceConfig, Traces};

pub mod inspect;
mod log;
mod relay;
mod store;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tracked_tests;
mod writer;

pub use relay::{Relay, RelayStep};
pub use store::{Batch, TaskRecord};

/// What became of an appended event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Stored durably; the relay will publish it.
    New { seq: u64 },
    /// A different terminal state after a terminal one: stored and published
    /// with `conflictsWith` naming the earlier terminal state.
    Conflict { seq: u64, previous: State },
    /// This (taskId, state) was already accepted within the dedup window.
    Duplicate,
    /// The task already reached a later state; not published.
    Stale { furthest: State },
}

impl Appended {
    /// Whether the event will be published.
    pub fn is_stored(self) -> bool {
        matches!(self, Self::New { .. } | Self::Conflict { .. })
    }
}

/// Why an event could not be stored. Never answered with 2xx.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AppendError {
    #[error("the outbox is full ({0})")]
    Full(&'static str),
    #[error("the outbox cannot store events: {0}")]
    Storage(String),
    #[error("the outbox is shutting down")]
    Closed,
}

/// Errors of the outbox's own operations (open, read, admin).
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("cannot use data dir {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("outbox database: {0}")]
    Db(#[from] redb::Error),
    #[error("outbox pending log: {0}")]
    Log(std::io::Error),
    #[error("the outbox is shutting down")]
    Closed,
    #[error("the outbox database is being re-opened after a storage error")]
    Reopening,
    /// A task of the outbox's panicked (a bug): reported as such, never as
    /// "shutting down".
    #[error("an outbox task panicked: {0}")]
    Panicked(String),
}

impl OutboxError {
    /// The error of a blocking task that did not finish: a panic says so;
    /// otherwise the runtime is shutting down.
    pub fn from_join(e: tokio::task::JoinError) -> Self {
        match e.try_into_panic() {
            Ok(panic) => Self::Panicked(crate::sync::panic_message(&*panic)),
            Err(_) => Self::Closed,
        }
    }
}

impl From<crate::db::CellError> for OutboxError {
    fn from(e: crate::db::CellError) -> Self {
        match e {
            crate::db::CellError::Closed => Self::Closed,
            crate::db::CellError::Reopening => Self::Reopening,
            crate::db::CellError::Db(e) => Self::Db(e),
        }
    }
}

crate::db::redb_errors!(
    OutboxError:
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// Counters for every decision the bridge takes, for logs, the admin
/// endpoint and metrics.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    pub accepted: AtomicU64,
    pub duplicates: AtomicU64,
    pub stale: AtomicU64,
    pub conflicts: AtomicU64,
    pub rejected: AtomicU64,
    /// Rejected bodies pushed out of the in-memory keep (the oldest first).
    pub rejected_dropped: AtomicU64,
    /// Requests answered 429 by `server.rate_limit.others_per_sec`.
    pub rate_limited: AtomicU64,
    /// Clients put in penalty for spending their refusal budget.
    pub penalties: AtomicU64,
    /// Connections closed at accept, or requests answered 429 unread,
    /// because their client was in penalty.
    pub refused_penalty: AtomicU64,
    /// Connections closed at accept for want of a slot (per-address cap,
    /// or the listener's slots for addresses other than known senders).
    pub refused_connections: AtomicU64,
    /// Callbacks answered 503 because the backlog's rest is reserved for
    /// known senders.
    pub refused_reserved: AtomicU64,
    pub refused_full: AtomicU64,
    pub storage_errors: AtomicU64,
    pub published: AtomicU64,
    pub publish_retries: AtomicU64,
    /// Refusals of one event where it goes (no stream, unknown topic), each
    /// counted; past `outbox.refusal_attempts` the event is dead-lettered.
    pub refusals: AtomicU64,
    /// Pending events refused at their last try and waiting out their own
    /// backoff now (a gauge); `/readyz` reports them.
    pub refusing: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub pending: AtomicU64,
    pub pending_bytes: AtomicU64,
    pub dead: AtomicU64,
    /// Dedup records evicted at `max_tracked_tasks`/`max_tracked_bytes`:
    /// of finished tasks (taken first), and of unfinished ones.
    pub evicted_finished: AtomicU64,
    pub evicted_unfinished: AtomicU64,
    /// When eviction last had to take records of unfinished tasks (ms;
    /// 0 = never): `/readyz` warns for a while after.
    #[serde(skip)]
    pub evicted_unfinished_at: AtomicI64,
    /// Oldest dead letters deleted to stay under `outbox.max_dead_letters`
    /// and `outbox.max_dead_letter_bytes`.
    pub dead_dropped: AtomicU64,
    /// Dead letters deleted for good by an operator (`bury`).
    pub dead_buried: AtomicU64,
    /// Damaged ranges of the pending log found when it was opened (each
    /// kept as a dead letter the first time it is found).
    pub log_damaged_ranges: AtomicU64,
    /// Bytes in those ranges.
    pub log_damaged_bytes: AtomicU64,
    /// Bytes of a torn final write cut from the log when it was opened.
    pub log_torn_bytes: AtomicU64,
    /// Database files (`outbox.redb`, `tasks.redb`) found damaged at start
    /// and set aside for fresh ones.
    pub stores_set_aside: AtomicU64,
    /// What is damaged, one line each (newest last, at most
    /// [`MAX_DAMAGE_NOTES`]): for `/admin/status` and `/readyz`.
    #[serde(skip)]
    pub damage: Mutex<Vec<String>>,
    /// The last group commit failed; the database is being re-opened.
    #[serde(skip)]
    pub storage_failing: AtomicBool,
    /// When the relay last moved the queue forward or found it empty (ms
    /// since the epoch; 0 = not started).
    #[serde(skip)]
    pub relay_progress_at: AtomicI64,
    /// When a publish last failed transiently (ms): the broker did not answer.
    #[serde(skip)]
    pub broker_error_at: AtomicI64,
    /// Labelled counters and histograms for `/metrics`.
    #[serde(skip)]
    pub metrics: crate::metrics::Metrics,
}

/// Most lines kept in [`Stats::damage`].
pub const MAX_DAMAGE_NOTES: usize = 100;

impl Stats {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Notes what is damaged, for `/admin/status` and `/readyz`.
    pub fn note_damage(&self, what: String) {
        let mut notes = lock(&self.damage);
        if notes.len() == MAX_DAMAGE_NOTES {
            notes.remove(0);
        }
        notes.push(what);
    }

    /// Whether damage was found since the start.
    pub fn damaged(&self) -> bool {
        !lock(&self.damage).is_empty()
    }
}

/// A snapshot for the admin endpoint.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub pending: u64,
    pub pending_bytes: u64,
    pub oldest_pending_age_ms: Option<i64>,
    pub dead_letters: u64,
    pub tasks_tracked: u64,
    /// What was found damaged (the pending log's ranges, database files set
    /// aside), one line each; empty when nothing is.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub damage: Vec<String>,
    #[serde(skip_serializing_if = "serde_json::Value::is_null")]
    pub counters: serde_json::Value,
}

/// An event the broker refused permanently, kept whole with the reason.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    pub seq: u64,
    pub reason: String,
    pub failed_at: i64,
    /// The event as JSON (`null` when the stored bytes are not JSON).
    pub event: serde_json::Value,
    /// The stored bytes exactly, hex-encoded, when they are not a readable
    /// event: nothing is ever dropped, even what cannot be decoded. When
    /// [`DeadLetter::truncated_from`] is set, only their first bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_hex: Option<String>,
    /// Set when the stored bytes were longer than a dead letter keeps
    /// (`outbox.dead_letter_keep_bytes`, or a damaged range of the log):
    /// how many there were. `rawHex` then holds their first bytes only,
    /// and `event` is `null`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncated_from: Option<u64>,
}

impl DeadLetter {
    /// The dead letter of a pending entry's stored bytes, keeping at most
    /// `keep` of them: a longer event keeps its first `keep` bytes (as
    /// `rawHex`, not requeueable) and says so in the reason.
    pub(crate) fn of_stored(
        seq: u64,
        reason: String,
        failed_at: i64,
        bytes: &[u8],
        keep: usize,
    ) -> Self {
        if bytes.len() > keep {
            return Self {
                seq,
                reason: format!(
                    "{reason} (the event is {} bytes; this dead letter keeps its first {keep})",
                    bytes.len()
                ),
                failed_at,
                event: serde_json::Value::Null,
                raw_hex: Some(hex(&bytes[..keep])),
                truncated_from: Some(bytes.len() as u64),
            };
        }
        let readable = serde_json::from_slice::<TaskEvent>(bytes).is_ok();
        Self {
            seq,
            reason,
            failed_at,
            event: serde_json::from_slice(bytes).unwrap_or_default(),
            raw_hex: (!readable).then(|| hex(bytes)),
            truncated_from: None,
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Handle to the outbox; cheap to clone. The writer thread stops when the
/// last handle is dropped.
#[derive(Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

/// What the writer thread shares with the readers.
pub(super) struct Shared {
    /// Where each pending event is in the log.
    index: Mutex<log::Index>,
    segments: log::Segments,
    /// Dedup records newer than the task store's (not checkpointed yet).
    dirty: Mutex<HashMap<String, TaskRecord>>,
    /// The records a checkpoint is writing to the task store right now
    /// (older than `dirty`'s, newer than the store's).
    frozen: Mutex<Option<Arc<HashMap<String, TaskRecord>>>>,
    /// Tasks with a dedup record, in the store or in `dirty`.
    tracked: AtomicU64,
    /// What those records cost ([`store::record_bytes`]).
    tracked_bytes: AtomicU64,
}

impl Shared {
    fn new(data_dir: &Path) -> Self {
        Self {
            index: Mutex::default(),
            segments: log::Segments::new(data_dir.join("pending")),
            dirty: Mutex::default(),
            frozen: Mutex::default(),
            tracked: AtomicU64::new(0),
            tracked_bytes: AtomicU64::new(0),
        }
    }

    /// The dedup record of `task_id` that the task store does not have yet.
    fn unstored(&self, task_id: &str) -> Option<TaskRecord> {
        let dirty = lock(&self.dirty);
        if let Some(record) = dirty.get(task_id) {
            return Some(*record);
        }
        drop(dirty);
        let frozen = lock(&self.frozen);
        frozen.as_ref().and_then(|f| f.get(task_id).copied())
    }
}

struct Inner {
    db: Arc<store::DbCell>,
    shared: Arc<Shared>,
    /// Joined by [`Outbox::close`], or when the last handle is dropped.
    writer: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
    tx: mpsc::Sender<writer::Command>,
    stats: Arc<Stats>,
    notify: Arc<Notify>,
    config: OutboxConfig,
    traces: Traces,
}

impl Drop for Inner {
    /// The last handle is gone without [`Outbox::close`] (an error in the
    /// start after the outbox opened, say): the writer still commits what
    /// is queued, ends, and is joined here, so that no thread outlives the
    /// outbox and the data dir can be opened again at once.
    fn drop(&mut self) {
        let Some(writer) = lock(&self.writer).take() else {
            return;
        };
        // The writer ends once its channel is closed: this is its only sender.
        let (closed, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.tx, closed));
        join_writer(writer);
    }
}

/// Waits for the writer thread to end; a panic in it is logged as one.
fn join_writer(writer: std::thread::JoinHandle<()>) {
    if let Err(panic) = writer.join() {
        tracing::error!(cause = %crate::sync::panic_message(&*panic), "outbox writer thread panicked");
    }
}

impl Outbox {
    /// Opens (or creates) the outbox in `config.data_dir` and starts its
    /// writer thread. Whatever an earlier run left pending is relayed again.
    pub fn open(config: &OutboxConfig) -> Result<Self, OutboxError> {
        let traces = Traces::new(&TraceConfig::default(), config.dedup_window_secs);
        Self::open_traced(config, traces)
    }

    /// Like [`Outbox::open`], noting each append's decision in `traces`.
    pub fn open_traced(config: &OutboxConfig, traces: Traces) -> Result<Self, OutboxError> {
        let dir = &config.data_dir;
        let io_err = |source| OutboxError::DataDir {
            path: dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io_err)?;
        check_writable(dir).map_err(io_err)?;
        let (db, set_aside) = store::DbCell::open(
            dir.join("outbox.redb"),
            config.cache_mib.saturating_mul(1024 * 1024),
            "outbox",
            store::probe,
        )?;
        let db = Arc::new(db);
        let stats = Arc::new(Stats::default());
        if let Some(aside) = set_aside {
            tracing::error!(
                moved_to = %aside.moved_to.display(),
                cause = %aside.cause,
                "outbox.redb is damaged and was set aside; starting with a fresh one. LOST from \
                 the running state: the dead letters, and the dedup records of events no \
                 longer in the pending log (repeats of those may be published again). The \
                 pending log is delivered as usual. The damaged file is kept for recovery \
                 (see the README, \"Damage and recovery\")"
            );
            Stats::add(&stats.stores_set_aside, 1);
            stats.note_damage(format!(
                "outbox.redb damaged ({}); set aside as {}: its dead letters and older dedup records are not in use",
                aside.cause,
                aside.moved_to.display()
            ));
        }
        let notify = Arc::new(Notify::new());
        let shared = Arc::new(Shared::new(dir));
        let (tx, rx) = mpsc::channel(16 * 1024);
        let writer = writer::Writer::start(
            db.clone(),
            config.clone(),
            stats.clone(),
            notify.clone(),
            shared.clone(),
            rx,
        )?;
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                shared,
                writer: std::sync::Mutex::new(Some(writer)),
                tx,
                stats,
                notify,
                config: config.clone(),
                traces,
            }),
        })
    }

    /// Stores `event` durably unless it is a duplicate or stale. Returns only
    /// after the decision is on disk.
    pub async fn append(&self, event: TaskEvent) -> Result<Appended, AppendError> {
        let caller = Caller::of(&event);
        self.append_from(event, false, caller).await
    }

    /// Like [`Outbox::append`], for a task known not to be junk (registered
    /// with hookbridge, polled, or confirmed by the provider): its dedup
    /// record keeps the full `dedup_window_secs` even if it is seen once.
    pub async fn append_trusted(&self, event: TaskEvent) -> Result<Appended, AppendError> {
        let caller = Caller::of(&event);
        self.append_from(event, true, caller).await
    }

    /// [`Outbox::append`] (or, `trusted`, [`Outbox::append_trusted`]) of
    /// an event from `caller`, whose decision the task's trace notes.
    pub async fn append_from(
        &self,
        event: TaskEvent,
        trusted: bool,
        caller: Caller,
    ) -> Result<Appended, AppendError> {
        let traces = &self.inner.traces;
        let noted = traces
            .enabled()
            .then(|| (event.task_id.clone(), event.state, event.received_at));
        let outcome = self.append_as(event, trusted).await;
        if let Some((task_id, state, received_at)) = noted {
            let (decision, reason, status) = match &outcome {
                Ok(Appended::New { .. }) => (Decision::Accepted, None, None),
                Ok(Appended::Conflict { previous, .. }) => (
                    Decision::Conflict,
                    Some(format!("conflicts with {}", previous.as_str())),
                    None,
                ),
                Ok(Appended::Duplicate) => (Decision::Duplicate, None, None),
                Ok(Appended::Stale { furthest }) => (
                    Decision::Stale,
                    Some(format!("the task reached {}", furthest.as_str())),
                    None,
                ),
                Err(e) => (Decision::Refused, Some(e.to_string()), Some(503)),
            };
            traces.callback(
                &task_id,
                CallbackEntry {
                    received_at,
                    origin: caller.origin,
                    client: caller.client,
                    state: Some(state),
                    decision,
                    reason,
                    status,
                    // Derived from the task and the state when read.
                    event_id: None,
                    trace_id: caller.trace_id,
                },
            );
        }
        outcome
    }

    /// The per-task trace this outbox notes its decisions in.
    pub fn traces(&self) -> &Traces {
        &self.inner.traces
    }

    async fn append_as(&self, event: TaskEvent, trusted: bool) -> Result<Appended, AppendError> {
        // Sized once: a callback's JSON is rarely above a few hundred bytes.
        let mut payload = Vec::with_capacity(1024);
        serde_json::to_writer(&mut payload, &event)
            .map_err(|e| AppendError::Storage(e.to_string()))?;
        let (reply, rx) = oneshot::channel();
        self.send(writer::Command::Append {
            event: Box::new(event),
            payload,
            trusted,
            reply,
        })
        .await?;
        rx.await.map_err(|_| AppendError::Closed)?
    }

    /// The next batch for the relay: the oldest pending entries in sequence
    /// order, at most `batch`, at most one per task (a task's later event
    /// waits until its earlier one is acknowledged), looking at no more than
    /// `scan` entries.
    /// Entries that cannot be decoded come back apart, to be dead-lettered.
    pub fn read_batch(&self, batch: usize, scan: usize) -> Result<Batch, OutboxError> {
        self.read_batch_within(batch, u64::MAX, scan, &HashMap::new())
    }

    /// Like [`Outbox::read_batch`], also bounded in bytes: the events' JSON
    /// adds up to at most `max_bytes`, except that the first event always
    /// comes, however large (it would otherwise never go). `skip` maps the
    /// entries the relay holds back (each waiting out its own backoff) to
    /// their task: they are not read, and neither is any later event of
    /// their task.
    pub fn read_batch_within(
        &self,
        batch: usize,
        max_bytes: u64,
        scan: usize,
        skip: &HashMap<u64, String>,
    ) -> Result<Batch, OutboxError> {
        let slots = lock(&self.inner.shared.index).oldest(scan);
        let mut tasks = HashSet::with_capacity(batch.min(slots.len()));
        let mut out = Batch {
            ready: Vec::with_capacity(batch.min(slots.len())),
            unreadable: Vec::new(),
        };
        let mut bytes_read = 0u64;
        for slot in slots {
            if out.ready.len() == batch {
                break;
            }
            if let Some(task_id) = skip.get(&slot.seq) {
                tasks.insert(task_id.clone());
                continue;
            }
            let size = u64::from(slot.len);
            if !out.ready.is_empty() && bytes_read.saturating_add(size) > max_bytes {
                break;
            }
            let read = self
                .inner
                .shared
                .segments
                .read(&slot)
                .map_err(OutboxError::Log)?;
            let bytes = bytes::Bytes::from(read);
            let head = slot.head as usize;
            let meta = match log::decode_head(&bytes[..head], slot.received_at) {
                Some((_, Some(meta), _)) => Ok(meta),
                // Moved from an older version's store: the JSON says it all.
                _ => serde_json::from_slice::<TaskEvent>(&bytes[head..])
                    .map(|event| crate::event::EventMeta::of(&event))
                    .map_err(|e| format!("unreadable outbox entry: {e}")),
            };
            match meta {
                Ok(meta) if !tasks.contains(&meta.task_id) => {
                    tasks.insert(meta.task_id.clone());
                    bytes_read = bytes_read.saturating_add(size);
                    out.ready.push(crate::publish::Outgoing {
                        seq: slot.seq,
                        meta,
                        payload: bytes.slice(head..),
                    })
                }
                // A later event of a task already in this batch: next batch.
                Ok(_) => {}
                Err(reason) => out.unreadable.push((slot.seq, reason)),
            }
        }
        Ok(out)
    }

    /// Records the outcome of a publish: `delivered` are deleted, `dead` move
    /// to the dead letters with their reason. When it returns the dead
    /// letters are durable and the acks written; the acks become durable
    /// with the next sync (a crash before that only republishes them).
    pub async fn complete(
        &self,
        delivered: Vec<u64>,
        dead: Vec<(u64, String)>,
    ) -> Result<(), OutboxError> {
        let (reply, rx) = oneshot::channel();
        self.send(writer::Command::Complete {
            delivered,
            dead,
            reply,
        })
        .await
        .map_err(|_| OutboxError::Closed)?;
        rx.await.map_err(|_| OutboxError::Closed)?
    }

    /// Moves every dead letter back to the end of the pending queue.
    pub async fn requeue_dead(&self) -> Result<u64, OutboxError> {
        Ok(self.requeue_dead_letters(None).await?.len() as u64)
    }

    /// Moves the dead letters numbered `only` (all when `None`) back to the
    /// end of the pending queue; returns the numbers of those moved (a
    /// missing one, or one without a readable event, is not).
    pub async fn requeue_dead_letters(
        &self,
        only: Option<Vec<u64>>,
    ) -> Result<Vec<u64>, OutboxError> {
        let only = only.map(|mut seqs| {
            seqs.sort_unstable();
            seqs.dedup();
            seqs
        });
        let (reply, rx) = oneshot::channel();
        self.send(writer::Command::Requeue { only, reply })
            .await
            .map_err(|_| OutboxError::Closed)?;
        rx.await.map_err(|_| OutboxError::Closed)?
    }

    /// Deletes the dead letters numbered `seqs` for good (an operator's
    /// "bury": a dead letter nobody will requeue); returns the numbers of
    /// those deleted, in sequence order (a missing one is not).
    pub async fn delete_dead_letters(&self, mut seqs: Vec<u64>) -> Result<Vec<u64>, OutboxError> {
        seqs.sort_unstable();
        seqs.dedup();
        let (reply, rx) = oneshot::channel();
        self.send(writer::Command::Delete { seqs, reply })
            .await
            .map_err(|_| OutboxError::Closed)?;
        rx.await.map_err(|_| OutboxError::Closed)?
    }

    /// Stores `event` straight in the dead letters with `reason`, without
    /// publishing it (for example a callback the provider did not confirm).
    pub async fn bury(&self, event: TaskEvent, reason: String) -> Result<u64, OutboxError> {
        let bytes = serde_json::to_vec(&event).unwrap_or_default();
        self.bury_raw(&bytes, reason).await
    }

    /// Like [`Outbox::bury`], for stored bytes that are not a readable event
    /// (an entry of another store that cannot be decoded): the dead letter
    /// keeps them exactly, as [`DeadLetter::raw_hex`] (up to
    /// `outbox.dead_letter_keep_bytes`).
    pub async fn bury_raw(&self, bytes: &[u8], reason: String) -> Result<u64, OutboxError> {
        let keep = self.inner.config.dead_letter_keep_bytes as usize;
        let letter = DeadLetter::of_stored(0, reason, 0, bytes, keep);
        let (reply, rx) = oneshot::channel();
        self.send(writer::Command::Bury {
            letter: Box::new(letter),
            reply,
        })
        .await
        .map_err(|_| OutboxError::Closed)?;
        rx.await.map_err(|_| OutboxError::Closed)?
    }

    /// Deletes every task record older than the dedup window (also runs
    /// periodically). Returns how many were deleted.
    ///
    /// A pass starts with a checkpoint; then the records are read in steps
    /// of bounded size on the blocking pool, off the writer, and only the
    /// expired ones found go to the writer, to be deleted in the task
    /// store's transaction if still expired. A pass over millions of
    /// records that finds none expired so costs the appends one checkpoint,
    /// not a write transaction per step.
    pub async fn prune(&self) -> Result<u64, OutboxError> {
        let mut total = self.prune_step(Vec::new()).await?;
        let window = (self.inner.config.dedup_window_secs as i64).saturating_mul(1000);
        let one_off = (self.inner.config.one_off_window_secs as i64).saturating_mul(1000);
        let mut from: Option<String> = None;
        loop {
            let db = self.inner.db.clone();
            let after = from.take();
            let (expired, next) = tokio::task::spawn_blocking(move || {
                writer::expired_after(&*db.get()?, after.as_deref(), now_ms(), window, one_off)
            })
            .await
            .map_err(OutboxError::from_join)??;
            if !expired.is_empty() {
                total += self.prune_step(expired).await?;
            }
            match next {
                Some(next) => from = Some(next),
                None => return Ok(total),
            }
        }
    }

    /// One prune step on the writer (see [`writer::Command::Prune`]).
    async fn prune_step(&self, expired: Vec<String>) -> Result<u64, OutboxError> {
        let (reply, rx) = oneshot::channel();
        self.send(writer::Command::Prune {
            expired,
            reply: Some(reply),
        })
        .await
        .map_err(|_| OutboxError::Closed)?;
        rx.await.map_err(|_| OutboxError::Closed)?
    }

    /// Commits what is queued, stops and joins the writer thread, and
    /// closes the database, so that the data dir can be opened again at
    /// once. Every later call on any handle fails with `Closed`.
    pub async fn close(&self) {
        if self.inner.tx.send(writer::Command::Stop).await.is_err() {
            tracing::debug!("the outbox writer had stopped already");
        }
        let writer = lock(&self.inner.writer).take();
        let db = self.inner.db.clone();
        let closed = tokio::task::spawn_blocking(move || {
            if let Some(writer) = writer {
                join_writer(writer);
            }
            db.close();
        })
        .await;
        if let Err(e) = closed {
            tracing::error!(error = %e, "closing the outbox failed");
        }
    }

    /// Whether the writer thread is still there to take writes (for the
    /// supervisor and the readiness check).
    pub fn writer_alive(&self) -> bool {
        let writer = lock(&self.inner.writer);
        writer.as_ref().is_some_and(|w| !w.is_finished())
    }

    async fn send(&self, command: writer::Command) -> Result<(), AppendError> {
        self.inner
            .tx
            .send(command)
            .await
            .map_err(|_| AppendError::Closed)
    }

    /// The first `limit` dead letters, oldest first.
    pub fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, OutboxError> {
        self.dead_letters_after(None, limit)
    }

    /// Like [`Outbox::dead_letters`], starting after sequence number `after`
    /// (for paging through all of them).
    pub fn dead_letters_after(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, OutboxError> {
        store::dead_letters(&*self.inner.db.get()?, after, limit)
    }

    /// The dead letter numbered `seq`, if there is one.
    pub fn dead_letter(&self, seq: u64) -> Result<Option<DeadLetter>, OutboxError> {
        store::dead_letter(&*self.inner.db.get()?, seq)
    }

    /// The task's dedup/guard record, if still within the window.
    pub fn task(&self, task_id: &str) -> Result<Option<TaskRecord>, OutboxError> {
        match self.inner.shared.unstored(task_id) {
            Some(record) => Ok(Some(record)),
            None => store::task(&*self.inner.db.get()?, task_id),
        }
    }

    /// What the dedup records cost ([`store::record_bytes`]; estimated from
    /// a sample after a restart with more than 10,000 records).
    pub fn tracked_bytes(&self) -> u64 {
        self.inner.shared.tracked_bytes.load(Ordering::Relaxed)
    }

    pub fn status(&self) -> Result<Status, OutboxError> {
        let s = &self.inner.stats;
        let shared = &self.inner.shared;
        let oldest = lock(&shared.index).first().map(|slot| slot.received_at);
        let tasks = shared.tracked.load(Ordering::Relaxed);
        Ok(Status {
            pending: s.pending.load(Ordering::Relaxed),
            pending_bytes: s.pending_bytes.load(Ordering::Relaxed),
            oldest_pending_age_ms: oldest.map(|at| (now_ms() - at).max(0)),
            dead_letters: s.dead.load(Ordering::Relaxed),
            tasks_tracked: tasks,
            damage: lock(&s.damage).clone(),
            counters: serde_json::to_value(&**s).unwrap_or_default(),
        })
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.inner.stats
    }

    /// Whether the backlog is at its cap (for operators and tests; the
    /// writer enforces the cap, after the dedup check).
    pub fn is_full(&self) -> bool {
        let s = &self.inner.stats;
        s.pending.load(Ordering::Relaxed) >= self.inner.config.max_pending
            || s.pending_bytes.load(Ordering::Relaxed) >= self.inner.config.max_pending_bytes
    }

    /// Whether the backlog is past the share of its caps left when
    /// `reserved_percent` of them is kept for known senders.
    pub fn over_share(&self, reserved_percent: u8) -> bool {
        let s = &self.inner.stats;
        let keep = u128::from(100 - reserved_percent.min(100));
        let share = |cap: u64| (u128::from(cap) * keep / 100) as u64;
        s.pending.load(Ordering::Relaxed) >= share(self.inner.config.max_pending)
            || s.pending_bytes.load(Ordering::Relaxed) >= share(self.inner.config.max_pending_bytes)
    }

    pub(crate) fn notified(&self) -> Arc<Notify> {
        self.inner.notify.clone()
    }

    pub fn config(&self) -> &OutboxConfig {
        &self.inner.config
    }
}

/// An unwritable data dir must fail at start-up, not on the first callback.
/// A full one must not: the probe is an empty file (no data block), and a
/// lack of space is only logged, so that a restart on a full disk can
/// deliver what is pending and free the space.
fn check_writable(dir: &Path) -> std::io::Result<()> {
    let probe = dir.join(".write-probe");
    match std::fs::File::create(&probe) {
        Ok(file) => drop(file),
        Err(e) if e.kind() == std::io::ErrorKind::StorageFull => {
            tracing::warn!(dir = %dir.display(), "the data dir's file system is full; starting anyway");
            return Ok(());
        }
        Err(e) => return Err(e),
    }
    std::fs::remove_file(probe)
}
