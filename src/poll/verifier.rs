//! Verify mode: callbacks held by the webhook are confirmed against the
//! provider's status endpoint before anything is published.
//!
//! A terminal callback is confirmed when the provider reports the same
//! state, a non-terminal one when the provider is at that state or later.
//! What is appended is always the provider's record (our own key fetched
//! it), taken back to the callback's state if the provider is further
//! along, marked `source = "webhook"` with the callback's receive time:
//! nothing else the sender wrote reaches the broker. A
//! different terminal state, a 403 or a 400 refute the callback at once; a
//! 404 or a state that lags behind only after
//! `reconcile.unknown_task_grace_secs` (the status endpoint may trail the
//! callback). Refuted callbacks become dead letters with the reason.
//! Provider outages leave callbacks held, retried without a deadline. A
//! held entry that cannot be read is buried whole with the reason, so junk
//! never sits in the capped queue. One callback per task is checked per
//! step, oldest first, so a task's callbacks are appended in arrival order.
//!
//! Fairness: a step takes a few callbacks (`4 * provider.max_in_flight`,
//! about a second of the provider's budget at the defaults), round-robin
//! across the addresses they came from (`Registry::held_due`). A flood of
//! forged callbacks from one address therefore delays a callback from
//! another by at most one step plus one turn per address with callbacks
//! due: `(step + addresses) / provider.requests_per_sec` seconds, not the
//! time to verify the whole flood.
//!
//! A refuted callback's dead letter holds the task id, the state and the
//! receive time (as an event with nothing else), and its reason ends with
//! the first 256 bytes of the body and its size: a forged body is never
//! kept whole.

use futures::StreamExt;

use super::registry::{Held, Unreadable};
use super::{retry_pause, Job, PollStats, PollWorker, ProviderError, Queue, RegistryError};
use crate::clock::now_ms;
use crate::event::{self, Source, TaskEvent};

/// Most callbacks one step takes.
const MAX_STEP: usize = 256;

/// What one step did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VerifyStep {
    pub verified: usize,
    pub unconfirmed: usize,
    /// Still held: provider unavailable, or inside the grace period.
    pub retrying: usize,
    pub halted: bool,
}

/// The provider's word on a callback.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Publish this event.
    Confirmed(Box<TaskEvent>),
    /// Never publish; the reason goes with the dead letter.
    Refuted(String),
    /// Not (yet) confirmed: ask again within the grace period.
    Unsure(String),
}

/// Compares a callback with the provider's record of the same task.
pub fn judge(callback: &TaskEvent, record: &TaskEvent) -> Verdict {
    let (said, actual) = (callback.state, record.state);
    let confirmed = || Verdict::Confirmed(Box::new(confirmed(callback, record)));
    if said == actual {
        return confirmed();
    }
    let difference = format!("the callback says {said}, the provider says {actual}");
    if said.is_terminal() && actual.is_terminal() {
        Verdict::Refuted(format!("not confirmed: {difference}"))
    } else if !said.is_terminal() && actual.rank() > said.rank() {
        confirmed()
    } else {
        Verdict::Unsure(difference)
    }
}

/// What a confirmed callback publishes: the provider's record, never the
/// sender's fields (an unsigned callback's sender is untrusted: its output
/// URLs, error, model and orderId must not reach the broker). Only the
/// callback's state and receive time are kept. When the provider is
/// already further along, the record is taken back to the callback's
/// state: what only the later state has (outputs, error, completion time,
/// credits) is left out.
fn confirmed(callback: &TaskEvent, record: &TaskEvent) -> TaskEvent {
    let mut event = record.clone();
    event.source = Source::Webhook;
    event.received_at = callback.received_at;
    if record.state != callback.state {
        event.state = callback.state;
        event.event_id = event::event_id(&event.task_id, callback.state);
        event.provider_state = callback.state.as_str().to_string();
        event.outputs = Default::default();
        event.error = None;
        event.credits_used = None;
        event.complete_time = None;
        event.update_time = None;
        event.conflicts_with = None;
    }
    event
}

enum Outcome {
    Verified,
    Unconfirmed,
    Retry,
    Halt,
}

/// The worker that verifies held callbacks.
pub type Verifier = PollWorker<Verify>;

/// The step of the [`Verifier`].
pub struct Verify;

