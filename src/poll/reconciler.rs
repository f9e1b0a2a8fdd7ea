//! The reconciler: polls registered tasks that have no terminal event yet,
//! publishes what it finds, and buries what never finishes (see the module
//! docs of `poll` for the rules).

use std::sync::atomic::AtomicU64;

use futures::StreamExt;

use super::{
    retry_pause, synthetic_pending, Job, PollStats, PollWorker, ProviderError, Queue, Registration,
    RegistryError, UnreadableTask,
};
use crate::clock::now_ms;
use crate::event::TaskEvent;

/// Most tasks looked at in one step.
const BATCH: usize = 256;

/// What one step did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReconcileStep {
    /// Tasks whose status was requested.
    pub polled: usize,
    /// Terminal (or, with `publish_progress`, other) events stored for publishing.
    pub published: usize,
    /// Tasks found finished in the outbox, without a poll.
    pub already_done: usize,
    /// Tasks buried as stuck or unknown.
    pub buried: usize,
    /// Polling is stopped (the provider refused the key).
    pub halted: bool,
}

/// What became of one task in a step.
enum Visit {
    Done { buried: bool, published: bool },
    AlreadyDone,
    Again { published: bool },
    Halt,
}

/// The worker that polls registered tasks.
pub type Reconciler = PollWorker<Reconcile>;

/// The step of the [`Reconciler`].
pub struct Reconcile;

impl PollWorker<Reconcile> {
    fn stats(&self) -> &PollStats {
        &self.tasks.stats
    }

    /// Polls every task that is due now. Tests drive the reconciler with this.
    pub async fn run_once(&mut self) -> Result<ReconcileStep, RegistryError> {
        let mut step = ReconcileStep::default();
        let (now, registry) = (now_ms(), &self.tasks.registry);
        let due = registry.blocking(move |r| r.due(now, BATCH)).await?;
        let mut unreadable = Vec::new();
        for entry in due.unreadable {
            if self.bury_unreadable(&entry).await {
                step.buried += 1;
                unreadable.push(entry);
            }
        }
        self.tasks
            .registry
            .blocking(move |r| r.forget_unreadable(&unreadable))
            .await?;
        let this = &*self;
        let visits: Vec<_> = futures::stream::iter(due.tasks)
            .map(|(task_id, registration)| async move {
                let (registration, visit) = this.visit(&task_id, registration).await;
                (task_id, registration, visit)
            })
            .buffer_unordered(self.max_in_flight)
            .collect()
            .await;
        let mut updates = Vec::with_capacity(visits.len());
        for (task_id, registration, visit) in visits {
            match visit {
                Visit::Halt => {
                    step.halted = true;
                    continue;
                }
                Visit::AlreadyDone => step.already_done += 1,
                Visit::Done { buried, published } => {
                    step.polled += 1;
                    step.buried += buried as usize;
                    step.published += published as usize;
                }
                Visit::Again { published } => {
                    step.polled += 1;
                    step.published += published as usize;
                }
            }
            updates.push((task_id, registration));
        }
        self.tasks
            .registry
            .blocking(move |r| r.save(&updates))
            .await?;
        Ok(step)
    }

