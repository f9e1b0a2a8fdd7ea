//! The held queue of verify mode: callbacks stored for the verifier
//! (`held`: seq -> [`Held`]), at most one per (taskId, state)
//! (`held_keys`), capped, and never clogged by an entry that cannot be read.
//!
//! A held entry keeps only what verification needs: the task id, the
//! state, the receive time, the sender's address, and at most
//! [`EXCERPT`] bytes of the body for the dead letter of a forged one. What
//! is published is the provider's record, never the sender's fields, so
//! nothing more is worth a byte of disk. The queue is capped in entries
//! and in bytes (`held_meta`, kept in the same transactions), and per
//! address (`held_from`: address -> entries), so that one address cannot
//! fill it. The verifier takes due entries round-robin across addresses
//! ([`Registry::held_due`]): a flood from one address delays a callback
//! from another by at most one turn per address with entries due.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Mutex;

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{encode, write, Registry, RegistryError, HELD, HELD_KEYS};
use crate::event::{State, TaskEvent};
use crate::sync::lock;

/// Held bookkeeping: [`BYTES`] -> what the held entries cost.
pub(super) const HELD_META: TableDefinition<&str, u64> = TableDefinition::new("held_meta");
/// Client address -> its held entries.
pub(super) const HELD_FROM: TableDefinition<&str, u64> = TableDefinition::new("held_from");
const BYTES: &str = "bytes";

/// Most bytes of a held callback's body kept for its dead letter.
pub const EXCERPT: usize = 256;
/// The B-tree's share of an entry and its `held_keys` row, counted with it.
const ENTRY_OVERHEAD: u64 = 48;

/// A callback stored for the verifier: what is needed to verify it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Held {
    #[serde(skip)]
    pub seq: u64,
    pub task_id: String,
    pub state: State,
    /// When the callback came (ms since the epoch).
    pub received_at: i64,
    /// The client address it came from ([`sender_of`]: an IPv6 address by
    /// its /64); empty when unknown (the verifier's round-robin then counts
    /// it as one address).
    #[serde(default)]
    pub from: String,
    /// The first bytes of the body (at most [`EXCERPT`], cut at a character).
    #[serde(default)]
    pub excerpt: String,
    /// The size of the whole body.
    #[serde(default)]
    pub body_bytes: u64,
    pub attempts: u32,
    pub next_at: i64,
}

/// What earlier versions stored: the whole parsed callback.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OldHeld {
    event: TaskEvent,
    attempts: u32,
    next_at: i64,
}

impl Held {
    /// The entry for a callback that came from `from` with `body`.
    pub fn new(event: &TaskEvent, from: &str, body: &[u8], now: i64) -> Self {
        let cut = &body[..body.len().min(EXCERPT)];
        let text = String::from_utf8_lossy(cut);
        let excerpt = match text.char_indices().nth(EXCERPT) {
            Some((at, _)) => text[..at].to_string(),
            None => text.into_owned(),
        };
        Self {
            seq: 0,
            task_id: event.task_id.clone(),
            state: event.state,
            received_at: event.received_at,
            from: from.chars().take(64).collect(),
            excerpt,
            body_bytes: body.len() as u64,
            attempts: 0,
            next_at: now,
        }
    }

    /// Reads a stored entry, of this version or an earlier one.
    fn decode(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice::<Held>(bytes).or_else(|e| {
            let old = serde_json::from_slice::<OldHeld>(bytes).map_err(|_| e)?;
            let body = serde_json::to_vec(&old.event).unwrap_or_default();
            let mut held = Held::new(&old.event, "", &body, old.next_at);
            held.attempts = old.attempts;
            Ok(held)
        })
    }

    /// The callback as the verifier judges it: task, state and receive time.
    pub fn callback(&self) -> TaskEvent {
        let mut event = crate::poll::synthetic_pending(&self.task_id, self.received_at);
        event.state = self.state;
        event.provider_state = self.state.as_str().to_string();
        event.event_id = crate::event::event_id(&self.task_id, self.state);
        event.source = crate::event::Source::Webhook;
        event
    }
}