impl PollWorker<Verify> {
    /// Verifies every held callback that is due. Tests drive it with this.
    pub async fn run_once(&mut self) -> Result<VerifyStep, RegistryError> {
        let mut step = VerifyStep::default();
        let (now, registry) = (now_ms(), &self.tasks.registry);
        let step_size = (self.max_in_flight * 4).clamp(4, MAX_STEP);
        let due = registry
            .blocking(move |r| r.held_due(now, step_size))
            .await?;
        let (held, mut released) = (due.held, Vec::new());
        for entry in due.unreadable {
            let seq = entry.seq;
            if self.bury_unreadable(entry).await {
                step.unconfirmed += 1;
                released.push(seq);
            }
        }
        let this = &*self;
        let outcomes: Vec<_> = futures::stream::iter(held)
            .map(|h| async move {
                let outcome = this.check(&h).await;
                (h, outcome)
            })
            .buffer_unordered(self.max_in_flight)
            .collect()
            .await;
        let mut retry = Vec::new();
        for (mut h, outcome) in outcomes {
            match outcome {
                Outcome::Verified => step.verified += 1,
                Outcome::Unconfirmed => step.unconfirmed += 1,
                Outcome::Halt => {
                    step.halted = true;
                    continue;
                }
                Outcome::Retry => {
                    step.retrying += 1;
                    let pause = retry_pause(&self.config, h.attempts);
                    h.attempts = h.attempts.saturating_add(1);
                    h.next_at = now_ms() + pause.as_millis() as i64;
                    retry.push(h);
                    continue;
                }
            }
            released.push(h.seq);
        }
        self.tasks
            .registry
            .blocking(move |r| r.settle_held(&released, &retry))
            .await?;
        Ok(step)
    }

    async fn check(&self, held: &Held) -> Outcome {
        let callback = &held.callback();
        let task_id = callback.task_id.as_str();
        let client = &self.client;
        let in_grace =
            now_ms() - callback.received_at < self.config.unknown_task_grace_secs as i64 * 1000;
        let verdict = match client.record_info(task_id).await {
            Ok(record) => judge(callback, &record),
            Err(ProviderError::UnknownTask) => {
                Verdict::Unsure(ProviderError::UnknownTask.to_string())
            }
            Err(ProviderError::Unauthorized) => {
                self.tasks.stats.halt(format!(
                    "{} while verifying a callback for task {task_id}",
                    ProviderError::Unauthorized
                ));
                return Outcome::Halt;
            }
            Err(e @ (ProviderError::Forbidden | ProviderError::Refused { .. })) => {
                Verdict::Refuted(format!("not confirmed: {e}"))
            }
            Err(e @ ProviderError::Invalid(_)) => Verdict::Unsure(e.to_string()),
            Err(e @ ProviderError::Transient(_)) => {
                tracing::debug!(%task_id, error = %e, "verification postponed");
                return Outcome::Retry;
            }
        };
        let reason = match verdict {
            Verdict::Confirmed(event) => {
                return match self.outbox.append_from(*event, true, verified()).await {
                    Ok(appended) => {
                        PollStats::add(&self.tasks.stats.verified, 1);
                        tracing::debug!(%task_id, ?appended, "callback confirmed");
                        Outcome::Verified
                    }
                    Err(e) => {
                        tracing::warn!(%task_id, error = %e, "cannot store a confirmed callback; will retry");
                        Outcome::Retry
                    }
                };
            }
            Verdict::Unsure(_) if in_grace => return Outcome::Retry,
            Verdict::Unsure(reason) => format!("not confirmed: {reason}"),
            Verdict::Refuted(reason) => reason,
        };
        let from = if held.from.is_empty() {
            "?"
        } else {
            held.from.as_str()
        };
        tracing::warn!(%task_id, %from, %reason, "callback not confirmed by the provider; kept as a dead letter");
        let reason = format!(
            "{reason}; from {from}, body of {bytes} bytes not kept, it began: {excerpt:?}",
            bytes = held.body_bytes,
            excerpt = held.excerpt,
        );
        match self.outbox.bury(callback.clone(), reason).await {
            Ok(_) => {
                PollStats::add(&self.tasks.stats.unconfirmed, 1);
                Outcome::Unconfirmed
            }
            Err(e) => {
                tracing::error!(%task_id, error = %e, "cannot store the dead letter; will retry");
                Outcome::Retry
            }
        }
    }

