//! hookbridge's integration tests: one binary, real brokers.
//!
//! Run them with `scripts/test.sh`, which starts Kafka and NATS on loopback
//! and sets the variables `support::brokers` reads.

mod support;

mod chaos;
mod cli;
mod cluster;
mod config_files;
mod console;
mod crash_storage;
mod dedup;
mod deploy;
mod edge;
mod examples;
mod fairness;
mod hostile;
mod ingress;
mod kafka;
mod metrics;
mod nats;
mod outbox;
mod poll;
mod readme;
mod refusals;
mod storage;
mod supervise;
mod telemetry;
mod trace;
mod tracked;
mod verify;
