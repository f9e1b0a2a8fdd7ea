//! Cluster mode: N replicas behind a load balancer behave as one bridge.
//!
//! Each replica keeps its own durable outbox (a 200 still means "on this
//! replica's disk") and its local dedup and state guard. What the replicas
//! share lives in the broker the user already runs; hookbridge has no
//! membership or consensus protocol of its own.
//!
//! - **Kafka** ([`kafka`]): the relay publishes to an internal topic keyed by
//!   taskId. A consumer group assigns its partitions to the replicas, so one
//!   replica owns a task at a time. The owner applies dedup and the state
//!   guard and writes the event to the output topic, the task's new guard
//!   state to a compacted changelog topic, and the consumed offsets, all in
//!   one Kafka transaction. A partition that moves is restored from the
//!   changelog before its first message is processed. Consumers read the
//!   output with `isolation.level=read_committed`.
//! - **JetStream** ([`jetstream`]): each task's states are published on
//!   subjects one filter selects (`{task}` in `publisher.subject`). A
//!   replica reads the task's last message on the stream, and publishes
//!   only a further state, with the condition that the task's last sequence
//!   is still the one it read: the stream leader's own write decides, so no
//!   side record can disagree with the stream across a leader change.
//!
//! Whichever replica finds a state stale or already published answers the
//! relay "done": the event leaves that replica's outbox without a publish.
//! A replica that cannot reach the coordination (the group or the stream)
//! says so on `/readyz`, so the load balancer sends the traffic elsewhere.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{ClusterConfig, Config};
use crate::event::{event_id, State};
use crate::publish::Publisher;
use crate::publish::PublisherConfig;
use crate::supervise::{Health, Supervisor};

#[cfg(feature = "nats")]
pub mod jetstream;
#[cfg(feature = "kafka")]
pub mod kafka;

/// The readiness component cluster coordination is reported as.
pub const COMPONENT: &str = "cluster";
/// How often coordination is probed when no event tells.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// The state an event id stands for: event ids are UUIDv5s of (taskId,
/// state), so the five candidates are all there is to try. `None` for an
/// id hookbridge did not make.
pub fn state_of(task_id: &str, id: &str) -> Option<State> {
    [
        State::Pending,
        State::Waiting,
        State::Generating,
        State::Success,
        State::Fail,
    ]
    .into_iter()
    .find(|s| event_id(task_id, *s) == id)
}

/// A task's shared guard state, as the changelog holds it (Kafka) or the stream's last message tells (JetStream).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Guard {
    /// The furthest state claimed for the task.
    pub state: State,
    /// Its event id.
    pub id: String,
    /// Whether the broker acknowledged it (always true today: Kafka writes
    /// the guard in the same transaction as the event, JetStream reads it
    /// from the stream; `false` is kept for records written before).
    pub done: bool,
    /// When it was claimed, ms since the epoch.
    pub at: i64,
}

/// What the shared guard says about one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A state further than the furthest so far: claim it and publish.
    Advance,
    /// The furthest state itself, claimed but maybe not published (a
    /// crash, or another replica right now): publish again; the broker's
    /// own dedup drops a repeat.
    Republish,
    /// Already published, or behind the furthest state (stale), or the
    /// other terminal state: do not publish.
    Suppress,
}

/// The guard's decision for `state` / `id` given the task's record.
pub fn verdict(guard: Option<&Guard>, state: State, id: &str) -> Verdict {
    match guard {
        None => Verdict::Advance,
        Some(g) if g.id == id && g.done => Verdict::Suppress,
        Some(g) if g.id == id => Verdict::Republish,
        Some(g) if g.state.rank() >= state.rank() => Verdict::Suppress,
        Some(_) => Verdict::Advance,
    }
}

/// How long coordination may fail before `/readyz` says so: a leader
/// election or a rebalance takes seconds, and all replicas see it at once;
/// were they all to leave the load balancer, callbacks would be refused.
pub const UNREACHABLE_AFTER_MS: i64 = 5_000;

/// Whether the replica reaches the coordination: since when the attempts
/// to use it fail (0: the last one succeeded).
#[derive(Debug, Default)]
pub struct Coordination {
    failing_since: AtomicI64,
}