    /// Buries a held entry that cannot be read, its bytes kept exactly, with
    /// the reason; `false` if the outbox could not store it (tried again
    /// next step).
    async fn bury_unreadable(&self, entry: Unreadable) -> bool {
        let reason = format!(
            "unreadable held callback (not verified, not published): {}",
            entry.error
        );
        tracing::warn!(seq = entry.seq, %reason, "held callback buried as a dead letter");
        match self.outbox.bury_raw(&entry.raw, reason).await {
            Ok(_) => {
                PollStats::add(&self.tasks.stats.unconfirmed, 1);
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot store the dead letter; will retry");
                false
            }
        }
    }
}

impl Job for Verify {
    const QUEUE: Queue = Queue::Held;

    async fn step(w: &mut Verifier) -> Result<bool, RegistryError> {
        Ok(w.run_once().await?.halted)
    }
}

/// A held callback the provider confirmed, as its trace names it.
fn verified() -> crate::trace::Caller {
    crate::trace::Caller {
        origin: crate::trace::Origin::Verified,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{from_value, State};
    use serde_json::json;

    fn event(state: &str, source: Source, at: i64) -> TaskEvent {
        let mut body = json!({"taskId": "task_1", "state": state});
        if state == "success" {
            body["output"] = json!([{"url": format!("https://{source:?}.example/v.mp4")}]);
        }
        from_value(body, source, at).unwrap()
    }

    #[test]
    fn a_terminal_callback_needs_the_same_terminal_state() {
        let callback = event("success", Source::Webhook, 7);
        let Verdict::Confirmed(confirmed) = judge(&callback, &event("success", Source::Poll, 9))
        else {
            panic!("same state confirms")
        };
        assert_eq!(confirmed.source, Source::Webhook);
        assert_eq!(confirmed.received_at, 7);
        assert_eq!(
            confirmed.outputs[0]["url"], "https://Poll.example/v.mp4",
            "the provider's record is what gets published"
        );
        assert!(
            matches!(judge(&callback, &event("fail", Source::Poll, 9)), Verdict::Refuted(r) if r.contains("says success, the provider says fail"))
        );
        assert!(matches!(
            judge(&callback, &event("generating", Source::Poll, 9)),
            Verdict::Unsure(_)
        ));
    }

    /// The sender of a callback is untrusted: a confirmed one carries the
    /// provider's fields, whichever state the provider is at.
    #[test]
    fn a_confirmed_callback_carries_none_of_the_senders_fields() {
        let forged = |state: &str| {
            let body = json!({"taskId": "task_1", "state": state, "model": "evil",
                "orderId": "order_evil", "creditsUsed": 9,
                "output": [{"url": "https://attacker.example/x.mp4"}],
                "error": {"code": "666", "message": "click https://attacker.example"}});
            from_value(body, Source::Webhook, 7).unwrap()
        };
        let mut record = event("success", Source::Poll, 9);
        record.model = Some("seedance-20".into());
        record.order_id = Some("order_1".into());
        for state in ["generating", "success"] {
            let Verdict::Confirmed(e) = judge(&forged(state), &record) else {
                panic!("{state}: confirmed")
            };
            let shown = serde_json::to_string(&*e).unwrap();
            assert!(
                !shown.contains("evil") && !shown.contains("attacker"),
                "{shown}"
            );
            assert_eq!(e.model.as_deref(), Some("seedance-20"));
            assert_eq!(e.order_id.as_deref(), Some("order_1"));
            assert_eq!((e.state.as_str(), e.received_at), (state, 7));
            assert_eq!(e.event_id, event::event_id("task_1", e.state));
        }
        let Verdict::Confirmed(e) = judge(&forged("generating"), &record) else {
            unreachable!()
        };
        assert_eq!(e.provider_state, "generating");
        assert!(e.error.is_none() && e.credits_used.is_none() && e.complete_time.is_none());
        assert_eq!(
            serde_json::to_value(&*e).unwrap()["outputs"],
            json!([]),
            "outputs belong to the later state"
        );
    }

    #[test]
    fn a_progress_callback_is_confirmed_by_that_state_or_a_later_one() {
        let callback = event("generating", Source::Webhook, 7);
        assert!(
            matches!(judge(&callback, &event("generating", Source::Poll, 9)), Verdict::Confirmed(e) if e.state == State::Generating)
        );
        assert!(
            matches!(judge(&callback, &event("success", Source::Poll, 9)), Verdict::Confirmed(e) if e.state == State::Generating && e.source == Source::Webhook)
        );
        assert!(matches!(
            judge(&callback, &event("waiting", Source::Poll, 9)),
            Verdict::Unsure(_)
        ));
    }
}
