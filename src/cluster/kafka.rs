//! Kafka cluster mode: task ownership by a consumer group, dedup and order
//! by one transaction per batch (the pattern Kafka Streams uses).
//!
//! - [`Intake`]: the relay's publisher. Each event goes to
//!   `cluster.internal_topic`, keyed by taskId (idempotent, `acks=all`), with
//!   its output topic in the `hookbridge-destination` header.
//! - [`Owner`]: a supervised worker in the group `cluster.group_id` on that
//!   topic. The group gives each partition, hence each task, to one replica
//!   at a time. For a batch of records the owner checks each against the
//!   task's [`Guard`], then in one transaction (`transactional.id` =
//!   `cluster.transactional_id`) writes the events that pass to their output
//!   topics, their new guards to `cluster.changelog_topic` (compacted, same
//!   partition number as the record came from) and the consumed offsets.
//!   Either all of it is visible to `read_committed` readers or none.
//! - A partition's guards are read back from its changelog partition before
//!   its first record is processed, after every rebalance, so a task that
//!   moves keeps its dedup and its state guard. Offsets are fetched with
//!   `require_stable` semantics (KIP-447), so a previous owner's pending
//!   transaction is settled before the new owner reads.
//! - Any error (a broker gone, a fenced producer, a rebalance mid-batch)
//!   aborts the transaction and restarts the session from the committed
//!   offsets; nothing is half-applied.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::future::BoxFuture;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

use super::{state_of, verdict, Coordination, Guard, Verdict};
use crate::clock::now_ms;
use crate::config::ClusterConfig;
use crate::publish::config::{librdkafka_key, KafkaConfig};
use crate::publish::kafka::{client_config, KafkaPublisher};
use crate::publish::{EncodeError, Encoded, Outgoing, Published, Publisher};

/// The header that carries an internal record's output topic.
pub const DESTINATION: &str = "hookbridge-destination";
/// Most records one transaction carries.
const MAX_BATCH: usize = 500;
/// How long the owner waits for more records once one arrived.
const LINGER: Duration = Duration::from_millis(5);
/// Bound of one transactional call or metadata request.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest restore of one changelog partition.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(120);
/// Idle time after which the owner probes the cluster.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// The relay's publisher in Kafka cluster mode.
pub struct Intake {
    inner: KafkaPublisher,
    internal_topic: String,
}

impl Intake {
    pub async fn new(config: KafkaConfig, internal_topic: String) -> anyhow::Result<Self> {
        Ok(Self {
            inner: KafkaPublisher::new(config).await?,
            internal_topic,
        })
    }
}

impl Publisher for Intake {
    fn name(&self) -> &'static str {
        "kafka-cluster"
    }

    fn encode(&self, o: &Outgoing) -> Result<Encoded, EncodeError> {
        let mut m = self.inner.encode(o)?;
        let output = std::mem::replace(&mut m.destination, self.internal_topic.clone());
        m.headers.push((DESTINATION, output));
        Ok(m)
    }

    fn publish<'a>(&'a self, batch: &'a [Encoded]) -> BoxFuture<'a, Vec<Published>> {
        self.inner.publish(batch)
    }

    fn flush(&self, timeout: Duration) -> BoxFuture<'_, ()> {
        self.inner.flush(timeout)
    }
}

/// Notes the partitions a rebalance moved, so the owner drops their guards
/// (read again from the changelog before their next record) and keeps the
/// others'. With the cooperative protocol a rebalance names only what
/// moved; with the eager one, everything.
#[derive(Default)]
struct OwnerContext {
    moved: Mutex<Moved>,
}

#[derive(Default)]
struct Moved {
    /// A rebalance failed: nothing known can be trusted.
    all: bool,
    partitions: Vec<i32>,
}