impl Coordination {
    pub fn ok(&self) {
        if self.failing_since.swap(0, Ordering::Relaxed) != 0 {
            tracing::info!("cluster coordination reachable again");
        }
    }

    pub fn failed(&self, why: &str) {
        let now = crate::clock::now_ms().max(1);
        if self
            .failing_since
            .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            tracing::warn!(reason = why, "cluster coordination unreachable");
        }
    }

    /// Whether coordination has been failing for less than
    /// [`UNREACHABLE_AFTER_MS`] at `now_ms`.
    pub fn reachable_at(&self, now_ms: i64) -> bool {
        let since = self.failing_since.load(Ordering::Relaxed);
        since == 0 || now_ms - since < UNREACHABLE_AFTER_MS
    }

    pub fn reachable(&self) -> bool {
        self.reachable_at(crate::clock::now_ms())
    }
}

/// The coordination worker of one backend.
enum Backend {
    #[cfg(feature = "kafka")]
    Kafka(Box<kafka::Owner>),
    #[cfg(feature = "nats")]
    JetStream(Arc<jetstream::GuardedJetStream>),
}

/// Cluster mode's part of a running app: its worker and its readiness.
pub struct Cluster {
    backend: Backend,
    coordination: Arc<Coordination>,
    /// How long `/readyz` says 503 before the listener closes on shutdown.
    pub drain: Duration,
}

/// Builds the publisher cluster mode relays through, and the rest of it.
pub async fn build(config: &Config) -> anyhow::Result<(Arc<dyn Publisher>, Cluster)> {
    let coordination = Arc::new(Coordination::default());
    let c: &ClusterConfig = &config.cluster;
    let drain = Duration::from_millis(c.drain_ms);
    let (publisher, backend): (Arc<dyn Publisher>, Backend) = match &config.publisher {
        #[cfg(feature = "kafka")]
        PublisherConfig::Kafka(k) => {
            let intake = kafka::Intake::new(k.clone(), c.internal_topic.clone()).await?;
            let owner = kafka::Owner::new(
                k.clone(),
                c.clone(),
                config.outbox.dedup_window_secs,
                coordination.clone(),
            );
            (Arc::new(intake), Backend::Kafka(Box::new(owner)))
        }
        #[cfg(feature = "nats")]
        PublisherConfig::Nats(n) => {
            let guarded = Arc::new(
                jetstream::GuardedJetStream::connect(n.clone(), c.clone(), coordination.clone())
                    .await?,
            );
            (guarded.clone(), Backend::JetStream(guarded))
        }
        #[allow(unreachable_patterns)]
        other => anyhow::bail!("cluster mode cannot use the publisher {other:?}"),
    };
    Ok((
        publisher,
        Cluster {
            backend,
            coordination,
            drain,
        },
    ))
}

