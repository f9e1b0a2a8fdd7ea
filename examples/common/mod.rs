//! What every consumer of hookbridge's task events must do, shared by the
//! Kafka and JetStream examples.
//!
//! - **Dedupe on `eventId`.** Delivery is at least once: a crash between the
//!   broker's ack and the outbox's delete publishes a batch again, and with
//!   several instances on Kafka a callback can be published twice. The same
//!   (taskId, state) always has the same `eventId`, so remembering the ids of
//!   the last dedup window is enough. A real consumer records the id in the
//!   same transaction as its side effect (a unique key in its database); here
//!   it is an in-memory set with a cap.
//! - **Keep per-task order.** hookbridge publishes a task's events in the
//!   order it accepted them. Kafka keeps them in order because the key is the
//!   `taskId` (one partition); a JetStream stream keeps its arrival order.
//!   Handle one task's events one at a time, in the order they come (a
//!   parallel consumer shards by `taskId`, never round-robin).
//! - **Apply the state rank rule.** `pending < waiting < generating <
//!   success = fail`. An event ranked below the furthest state seen for its
//!   task is stale and is skipped. A terminal state after a different
//!   terminal one carries `conflictsWith`: it is processed, as a correction
//!   that needs attention, never silently dropped.

use std::collections::{HashMap, HashSet, VecDeque};

use serde_json::{json, Value};

/// How many event ids are remembered. A week of events at the expected rate
/// is the right size for a real consumer.
const REMEMBERED_IDS: usize = 100_000;

/// What became of one message.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Handled: its side effect ran.
    Processed,
    /// Its `eventId` was handled before.
    Duplicate,
    /// Its task already reached a later state.
    Stale,
    /// Not a task event this consumer understands.
    Invalid(String),
}

/// The consumer's memory: ids seen and each task's furthest state.
#[derive(Default)]
pub struct Processor {
    seen: HashSet<String>,
    seen_order: VecDeque<String>,
    furthest: HashMap<String, u8>,
}

/// The state rank: the order a task moves through.
pub fn rank(state: &str) -> Option<u8> {
    match state {
        "pending" => Some(0),
        "waiting" => Some(1),
        "generating" => Some(2),
        "success" | "fail" => Some(3),
        _ => None,
    }
}

impl Processor {
    /// Checks one message and, if it is new and current, processes it: here
    /// that prints one JSON line on stdout.
    pub fn handle(&mut self, payload: &[u8]) -> Outcome {
        let event: Value = match serde_json::from_slice(payload) {
            Ok(event) => event,
            Err(e) => return Outcome::Invalid(format!("not JSON: {e}")),
        };
        let field = |name: &str| event.get(name).and_then(Value::as_str);
        let (Some(event_id), Some(task_id), Some(state)) =
            (field("eventId"), field("taskId"), field("state"))
        else {
            return Outcome::Invalid("eventId, taskId or state missing".into());
        };
        let Some(rank) = rank(state) else {
            return Outcome::Invalid(format!("unknown state {state:?}"));
        };
        if self.seen.contains(event_id) {
            return Outcome::Duplicate;
        }
        let furthest = self.furthest.get(task_id).copied();
        if furthest.is_some_and(|f| rank < f) {
            return Outcome::Stale;
        }

        // The side effect. A real consumer does its work here and records
        // `event_id` with it, atomically.
        let line = json!({
            "eventId": event_id,
            "taskId": task_id,
            "state": state,
            "conflictsWith": event.get("conflictsWith"),
        });
        println!("{line}");

        self.remember(event_id);
        self.furthest
            .insert(task_id.to_string(), furthest.unwrap_or(0).max(rank));
        Outcome::Processed
    }

    fn remember(&mut self, event_id: &str) {
        if self.seen_order.len() == REMEMBERED_IDS {
            if let Some(oldest) = self.seen_order.pop_front() {
                self.seen.remove(&oldest);
            }
        }
        self.seen.insert(event_id.to_string());
        self.seen_order.push_back(event_id.to_string());
    }
}

/// When to stop: after `max_messages` (duplicates included), or when nothing
/// arrived for `idle_timeout_secs`. Both off means run until killed.
#[derive(Debug, Clone, clap::Args)]
pub struct Stop {
    /// Stop after reading this many messages (0: no limit).
    #[arg(long, env = "MAX_MESSAGES", default_value_t = 0)]
    pub max_messages: u64,
    /// Stop when no message arrived for this many seconds (0: never).
    #[arg(long, env = "IDLE_TIMEOUT_SECS", default_value_t = 0)]
    pub idle_timeout_secs: u64,
}

impl Stop {
    /// How long to wait for the next message.
    pub fn idle(&self) -> std::time::Duration {
        match self.idle_timeout_secs {
            0 => std::time::Duration::MAX,
            secs => std::time::Duration::from_secs(secs),
        }
    }

    pub fn reached(&self, read: u64) -> bool {
        self.max_messages != 0 && read >= self.max_messages
    }
}

/// Logs a skipped message on stderr (stdout carries only processed events).
pub fn report(outcome: &Outcome, position: &str) {
    match outcome {
        Outcome::Processed => {}
        Outcome::Duplicate => eprintln!("{position}: duplicate eventId, skipped"),
        Outcome::Stale => eprintln!("{position}: stale state, skipped"),
        Outcome::Invalid(reason) => eprintln!("{position}: skipped: {reason}"),
    }
}
