//! The per-task trace: what became of each callback of a task, and where
//! each of its events landed. It answers the operator's question "did the
//! callback for task X arrive, what did we decide, and where is its event?"
//! (`GET /admin/tasks/{taskId}`, `hookbridge trace`, the console).
//!
//! - **Recorded off the sync path.** A callback's decision is noted after
//!   the outbox answered it, a publication after the broker acknowledged
//!   it: one short lock of one of [`SHARDS`] shards, never a disk write.
//! - **Bounded.** At most `trace.max_per_task` callbacks and as many
//!   publications per task (the oldest go first), at most `trace.max_bytes`
//!   in all (the task touched longest ago goes first, counted in
//!   [`Traces::dropped`]), and nothing older than `outbox.dedup_window_secs`.
//! - **Not durable.** The trace lives in memory: a restart starts it empty.
//!   What is durable (the events, their dedup records, the dead letters)
//!   stays in the outbox; the trace is for looking, never for deciding.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::clock::now_ms;
use crate::event::State;
use crate::publish::{rfc3339_millis, Receipt};
use crate::sync::lock;

/// Shards of the store: concurrent callbacks of different tasks rarely
/// wait for each other.
pub const SHARDS: usize = 16;

/// What a callback came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    /// Stored; its event will be published.
    Accepted,
    /// This (taskId, state) was accepted before, within the dedup window.
    Duplicate,
    /// The task already reached a later state.
    Stale,
    /// A second, different terminal state: stored with `conflictsWith`.
    Conflict,
    /// Refused for what it holds (a 4xx, or a wrong callback token).
    Rejected,
    /// Refused for want of room or storage (a 503): not the sender's fault.
    Refused,
    /// Verify mode: kept until the provider confirms it.
    Held,
}

impl Decision {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Duplicate => "duplicate",
            Self::Stale => "stale",
            Self::Conflict => "conflict",
            Self::Rejected => "rejected",
            Self::Refused => "refused",
            Self::Held => "held",
        }
    }
}

/// Where an event came from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// A callback on the public listener.
    #[default]
    Webhook,
    /// The reconciler's poll of the provider's status endpoint.
    Poll,
    /// A held callback the provider confirmed (verify mode).
    Verified,
}

impl Origin {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Webhook => "webhook",
            Self::Poll => "poll",
            Self::Verified => "verified",
        }
    }
}

/// Who handed an event to the outbox: what its trace entry says besides
/// the decision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caller {
    pub origin: Origin,
    pub client: Option<IpAddr>,
    pub trace_id: Option<String>,
}

impl Caller {
    /// A caller known only from the event's source.
    pub fn of(event: &crate::event::TaskEvent) -> Self {
        Self {
            origin: match event.source {
                crate::event::Source::Poll => Origin::Poll,
                crate::event::Source::Webhook => Origin::Webhook,
            },
            ..Self::default()
        }
    }
}

/// One callback of a task and what became of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CallbackEntry {
    /// Milliseconds since the epoch.
    pub received_at: i64,
    pub origin: Origin,
    /// The client's address (webhooks only).
    pub client: Option<IpAddr>,
    /// The state it reported, when it could be read.
    pub state: Option<State>,
    pub decision: Decision,
    /// Why it was rejected or refused.
    pub reason: Option<String>,
    /// The HTTP status it was answered with, when not 200.
    pub status: Option<u16>,
    /// Its event's id, when it had a state. Not stored: [`Traces::get`]
    /// derives it from the task id and the state (event ids are
    /// deterministic), so a caller need not set it.
    pub event_id: Option<String>,
    /// The OpenTelemetry trace id it was received under (32 hex digits).
    pub trace_id: Option<String>,
}

/// One event of a task the broker acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Publication {
    /// Not stored either: derived from the task id and the state on read.
    pub event_id: String,
    pub state: State,
    /// When the broker acknowledged it, in milliseconds since the epoch.
    pub at: i64,
    /// `kafka`, `nats` or `file`.
    pub broker: &'static str,
    /// The Kafka topic or NATS subject it went to (in Kafka cluster mode,
    /// the internal topic that hands it to its owner).
    #[serde(serialize_with = "text")]
    pub topic: Arc<str>,
    #[serde(skip)]
    pub receipt: Receipt,
    pub trace_id: Option<String>,
}

