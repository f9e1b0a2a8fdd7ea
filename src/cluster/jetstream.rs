//! JetStream cluster mode: the output stream's own write keeps each task's
//! order.
//!
//! Every state of a task is published on subjects one filter selects:
//! `publisher.subject` has a `{task}` token (e.g.
//! `kinovi.tasks.{state}.{task}`), and the filter is that template with
//! `{task}` rendered and `{state}` and `{model}` as `*`. For each event:
//!
//! 1. read the last message on the task's filter (from the stream leader);
//!    its `Nats-Msg-Id` is an event id, hence a state; [`verdict`] decides;
//! 2. `Suppress` (that event, a later state or the other terminal one is
//!    there): done, nothing published;
//! 3. else publish with `Nats-Msg-Id` = event id and the condition
//!    `Nats-Expected-Last-Subject-Sequence` = the sequence read, on that
//!    filter (`Nats-Expected-Last-Subject-Sequence-Subject`). The stream
//!    leader stores it only if nothing landed on the task's subjects since
//!    the read, and refuses a second conditional write on the same filter
//!    while one is in flight; a refusal reads again (1).
//!
//! No interleaving of replicas can publish a lower state after a higher
//! one: each write is conditional on the task's last message, and the
//! verdict only ever lets a higher rank follow a lower one. There is no
//! side record to fall out of step with the stream across a leader change,
//! no claim and no lease: a crash at any point leaves the stream as the
//! whole truth, and the retry reads it. The duplicate window still drops a
//! repeat whose PubAck was lost. Past the stream's `max_age` (or after a
//! purge) a task's history is gone and a late state is published again, as
//! a single instance past its dedup window would.

use std::sync::Arc;

use async_nats::jetstream::stream::{LastRawMessageErrorKind, Stream};
use futures::future::{join_all, BoxFuture};
use futures::FutureExt;
use std::time::Duration;
use tokio::sync::OnceCell;

use super::{state_of, verdict, Coordination, Guard, Verdict};
use crate::config::ClusterConfig;
use crate::publish::config::NatsConfig;
use crate::publish::nats::{Checked, Expect, NatsPublisher, Version};
use crate::publish::{
    task_token, EncodeError, Encoded, Outgoing, PublishError, Published, Publisher, Receipt,
};

/// The oldest nats-server cluster mode runs on: the first that checks an
/// expected last sequence against a subject filter, and refuses a second
/// conditional write on a filter while one is in flight.
pub const OLDEST_SERVER: Version = Version(2, 11, 0);
/// How many times one event re-reads after losing the conditional write
/// before the relay is told to retry it later.
const MAX_RACES: usize = 16;

/// A [`NatsPublisher`] whose writes the stream orders per task.
pub struct GuardedJetStream {
    inner: NatsPublisher,
    /// `publisher.subject` with `{state}` and `{model}` as `*`.
    filter_template: String,
    stream: OnceCell<Stream<()>>,
    coordination: Arc<Coordination>,
}

impl GuardedJetStream {
    pub async fn connect(
        config: NatsConfig,
        _cluster: ClusterConfig,
        coordination: Arc<Coordination>,
    ) -> anyhow::Result<Self> {
        let filter_template = config
            .subject
            .replace("{state}", "*")
            .replace("{model}", "*");
        let inner = NatsPublisher::connect(config).await?;
        inner
            .check_server(None, OLDEST_SERVER, "JetStream cluster mode")
            .await?;
        Ok(Self {
            inner,
            filter_template,
            stream: OnceCell::new(),
            coordination,
        })
    }

    /// The stream that captures the tasks' subjects: looked up once, by the
    /// filter of any task.
    async fn stream(&self) -> Result<&Stream<()>, PublishError> {
        self.stream
            .get_or_try_init(|| async {
                // Refused, not transient: only an operator can upgrade it.
                self.inner
                    .version_ok(OLDEST_SERVER, "JetStream cluster mode")
                    .map_err(PublishError::Refused)?;
                let js = self.inner.jetstream();
                let sample = self.filter(&task_token(""));
                let name = js.stream_by_subject(sample.clone()).await.map_err(|e| {
                    self.unreachable(format!("no stream found for subject {sample}: {e}"))
                })?;
                js.get_stream_no_info(&name)
                    .await
                    .map_err(|e| self.unreachable(format!("cannot open stream {name}: {e}")))
            })
            .await
    }

