//! The relay: drains the outbox through the publisher, oldest first.
//!
//! One step reads the oldest pending entries, keeps at most one per task
//! (so retries and pipelining cannot reorder a task), encodes each event on
//! its own, hands the batch to the publisher with every message in flight at
//! once, then records the outcome durably: acknowledged entries are
//! deleted, permanently refused ones become dead letters, the rest stay for
//! the next step after a capped backoff.
//!
//! One event never stops the ones behind it: an entry that does not decode,
//! an encoding error and even a panic while encoding one event (a bug that
//! only some input reaches) make that event a dead letter with the reason,
//! and the step goes on with the others.
//!
//! Backoff is per event unless the broker itself is failing. An event the
//! broker refuses where it goes ([`PublishError::Refused`]: no stream for
//! its subject, an unknown topic) is held back alone, with its own doubling
//! backoff, and becomes a dead letter after `outbox.refusal_attempts`; a
//! transient failure while other events of the step went through is held
//! back the same way, without counting. Only a step in which nothing went
//! through and something failed transiently (the broker is away) makes the
//! whole relay wait. A held event keeps its task's later events back, so
//! per-task order holds. The holds live in memory (a restart tries again
//! from zero) and are bounded: past [`MAX_HELD_PER_BATCH`] batches' worth,
//! no new event is read until some are due.
//!
//! With telemetry on, each event that was stored with a trace context is
//! published in a `publish` span, a child of that context (its `store`
//! span, maybe before a restart or on another replica); the message's
//! `traceparent` header then names the publish span. A retry is a new span.
//!
//! Memory is bounded in bytes: a step reads at most `outbox.relay_batch`
//! events and `outbox.relay_batch_bytes` of their JSON (one larger event
//! goes alone), and the payload is shared, never copied, from the read to
//! the publisher.

use std::collections::HashMap;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Batch, Outbox, OutboxError, Stats};
use crate::clock::now_ms;
use crate::publish::{Encoded, Outgoing, PublishError, Published, Publisher, Receipt};
use crate::sync::panic_message;

/// Most events held back at once, in batches (`outbox.relay_batch`).
pub const MAX_HELD_PER_BATCH: usize = 8;

/// What one relay step did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RelayStep {
    pub published: usize,
    pub dead_lettered: usize,
    /// Entries that failed transiently and stay pending.
    pub retrying: usize,
    /// Entries the broker refused where they go, held back with their own
    /// backoff (see the module docs).
    pub refused: usize,
}

impl RelayStep {
    pub fn is_idle(&self) -> bool {
        *self == Self::default()
    }
}

/// One event held back after a failure, until `due`.
#[derive(Debug, Clone)]
struct Hold {
    task_id: String,
    /// Refusals so far; transient failures do not count.
    refusals: u32,
    due: Instant,
    /// The wait after the next failure.
    backoff: Duration,
}

pub struct Relay {
    outbox: Outbox,
    publisher: Arc<dyn Publisher>,
    backoff: Duration,
    /// Events held back, by sequence number.
    held: HashMap<u64, Hold>,
}

/// The longest sleep of an idle relay.
const IDLE_LOOK: Duration = Duration::from_secs(1);

/// The `publish` spans of the events of `ready` stored with a trace
/// context (telemetry on), by sequence number; each event's traceparent
/// becomes its span's, for the message's headers. Empty with telemetry off.
fn publish_spans(ready: &mut [Outgoing]) -> Vec<(u64, tracing::Span)> {
    if !crate::telemetry::enabled() {
        return Vec::new();
    }
    let mut spans = Vec::new();
    for o in ready {
        let Some(stored) = o.meta.traceparent.as_deref() else {
            continue;
        };
        if let Some((span, traceparent)) = crate::telemetry::publish_span(stored, &o.meta.task_id) {
            o.meta.traceparent = Some(traceparent);
            spans.push((o.seq, span));
        }
    }
    spans
}

