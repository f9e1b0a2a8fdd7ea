//! JetStream cluster mode: the shared guard in a key-value bucket.
//!
//! One entry per task (key: a UUIDv5 of the task id, so any task id is a
//! legal key) holds a [`Guard`]: the furthest state claimed, its event id,
//! whether it was published, when it was claimed. For each event:
//!
//! 1. read the entry; [`verdict`] decides;
//! 2. `Advance`: claim the state, with create-if-absent for a new task or a
//!    revision-checked update otherwise; a lost race reads again. While
//!    another replica's claim of an earlier state is unpublished and younger
//!    than `cluster.lease_ms`, the event waits (a transient error: the relay
//!    retries), so a task's states reach the stream in order;
//! 3. publish with `Nats-Msg-Id` = event id and wait for the PubAck;
//! 4. mark the entry published (revision-checked; losing that race means
//!    another replica already moved the task on).
//!
//! A crash between 2 and 4 leaves a claim that is not published: the same
//! event, from this replica's outbox after its restart or from another
//! replica's, gets `Republish`, and the stream's duplicate window drops the
//! copy if the first publish did land. Entries expire with the bucket's
//! `max_age` = `outbox.dedup_window_secs`.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv::{CreateErrorKind, Operation, Store, UpdateErrorKind};
use async_nats::jetstream::stream;
use bytes::Bytes;
use futures::future::{join_all, BoxFuture};
use futures::FutureExt;
use tokio::sync::OnceCell;

use super::{state_of, verdict, Coordination, Guard, Verdict};
use crate::config::{ClusterConfig, NatsConfig};
use crate::event::State;
use crate::outbox::now_ms;
use crate::publish::nats::NatsPublisher;
use crate::publish::{EncodeError, Encoded, Outgoing, PublishError, Publisher};

/// Names the bucket's keys: UUIDv5s of task ids.
const KEY_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6b1c_52a8_4c1e_4a3c_9d0e_5f2b_7a61_c0de);
/// The key the probe reads (absent is fine: the read is what counts).
const PROBE_KEY: &str = "probe";

/// A [`NatsPublisher`] behind the shared guard.
pub struct GuardedJetStream {
    inner: NatsPublisher,
    cluster: ClusterConfig,
    max_age: Duration,
    store: OnceCell<Store>,
    coordination: Arc<Coordination>,
}