fn text<S: serde::Serializer>(value: &Arc<str>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(value)
}

/// Everything kept about one task, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TaskTrace {
    pub task_id: String,
    pub callbacks: Vec<CallbackEntry>,
    pub published: Vec<Publication>,
}

impl TaskTrace {
    /// The answer of `GET /admin/tasks/{taskId}`: times in RFC 3339, and
    /// the fields that do not apply left out.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::{json, Map, Value};
        let callbacks: Vec<Value> = self
            .callbacks
            .iter()
            .map(|c| {
                let mut m = Map::new();
                m.insert("receivedAt".into(), rfc3339_millis(c.received_at).into());
                m.insert("source".into(), c.origin.as_str().into());
                if let Some(ip) = c.client {
                    m.insert("client".into(), ip.to_string().into());
                }
                if let Some(state) = c.state {
                    m.insert("state".into(), state.as_str().into());
                }
                m.insert("decision".into(), c.decision.as_str().into());
                if let Some(reason) = &c.reason {
                    m.insert("reason".into(), reason.as_str().into());
                }
                if let Some(status) = c.status {
                    m.insert("status".into(), status.into());
                }
                if let Some(id) = &c.event_id {
                    m.insert("eventId".into(), id.as_str().into());
                }
                if let Some(id) = &c.trace_id {
                    m.insert("traceId".into(), id.as_str().into());
                }
                Value::Object(m)
            })
            .collect();
        let published: Vec<Value> = self
            .published
            .iter()
            .map(|p| {
                let mut m = Map::new();
                m.insert("eventId".into(), p.event_id.as_str().into());
                m.insert("state".into(), p.state.as_str().into());
                m.insert("at".into(), rfc3339_millis(p.at).into());
                m.insert("broker".into(), p.broker.into());
                let place = if p.broker == "nats" {
                    "subject"
                } else {
                    "topic"
                };
                if p.broker != "file" {
                    m.insert(place.into(), (*p.topic).into());
                }
                let r = &p.receipt;
                if let Some(partition) = r.partition {
                    m.insert("partition".into(), partition.into());
                }
                if let Some(offset) = r.offset {
                    m.insert("offset".into(), offset.into());
                }
                if let Some(stream) = &r.stream {
                    m.insert("stream".into(), stream.as_str().into());
                }
                if let Some(sequence) = r.sequence {
                    m.insert("sequence".into(), sequence.into());
                }
                if let Some(id) = &p.trace_id {
                    m.insert("traceId".into(), id.as_str().into());
                }
                Value::Object(m)
            })
            .collect();
        json!({"taskId": self.task_id, "callbacks": callbacks, "published": published})
    }
}

/// The broker family of a publisher's name, as the trace shows it.
pub fn broker_of(publisher: &'static str) -> &'static str {
    match publisher {
        p if p.starts_with("kafka") => "kafka",
        p if p.starts_with("jetstream") || p == "nats" => "nats",
        _ => "file",
    }
}

/// `[trace]`: how much of each task's history is kept.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TraceConfig {
    /// Keep a per-task trace at all (`GET /admin/tasks/{taskId}`,
    /// `hookbridge trace`, the console's task page).
    pub enabled: bool,
    /// Most bytes the traces of all tasks may take (estimated); past it the
    /// task touched longest ago is dropped first. 1 MiB to 16 GiB.
    pub max_bytes: u64,
    /// Most callbacks, and most publications, kept per task (the oldest go
    /// first). 1 to 1,000.
    pub max_per_task: usize,
}

impl Default for TraceConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_bytes: 64 * 1024 * 1024,
            max_per_task: 32,
        }
    }
}

/// Handle to the traces of all tasks; cheap to clone. A disabled one
/// records nothing and finds nothing.
#[derive(Clone, Default)]
pub struct Traces {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    shards: Vec<Mutex<Shard>>,
    hasher: std::collections::hash_map::RandomState,
    max_shard_bytes: u64,
    max_per_task: usize,
    window_ms: i64,
    dropped: AtomicU64,
}

