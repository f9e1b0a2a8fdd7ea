//! The good sender, always from 127.0.0.1: an open loop of callbacks over a
//! keep-alive pool opened before the attack, a trickle of callbacks each on
//! a fresh connection, and (burst phase) 3,000 callbacks at once over 16
//! keep-alive connections. Every callback is counted: answered 200, or
//! lost with its kind.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use tokio::task::JoinSet;

use super::super::load::{Bodies, Conn, Target};
use super::super::report::micros;
use super::failure_kind;

/// The good sender's address; the attacks never use it.
pub const SENDER: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

pub struct Load {
    /// Pooled callbacks per second.
    pub rate: u64,
    /// Callbacks per second, each on a new connection.
    pub fresh_rate: f64,
    /// Keep-alive connections of the pool.
    pub pool: usize,
    pub warmup: Duration,
    pub duration: Duration,
    /// Longest wait for one answer; past it the callback counts as lost.
    pub timeout: Duration,
}

/// What became of the good callbacks.
#[derive(Default)]
pub struct Tally {
    /// Latency from the due time of callbacks due in the measured window
    /// and answered 200, microseconds.
    pub latency: Vec<u32>,
    pub sent: u64,
    pub statuses: BTreeMap<u16, u64>,
    /// Callbacks with no answer, by kind (reset, closed, timeout, ...).
    pub failures: BTreeMap<&'static str, u64>,
    /// Pooled connections found closed by the server before a callback was
    /// put on them (the callback went on a new one: not lost).
    pub stale: u64,
    /// The first error message of each kind.
    pub samples: BTreeMap<&'static str, String>,
}

impl Tally {
    /// Answered with anything but 200, or not answered.
    pub fn lost(&self) -> u64 {
        let refused: u64 = self
            .statuses
            .iter()
            .filter(|(s, _)| **s != 200)
            .map(|(_, n)| n)
            .sum();
        refused + self.failures.values().sum::<u64>()
    }

    pub fn merge(&mut self, other: Tally) {
        self.latency.extend(other.latency);
        self.sent += other.sent;
        for (s, n) in other.statuses {
            *self.statuses.entry(s).or_default() += n;
        }
        for (k, n) in other.failures {
            *self.failures.entry(k).or_default() += n;
        }
        self.stale += other.stale;
        for (k, m) in other.samples {
            self.samples.entry(k).or_insert(m);
        }
    }

    /// One callback's outcome; `latency` is kept when it was answered 200
    /// and `measured`.
    fn record(&mut self, outcome: anyhow::Result<u16>, latency: Duration, measured: bool) {
        self.sent += 1;
        match outcome {
            Ok(status) => {
                *self.statuses.entry(status).or_default() += 1;
                if status == 200 && measured {
                    self.latency.push(micros(latency));
                }
            }
            Err(e) => {
                let kind = failure_kind(&e);
                *self.failures.entry(kind).or_default() += 1;
                self.samples.entry(kind).or_insert_with(|| format!("{e:#}"));
            }
        }
    }

    /// "200=1000 429=3 reset=1" (every kind, lost or not).
    pub fn kinds(&self) -> String {
        let mut parts: Vec<String> = self
            .statuses
            .iter()
            .map(|(s, n)| format!("{s}={n}"))
            .collect();
        parts.extend(self.failures.iter().map(|(k, n)| format!("{k}={n}")));
        if parts.is_empty() {
            parts.push("none".into());
        }
        parts.join(" ")
    }
}

/// Sends one callback on `conn` (a new connection when `None`), connect
/// and answer within `timeout`; the connection is dropped when it failed.
async fn post(
    conn: &mut Option<Conn>,
    target: &Target,
    body: Bytes,
    timeout: Duration,
) -> anyhow::Result<u16> {
    let attempt = async {
        let c = match conn {
            Some(c) => c,
            None => conn.insert(
                Conn::open_from(target, Some(SENDER))
                    .await
                    .context("connect")?,
            ),
        };
        c.send(target, "POST", body).await.map(|(status, _)| status)
    };
    let outcome = match tokio::time::timeout(timeout, attempt).await {
        Ok(outcome) => outcome,
        Err(_) => Err(super::Timeout.into()),
    };
    if outcome.is_err() {
        *conn = None;
    }
    outcome
}

/// The pool (opened now, before the caller starts the attack) and the
/// fresh-connection trickle; `run` sends them on the timeline.
pub struct Sender {
    target: Arc<Target>,
    idle: Arc<Mutex<Vec<Conn>>>,
    bodies: Arc<Bodies>,
    /// The callbacks that warmed the pool up (counted, not measured).
    warm: Tally,
}

impl Sender {
    /// Opens the pool and sends one callback on each connection, so that
    /// the server sees a pool in use, as the provider's would be.
    pub async fn open(target: &Target, load: &Load) -> anyhow::Result<Self> {
        let bodies = Bodies::new();
        let mut pool = Vec::with_capacity(load.pool);
        let mut warm = Tally::default();
        for _ in 0..load.pool.max(1) {
            let mut conn = Some(
                Conn::open_from(target, Some(SENDER))
                    .await
                    .context("the good sender cannot connect")?,
            );
            let sent = Instant::now();
            let outcome = post(&mut conn, target, bodies.next(), load.timeout).await;
            warm.record(outcome, sent.elapsed(), false);
            pool.extend(conn);
        }
        Ok(Self {
            target: Arc::new(target.clone()),
            idle: Arc::new(Mutex::new(pool)),
            bodies: Arc::new(bodies),
            warm,
        })
    }

