//! A NATS JetStream consumer of hookbridge's task events: at least once,
//! idempotent by `eventId`, in per-task order. What every consumer must do
//! is in `examples/common/mod.rs`; this file adds the JetStream side:
//!
//! - A durable pull consumer with explicit acks: a message is acked only
//!   after it was handled, so a crash redelivers it, and the `eventId`
//!   dedupe absorbs the repeat.
//! - The stream keeps the order hookbridge published in. With
//!   `max_ack_pending = 1` a redelivery can never overtake a later message,
//!   so a task's events are handled in order. To go parallel, shard by
//!   subject (e.g. `publisher.subject = "kinovi.tasks.{model}.{state}"` and
//!   one consumer a model), never several workers on one consumer.
//! - hookbridge sets `Nats-Msg-Id` to the `eventId`, so the server drops
//!   repeats within the stream's duplicate window; older repeats, or
//!   messages published without the header, still reach the consumer.
//!
//! Run it against a server (prints one JSON line per processed event):
//!
//! ```sh
//! cargo run --example jetstream_consumer -- --url nats://127.0.0.1:4222 --stream KINOVI_TASKS --subject 'kinovi.tasks.>'
//! ```
//!
//! Every option can also come from the environment (`NATS_URL`,
//! `NATS_STREAM`, `NATS_SUBJECT`, `NATS_DURABLE`, `MAX_MESSAGES`,
//! `IDLE_TIMEOUT_SECS`).

mod common;

use anyhow::{anyhow, Context};
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use clap::Parser;
use futures::StreamExt;

use common::{report, Processor, Stop};

#[derive(Debug, Parser)]
#[command(about = "Consume hookbridge task events from JetStream, once each, in per-task order")]
struct Args {
    /// NATS server URL.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    url: String,
    /// The stream that captures hookbridge's subjects.
    #[arg(long, env = "NATS_STREAM", default_value = "KINOVI_TASKS")]
    stream: String,
    /// Subject filter (empty: the whole stream).
    #[arg(long, env = "NATS_SUBJECT", default_value = "kinovi.tasks.>")]
    subject: String,
    /// Durable consumer name: the server remembers what it acked.
    #[arg(long, env = "NATS_DURABLE", default_value = "hookbridge-example")]
    durable: String,
    #[command(flatten)]
    stop: Stop,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client = async_nats::connect(&args.url)
        .await
        .with_context(|| format!("connecting to {}", args.url))?;
    let js = async_nats::jetstream::new(client);
    let stream = js
        .get_stream(&args.stream)
        .await
        .with_context(|| format!("opening stream {}", args.stream))?;
    let consumer: PullConsumer = stream
        .get_or_create_consumer(
            &args.durable,
            pull::Config {
                durable_name: Some(args.durable.clone()),
                filter_subject: args.subject.clone(),
                deliver_policy: DeliverPolicy::All,
                ack_policy: AckPolicy::Explicit,
                max_ack_pending: 1,
                ..Default::default()
            },
        )
        .await
        .context("creating the pull consumer")?;
    let mut messages = consumer.messages().await.context("pulling messages")?;

    let mut processor = Processor::default();
    let mut read = 0;
    while !args.stop.reached(read) {
        let message = match tokio::time::timeout(args.stop.idle(), messages.next()).await {
            Err(_) => {
                eprintln!("idle for {:?}; stopping", args.stop.idle());
                break;
            }
            Ok(None) => break,
            Ok(Some(message)) => message.context("receiving from JetStream")?,
        };
        let outcome = processor.handle(&message.payload);
        let position = match message.info() {
            Ok(info) => format!("{}#{}", message.subject, info.stream_sequence),
            Err(_) => message.subject.to_string(),
        };
        report(&outcome, &position);
        // Acked only now, handled; the server confirms before the next one.
        message
            .double_ack()
            .await
            .map_err(|e| anyhow!("acking {position}: {e}"))?;
        read += 1;
    }
    Ok(())
}