#[derive(Default)]
struct Shard {
    tasks: HashMap<Arc<str>, Kept>,
    /// Tasks in the order they were touched, with the touch's number; an
    /// item whose number is not the task's last touch is skipped.
    order: VecDeque<(Arc<str>, u64)>,
    touches: u64,
    bytes: u64,
}

struct Kept {
    callbacks: VecDeque<CallbackEntry>,
    published: VecDeque<Publication>,
    touch: u64,
    touched_at: i64,
    bytes: u64,
}

/// What one task's entry costs besides its items (map slot, order item,
/// the id).
const TASK_OVERHEAD: u64 = 160;

fn callback_bytes(c: &CallbackEntry) -> u64 {
    let text = |s: &Option<String>| s.as_ref().map_or(0, String::len) as u64;
    std::mem::size_of::<CallbackEntry>() as u64
        + text(&c.reason)
        + text(&c.event_id)
        + text(&c.trace_id)
}

fn publication_bytes(p: &Publication) -> u64 {
    std::mem::size_of::<Publication>() as u64
        + (p.event_id.len() + p.topic.len()) as u64
        + p.receipt.stream.as_ref().map_or(0, String::len) as u64
        + p.trace_id.as_ref().map_or(0, String::len) as u64
}

impl Traces {
    /// A trace kept for `window_secs` (the dedup window), bounded by `config`.
    pub fn new(config: &TraceConfig, window_secs: u64) -> Self {
        if !config.enabled {
            return Self::default();
        }
        let shards = (0..SHARDS).map(|_| Mutex::default()).collect();
        Self {
            inner: Some(Arc::new(Inner {
                shards,
                hasher: Default::default(),
                max_shard_bytes: (config.max_bytes / SHARDS as u64).max(1),
                max_per_task: config.max_per_task.max(1),
                window_ms: i64::try_from(window_secs.saturating_mul(1000)).unwrap_or(i64::MAX),
                dropped: AtomicU64::new(0),
            })),
        }
    }

    /// Whether anything is recorded.
    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Notes a callback of `task_id`.
    pub fn callback(&self, task_id: &str, mut entry: CallbackEntry) {
        entry.event_id = None;
        let bytes = callback_bytes(&entry);
        self.record(task_id, bytes, |kept, max| {
            kept.callbacks.push_back(entry);
            let mut freed = 0;
            while kept.callbacks.len() > max {
                freed += kept.callbacks.pop_front().map_or(0, |c| callback_bytes(&c));
            }
            freed
        });
    }

    /// Notes an acknowledged publication of `task_id`.
    pub fn published(&self, task_id: &str, mut entry: Publication) {
        entry.event_id = String::new();
        let bytes = publication_bytes(&entry);
        self.record(task_id, bytes, |kept, max| {
            kept.published.push_back(entry);
            let mut freed = 0;
            while kept.published.len() > max {
                freed += kept
                    .published
                    .pop_front()
                    .map_or(0, |p| publication_bytes(&p));
            }
            freed
        });
    }

    /// Adds one item (`bytes`) to `task_id`'s entry through `add`, which
    /// returns the bytes of the items it pushed out; then drops what is
    /// past the window or the shard's share of `max_bytes`.
    fn record(&self, task_id: &str, bytes: u64, add: impl FnOnce(&mut Kept, usize) -> u64) {
        let Some(inner) = &self.inner else { return };
        let now = now_ms();
        let mut shard = lock(&inner.shards[inner.shard(task_id)]);
        shard.touches += 1;
        let touch = shard.touches;
        let (key, grew) = match shard.tasks.get_key_value(task_id) {
            Some((key, _)) => (key.clone(), 0),
            None => (
                Arc::<str>::from(task_id),
                TASK_OVERHEAD + task_id.len() as u64,
            ),
        };
        let freed = {
            let kept = shard.tasks.entry(key.clone()).or_insert_with(|| Kept {
                callbacks: VecDeque::new(),
                published: VecDeque::new(),
                touch,
                touched_at: now,
                bytes: grew,
            });
            let freed = add(kept, inner.max_per_task);
            kept.touch = touch;
            kept.touched_at = now;
            kept.bytes = (kept.bytes + bytes).saturating_sub(freed);
            freed
        };
        shard.bytes = (shard.bytes + grew + bytes).saturating_sub(freed);
        shard.order.push_back((key, touch));
        inner.trim(&mut shard, now);
    }

