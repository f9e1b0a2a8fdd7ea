//! Cluster mode (`[cluster]`): its settings and the checks that tie them to
//! the publisher.

use serde::{Deserialize, Serialize};

use super::{invalid, Config, ConfigError, PublisherConfig};

/// Cluster mode: N replicas behind a load balancer behave as one bridge,
/// coordinated by the broker itself (see `cluster` module docs).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Turn cluster mode on. Off (the default): single-instance mode.
    pub enabled: bool,
    /// Kafka: the internal topic the relays publish to, keyed by taskId.
    pub internal_topic: String,
    /// Kafka: the compacted topic holding each task's guard state.
    pub changelog_topic: String,
    /// Kafka: the consumer group that assigns task ownership.
    pub group_id: String,
    /// Kafka: `transactional.id` of this replica's owner; unique per
    /// replica, stable across its restarts. Required with Kafka.
    pub transactional_id: String,
    /// Kafka: partitions of the internal and changelog topics when
    /// hookbridge creates them (the most replicas that share the work).
    pub partitions: i32,
    /// Kafka: replication factor of those topics when created.
    pub replication_factor: i32,
    /// On SIGTERM, `/readyz` answers 503 for this long before the listener
    /// closes, so the load balancer stops sending first, in milliseconds.
    pub drain_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            internal_topic: "hookbridge.internal".into(),
            changelog_topic: "hookbridge.changelog".into(),
            group_id: "hookbridge-owners".into(),
            transactional_id: String::new(),
            partitions: 12,
            replication_factor: 3,
            drain_ms: 3_000,
        }
    }
}

impl Config {
    pub(super) fn validate_cluster(&self) -> Result<(), ConfigError> {
        let c = &self.cluster;
        if !c.enabled {
            return Ok(());
        }
        if c.drain_ms > 600_000 {
            return invalid("cluster.drain_ms", "must be at most 600000");
        }
        match &self.publisher {
            PublisherConfig::File(_) => {
                invalid("cluster.enabled", "needs a Kafka or a JetStream publisher")
            }
            PublisherConfig::Kafka(_) => {
                for (key, topic) in [
                    ("cluster.internal_topic", &c.internal_topic),
                    ("cluster.changelog_topic", &c.changelog_topic),
                ] {
                    crate::publish::names::check_topic(topic)
                        .or_else(|e| invalid(key, &e.to_string()))?;
                }
                if c.internal_topic == c.changelog_topic {
                    return invalid(
                        "cluster.changelog_topic",
                        "must differ from cluster.internal_topic",
                    );
                }
                if c.group_id.trim().is_empty() {
                    return invalid("cluster.group_id", "must not be empty");
                }
                if c.transactional_id.trim().is_empty() {
                    return invalid(
                        "cluster.transactional_id",
                        "must be set, unique per replica, with a Kafka publisher",
                    );
                }
                if !(1..=10_000).contains(&c.partitions) {
                    return invalid("cluster.partitions", "must be between 1 and 10000");
                }
                if !(1..=16).contains(&c.replication_factor) {
                    return invalid("cluster.replication_factor", "must be between 1 and 16");
                }
                Ok(())
            }
            PublisherConfig::Nats(n) => {
                if !n.jetstream {
                    return invalid("cluster.enabled", "needs `publisher.jetstream = true`");
                }
                // The stream's own write keeps each task's order: every
                // state of a task must land on subjects one filter selects.
                if !crate::publish::names::has_whole_task_token(&n.subject) {
                    return invalid(
                        "publisher.subject",
                        "must have {task} as one of its tokens in JetStream cluster mode, \
                         and {model}, {state} and {task} only as whole tokens \
                         (e.g. kinovi.tasks.{state}.{task}): the stream keeps each task's \
                         order by the last message on that task's subjects",
                    );
                }
                Ok(())
            }
        }
    }
}