impl GuardedJetStream {
    pub async fn connect(
        config: NatsConfig,
        cluster: ClusterConfig,
        window_secs: u64,
        coordination: Arc<Coordination>,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            inner: NatsPublisher::connect(config).await?,
            cluster,
            max_age: Duration::from_secs(window_secs),
            store: OnceCell::new(),
            coordination,
        })
    }

    /// The bucket, created when missing.
    async fn store(&self) -> Result<&Store, PublishError> {
        let js = self.inner.jetstream();
        let name = &self.cluster.kv_bucket;
        let result = self
            .store
            .get_or_try_init(|| async {
                if let Ok(store) = js.get_key_value(name).await {
                    return Ok(store);
                }
                // The bucket's stream as `create_key_value` makes it, created
                // directly: that call first asks for account details in a
                // shape older servers (2.9) do not answer in.
                js.get_or_create_stream(stream::Config {
                    name: format!("KV_{name}"),
                    subjects: vec![format!("$KV.{name}.>")],
                    max_messages_per_subject: 1,
                    max_age: self.max_age,
                    allow_rollup: true,
                    deny_delete: true,
                    allow_direct: true,
                    discard: stream::DiscardPolicy::New,
                    num_replicas: self.cluster.kv_replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| format!("cannot create bucket {name}: {e}"))?;
                js.get_key_value(name)
                    .await
                    .map_err(|e| format!("cannot open bucket {name}: {e}"))
            })
            .await;
        result.map_err(|e| self.unreachable(e))
    }

    fn unreachable(&self, why: impl std::fmt::Display) -> PublishError {
        let why = why.to_string();
        self.coordination.failed(&why);
        PublishError::Transient(why)
    }

    /// One read of the bucket, for readiness when no event tells.
    pub async fn probe(&self) {
        let Ok(store) = self.store().await else {
            return;
        };
        match store.get(PROBE_KEY).await {
            Ok(_) => self.coordination.ok(),
            Err(e) => self.coordination.failed(&e.to_string()),
        }
    }

    /// Guard, publish, mark: see the module docs.
    async fn guarded(&self, m: &Encoded) -> Result<(), PublishError> {
        let Some(state) = state_of(&m.key, &m.id) else {
            // Not an id hookbridge made: nothing to guard it by.
            return self.publish_one(m).await;
        };
        let store = self.store().await?;
        let key = task_key(&m.key);
        let claimed = loop {
            let entry = store
                .entry(key.as_str())
                .await
                .map_err(|e| self.unreachable(e))?;
            self.coordination.ok();
            let (guard, revision) = match &entry {
                Some(e) if e.operation == Operation::Put => {
                    (serde_json::from_slice::<Guard>(&e.value).ok(), e.revision)
                }
                Some(e) => (None, e.revision),
                None => (None, 0),
            };
            match verdict(guard.as_ref(), state, &m.id) {
                Verdict::Suppress => {
                    tracing::debug!(task_id = %m.key, state = state.as_str(), "suppressed by the cluster guard");
                    return Ok(());
                }
                Verdict::Republish => break revision,
                Verdict::Advance => {}
            }
            if let Some(g) = &guard {
                if !g.done && now_ms() - g.at < self.cluster.lease_ms as i64 {
                    return Err(PublishError::Transient(format!(
                        "task {} waits for its {} to be published",
                        m.key,
                        g.state.as_str()
                    )));
                }
            }
            let value = encode(state, &m.id, false);
            let result = if guard.is_none() && entry.is_none() {
                store
                    .create(key.as_str(), value)
                    .await
                    .map_err(|e| (e.kind() == CreateErrorKind::AlreadyExists, e.to_string()))
            } else {
                store
                    .update(key.as_str(), value, revision)
                    .await
                    .map_err(|e| {
                        (
                            e.kind() == UpdateErrorKind::WrongLastRevision,
                            e.to_string(),
                        )
                    })
            };
            match result {
                Ok(revision) => break revision,
                // Another replica moved the task meanwhile: decide again.
                Err((true, _)) => continue,
                Err((false, e)) => return Err(self.unreachable(e)),
            }
        };
        self.publish_one(m).await?;
        match store
            .update(key.as_str(), encode(state, &m.id, true), claimed)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => Ok(()),
            // Published, not marked: the retry republishes (the window drops
            // it) and marks.
            Err(e) => Err(self.unreachable(e)),
        }
    }

    async fn publish_one(&self, m: &Encoded) -> Result<(), PublishError> {
        self.inner
            .publish(std::slice::from_ref(m))
            .await
            .into_iter()
            .next()
            .unwrap_or_else(|| Err(PublishError::Transient("no result".into())))
    }
}

/// The bucket key of a task.
fn task_key(task_id: &str) -> String {
    format!(
        "t.{}",
        uuid::Uuid::new_v5(&KEY_NAMESPACE, task_id.as_bytes()).simple()
    )
}

fn encode(state: State, id: &str, done: bool) -> Bytes {
    let guard = Guard {
        state,
        id: id.to_string(),
        done,
        at: now_ms(),
    };
    // A struct of strings, a bool and a number always serializes.
    Bytes::from(serde_json::to_vec(&guard).unwrap_or_default())
}

impl Publisher for GuardedJetStream {
    fn name(&self) -> &'static str {
        "jetstream-cluster"
    }

    fn encode(&self, o: &Outgoing) -> Result<Encoded, EncodeError> {
        self.inner.encode(o)
    }

    fn publish<'a>(&'a self, batch: &'a [Encoded]) -> BoxFuture<'a, Vec<Result<(), PublishError>>> {
        async move { join_all(batch.iter().map(|m| self.guarded(m))).await }.boxed()
    }

    fn flush(&self, timeout: Duration) -> BoxFuture<'_, ()> {
        self.inner.flush(timeout)
    }
}