    /// Everything kept about `task_id`, if anything is.
    pub fn get(&self, task_id: &str) -> Option<TaskTrace> {
        let inner = self.inner.as_ref()?;
        let shard = lock(&inner.shards[inner.shard(task_id)]);
        let kept = shard.tasks.get(task_id)?;
        if now_ms() - kept.touched_at >= inner.window_ms {
            return None;
        }
        let mut trace = TaskTrace {
            task_id: task_id.to_owned(),
            callbacks: kept.callbacks.iter().cloned().collect(),
            published: kept.published.iter().cloned().collect(),
        };
        drop(shard);
        for c in &mut trace.callbacks {
            c.event_id = c.state.map(|state| crate::event::event_id(task_id, state));
        }
        for p in &mut trace.published {
            p.event_id = crate::event::event_id(task_id, p.state);
        }
        Some(trace)
    }

    /// Tasks with a trace, and their estimated bytes.
    pub fn usage(&self) -> (u64, u64) {
        let Some(inner) = &self.inner else {
            return (0, 0);
        };
        inner.shards.iter().fold((0, 0), |(tasks, bytes), shard| {
            let shard = lock(shard);
            (tasks + shard.tasks.len() as u64, bytes + shard.bytes)
        })
    }

    /// Traces of tasks dropped to stay under `trace.max_bytes`.
    pub fn dropped(&self) -> u64 {
        self.inner
            .as_ref()
            .map_or(0, |inner| inner.dropped.load(Ordering::Relaxed))
    }
}

impl Inner {
    fn shard(&self, task_id: &str) -> usize {
        (self.hasher.hash_one(task_id) % SHARDS as u64) as usize
    }