/// The sender key of a client address for the per-address cap and the
/// round-robin: an IPv4 address as is, an IPv6 address by its /64 (what
/// one subscriber usually holds, so that one host cannot pose as many).
pub fn sender_of(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                let net = std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0);
                format!("{net}/64")
            }
        },
    }
}

/// What an entry stored as `value` costs against `provider.max_held_bytes`.
fn cost(value_len: usize, task_id: &str) -> u64 {
    (value_len + task_id.len()) as u64 + ENTRY_OVERHEAD
}

/// A held entry that cannot be decoded (written by another version, or
/// damaged): the verifier buries it with `error` as the reason.
#[derive(Debug, Clone, PartialEq)]
pub struct Unreadable {
    pub seq: u64,
    /// The stored bytes, whole.
    pub raw: Vec<u8>,
    pub error: String,
}

/// What [`Registry::held_due`] found.
#[derive(Debug, Default)]
pub struct HeldDue {
    /// Due callbacks, at most one per task, round-robin across addresses.
    pub held: Vec<Held>,
    pub unreadable: Vec<Unreadable>,
}

/// What became of a callback offered to [`Registry::hold`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holding {
    /// Stored (durably) under this sequence number.
    Held(u64),
    /// The same (taskId, state) is already awaiting verification.
    Duplicate,
    /// The held queue is at one of its caps; nothing stored.
    Full(HeldCap),
}

/// Which cap of the held queue was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeldCap {
    /// `provider.max_held`.
    Entries,
    /// `provider.max_held_bytes`.
    Bytes,
    /// `provider.max_held_per_address`.
    Address,
}

/// The caps of the held queue.
#[derive(Debug, Clone, Copy)]
pub struct HeldLimits {
    pub entries: u64,
    pub bytes: u64,
    pub per_address: u64,
}

/// A callback waiting for the next group commit of [`Registry::hold`].
struct Waiting {
    held: Held,
    limits: HeldLimits,
    reply: std::sync::mpsc::Sender<Result<Holding, RegistryError>>,
}

/// The queue of [`Registry::hold`]'s group commit.
#[derive(Default)]
pub(super) struct HoldQueue {
    waiting: Mutex<Vec<Waiting>>,
    /// Held by the caller whose turn it is to commit.
    turn: Mutex<()>,
}

/// The held queue's tables inside one write transaction.
struct HeldTables<'t> {
    held: redb::Table<'t, u64, &'static [u8]>,
    keys: redb::Table<'t, (&'static str, &'static str), u64>,
    meta: redb::Table<'t, &'static str, u64>,
    from: redb::Table<'t, &'static str, u64>,
}

impl HeldTables<'_> {
    /// See [`Registry::hold`].
    fn hold(&mut self, held: &Held, limits: HeldLimits) -> Result<Holding, RegistryError> {
        let key = (held.task_id.as_str(), held.state.as_str());
        let existing = self.keys.get(key)?.map(|seq| seq.value());
        // A key whose entry was released some other way is stale.
        if let Some(seq) = existing {
            if self.held.get(seq)?.is_some() {
                return Ok(Holding::Duplicate);
            }
        }
        let value = encode(held);
        let size = cost(value.len(), &held.task_id);
        let bytes = self.meta.get(BYTES)?.map_or(0, |v| v.value());
        let mine = self.from.get(held.from.as_str())?.map_or(0, |v| v.value());
        if self.held.len()? >= limits.entries {
            return Ok(Holding::Full(HeldCap::Entries));
        }
        if bytes + size > limits.bytes {
            return Ok(Holding::Full(HeldCap::Bytes));
        }
        if !held.from.is_empty() && mine >= limits.per_address {
            return Ok(Holding::Full(HeldCap::Address));
        }
        let seq = self.held.last()?.map_or(1, |(k, _)| k.value() + 1);
        self.held.insert(seq, value.as_slice())?;
        self.keys.insert(key, seq)?;
        self.meta.insert(BYTES, bytes + size)?;
        if !held.from.is_empty() {
            self.from.insert(held.from.as_str(), mine + 1)?;
        }
        Ok(Holding::Held(seq))
    }
}