impl OwnerContext {
    /// What moved since the last call.
    fn take_moved(&self) -> Moved {
        std::mem::take(&mut *self.moved.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl ClientContext for OwnerContext {}

impl ConsumerContext for OwnerContext {
    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let mut moved = self.moved.lock().unwrap_or_else(|e| e.into_inner());
        match rebalance {
            Rebalance::Assign(tpl) | Rebalance::Revoke(tpl) => moved
                .partitions
                .extend(tpl.elements().iter().map(|e| e.partition())),
            Rebalance::Error(_) => moved.all = true,
        }
    }
}

/// The restore consumer's context: reaching the end of a partition is
/// what it waits for, not an error to log.
struct RestoreContext;

impl ClientContext for RestoreContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if !is_end_of_partition(&error) {
            tracing::warn!(%error, reason, "changelog restore");
        }
    }
}

/// The end of a partition, however librdkafka wraps it (the client context
/// gets it as a global error, `poll` as a partition's).
fn is_end_of_partition(error: &KafkaError) -> bool {
    matches!(error, KafkaError::PartitionEOF(_))
        || error.rdkafka_error_code() == Some(RDKafkaErrorCode::PartitionEOF)
}

impl ConsumerContext for RestoreContext {}

/// One consumed internal record, owned.
struct Incoming {
    partition: i32,
    offset: i64,
    key: String,
    payload: Vec<u8>,
    headers: Vec<(String, Vec<u8>)>,
    /// When the relay produced it, ms since the epoch (0: unknown).
    produced_ms: i64,
}

impl Incoming {
    fn of(m: &impl Message) -> Self {
        let headers = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                    .collect()
            })
            .unwrap_or_default();
        Self {
            partition: m.partition(),
            offset: m.offset(),
            key: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
            payload: m.payload().unwrap_or_default().to_vec(),
            headers,
            produced_ms: m.timestamp().to_millis().unwrap_or_default(),
        }
    }

    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }
}

/// What one transaction writes for one record that passed the guard.
struct Output {
    partition: i32,
    topic: String,
    key: String,
    payload: Vec<u8>,
    headers: Vec<(String, Vec<u8>)>,
    guard: Vec<u8>,
}

/// How one batch's transaction ended.
enum Outcome {
    Committed,
    /// Aborted cleanly: the session goes on and consumes the batch again.
    Aborted(String),
}

/// The owner worker; cheap to clone, each run builds its own clients.
#[derive(Clone)]
pub struct Owner {
    kafka: KafkaConfig,
    cluster: ClusterConfig,
    window_ms: i64,
    coordination: Arc<Coordination>,
}

type Guards = HashMap<i32, HashMap<String, Guard>>;

impl Owner {
    pub fn new(
        kafka: KafkaConfig,
        cluster: ClusterConfig,
        window_secs: u64,
        coordination: Arc<Coordination>,
    ) -> Self {
        Self {
            kafka,
            cluster,
            window_ms: (window_secs as i64).saturating_mul(1000),
            coordination,
        }
    }