/// The span of `seq` among `spans` (in sequence order).
fn span_of(spans: &[(u64, tracing::Span)], seq: u64) -> Option<&tracing::Span> {
    let at = spans.binary_search_by_key(&seq, |(s, _)| *s).ok()?;
    Some(&spans[at].1)
}

/// Encodes one event, turning an error or a panic into the reason it is
/// dead-lettered.
fn encode(publisher: &dyn Publisher, o: &Outgoing) -> Result<Encoded, String> {
    match catch_unwind(AssertUnwindSafe(|| publisher.encode(o))) {
        Ok(Ok(m)) => Ok(m),
        Ok(Err(e)) => Err(e.to_string()),
        Err(panic) => Err(format!(
            "encoding the event panicked: {}",
            panic_message(&*panic)
        )),
    }
}

impl Relay {
    pub fn new(outbox: Outbox, publisher: Arc<dyn Publisher>) -> Self {
        let backoff = Duration::from_millis(outbox.config().retry_initial_ms);
        Self {
            outbox,
            publisher,
            backoff,
            held: HashMap::new(),
        }
    }

    /// When the first held event is due again, if any is held.
    pub fn next_due(&self) -> Option<Instant> {
        self.held.values().map(|h| h.due).min()
    }

    /// The next batch to publish: pending events oldest first, without the
    /// held ones not yet due. Held events take no room in the batch; past
    /// the cap on them, no new event is looked at until some are due.
    async fn next_batch(&self, now: Instant) -> Result<Batch, OutboxError> {
        let config = self.outbox.config();
        let (size, max_bytes) = (config.relay_batch, config.relay_batch_bytes);
        let skip: HashMap<u64, String> = self
            .held
            .iter()
            .filter(|(_, h)| h.due > now)
            .map(|(seq, h)| (*seq, h.task_id.clone()))
            .collect();
        let cap = size.saturating_mul(MAX_HELD_PER_BATCH);
        let scan = if self.held.len() >= cap {
            // The held events are the oldest pending ones: look at them only.
            self.held.len()
        } else {
            size * 2 + skip.len()
        };
        let outbox = self.outbox.clone();
        tokio::task::spawn_blocking(move || outbox.read_batch_within(size, max_bytes, scan, &skip))
            .await
            .map_err(OutboxError::from_join)?
    }

    /// Sorts the publish results: delivered, dead-lettered (into `dead`),
    /// refused (held alone, dead-lettered after `refusal_attempts`) or to
    /// retry (held alone when others went through: the broker is there).
    fn settle(
        &mut self,
        encoded: &[Encoded],
        results: Vec<Published>,
        now: Instant,
        dead: &mut Vec<(u64, String)>,
    ) -> (Vec<(u64, Receipt)>, RelayStep) {
        let stats = self.outbox.stats().clone();
        let (mut delivered, mut step) = (Vec::new(), RelayStep::default());
        let went_through = results.iter().any(Result::is_ok);
        let mut transient = Vec::new();
        for (m, result) in encoded.iter().zip(results) {
            match result {
                Ok(receipt) => {
                    self.held.remove(&m.seq);
                    delivered.push((m.seq, receipt));
                }
                Err(PublishError::Permanent(reason)) => {
                    self.held.remove(&m.seq);
                    tracing::warn!(task_id = %m.key, event_id = %m.id, %reason, "dead-lettered");
                    dead.push((m.seq, reason));
                }
                Err(PublishError::Refused(reason)) => {
                    Stats::add(&stats.refusals, 1);
                    let attempts = self.outbox.config().refusal_attempts;
                    let hold = self.hold(m, now);
                    hold.refusals += 1;
                    if hold.refusals >= attempts {
                        let reason = format!("refused {attempts} times: {reason}");
                        self.held.remove(&m.seq);
                        tracing::warn!(task_id = %m.key, event_id = %m.id, %reason, "dead-lettered");
                        dead.push((m.seq, reason));
                    } else {
                        tracing::warn!(task_id = %m.key, event_id = %m.id, destination = %m.destination, %reason, "refused; will retry this event alone");
                        step.refused += 1;
                    }
                }
                Err(PublishError::Transient(reason)) => {
                    if step.retrying == 0 {
                        tracing::warn!(%reason, "publish failed; will retry");
                    }
                    step.retrying += 1;
                    transient.push(m);
                }
            }
        }
        // Others went through: the broker is there, so these wait alone.
        if went_through {
            for m in transient {
                self.hold(m, now);
            }
        }
        (delivered, step)
    }

