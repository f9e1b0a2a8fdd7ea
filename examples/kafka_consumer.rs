//! A Kafka consumer of hookbridge's task events: at least once, idempotent
//! by `eventId`, in per-task order. What every consumer must do is in
//! `examples/common/mod.rs`; this file adds the Kafka side:
//!
//! - The message key is the `taskId`, so a task's events share a partition
//!   and arrive in order. One `StreamConsumer` handles messages one at a
//!   time; to go parallel, add instances to the consumer group (Kafka
//!   shards by partition, so by task), never a pool over one stream.
//! - An offset is stored only after its message was handled, and committed
//!   in the background and on exit: a crash re-reads a few messages, which
//!   the `eventId` dedupe absorbs.
//!
//! Run it against a broker (prints one JSON line per processed event):
//!
//! ```sh
//! cargo run --example kafka_consumer -- --brokers 127.0.0.1:9092 --topic kinovi.task-events
//! ```
//!
//! Every option can also come from the environment (`KAFKA_BROKERS`,
//! `KAFKA_TOPIC`, `KAFKA_GROUP`, `MAX_MESSAGES`, `IDLE_TIMEOUT_SECS`).

mod common;

use anyhow::Context;
use clap::Parser;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::{ClientConfig, Message};

use common::{report, Processor, Stop};

#[derive(Debug, Parser)]
#[command(about = "Consume hookbridge task events from Kafka, once each, in per-task order")]
struct Args {
    /// Bootstrap servers.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    brokers: String,
    /// The topic hookbridge publishes to (`publisher.topic`).
    #[arg(long, env = "KAFKA_TOPIC", default_value = "kinovi.task-events")]
    topic: String,
    /// Consumer group: its committed offsets are where a restart resumes.
    #[arg(long, env = "KAFKA_GROUP", default_value = "hookbridge-example")]
    group: String,
    #[command(flatten)]
    stop: Stop,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set("group.id", &args.group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "true")
        // Offsets are stored by hand, after the message was handled.
        .set("enable.auto.offset.store", "false")
        .create()
        .context("creating the Kafka consumer")?;
    consumer
        .subscribe(&[&args.topic])
        .with_context(|| format!("subscribing to {}", args.topic))?;

    let mut processor = Processor::default();
    let mut read = 0;
    while !args.stop.reached(read) {
        let message = match tokio::time::timeout(args.stop.idle(), consumer.recv()).await {
            Err(_) => {
                eprintln!("idle for {:?}; stopping", args.stop.idle());
                break;
            }
            Ok(message) => message.context("receiving from Kafka")?,
        };
        let outcome = processor.handle(message.payload().unwrap_or_default());
        let position = format!(
            "{}[{}]@{}",
            message.topic(),
            message.partition(),
            message.offset()
        );
        report(&outcome, &position);
        consumer
            .store_offset_from_message(&message)
            .context("storing the offset")?;
        read += 1;
    }
    if read > 0 {
        consumer
            .commit_consumer_state(CommitMode::Sync)
            .context("committing the offsets")?;
    }
    Ok(())
}
