//! The reconciler: polls registered tasks that have no terminal event yet,
//! publishes what it finds, and buries what never finishes (see the module
//! docs of `poll` for the rules).

use std::future::Future;
use std::time::Duration;

use futures::StreamExt;

use super::{backoff, synthetic_pending, PollStats, ProviderError, Registration, Tasks};
use crate::config::ReconcileConfig;
use crate::event::TaskEvent;
use crate::outbox::{now_ms, Outbox};

/// Most tasks looked at in one step.
const BATCH: usize = 256;
/// Longest idle wait between two looks at the registry.
const IDLE: Duration = Duration::from_secs(5);
/// Shortest wait between two steps, so that a task whose update could not be
/// saved does not spin the loop.
const MIN_PAUSE: Duration = Duration::from_millis(10);

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

pub struct Reconciler {
    tasks: Tasks,
    outbox: Outbox,
    config: ReconcileConfig,
    max_in_flight: usize,
}

impl Reconciler {
    /// `None` when there is no provider client (no API key).
    pub fn new(
        tasks: Tasks,
        outbox: Outbox,
        config: ReconcileConfig,
        max_in_flight: usize,
    ) -> Option<Self> {
        tasks.client.as_ref()?;
        Some(Self {
            tasks,
            outbox,
            config,
            max_in_flight: max_in_flight.max(1),
        })
    }

    fn stats(&self) -> &PollStats {
        &self.tasks.stats
    }

    /// Polls every task that is due now. Tests drive the reconciler with this.
    pub async fn run_once(&mut self) -> Result<ReconcileStep, super::RegistryError> {
        let mut step = ReconcileStep::default();
        if self.stats().halted().is_some() {
            step.halted = true;
            return Ok(step);
        }
        let now = now_ms();
        let due = self
            .tasks
            .registry
            .blocking(move |r| r.due(now, BATCH))
            .await?;
        let this = &*self;
        let visits: Vec<_> = futures::stream::iter(due)
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
        let client = self.tasks.client.as_ref().expect("checked in new");
        let polled = client.record_info(task_id).await;
        let now = now_ms();
        let grace_ms = self.config.unknown_task_grace_secs as i64 * 1000;
        let outcome = match polled {
            Ok(event) if event.state.is_terminal() => {
                return match self.outbox.append(event).await {
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
                    published =
                        matches!(self.outbox.append(event.clone()).await, Ok(a) if a.is_stored());
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
                let buried = self.bury(task_id, &r, reason, now).await;
                PollStats::add(&self.stats().unknown_tasks, buried as u64);
                r.done = buried;
                return (
                    r,
                    Visit::Done {
                        buried,
                        published: false,
                    },
                );
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
            let buried = self.bury(task_id, &r, reason, now).await;
            PollStats::add(&self.stats().stuck, buried as u64);
            r.done = buried;
            return (
                r,
                Visit::Done {
                    buried,
                    published: outcome,
                },
            );
        }
        let pause = backoff(
            Duration::from_millis(self.config.poll_initial_ms),
            Duration::from_millis(self.config.poll_max_ms),
            r.attempts,
        );
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

    /// Runs until `shutdown` resolves. A step cut short by shutdown loses
    /// nothing: the registry still says what is due.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        tracing::info!(
            first_poll_after_secs = self.config.first_poll_after_secs,
            deadline_secs = self.config.deadline_secs,
            "reconciler started"
        );
        loop {
            let step = tokio::select! {
                step = self.run_once() => step,
                _ = &mut shutdown => break,
            };
            let floor = match step {
                Ok(step) if step.halted => {
                    // Logged by `halt`; wait for shutdown only.
                    shutdown.as_mut().await;
                    break;
                }
                Ok(_) => MIN_PAUSE,
                Err(e) => {
                    tracing::error!(error = %e, "reconciler step failed");
                    Duration::from_secs(1)
                }
            };
            let next = self
                .tasks
                .registry
                .blocking(|r| r.next_due())
                .await
                .ok()
                .flatten();
            let pause = next
                .map_or(IDLE, |at| {
                    Duration::from_millis((at - now_ms()).max(0) as u64)
                })
                .clamp(floor, IDLE);
            tokio::select! {
                _ = &mut shutdown => break,
                _ = self.tasks.registry.task_added() => {}
                _ = tokio::time::sleep(pause) => {}
            }
        }
        tracing::info!("reconciler stopped");
    }
}