    /// One batch: read, encode, publish, record. Tests drive the relay with
    /// this.
    pub async fn run_once(&mut self) -> Result<RelayStep, OutboxError> {
        let now = Instant::now();
        let mut batch = self.next_batch(now).await?;
        let stats = self.outbox.stats().clone();
        if batch.ready.is_empty() && batch.unreadable.is_empty() {
            // Held events are pending but not moving: that is no progress.
            if self.held.is_empty() {
                stats.relay_progress_at.store(now_ms(), Ordering::Relaxed);
            }
            return Ok(RelayStep::default());
        }
        let mut dead = Vec::new();
        for (seq, reason) in batch.unreadable {
            tracing::error!(seq, %reason, "dead-lettered");
            dead.push((seq, reason));
        }
        let undecodable = dead.len();
        let spans = publish_spans(&mut batch.ready);
        let mut encoded = Vec::with_capacity(batch.ready.len());
        for o in &batch.ready {
            match encode(&*self.publisher, o) {
                Ok(m) => {
                    if let Some(span) = span_of(&spans, m.seq) {
                        span.record("messaging.destination.name", m.destination.as_str());
                    }
                    encoded.push(m)
                }
                Err(reason) => {
                    tracing::error!(task_id = %o.meta.task_id, event_id = %o.meta.event_id, %reason, "dead-lettered");
                    dead.push((o.seq, reason));
                }
            }
        }
        let unencodable = dead.len() - undecodable;
        let started = std::time::Instant::now();
        let mut results = if encoded.is_empty() {
            Vec::new()
        } else {
            self.publisher.publish(&encoded).await
        };
        let took = started.elapsed();
        // A backend that answers for fewer messages than it was given leaves
        // the rest pending, never lost.
        results.resize(
            encoded.len(),
            Err(PublishError::Transient("no result".into())),
        );
        self.isolate_permanent_failures(&encoded, &mut results)
            .await;
        for (m, result) in encoded.iter().zip(&results) {
            if let (Some(span), Err(e)) = (span_of(&spans, m.seq), result) {
                // On the span only: the relay logs failures once per step.
                span.record("otel.status_code", "ERROR");
                span.record("otel.status_description", e.to_string().as_str());
            }
        }
        // The publish spans end here, with the broker's answer.
        drop(spans);
        let went_through = results.iter().any(Result::is_ok);
        let (landed, mut step) = self.settle(&encoded, results, now, &mut dead);
        self.trace(&batch.ready, &encoded, &landed);
        let delivered: Vec<u64> = landed.into_iter().map(|(seq, _)| seq).collect();
        stats.refusing.store(
            self.held.values().filter(|h| h.refusals > 0).count() as u64,
            Ordering::Relaxed,
        );
        step.published = delivered.len();
        step.dead_lettered = dead.len();
        Stats::add(&stats.publish_retries, step.retrying as u64);
        if step.retrying > 0 && !went_through {
            stats.broker_error_at.store(now_ms(), Ordering::Relaxed);
        }
        if !encoded.is_empty() {
            let acked = batch
                .ready
                .iter()
                .filter(|o| delivered.binary_search(&o.seq).is_ok());
            stats
                .metrics
                .published(took, acked.map(|o| o.meta.received_at), now_ms());
        }
        if !delivered.is_empty() || !dead.is_empty() {
            let refused = dead.len() - undecodable - unencodable;
            self.outbox.complete(delivered, dead).await?;
            stats
                .metrics
                .relay_dead_lettered(undecodable, unencodable, refused);
            stats.relay_progress_at.store(now_ms(), Ordering::Relaxed);
        }
        Ok(step)
    }