    /// Runs sessions until `stop`; a failed session is logged, reported
    /// as unreachable coordination, and started again after a backoff.
    pub async fn run(self, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        let mut backoff = Duration::from_millis(500);
        loop {
            let result = tokio::select! {
                r = self.session(&mut backoff) => r,
                _ = &mut stop => return,
            };
            if let Err(e) = result {
                // A rebalance or a fenced transaction mid-batch is routine;
                // only failing to (re)join is unreachable coordination
                // (reported by `session`).
                tracing::warn!(
                    error = format!("{e:#}"),
                    "cluster owner session failed; starting again"
                );
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = &mut stop => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    /// The connection settings every client of the owner shares.
    fn base(&self) -> ClientConfig {
        let mut cc = ClientConfig::new();
        cc.set("bootstrap.servers", &self.kafka.brokers)
            .set("reconnect.backoff.max.ms", "1000");
        for (key, value) in &self.kafka.options {
            cc.set(librdkafka_key(key), value.expose());
        }
        cc
    }

    /// One consumer and one transactional producer, until an error. Dropping
    /// the future (on stop) drops both; no transaction is open between
    /// batches, and an open one is aborted by the broker's timeout.
    async fn session(&self, backoff: &mut Duration) -> anyhow::Result<()> {
        let (producer, consumer) = match self.join().await {
            Ok(clients) => clients,
            Err(e) => {
                self.coordination.failed(&format!("{e:#}"));
                return Err(e);
            }
        };
        let restorer = match self.restorer().await {
            Ok(restorer) => restorer,
            Err(e) => {
                drop_off_runtime("the owner consumer", consumer).await;
                return Err(e);
            }
        };
        self.coordination.ok();
        let result = self
            .process_until_error(&producer, &consumer, &restorer, backoff)
            .await;
        // Leaving the group blocks; not on the runtime.
        drop_off_runtime("the owner consumer", (consumer, restorer)).await;
        result
    }

    /// The consumer that reads changelog partitions back, kept for the
    /// session so that a restore does not pay for new connections.
    async fn restorer(&self) -> anyhow::Result<Arc<BaseConsumer<RestoreContext>>> {
        let mut cc = self.base();
        cc.set("group.id", format!("{}-restore", self.cluster.group_id))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            // The end of an empty or read partition is answered at once
            // rather than after the broker's 500 ms wait for new records.
            .set("fetch.wait.max.ms", "10")
            .set("isolation.level", "read_committed");
        blocking(move || Ok(Arc::new(cc.create_with_context(RestoreContext)?)))
            .await
            .context("cannot create the changelog reader")
    }

    /// The transactional producer and the consumer in the owner group.
    async fn join(&self) -> anyhow::Result<(FutureProducer, Arc<StreamConsumer<OwnerContext>>)> {
        self.ensure_topics().await?;
        let mut pc = client_config(&self.kafka);
        pc.set("transactional.id", &self.cluster.transactional_id);
        let producer: FutureProducer = blocking(move || {
            let producer: FutureProducer = pc.create()?;
            producer.init_transactions(CALL_TIMEOUT)?;
            Ok(producer)
        })
        .await
        .context("cannot start the transactional producer")?;
        let mut cc = self.base();
        cc.set("group.id", &self.cluster.group_id)
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("auto.offset.reset", "earliest")
            // A replica that dies unannounced gives its tasks up this fast.
            .set("session.timeout.ms", "6000")
            // Members learn of a rebalance at their next heartbeat: a short one
            // lets the group settle (cooperative: two rounds) in about a second.
            .set("heartbeat.interval.ms", "500")
            // A rebalance moves only the partitions that must move; the others
            // keep being processed, their guards kept.
            // (Static membership, `group.instance.id`, was tried with it: a
            // replica restarted during a broker fault came back with no
            // partitions and never consumed again.)
            .set("partition.assignment.strategy", "cooperative-sticky");
        let topic = self.cluster.internal_topic.clone();
        let consumer: Arc<StreamConsumer<OwnerContext>> = Arc::new(
            blocking(move || {
                let consumer: StreamConsumer<OwnerContext> =
                    cc.create_with_context(OwnerContext::default())?;
                consumer.subscribe(&[&topic])?;
                Ok(consumer)
            })
            .await
            .context("cannot join the owner group")?,
        );
        Ok((producer, consumer))
    }

    async fn process_until_error(
        &self,
        producer: &FutureProducer,
        consumer: &Arc<StreamConsumer<OwnerContext>>,
        restorer: &Arc<BaseConsumer<RestoreContext>>,
        backoff: &mut Duration,
    ) -> anyhow::Result<()> {
        let mut guards = Guards::new();
        loop {
            // Guards of newly assigned partitions are read before their
            // first record arrives, not when it does.
            self.forget_moved(consumer, &mut guards);
            let assigned = consumer.assignment().map(|tpl| {
                tpl.elements()
                    .iter()
                    .map(|e| e.partition())
                    .filter(|p| !guards.contains_key(p))
                    .collect::<Vec<_>>()
            });
            if let Ok(missing) = assigned {
                if !missing.is_empty() {
                    guards.extend(self.restore(restorer, missing).await?);
                }
            }
            let mut batch = Vec::new();
            match tokio::time::timeout(PROBE_EVERY, consumer.recv()).await {
                Err(_) => {
                    self.probe(consumer).await;
                    continue;
                }
                Ok(Ok(m)) => batch.push(Incoming::of(&m)),
                Ok(Err(e)) => {
                    // A broker gone or a leader moving: librdkafka reconnects
                    // and goes on by itself. Rejoining the group would move
                    // every partition and read every guard again.
                    self.consumer_error(e)?;
                    continue;
                }
            }
            while batch.len() < MAX_BATCH {
                match tokio::time::timeout(LINGER, consumer.recv()).await {
                    Ok(Ok(m)) => batch.push(Incoming::of(&m)),
                    Ok(Err(e)) => {
                        self.consumer_error(e)?;
                        break;
                    }
                    Err(_) => break,
                }
            }
            self.forget_moved(consumer, &mut guards);
            let mut firsts = BTreeMap::new();
            for record in &batch {
                firsts.entry(record.partition).or_insert(record.offset);
            }
            let (records, oldest) = (
                batch.len(),
                batch
                    .iter()
                    .map(|r| r.produced_ms)
                    .min()
                    .unwrap_or_default(),
            );
            let started = Instant::now();
            let outcome = self
                .transact(producer, consumer, restorer, &mut guards, batch)
                .await?;
            tracing::debug!(
                records,
                waited_ms = started_ms(started) - oldest,
                took_ms = started.elapsed().as_millis() as u64,
                "owner batch"
            );
            match outcome {
                Outcome::Committed => {
                    self.coordination.ok();
                    *backoff = Duration::from_millis(500);
                }
                Outcome::Aborted(why) => {
                    // Typically a rebalance mid-batch. Nothing of the batch
                    // is visible: read it again (the partitions still ours)
                    // against guards read again.
                    tracing::info!(reason = %why, "owner transaction aborted; consuming the batch again");
                    guards.clear();
                    self.rewind(consumer, firsts).await;
                }
            }
        }
    }

    /// Drops the guards of the partitions a rebalance moved: each may have
    /// been another owner's meanwhile, so it is read again. The others'
    /// stay valid.
    fn forget_moved(&self, consumer: &StreamConsumer<OwnerContext>, guards: &mut Guards) {
        let moved = consumer.context().take_moved();
        if moved.all {
            guards.clear();
        }
        for partition in moved.partitions {
            guards.remove(&partition);
        }
    }

    /// An error from the owner's consumer: `Err` ends the session only when
    /// the client cannot go on (fatal); others are noted and passed.
    fn consumer_error(&self, e: KafkaError) -> anyhow::Result<()> {
        if is_fatal(&e) {
            return Err(anyhow::Error::new(e).context("consuming the internal topic"));
        }
        tracing::debug!(error = %e, "owner consumer (librdkafka recovers by itself)");
        self.coordination.failed(&e.to_string());
        Ok(())
    }

    /// Seeks each partition back to `firsts`; a partition no longer
    /// assigned refuses, and its new owner starts from the committed offset.
    async fn rewind(
        &self,
        consumer: &Arc<StreamConsumer<OwnerContext>>,
        firsts: BTreeMap<i32, i64>,
    ) {
        let (consumer, topic) = (consumer.clone(), self.cluster.internal_topic.clone());
        let rewound = tokio::task::spawn_blocking(move || {
            for (partition, offset) in firsts {
                if let Err(e) =
                    consumer.seek(&topic, partition, Offset::Offset(offset), CALL_TIMEOUT)
                {
                    // Expected when the partition moved to another owner.
                    tracing::debug!(partition, error = %e, "cluster: cannot rewind a partition");
                }
            }
        })
        .await;
        if let Err(e) = rewound {
            tracing::warn!(error = %e, "cluster: the rewind of the owner consumer failed");
        }
    }

    async fn probe(&self, consumer: &Arc<StreamConsumer<OwnerContext>>) {
        let (consumer, topic) = (consumer.clone(), self.cluster.internal_topic.clone());
        let result = blocking(move || {
            consumer.fetch_metadata(Some(&topic), Duration::from_secs(2))?;
            Ok(())
        })
        .await;
        match result {
            Ok(()) => self.coordination.ok(),
            Err(e) => self.coordination.failed(&format!("{e:#}")),
        }
    }

    /// Applies the guard to `batch` and commits the outcome in one
    /// transaction.
    async fn transact(
        &self,
        producer: &FutureProducer,
        consumer: &StreamConsumer<OwnerContext>,
        restorer: &Arc<BaseConsumer<RestoreContext>>,
        guards: &mut Guards,
        batch: Vec<Incoming>,
    ) -> anyhow::Result<Outcome> {
        let mut missing: Vec<i32> = batch
            .iter()
            .map(|r| r.partition)
            .filter(|p| !guards.contains_key(p))
            .collect();
        missing.sort_unstable();
        missing.dedup();
        if !missing.is_empty() {
            let started = Instant::now();
            guards.extend(self.restore(restorer, missing.clone()).await?);
            tracing::debug!(partitions = ?missing, took_ms = started.elapsed().as_millis() as u64, "guards restored");
        }
        let (outputs, offsets) = apply_guards(guards, batch)?;
        self.commit(producer, consumer, outputs, offsets).await
    }

    /// One transaction: the outputs and their guards, then the consumed
    /// offsets; aborted as a whole on any error.
    async fn commit(
        &self,
        producer: &FutureProducer,
        consumer: &StreamConsumer<OwnerContext>,
        outputs: Vec<Output>,
        offsets: BTreeMap<i32, i64>,
    ) -> anyhow::Result<Outcome> {
        let mut tpl = TopicPartitionList::new();
        for (partition, offset) in offsets {
            tpl.add_partition_offset(
                &self.cluster.internal_topic,
                partition,
                Offset::Offset(offset),
            )?;
        }
        let metadata = consumer
            .group_metadata()
            .context("the consumer has no group metadata")?;
        let (producer, changelog) = (producer.clone(), self.cluster.changelog_topic.clone());
        blocking(move || {
            producer.begin_transaction()?;
            let sent = (|| {
                for o in &outputs {
                    let mut headers = OwnedHeaders::new_with_capacity(o.headers.len());
                    for (key, value) in &o.headers {
                        headers = headers.insert(Header {
                            key,
                            value: Some(value.as_slice()),
                        });
                    }
                    enqueue(
                        &producer,
                        FutureRecord::to(&o.topic)
                            .key(o.key.as_str())
                            .payload(o.payload.as_slice())
                            .headers(headers),
                    )?;
                    enqueue(
                        &producer,
                        FutureRecord::to(&changelog)
                            .partition(o.partition)
                            .key(o.key.as_str())
                            .payload(o.guard.as_slice()),
                    )?;
                }
                producer.send_offsets_to_transaction(&tpl, &metadata, CALL_TIMEOUT)?;
                producer.commit_transaction(CALL_TIMEOUT)
            })();
            match sent {
                Ok(()) => Ok(Outcome::Committed),
                Err(e) => {
                    let aborted = producer.abort_transaction(CALL_TIMEOUT);
                    if aborted.is_ok() && producer.client().fatal_error().is_none() {
                        Ok(Outcome::Aborted(e.to_string()))
                    } else {
                        Err(e.into())
                    }
                }
            }
        })
        .await
        .context("the owner's transaction failed")
    }

    /// The guards of `partitions`, read from their changelog partitions
    /// (committed records only) with one consumer, without the ones older
    /// than the dedup window.
    async fn restore(
        &self,
        consumer: &Arc<BaseConsumer<RestoreContext>>,
        partitions: Vec<i32>,
    ) -> anyhow::Result<Guards> {
        let topic = self.cluster.changelog_topic.clone();
        let oldest = now_ms() - self.window_ms;
        let what = format!("{topic} partitions {partitions:?}");
        let consumer = consumer.clone();
        blocking(move || {
            let mut tpl = TopicPartitionList::new();
            for p in &partitions {
                tpl.add_partition_offset(&topic, *p, Offset::Beginning)?;
            }
            consumer.assign(&tpl)?;
            let deadline = Instant::now() + RESTORE_TIMEOUT;
            let mut guards: Guards = partitions.iter().map(|p| (*p, HashMap::new())).collect();
            // EOF comes again each time new records were read after it: count
            // each partition once.
            let mut open: std::collections::BTreeSet<i32> = partitions.iter().copied().collect();
            while !open.is_empty() {
                if Instant::now() > deadline {
                    bail!("restoring took too long");
                }
                match consumer.poll(Duration::from_millis(500)) {
                    None => continue,
                    Some(Err(KafkaError::PartitionEOF(p))) => {
                        open.remove(&p);
                    }
                    Some(Err(e)) if is_fatal(&e) => return Err(e.into()),
                    // A broker gone: librdkafka reconnects; the deadline bounds it.
                    Some(Err(_)) => continue,
                    Some(Ok(m)) => {
                        let tasks = guards.entry(m.partition()).or_default();
                        let key = String::from_utf8_lossy(m.key().unwrap_or_default());
                        let guard = m
                            .payload()
                            .and_then(|p| serde_json::from_slice::<Guard>(p).ok());
                        match guard {
                            Some(g) if g.at >= oldest => {
                                tasks.insert(key.into_owned(), g);
                            }
                            _ => {
                                tasks.remove(key.as_ref());
                            }
                        }
                    }
                }
            }
            consumer.unassign()?;
            Ok(guards)
        })
        .await
        .with_context(|| format!("cannot restore {what}"))
    }

    /// Creates the internal and changelog topics when missing.
    async fn ensure_topics(&self) -> anyhow::Result<()> {
        let cc = self.base();
        let admin: AdminClient<DefaultClientContext> = blocking(move || Ok(cc.create()?)).await?;
        let c = &self.cluster;
        let replication = || TopicReplication::Fixed(c.replication_factor);
        let internal = NewTopic::new(&c.internal_topic, c.partitions, replication());
        let changelog = NewTopic::new(&c.changelog_topic, c.partitions, replication())
            .set("cleanup.policy", "compact");
        let options = AdminOptions::new().operation_timeout(Some(CALL_TIMEOUT));
        let results = admin
            .create_topics([&internal, &changelog], &options)
            .await
            .context("cannot create the cluster topics")?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => bail!("cannot create topic {topic}: {code}"),
            }
        }
        drop_off_runtime("the admin client", admin).await;
        Ok(())
    }
}

/// Checks each record of `batch` against its task's guard, in order: the
/// records that advance their task, with the task's new guard (also kept in
/// `guards`), and the next offset to consume of each partition.
fn apply_guards(
    guards: &mut Guards,
    batch: Vec<Incoming>,
) -> anyhow::Result<(Vec<Output>, BTreeMap<i32, i64>)> {
    let mut offsets = BTreeMap::new();
    let mut outputs = Vec::new();
    for record in batch {
        offsets.insert(record.partition, record.offset + 1);
        let task = guards.entry(record.partition).or_default();
        let (Some(id), Some(topic)) = (record.header("event-id"), record.header(DESTINATION))
        else {
            tracing::error!(
                partition = record.partition,
                offset = record.offset,
                "internal record without event-id or destination; skipped"
            );
            continue;
        };
        let Some(state) = state_of(&record.key, &id) else {
            tracing::error!(task_id = %record.key, event_id = %id, "internal record with a foreign event id; skipped");
            continue;
        };
        if verdict(task.get(&record.key), state, &id) != Verdict::Advance {
            tracing::debug!(task_id = %record.key, state = state.as_str(), "suppressed by the cluster guard");
            continue;
        }
        let guard = Guard {
            state,
            id,
            done: true,
            at: now_ms(),
        };
        let value = serde_json::to_vec(&guard).context("encoding a guard")?;
        task.insert(record.key.clone(), guard);
        let headers = record
            .headers
            .into_iter()
            .filter(|(k, _)| k != DESTINATION)
            .collect();
        outputs.push(Output {
            partition: record.partition,
            topic,
            key: record.key,
            payload: record.payload,
            headers,
            guard: value,
        });
    }
    Ok((outputs, offsets))
}

/// Enqueues one record of the open transaction, waiting while librdkafka's
/// queue is full; `commit_transaction` waits for its delivery.
fn enqueue(
    producer: &FutureProducer,
    mut record: FutureRecord<'_, str, [u8]>,
) -> Result<(), KafkaError> {
    loop {
        match producer.send_result(record) {
            Ok(_delivery) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                record = r;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// Whether the client behind `error` cannot go on. librdkafka reports a
/// broker gone, a leader moving or a timeout to the consumer as well, and
/// recovers from them by itself.
fn is_fatal(error: &KafkaError) -> bool {
    error.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal)
}

/// `at` in ms since the epoch.
fn started_ms(at: Instant) -> i64 {
    now_ms() - at.elapsed().as_millis() as i64
}

/// Runs blocking librdkafka calls off the runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .context("a blocking Kafka call panicked")?
}

/// Drops librdkafka clients off the runtime (closing one, leaving a group
/// block); a panic while doing so is logged, never dropped.
async fn drop_off_runtime<T: Send + 'static>(what: &'static str, clients: T) {
    if let Err(e) = tokio::task::spawn_blocking(move || drop(clients)).await {
        tracing::warn!(error = %e, what, "cluster: closing a Kafka client failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_end_of_a_partition_is_recognised_however_it_is_wrapped() {
        assert!(is_end_of_partition(&KafkaError::PartitionEOF(3)));
        assert!(is_end_of_partition(&KafkaError::Global(
            RDKafkaErrorCode::PartitionEOF
        )));
        assert!(!is_end_of_partition(&KafkaError::Global(
            RDKafkaErrorCode::BrokerTransportFailure
        )));
    }

    fn record(offset: i64, task: &str, state: crate::event::State) -> Incoming {
        Incoming {
            partition: 0,
            offset,
            key: task.into(),
            payload: b"{}".to_vec(),
            headers: vec![
                (
                    "event-id".into(),
                    crate::event::event_id(task, state).into_bytes(),
                ),
                (DESTINATION.into(), b"out".to_vec()),
            ],
            produced_ms: 0,
        }
    }

    #[test]
    fn a_batch_advances_each_task_in_order_and_consumes_every_record() {
        use crate::event::State;
        let mut guards = Guards::new();
        let batch = vec![
            record(5, "t1", State::Waiting),
            record(6, "t1", State::Generating),
            record(7, "t1", State::Waiting),
            record(8, "t2", State::Success),
            record(9, "t2", State::Fail),
        ];
        let (outputs, offsets) = apply_guards(&mut guards, batch).unwrap();
        let written: Vec<(&str, String)> = outputs
            .iter()
            .map(|o| {
                (
                    o.key.as_str(),
                    String::from_utf8_lossy(&o.guard).into_owned(),
                )
            })
            .collect();
        assert_eq!(
            written.len(),
            3,
            "the stale waiting and the second terminal are not written"
        );
        assert!(written[1].1.contains("\"generating\""), "{written:?}");
        assert!(outputs
            .iter()
            .all(|o| o.topic == "out" && o.headers.iter().all(|(k, _)| k != DESTINATION)));
        assert_eq!(
            offsets,
            BTreeMap::from([(0, 10)]),
            "every record is consumed, written or not"
        );
        assert_eq!(guards[&0]["t1"].state, State::Generating);
        assert_eq!(guards[&0]["t2"].state, State::Success);
    }

    #[test]
    fn a_broker_gone_does_not_end_the_owner_session() {
        let gone = KafkaError::MessageConsumption(RDKafkaErrorCode::BrokerTransportFailure);
        assert!(!is_fatal(&gone));
        assert!(!is_fatal(&KafkaError::MessageConsumption(
            RDKafkaErrorCode::AllBrokersDown
        )));
        assert!(is_fatal(&KafkaError::MessageConsumption(
            RDKafkaErrorCode::Fatal
        )));
    }
}