    /// Drops, oldest touch first, the tasks past the window and as many
    /// as the shard's byte share needs; compacts the order queue.
    fn trim(&self, shard: &mut Shard, now: i64) {
        while let Some((key, touch)) = shard.order.front().cloned() {
            let Some(kept) = shard.tasks.get(&key) else {
                shard.order.pop_front();
                continue;
            };
            if kept.touch != touch {
                // Touched again since: a later item of the queue stands for it.
                shard.order.pop_front();
                continue;
            }
            let expired = now - kept.touched_at >= self.window_ms;
            let over = shard.bytes > self.max_shard_bytes;
            if !expired && !over {
                break;
            }
            shard.order.pop_front();
            if let Some(kept) = shard.tasks.remove(&key) {
                shard.bytes = shard.bytes.saturating_sub(kept.bytes);
                if !expired {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        // Stale queue items of tasks touched many times: rebuild the queue
        // from the tasks' last touches when it is far longer than needed.
        if shard.order.len() > 4 * shard.tasks.len() + 64 {
            let mut order: Vec<(Arc<str>, u64)> = shard
                .tasks
                .iter()
                .map(|(key, kept)| (key.clone(), kept.touch))
                .collect();
            order.sort_unstable_by_key(|(_, touch)| *touch);
            shard.order = order.into();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(max_bytes: u64, max_per_task: usize) -> TraceConfig {
        TraceConfig {
            enabled: true,
            max_bytes,
            max_per_task,
        }
    }

    fn callback(state: State, decision: Decision) -> CallbackEntry {
        CallbackEntry {
            received_at: 1_700_000_000_000,
            origin: Origin::Webhook,
            client: Some(IpAddr::from([127, 0, 0, 1])),
            state: Some(state),
            decision,
            reason: None,
            status: None,
            event_id: Some(crate::event::event_id("t1", state)),
            trace_id: None,
        }
    }

    fn publication(task: &str, state: State, offset: i64) -> Publication {
        Publication {
            event_id: crate::event::event_id(task, state),
            state,
            at: 1_700_000_000_100,
            broker: "kafka",
            topic: Arc::from("kinovi.tasks"),
            receipt: Receipt {
                partition: Some(2),
                offset: Some(offset),
                ..Receipt::default()
            },
            trace_id: None,
        }
    }

    #[test]
    fn a_task_shows_each_decision_and_where_its_event_landed() {
        let traces = Traces::new(&config(1 << 20, 32), 3600);
        traces.callback("t1", callback(State::Generating, Decision::Accepted));
        traces.callback("t1", callback(State::Generating, Decision::Duplicate));
        traces.published("t1", publication("t1", State::Generating, 41));
        traces.callback("t1", callback(State::Waiting, Decision::Stale));
        let trace = traces.get("t1").expect("a trace of t1");
        let decisions: Vec<_> = trace.callbacks.iter().map(|c| c.decision).collect();
        assert_eq!(
            decisions,
            [Decision::Accepted, Decision::Duplicate, Decision::Stale]
        );
        let json = trace.to_json();
        assert_eq!(json["taskId"], "t1");
        assert_eq!(
            json["callbacks"][0]["receivedAt"],
            "2023-11-14T22:13:20.000Z"
        );
        assert_eq!(json["callbacks"][0]["client"], "127.0.0.1");
        assert_eq!(json["callbacks"][2]["decision"], "stale");
        assert!(json["callbacks"][0].get("reason").is_none());
        assert_eq!(json["published"][0]["partition"], 2);
        assert_eq!(json["published"][0]["offset"], 41);
        assert_eq!(json["published"][0]["topic"], "kinovi.tasks");
        assert!(json["published"][0].get("sequence").is_none());
        assert!(traces.get("t2").is_none());
    }

    #[test]
    fn each_task_keeps_its_newest_entries_only() {
        let traces = Traces::new(&config(1 << 20, 3), 3600);
        for offset in 0..10 {
            traces.published("t1", publication("t1", State::Generating, offset));
        }
        let trace = traces.get("t1").expect("a trace of t1");
        let offsets: Vec<_> = trace
            .published
            .iter()
            .filter_map(|p| p.receipt.offset)
            .collect();
        assert_eq!(offsets, [7, 8, 9]);
    }

    #[test]
    fn the_total_stays_under_its_bytes_and_the_oldest_tasks_go_first() {
        let max = 256 * 1024;
        let traces = Traces::new(&config(max, 8), 3600);
        for i in 0..20_000 {
            let task = format!("task-{i}");
            traces.callback(&task, callback(State::Generating, Decision::Accepted));
            traces.published(&task, publication(&task, State::Generating, i));
        }
        let (tasks, bytes) = traces.usage();
        assert!(bytes <= max, "{bytes} bytes kept, at most {max}");
        assert!(tasks > 100, "only {tasks} tasks kept");
        assert_eq!(traces.dropped(), 20_000 - tasks);
        assert!(traces.get("task-19999").is_some());
        assert!(traces.get("task-0").is_none());
    }

    #[test]
    fn a_task_touched_again_is_kept_over_older_ones() {
        let traces = Traces::new(&config(64 * 1024, 8), 3600);
        traces.callback("keep", callback(State::Generating, Decision::Accepted));
        for i in 0..5_000 {
            traces.callback("keep", callback(State::Generating, Decision::Duplicate));
            traces.callback(
                &format!("t{i}"),
                callback(State::Success, Decision::Accepted),
            );
        }
        assert!(traces.get("keep").is_some());
        // The queue of touches is compacted, never longer than a few times the tasks.
        let inner = traces.inner.as_ref().expect("enabled");
        for shard in &inner.shards {
            let shard = lock(shard);
            assert!(shard.order.len() <= 4 * shard.tasks.len() + 65);
        }
    }

    #[test]
    fn nothing_is_kept_past_the_window_or_when_disabled() {
        let traces = Traces::new(&config(1 << 20, 8), 0);
        traces.callback("t1", callback(State::Generating, Decision::Accepted));
        assert!(traces.get("t1").is_none());
        let off = Traces::new(
            &TraceConfig {
                enabled: false,
                ..TraceConfig::default()
            },
            3600,
        );
        off.callback("t1", callback(State::Generating, Decision::Accepted));
        assert!(off.get("t1").is_none());
        assert_eq!(off.usage(), (0, 0));
    }
}