    fn filter(&self, token: &str) -> String {
        self.filter_template.replace("{task}", token)
    }

    fn unreachable(&self, why: impl std::fmt::Display) -> PublishError {
        let why = why.to_string();
        self.coordination.failed(&why);
        PublishError::Transient(why)
    }

    /// One read of the stream, for readiness when no event tells.
    pub async fn probe(&self) {
        let Ok(stream) = self.stream().await else {
            return;
        };
        let probe = self.filter(&task_token(""));
        if self.last(stream, "", &probe).await.is_ok() {
            self.coordination.ok();
        }
    }

    /// The task's last message on the stream: its sequence (0: none) and,
    /// when its id is one of the task's event ids, the guard it stands for.
    async fn last(
        &self,
        stream: &Stream<()>,
        task_id: &str,
        filter: &str,
    ) -> Result<(u64, Option<Guard>), PublishError> {
        match stream
            .raw_message_builder()
            .last_by_subject(filter)
            .send()
            .await
        {
            Ok(message) => {
                let guard = message
                    .headers
                    .get(async_nats::header::NATS_MESSAGE_ID)
                    .map(|id| id.as_str().to_string())
                    .and_then(|id| {
                        state_of(task_id, &id).map(|state| Guard {
                            state,
                            id,
                            done: true,
                            at: 0,
                        })
                    });
                Ok((message.sequence, guard))
            }
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok((0, None)),
            Err(e) => {
                Err(self.unreachable(format!("cannot read the last message on {filter}: {e}")))
            }
        }
    }

    /// Read, decide, write conditionally: see the module docs.
    async fn guarded(&self, m: &Encoded) -> Published {
        let Some(state) = state_of(&m.key, &m.id) else {
            // Not an id hookbridge made: nothing to order it by.
            return self.publish_one(m).await;
        };
        let stream = self.stream().await?;
        let filter = self.filter(&task_token(&m.key));
        for _ in 0..MAX_RACES {
            let (last_sequence, guard) = self.last(stream, &m.key, &filter).await?;
            self.coordination.ok();
            if verdict(guard.as_ref(), state, &m.id) == Verdict::Suppress {
                tracing::debug!(task_id = %m.key, state = state.as_str(), "suppressed by the stream's last state");
                return Ok(Receipt::default());
            }
            let expect = Expect {
                filter: &filter,
                last_sequence,
            };
            match self.inner.send_expecting(m, &expect).await {
                Ok(receipt) => return Ok(receipt),
                // Another replica wrote the task meanwhile: decide again.
                Err(Checked::Moved) => continue,
                Err(Checked::Failed(e)) => return Err(e),
            }
        }
        Err(PublishError::Transient(format!(
            "task {} kept moving while its {} was published",
            m.key,
            state.as_str()
        )))
    }

    async fn publish_one(&self, m: &Encoded) -> Published {
        self.inner
            .publish(std::slice::from_ref(m))
            .await
            .into_iter()
            .next()
            .unwrap_or_else(|| Err(PublishError::Transient("no result".into())))
    }
}

impl Publisher for GuardedJetStream {
    fn name(&self) -> &'static str {
        "jetstream-cluster"
    }

    fn encode(&self, o: &Outgoing) -> Result<Encoded, EncodeError> {
        self.inner.encode(o)
    }

    fn publish<'a>(&'a self, batch: &'a [Encoded]) -> BoxFuture<'a, Vec<Published>> {
        async move { join_all(batch.iter().map(|m| self.guarded(m))).await }.boxed()
    }

    fn flush(&self, timeout: Duration) -> BoxFuture<'_, ()> {
        self.inner.flush(timeout)
    }
}