impl Cluster {
    /// Starts the owner (Kafka) and the coordination probe under
    /// `supervisor`; the probe mirrors reachability into `health`.
    pub fn supervise(&self, supervisor: &mut Supervisor, health: Arc<Health>) {
        match &self.backend {
            #[cfg(feature = "kafka")]
            Backend::Kafka(owner) => {
                let owner = (**owner).clone();
                supervisor.spawn("cluster-owner", move |stop| {
                    owner.clone().run(stop.cancelled_owned())
                });
            }
            #[cfg(feature = "nats")]
            Backend::JetStream(guarded) => {
                let guarded = guarded.clone();
                supervisor.spawn("cluster-probe", move |stop| {
                    let guarded = guarded.clone();
                    async move {
                        let stop = stop.cancelled_owned();
                        tokio::pin!(stop);
                        loop {
                            tokio::select! {
                                _ = &mut stop => return,
                                _ = tokio::time::sleep(PROBE_EVERY) => guarded.probe().await,
                            }
                        }
                    }
                });
            }
        }
        let coordination = self.coordination.clone();
        supervisor.spawn("cluster-readiness", move |stop| {
            let (coordination, health) = (coordination.clone(), health.clone());
            async move {
                let stop = stop.cancelled_owned();
                tokio::pin!(stop);
                loop {
                    let problem = (!coordination.reachable()).then_some("unreachable");
                    health.set_condition(COMPONENT, problem);
                    tokio::select! {
                        _ = &mut stop => return,
                        _ = tokio::time::sleep(PROBE_EVERY / 4) => {}
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(state: State, task: &str, done: bool) -> Guard {
        Guard {
            state,
            id: event_id(task, state),
            done,
            at: 0,
        }
    }

    #[test]
    fn the_state_is_read_back_from_the_event_id() {
        for s in [State::Pending, State::Generating, State::Fail] {
            assert_eq!(state_of("t-1", &event_id("t-1", s)), Some(s));
        }
        assert_eq!(state_of("t-2", &event_id("t-1", State::Fail)), None);
    }

    #[test]
    fn the_guard_advances_republishes_and_suppresses() {
        let t = "t";
        let id = |s| event_id(t, s);
        assert_eq!(
            verdict(None, State::Waiting, &id(State::Waiting)),
            Verdict::Advance
        );
        let generating = guard(State::Generating, t, true);
        assert_eq!(
            verdict(Some(&generating), State::Success, &id(State::Success)),
            Verdict::Advance
        );
        assert_eq!(
            verdict(Some(&generating), State::Generating, &id(State::Generating)),
            Verdict::Suppress,
            "published already"
        );
        assert_eq!(
            verdict(Some(&generating), State::Waiting, &id(State::Waiting)),
            Verdict::Suppress,
            "stale"
        );
        let claimed = guard(State::Generating, t, false);
        assert_eq!(
            verdict(Some(&claimed), State::Generating, &id(State::Generating)),
            Verdict::Republish
        );
        let success = guard(State::Success, t, true);
        assert_eq!(
            verdict(Some(&success), State::Fail, &id(State::Fail)),
            Verdict::Suppress,
            "terminal states do not replace each other"
        );
    }

    #[test]
    fn coordination_is_unreachable_after_failing_for_a_while_and_again_after_a_success() {
        let c = Coordination::default();
        assert!(c.reachable());
        c.failed("down");
        let now = crate::clock::now_ms();
        assert!(c.reachable_at(now), "a moment's failure is not reported");
        c.failed("still down");
        assert!(!c.reachable_at(now + UNREACHABLE_AFTER_MS + 1));
        c.ok();
        assert!(c.reachable_at(now + UNREACHABLE_AFTER_MS + 1));
    }
}

#[cfg(test)]
mod config_tests {
    use crate::config::{Config, ConfigError};

    fn key_of(toml: &str) -> Option<&'static str> {
        match Config::from_toml(toml) {
            Ok(_) => None,
            Err(ConfigError::Invalid { key, .. }) => Some(key),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn cluster_settings_are_checked_against_the_publisher() {
        let kafka =
            "[publisher]\ntype = \"kafka\"\nbrokers = \"k:9092\"\n[cluster]\nenabled = true\n";
        let replica = format!("{kafka}transactional_id = \"r1\"\n");
        let nats = "[publisher]\ntype = \"nats\"\nurl = \"nats://n:4222\"\n\
                    subject = \"k.{state}.{task}\"\n[cluster]\nenabled = true\n";
        for (toml, refused) in [
            (
                "[cluster]\nenabled = true".to_string(),
                Some("cluster.enabled"),
            ),
            (kafka.to_string(), Some("cluster.transactional_id")),
            (replica.clone(), None),
            (
                format!("{replica}internal_topic = \"a b\""),
                Some("cluster.internal_topic"),
            ),
            (
                format!("{replica}changelog_topic = \"hookbridge.internal\""),
                Some("cluster.changelog_topic"),
            ),
            (nats.to_string(), None),
            (nats.replace(".{task}", ""), Some("publisher.subject")),
            (
                nats.replace(".{task}", ".t{task}"),
                Some("publisher.subject"),
            ),
            (
                nats.replace("{state}", "s-{state}"),
                Some("publisher.subject"),
            ),
            // Off, nothing is checked: single-instance mode is unchanged.
            ("[cluster]\ndrain_ms = 2".to_string(), None),
        ] {
            assert_eq!(key_of(&toml), refused, "{toml}");
        }
    }
}