    async fn visit(&self, task_id: &str, mut r: Registration) -> (Registration, Visit) {
        if self.finished_in_outbox(task_id).await {
            r.done = true;
            return (r, Visit::AlreadyDone);
        }
        let client = &self.client;
        let polled = client.record_info(task_id).await;
        let now = now_ms();
        let grace_ms = self.config.unknown_task_grace_secs as i64 * 1000;
        let outcome = match polled {
            Ok(event) if event.state.is_terminal() => {
                return match self.outbox.append_trusted(event).await {
                    Ok(appended) => {
                        tracing::info!(%task_id, ?appended, "terminal state found by polling");
                        r.done = true;
                        (
                            r,
                            Visit::Done {
                                buried: false,
                                published: appended.is_stored(),
                            },
                        )
                    }
                    // The task did finish: try again soon, whatever the deadline.
                    Err(e) => {
                        tracing::warn!(%task_id, error = %e, "cannot store the polled event; will retry");
                        r.next_poll_at = now + self.config.poll_initial_ms as i64;
                        (r, Visit::Again { published: false })
                    }
                };
            }
            Ok(event) => {
                let mut published = false;
                if self.config.publish_progress {
                    published = matches!(self.outbox.append_trusted(event.clone()).await, Ok(a) if a.is_stored());
                }
                r.last_event = Some(Box::new(event));
                r.last_error = None;
                published
            }
            Err(ProviderError::UnknownTask) if now - r.registered_at >= grace_ms => {
                let reason = format!(
                    "unknown task: the provider answered 404 for {} s after registration",
                    (now - r.registered_at) / 1000
                );
                let counter: fn(&PollStats) -> &AtomicU64 = |s| &s.unknown_tasks;
                return self.give_up(task_id, r, reason, now, counter, false).await;
            }
            Err(e @ (ProviderError::Unauthorized | ProviderError::Forbidden)) => {
                self.stats()
                    .halt(format!("{e} while polling task {task_id}"));
                return (r, Visit::Halt);
            }
            Err(e) => {
                tracing::debug!(%task_id, error = %e, "poll failed");
                r.last_error = Some(e.to_string());
                false
            }
        };
        let deadline_at = r.registered_at + self.config.deadline_secs as i64 * 1000;
        if now >= deadline_at {
            let mut reason = format!(
                "stuck: no terminal state after {} s",
                self.config.deadline_secs
            );
            if let Some(error) = &r.last_error {
                reason.push_str(&format!(" (last poll: {error})"));
            }
            let counter: fn(&PollStats) -> &AtomicU64 = |s| &s.stuck;
            return self
                .give_up(task_id, r, reason, now, counter, outcome)
                .await;
        }
        let pause = retry_pause(&self.config, r.attempts);
        r.attempts = r.attempts.saturating_add(1);
        // One last look exactly at the deadline.
        r.next_poll_at = (now + pause.as_millis() as i64).min(deadline_at);
        (r, Visit::Again { published: outcome })
    }

    async fn finished_in_outbox(&self, task_id: &str) -> bool {
        let (outbox, id) = (self.outbox.clone(), task_id.to_string());
        matches!(
            tokio::task::spawn_blocking(move || outbox.task(&id)).await,
            Ok(Ok(Some(record))) if record.furthest.is_some_and(|s| s.is_terminal())
        )
    }

    /// A scheduled task whose registration cannot be read, as a dead letter
    /// holding the stored registration exactly; `false` if the outbox could
    /// not store it (tried again next step).
    async fn bury_unreadable(&self, entry: &UnreadableTask) -> bool {
        let task_id = entry.task_id.as_str();
        let reason = format!(
            "unreadable registration of task {task_id}, no longer polled: {}",
            entry.error
        );
        tracing::warn!(%task_id, %reason, "registered task given up; kept as a dead letter");
        let stored = entry.raw.as_deref().unwrap_or_default();
        match self.outbox.bury_raw(stored, reason).await {
            Ok(_) => {
                PollStats::add(&self.stats().unreadable_registrations, 1);
                true
            }
            Err(e) => {
                tracing::error!(%task_id, error = %e, "cannot store the dead letter; will retry");
                false
            }
        }
    }

    /// Buries the task with `reason`, counted by `counter`, and ends the
    /// visit (unless the dead letter could not be stored: retried next step).
    async fn give_up(
        &self,
        task_id: &str,
        mut r: Registration,
        reason: String,
        now: i64,
        counter: fn(&PollStats) -> &AtomicU64,
        published: bool,
    ) -> (Registration, Visit) {
        let buried = self.bury(task_id, &r, reason, now).await;
        PollStats::add(counter(self.stats()), buried as u64);
        r.done = buried;
        (r, Visit::Done { buried, published })
    }

    /// The last polled record (or a synthetic `pending` one) as a dead
    /// letter. `false` if the outbox could not store it (retried next step).
    async fn bury(&self, task_id: &str, r: &Registration, reason: String, now: i64) -> bool {
        let event: TaskEvent = match &r.last_event {
            Some(event) => (**event).clone(),
            None => synthetic_pending(task_id, now),
        };
        tracing::warn!(%task_id, %reason, "registered task given up; kept as a dead letter");
        match self.outbox.bury(event, reason).await {
            Ok(_) => true,
            Err(e) => {
                tracing::error!(%task_id, error = %e, "cannot store the dead letter; will retry");
                false
            }
        }
    }
}

impl Job for Reconcile {
    const QUEUE: Queue = Queue::Registered;

    async fn step(w: &mut Reconciler) -> Result<bool, RegistryError> {
        Ok(w.run_once().await?.halted)
    }
}