    /// Notes in each task's trace where its acknowledged event landed.
    fn trace(&self, ready: &[Outgoing], encoded: &[Encoded], landed: &[(u64, Receipt)]) {
        let traces = self.outbox.traces();
        if !traces.enabled() || landed.is_empty() {
            return;
        }
        let at = now_ms();
        let broker = crate::trace::broker_of(self.publisher.name());
        // `ready`, `encoded` and `landed` are all in sequence order.
        let find = |seq: u64| {
            let o = ready.binary_search_by_key(&seq, |o| o.seq).ok()?;
            let m = encoded.binary_search_by_key(&seq, |m| m.seq).ok()?;
            Some((&ready[o], &encoded[m]))
        };
        // Most batches go to one topic: one shared copy of its name.
        let mut topic: Option<Arc<str>> = None;
        for (seq, receipt) in landed {
            let Some((o, m)) = find(*seq) else { continue };
            let name = match &topic {
                Some(t) if **t == *m.destination => t.clone(),
                _ => topic.insert(Arc::from(m.destination.as_str())).clone(),
            };
            traces.published(
                &o.meta.task_id,
                crate::trace::Publication {
                    // Derived from the task and the state when read.
                    event_id: String::new(),
                    state: o.meta.state,
                    at,
                    broker,
                    topic: name,
                    receipt: receipt.clone(),
                    trace_id: o
                        .meta
                        .traceparent
                        .as_deref()
                        .and_then(crate::telemetry::trace_id_of)
                        .map(str::to_string),
                },
            );
        }
    }

    /// Holds `m` back for its next wait (doubling from `retry_initial_ms`
    /// up to `retry_max_ms`) and returns its hold.
    fn hold(&mut self, m: &Encoded, now: Instant) -> &mut Hold {
        let config = self.outbox.config();
        let initial = Duration::from_millis(config.retry_initial_ms);
        let max = Duration::from_millis(config.retry_max_ms);
        let hold = self.held.entry(m.seq).or_insert_with(|| Hold {
            task_id: m.key.clone(),
            refusals: 0,
            due: now,
            backoff: initial,
        });
        hold.due = now + hold.backoff;
        hold.backoff = (hold.backoff * 2).min(max);
        hold
    }

    /// A broker may refuse a whole produce request for one bad message (Kafka
    /// answers `MESSAGE_TOO_LARGE` for every message of an oversized batch).
    /// When several messages of a batch failed permanently, each is tried
    /// again alone, so only the ones that fail on their own become dead
    /// letters.
    async fn isolate_permanent_failures(&self, batch: &[Encoded], results: &mut [Published]) {
        let permanent = results
            .iter()
            .filter(|r| matches!(r, Err(e) if e.is_permanent()))
            .count();
        if permanent < 2 {
            return;
        }
        self.outbox.stats().metrics.retried_alone(permanent);
        for (m, result) in batch.iter().zip(results.iter_mut()) {
            if matches!(result, Err(e) if e.is_permanent()) {
                let alone = self.publisher.publish(std::slice::from_ref(m)).await;
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
        // A (re)started relay has not stalled yet.
        let stats = self.outbox.stats().clone();
        stats.relay_progress_at.store(now_ms(), Ordering::Relaxed);
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
                // Nothing went through and something failed transiently:
                // the broker is away, the whole relay waits.
                Ok(s) if s.retrying > 0 && s.published == 0 => Some(self.next_backoff(max_backoff)),
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
            // A periodic look even when idle: cheap, and robust to a lost
            // wake-up; sooner when a held event is due.
            let idle = self
                .next_due()
                .map(|due| due.saturating_duration_since(Instant::now()))
                .map_or(IDLE_LOOK, |d| d.min(IDLE_LOOK));
            tokio::select! {
                _ = &mut shutdown => break,
                _ = notify.notified(), if pause.is_none() => {}
                _ = tokio::time::sleep(pause.unwrap_or(idle)) => {}
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

#[cfg(test)]
mod tests;
