//! [`EventMeta`]: the fields of a [`TaskEvent`] that a message's
//! destination, key and headers are made of. The outbox stores them beside
//! the event's JSON in each log record (so the relay never parses the JSON
//! again), and the publishers read them: a type stored on disk, defined by
//! the event module rather than by a consumer of it.

use super::{State, TaskEvent};

/// What a message's destination, key and headers are made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventMeta {
    pub event_id: String,
    pub task_id: String,
    pub model: Option<String>,
    pub state: State,
    pub update_time: Option<i64>,
    pub received_at: i64,
    /// The W3C `traceparent` of the span that stored the event, when
    /// telemetry was on: the publish span continues it, and the message's
    /// `traceparent` header carries it on (see `crate::telemetry`).
    pub traceparent: Option<String>,
}

impl EventMeta {
    pub fn of(event: &TaskEvent) -> Self {
        Self {
            event_id: event.event_id.clone(),
            task_id: event.task_id.clone(),
            model: event.model.clone(),
            state: event.state,
            update_time: event.update_time,
            received_at: event.received_at,
            traceparent: event.traceparent.clone(),
        }
    }
}