    /// Open loop: pooled callback `i` is due at `start + i / rate` and goes
    /// out then, on an idle pooled connection or, when none is idle, on a
    /// new one that joins the pool (as an HTTP client's pool does). The
    /// fresh ones run on their own timeline. Latency runs from the due
    /// time; every callback ends within `load.timeout` of leaving.
    pub async fn run(self, load: &Load) -> anyhow::Result<Tally> {
        anyhow::ensure!(load.rate > 0, "--rate must be positive");
        let start = Instant::now() + Duration::from_millis(20);
        let from = start + load.warmup;
        let end = from + load.duration;
        let total = ((load.warmup + load.duration).as_secs_f64() * load.rate as f64) as u64;
        let (due_tx, mut due_rx) = tokio::sync::mpsc::channel::<Instant>(1024);
        let rate = load.rate;
        // The OS timer, not tokio's millisecond wheel (see load::open_loop).
        let pacer = std::thread::Builder::new()
            .name("good-pacer".into())
            .spawn(move || {
                for i in 0..total {
                    let due = start + Duration::from_nanos(i * 1_000_000_000 / rate);
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                    if due_tx.blocking_send(due).is_err() {
                        break;
                    }
                }
            })
            .context("cannot start the pacing thread")?;
        let fresh = tokio::spawn(fresh(
            self.target.clone(),
            self.bodies.clone(),
            load.fresh_rate,
            load.timeout,
            start,
            from,
            end,
        ));
        let pool_max = load.pool.max(1) * 4;
        let mut sends = JoinSet::new();
        let mut tally = self.warm;
        while let Some(due) = due_rx.recv().await {
            while let Some(done) = sends.try_join_next() {
                tally.merge(done?);
            }
            let (target, body, idle, timeout) = (
                self.target.clone(),
                self.bodies.next(),
                self.idle.clone(),
                load.timeout,
            );
            sends.spawn(async move {
                let mut one = Tally::default();
                let mut conn = lock(&idle).pop();
                if conn.as_ref().is_some_and(Conn::is_closed) {
                    one.stale += 1;
                    conn = None;
                }
                let outcome = post(&mut conn, &target, body, timeout).await;
                one.record(outcome, due.elapsed(), due >= from);
                if let Some(conn) = conn {
                    let mut idle = lock(&idle);
                    if idle.len() < pool_max {
                        idle.push(conn);
                    }
                }
                one
            });
        }
        while let Some(done) = sends.join_next().await {
            tally.merge(done?);
        }
        tally.merge(fresh.await??);
        if pacer.join().is_err() {
            anyhow::bail!("the pacing thread panicked");
        }
        Ok(tally)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Callbacks at `rate` per second from `start` to `end`, each on
/// a connection of its own, closed after the answer.
async fn fresh(
    target: Arc<Target>,
    bodies: Arc<Bodies>,
    rate: f64,
    timeout: Duration,
    start: Instant,
    from: Instant,
    end: Instant,
) -> anyhow::Result<Tally> {
    let mut tally = Tally::default();
    if rate <= 0.0 {
        return Ok(tally);
    }
    let every = Duration::from_secs_f64(1.0 / rate);
    let mut sends = JoinSet::new();
    let mut due = start;
    while due < end {
        tokio::time::sleep_until(due.into()).await;
        let (target, body) = (target.clone(), bodies.next());
        sends.spawn(async move {
            let mut conn = None;
            let outcome = post(&mut conn, &target, body, timeout).await;
            (outcome, due.elapsed(), due >= from)
        });
        due += every;
    }
    while let Some(sent) = sends.join_next().await {
        let (outcome, latency, measured) = sent?;
        tally.record(outcome, latency, measured);
    }
    Ok(tally)
}

/// The sender's burst: `count` callbacks for distinct tasks over
/// `connections` keep-alive connections, each sent as soon as the previous
/// one on its connection was answered.
pub async fn burst(
    target: &Target,
    count: u64,
    connections: usize,
    timeout: Duration,
) -> anyhow::Result<(Tally, Duration)> {
    let target = Arc::new(target.clone());
    let bodies = Arc::new(Bodies::new());
    let tickets = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = JoinSet::new();
    for _ in 0..connections.max(1) {
        let (target, bodies, tickets) = (target.clone(), bodies.clone(), tickets.clone());
        workers.spawn(async move {
            let mut tally = Tally::default();
            let mut conn = None;
            while tickets.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < count {
                let sent = Instant::now();
                let outcome = post(&mut conn, &target, bodies.next(), timeout).await;
                tally.record(outcome, sent.elapsed(), true);
            }
            tally
        });
    }
    let mut tally = Tally::default();
    while let Some(worker) = workers.join_next().await {
        tally.merge(worker?);
    }
    Ok((tally, started.elapsed()))
}
