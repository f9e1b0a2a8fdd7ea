//! Shared fixtures: the app under test, real brokers, and readers that show
//! what actually arrived on them.

pub mod app;
pub mod bin;
pub mod brokers;
pub mod browser;
pub mod callbacks;
pub mod faults;
pub mod kafka;
pub mod nats;
pub mod sim;

use std::future::Future;
use std::time::Duration;

/// `n` seconds: short enough to keep a broker read on one line.
pub fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// `n` milliseconds (see [`secs`]).
pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A random lowercase suffix so each test owns its topics, subjects and streams.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// Polls `check` until it returns `Some`, or panics with `what` after `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {limit:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The JSON Schema the README documents, compiled once per use.
pub fn schema() -> jsonschema::Validator {
    let text = include_str!("../../../schema/task-event.v1.json");
    let schema: serde_json::Value = serde_json::from_str(text).expect("schema is JSON");
    jsonschema::validator_for(&schema).expect("schema compiles")
}

/// Panics with every violation when `event` does not match the schema.
pub fn assert_valid_event(event: &serde_json::Value) {
    let validator = schema();
    let errors: Vec<String> = validator
        .iter_errors(event)
        .map(|e| e.to_string())
        .collect();
    assert!(
        errors.is_empty(),
        "event violates the schema: {errors:?}\n{event:#}"
    );
}
