//! Reading back what hookbridge put on a JetStream stream.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use serde_json::Value;

/// One stored message.
#[derive(Debug, Clone)]
pub struct Stored {
    pub subject: String,
    pub headers: HashMap<String, String>,
    pub value: Value,
    pub seq: u64,
}

impl Stored {
    pub fn event_id(&self) -> &str {
        self.value["eventId"].as_str().unwrap()
    }
}

/// A fresh stream capturing `<prefix>.>`; returns the subject prefix's template
/// for the publisher (`<prefix>.{state}`).
pub async fn create_stream(
    url: &str,
    name: &str,
    prefix: &str,
    duplicate_window: Duration,
) -> String {
    let client = async_nats::connect(url).await.expect("connect to NATS");
    let js = jetstream::new(client);
    js.create_stream(stream::Config {
        name: name.to_string(),
        subjects: vec![format!("{prefix}.>")],
        duplicate_window,
        ..Default::default()
    })
    .await
    .expect("stream created");
    format!("{prefix}.{{state}}")
}

/// Waits until the stream holds at least `expected` messages, waits `quiet`
/// longer for extras, then returns them all in stream order.
pub async fn read_stream(
    url: &str,
    name: &str,
    expected: u64,
    limit: Duration,
    quiet: Duration,
) -> Vec<Stored> {
    let client = async_nats::connect(url).await.expect("connect to NATS");
    let js = jetstream::new(client);
    let deadline = tokio::time::Instant::now() + limit;
    // The app may create the stream itself, a little after answering.
    let mut stream = loop {
        match js.get_stream(name).await {
            Ok(stream) => break stream,
            Err(e) => assert!(
                tokio::time::Instant::now() < deadline,
                "stream {name} does not exist after {limit:?}: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    loop {
        let n = stream.info().await.unwrap().state.messages;
        if n >= expected {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {n} of {expected} messages in stream {name} within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(quiet).await;
    let state = stream.info().await.unwrap().state.clone();
    let mut out = Vec::new();
    for seq in state.first_sequence..=state.last_sequence {
        let m = stream
            .get_raw_message(seq)
            .await
            .expect("message by sequence");
        let headers = m
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    v.first().map(|v| v.to_string()).unwrap_or_default(),
                )
            })
            .collect();
        out.push(Stored {
            subject: m.subject.to_string(),
            headers,
            value: serde_json::from_slice(&m.payload).expect("value is JSON"),
            seq,
        });
    }
    out
}
