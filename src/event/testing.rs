//! Test-only builders of events, shared by the modules' unit tests.

use super::{parse, Source, TaskEvent};

/// A webhook callback of `task` in `state` (as the provider names it),
/// parsed, received at 1 ms.
pub(crate) fn callback(task: &str, state: &str) -> TaskEvent {
    callback_at(task, state, 1)
}

/// Like [`callback`], received at `at` (ms).
pub(crate) fn callback_at(task: &str, state: &str, at: i64) -> TaskEvent {
    let body = serde_json::json!({ "taskId": task, "state": state });
    parse(body.to_string().as_bytes(), Source::Webhook, at).expect("a valid callback")
}