/// Adds `by` (may be negative) to a counter row, deleting it at zero.
fn shift(
    table: &mut redb::Table<'_, &'static str, u64>,
    key: &str,
    by: i64,
) -> Result<(), RegistryError> {
    let now = table.get(key)?.map_or(0, |v| v.value());
    let next = now.saturating_add_signed(by);
    if next == 0 {
        table.remove(key)?;
    } else {
        table.insert(key, next)?;
    }
    Ok(())
}

impl Registry {
    /// Sets the byte count of the held queue when it is missing (a file
    /// written by an earlier version). Called at open.
    pub(super) fn count_held_bytes(db: &redb::Database) -> Result<(), RegistryError> {
        let txn = write(db, true)?;
        {
            let mut meta = txn.open_table(HELD_META)?;
            txn.open_table(HELD_FROM)?;
            if meta.get(BYTES)?.is_none() {
                let held = txn.open_table(HELD)?;
                let mut bytes = 0;
                for entry in held.iter()? {
                    let (_, v) = entry?;
                    let task = Held::decode(v.value())
                        .map(|h| h.task_id)
                        .unwrap_or_default();
                    bytes += cost(v.value().len(), &task);
                }
                meta.insert(BYTES, bytes)?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Stores a callback for the verifier unless the same (taskId, state)
    /// is already held or a cap is reached (in that order: a repeat is
    /// answered as held even when the queue is full). `held.from` empty:
    /// no per-address cap. Durable when it returns `Held`.
    ///
    /// Concurrent calls share one transaction and one fsync (group commit):
    /// a caller queues its callback, then whoever holds the turn commits
    /// everything queued so far and answers each caller.
    pub fn hold(&self, held: &Held, limits: HeldLimits) -> Result<Holding, RegistryError> {
        let (reply, answer) = std::sync::mpsc::channel();
        lock(&self.holds.waiting).push(Waiting {
            held: held.clone(),
            limits,
            reply,
        });
        {
            // A turn's leader answers before it gives the turn up: once we
            // have it, our callback was either answered or is still queued.
            let _turn = lock(&self.holds.turn);
            let batch = std::mem::take(&mut *lock(&self.holds.waiting));
            if !batch.is_empty() {
                self.hold_batch(batch);
            }
        }
        answer.recv().map_err(|_| RegistryError::Closed)?
    }

    /// One durable transaction for every queued callback, in queue order.
    fn hold_batch(&self, batch: Vec<Waiting>) {
        let outcomes = self.db.with(|db| {
            let txn = write(db, true)?;
            let mut outcomes = Vec::with_capacity(batch.len());
            {
                let mut tables = HeldTables {
                    held: txn.open_table(HELD)?,
                    keys: txn.open_table(HELD_KEYS)?,
                    meta: txn.open_table(HELD_META)?,
                    from: txn.open_table(HELD_FROM)?,
                };
                for waiting in &batch {
                    outcomes.push(tables.hold(&waiting.held, waiting.limits)?);
                }
            }
            txn.commit()?;
            Ok(outcomes)
        });
        match outcomes {
            Ok(outcomes) => {
                if outcomes.iter().any(|o| matches!(o, Holding::Held(_))) {
                    self.held_added.notify_one();
                }
                for (waiting, outcome) in batch.into_iter().zip(outcomes) {
                    // A caller that is gone no longer needs its answer.
                    let _gone = waiting.reply.send(Ok(outcome));
                }
            }
            Err(e) => {
                for waiting in batch {
                    let _gone = waiting.reply.send(Err(e.copy()));
                }
            }
        }
    }

    /// (entries, bytes) held now.
    pub fn held_size(&self) -> Result<(u64, u64), RegistryError> {
        self.db.with(|db| {
            let txn = db.begin_read()?;
            let entries = txn.open_table(HELD)?.len()?;
            let bytes = txn
                .open_table(HELD_META)?
                .get(BYTES)?
                .map_or(0, |v| v.value());
            Ok((entries, bytes))
        })
    }

    /// Up to `limit` held callbacks due for verification, at most one per
    /// task (its oldest, so a task's callbacks are appended in the order
    /// they came), taken round-robin across sender addresses and oldest
    /// first within one; and every entry met that cannot be read. Looks at
    /// the whole queue (bounded by `provider.max_held`).
    pub fn held_due(&self, now: i64, limit: usize) -> Result<HeldDue, RegistryError> {
        self.db.with(|db| {
            let txn = db.begin_read()?;
            let held = txn.open_table(HELD)?;
            let mut out = HeldDue::default();
            let mut tasks = HashSet::new();
            let mut by_address: BTreeMap<String, VecDeque<Held>> = BTreeMap::new();
            for entry in held.iter()? {
                let (k, v) = entry?;
                match Held::decode(v.value()) {
                    Ok(mut h) => {
                        // A task's later callback waits for its earlier one.
                        if tasks.insert(h.task_id.clone()) && h.next_at <= now {
                            h.seq = k.value();
                            by_address.entry(h.from.clone()).or_default().push_back(h);
                        }
                    }
                    Err(e) if out.unreadable.len() < limit => out.unreadable.push(Unreadable {
                        seq: k.value(),
                        raw: v.value().to_vec(),
                        error: e.to_string(),
                    }),
                    Err(_) => {}
                }
            }
            let room = limit.saturating_sub(out.unreadable.len());
            let mut queues: Vec<VecDeque<Held>> = by_address.into_values().collect();
            while out.held.len() < room && !queues.is_empty() {
                queues.retain_mut(|queue| match queue.pop_front() {
                    Some(h) if out.held.len() < room => {
                        out.held.push(h);
                        true
                    }
                    _ => false,
                });
            }
            Ok(out)
        })
    }

    /// The earliest next verification attempt (an unreadable entry is due
    /// at once).
    pub fn next_held(&self) -> Result<Option<i64>, RegistryError> {
        self.db.with(|db| {
            let txn = db.begin_read()?;
            let held = txn.open_table(HELD)?;
            let mut next = None;
            for entry in held.iter()? {
                let (_, v) = entry?;
                let at = Held::decode(v.value()).map_or(0, |h| h.next_at);
                next = Some(next.map_or(at, |n: i64| n.min(at)));
            }
            Ok(next)
        })
    }

    /// Deletes settled held callbacks (by sequence number) and reschedules
    /// the others.
    pub fn settle_held(&self, released: &[u64], retry: &[Held]) -> Result<(), RegistryError> {
        if released.is_empty() && retry.is_empty() {
            return Ok(());
        }
        self.db.with(|db| {
            let txn = write(db, !released.is_empty())?;
            {
                let mut held = txn.open_table(HELD)?;
                let mut keys = txn.open_table(HELD_KEYS)?;
                let mut meta = txn.open_table(HELD_META)?;
                let mut from = txn.open_table(HELD_FROM)?;
                let mut bytes = meta.get(BYTES)?.map_or(0, |v| v.value()) as i64;
                for seq in released {
                    let Some(raw) = held.remove(*seq)?.map(|v| v.value().to_vec()) else {
                        continue;
                    };
                    let decoded = Held::decode(&raw).ok();
                    let task = decoded.as_ref().map_or("", |h| h.task_id.as_str());
                    bytes -= cost(raw.len(), task) as i64;
                    if let Some(h) = decoded {
                        let key = (h.task_id.as_str(), h.state.as_str());
                        if keys.get(key)?.is_some_and(|s| s.value() == *seq) {
                            keys.remove(key)?;
                        }
                        if !h.from.is_empty() {
                            shift(&mut from, &h.from, -1)?;
                        }
                    }
                }
                for h in retry {
                    // Released meanwhile: nothing to reschedule.
                    let Some(old_len) = held.get(h.seq)?.map(|v| v.value().len()) else {
                        continue;
                    };
                    let value = encode(h);
                    held.insert(h.seq, value.as_slice())?;
                    bytes += value.len() as i64 - old_len as i64;
                }
                meta.insert(BYTES, bytes.max(0) as u64)?;
            }
            txn.commit()?;
            Ok(())
        })
    }
}
