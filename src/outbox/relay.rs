//! The relay: drains the outbox through the publisher, oldest first.
//!
//! One step reads the oldest pending entries, keeps at most one per task
//! (so retries and pipelining cannot reorder a task), hands the batch to the
//! publisher with every message in flight at once, then records the outcome
//! durably: acknowledged entries are deleted, permanently refused ones become
//! dead letters, the rest stay for the next step after a capped backoff.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::{Outbox, OutboxError, Stats};
use crate::publish::{Outgoing, PublishError, Publisher};

/// What one relay step did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RelayStep {
    pub published: usize,
    pub dead_lettered: usize,
    /// Entries that failed transiently and stay pending.
    pub retrying: usize,
}

impl RelayStep {
    pub fn is_idle(&self) -> bool {
        *self == Self::default()
    }
}

pub struct Relay {
    outbox: Outbox,
    publisher: Arc<dyn Publisher>,
    backoff: Duration,
}

impl Relay {
    pub fn new(outbox: Outbox, publisher: Arc<dyn Publisher>) -> Self {
        let backoff = Duration::from_millis(outbox.config().retry_initial_ms);
        Self {
            outbox,
            publisher,
            backoff,
        }
    }

    /// One batch: read, publish, record. Tests drive the relay with this.
    pub async fn run_once(&mut self) -> Result<RelayStep, OutboxError> {
        let size = self.outbox.config().relay_batch;
        let outbox = self.outbox.clone();
        let batch = tokio::task::spawn_blocking(move || outbox.read_batch(size, size * 2))
            .await
            .map_err(|_| OutboxError::Closed)??;
        if batch.is_empty() {
            return Ok(RelayStep::default());
        }
        let mut results = self.publisher.publish(&batch).await;
        self.isolate_permanent_failures(&batch, &mut results).await;
        let (mut delivered, mut dead, mut step) = (Vec::new(), Vec::new(), RelayStep::default());
        for (o, result) in batch.iter().zip(results) {
            match result {
                Ok(()) => delivered.push(o.seq),
                Err(PublishError::Permanent(reason)) => {
                    tracing::warn!(task_id = %o.event.task_id, event_id = %o.event.event_id, %reason, "dead-lettered");
                    dead.push((o.seq, reason));
                }
                Err(PublishError::Transient(reason)) => {
                    if step.retrying == 0 {
                        tracing::warn!(%reason, "publish failed; will retry");
                    }
                    step.retrying += 1;
                }
            }
        }
        step.published = delivered.len();
        step.dead_lettered = dead.len();
        Stats::add(&self.outbox.stats().publish_retries, step.retrying as u64);
        if !delivered.is_empty() || !dead.is_empty() {
            self.outbox.complete(delivered, dead).await?;
        }
        Ok(step)
    }

    /// A broker may refuse a whole produce request for one bad message (Kafka
    /// answers `MESSAGE_TOO_LARGE` for every message of an oversized batch).
    /// When several messages of a batch failed permanently, each is tried
    /// again alone, so only the ones that fail on their own become dead
    /// letters.
    async fn isolate_permanent_failures(
        &self,
        batch: &[Outgoing],
        results: &mut [Result<(), PublishError>],
    ) {
        let permanent = results
            .iter()
            .filter(|r| matches!(r, Err(e) if e.is_permanent()))
            .count();
        if permanent < 2 {
            return;
        }
        for (o, result) in batch.iter().zip(results.iter_mut()) {
            if matches!(result, Err(e) if e.is_permanent()) {
                let alone = self.publisher.publish(std::slice::from_ref(o)).await;
                *result = alone
                    .into_iter()
                    .next()
                    .unwrap_or_else(|| Err(PublishError::Transient("no result".into())));
            }
        }
    }

    /// Runs until `shutdown` resolves; then lets the batch in flight finish
    /// (bounded by `shutdown_grace_ms`) and flushes the publisher.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        let grace = Duration::from_millis(self.outbox.config().shutdown_grace_ms);
        let max_backoff = Duration::from_millis(self.outbox.config().retry_max_ms);
        let initial = Duration::from_millis(self.outbox.config().retry_initial_ms);
        let notify = self.outbox.notified();
        tokio::pin!(shutdown);
        tracing::info!(publisher = self.publisher.name(), "relay started");
        loop {
            let step = {
                let once = self.run_once();
                tokio::pin!(once);
                tokio::select! {
                    step = &mut once => step,
                    _ = &mut shutdown => {
                        if tokio::time::timeout(grace, once).await.is_err() {
                            tracing::warn!("in-flight batch did not finish in time; it stays pending");
                        }
                        break;
                    }
                }
            };
            let pause = match step {
                Ok(s) if s.retrying > 0 => Some(self.next_backoff(max_backoff)),
                Ok(s) if s.is_idle() => None,
                Ok(_) => {
                    self.backoff = initial;
                    continue;
                }
                Err(e) => {
                    tracing::error!(error = %e, "relay step failed");
                    Some(self.next_backoff(max_backoff))
                }
            };
            tokio::select! {
                _ = &mut shutdown => break,
                _ = notify.notified(), if pause.is_none() => {}
                // A periodic look even when idle: cheap, and robust to a lost wake-up.
                _ = tokio::time::sleep(pause.unwrap_or(Duration::from_secs(1))) => {}
            }
        }
        self.publisher.flush(grace).await;
        tracing::info!("relay stopped");
    }

    fn next_backoff(&mut self, max: Duration) -> Duration {
        let current = self.backoff;
        self.backoff = (self.backoff * 2).min(max);
        current
    }
}
