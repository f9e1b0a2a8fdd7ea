//! The instruments the data path updates for `/metrics`: labelled
//! counters and histograms. Rendering and serving them is
//! `crate::http::metrics`; this module imports nothing of the crate.
//!
//! Design, and why:
//!
//! - **No process-global recorder.** Each outbox owns its [`Metrics`]
//!   (inside its `Stats`), so every app in a process, like every test,
//!   counts only its own traffic and a scrape's values are exact.
//! - **Counters are plain atomics** owned by the code that counts (the
//!   outbox's `Stats`, the poller's `PollStats`, and the labelled ones
//!   here). Histograms are `prometheus-client` histograms (fixed buckets of
//!   atomics, nothing to drain).
//!
//! Every series exists from the start (zero until something happens), so
//! alert rules and dashboards never see a missing series.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use prometheus_client::metrics::histogram::Histogram;

/// Why a request body was rejected (`hookbridge_events_rejected_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// Over `server.body_limit_bytes` (413).
    TooLarge,
    /// Not a valid callback (400).
    Invalid,
    /// A registered task's callback without its token, or a wrong one (401).
    BadToken,
}

impl Reject {
    /// The label values, in the variants' order.
    pub const LABELS: [&'static str; 3] = ["too_large", "invalid", "bad_token"];
}

/// Why the relay dead-lettered an entry (`hookbridge_events_dead_lettered_total`;
/// the provider side's classes come from the poller's `PollStats`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dead {
    /// The stored bytes do not decode.
    Undecodable,
    /// The publisher cannot encode the event (error or panic).
    Unencodable,
    /// The broker refused it permanently.
    Refused,
}

impl Dead {
    /// The label values, in the variants' order.
    pub const LABELS: [&'static str; 3] = ["undecodable", "unencodable", "refused"];
}

/// Latencies, from half a millisecond to ten seconds.
/// Fine below 5 ms, where the answer-time objective (2 ms) lies.
const LATENCY: [f64; 17] = [
    0.00025, 0.0005, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];
/// Requests committed together (the writer takes at most 4096).
const GROUP: [f64; 11] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0, 4096.0,
];
/// An event's age when the broker acknowledged it: from 10 ms to an hour.
const AGE: [f64; 14] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0, 300.0, 900.0, 3600.0,
];

/// The instruments the data path updates; one set per outbox.
#[derive(Debug)]
pub struct Metrics {
    rejected: [AtomicU64; 3],
    /// Messages of a permanently refused batch sent again one by one.
    retried_alone: AtomicU64,
    dead: [AtomicU64; 3],
    /// TLS certificate reloads that failed (the current one was kept).
    tls_reload_failures: AtomicU64,
    answer: Histogram,
    group_commit: Histogram,
    fsync: Histogram,
    checkpoint: Histogram,
    publish: Histogram,
    age_at_publish: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            rejected: Default::default(),
            retried_alone: AtomicU64::new(0),
            dead: Default::default(),
            tls_reload_failures: AtomicU64::new(0),
            answer: Histogram::new(LATENCY),
            group_commit: Histogram::new(GROUP),
            fsync: Histogram::new(LATENCY),
            checkpoint: Histogram::new(LATENCY),
            publish: Histogram::new(LATENCY),
            age_at_publish: Histogram::new(AGE),
        }
    }
}

/// Observes the time from its creation to its drop.
pub struct Timer<'a> {
    histogram: &'a Histogram,
    started: Instant,
}

impl Drop for Timer<'_> {
    fn drop(&mut self) {
        self.histogram.observe(self.started.elapsed().as_secs_f64());
    }
}

impl Metrics {
    pub fn rejected(&self, why: Reject) {
        self.rejected[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// A batch was refused permanently: `n` messages are sent again alone,
    /// so only the ones that fail on their own become dead letters.
    pub fn retried_alone(&self, n: usize) {
        self.retried_alone.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Counts what one relay step moved to the dead letters, by class.
    pub fn relay_dead_lettered(&self, undecodable: usize, unencodable: usize, refused: usize) {
        for (why, n) in [
            (Dead::Undecodable, undecodable),
            (Dead::Unencodable, unencodable),
            (Dead::Refused, refused),
        ] {
            self.dead[why as usize].fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// Times a webhook answer, until the returned guard is dropped.
    pub fn time_answer(&self) -> Timer<'_> {
        Timer {
            histogram: &self.answer,
            started: Instant::now(),
        }
    }

    /// Times one durable commit (the fsync), returning what `commit` did.
    pub fn time_commit<T>(&self, requests: usize, commit: impl FnOnce() -> T) -> T {
        self.group_commit.observe(requests as f64);
        let _timer = Timer {
            histogram: &self.fsync,
            started: Instant::now(),
        };
        commit()
    }

    /// Times one checkpoint of the dedup records into the task store (the
    /// B-tree inserts and the durable commit), returning what `write` did.
    pub fn time_checkpoint<T>(&self, write: impl FnOnce() -> T) -> T {
        let _timer = Timer {
            histogram: &self.checkpoint,
            started: Instant::now(),
        };
        write()
    }

    /// One publish call that took `took`, and the `received_at` (ms) of
    /// each event the broker acknowledged in it, at `now_ms`.
    pub fn published(
        &self,
        took: std::time::Duration,
        received_at: impl IntoIterator<Item = i64>,
        now_ms: i64,
    ) {
        self.publish.observe(took.as_secs_f64());
        for at in received_at {
            self.age_at_publish
                .observe((now_ms - at).max(0) as f64 / 1000.0);
        }
    }

    /// A TLS certificate reload failed; the current certificate stays.
    pub fn tls_reload_failed(&self) {
        self.tls_reload_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Rejected bodies by reason: ([`Reject::LABELS`], count).
    pub fn rejected_by_reason(&self) -> [(&'static str, u64); 3] {
        by_label(Reject::LABELS, &self.rejected)
    }

    /// Dead letters of the relay by class: ([`Dead::LABELS`], count).
    pub fn dead_by_class(&self) -> [(&'static str, u64); 3] {
        by_label(Dead::LABELS, &self.dead)
    }

    pub fn retried_alone_total(&self) -> u64 {
        self.retried_alone.load(Ordering::Relaxed)
    }

    pub fn tls_reload_failures(&self) -> u64 {
        self.tls_reload_failures.load(Ordering::Relaxed)
    }

    /// The histograms, for a scrape to encode.
    pub fn histograms(&self) -> Histograms<'_> {
        Histograms {
            answer: &self.answer,
            group_commit: &self.group_commit,
            fsync: &self.fsync,
            checkpoint: &self.checkpoint,
            publish: &self.publish,
            age_at_publish: &self.age_at_publish,
        }
    }
}

/// The histograms of one [`Metrics`], read-only.
pub struct Histograms<'a> {
    /// Time to answer a callback once its body is read.
    pub answer: &'a Histogram,
    /// Requests committed together.
    pub group_commit: &'a Histogram,
    /// One write and fdatasync of the pending log.
    pub fsync: &'a Histogram,
    /// One checkpoint of the dedup records: inserts, commit and sync.
    pub checkpoint: &'a Histogram,
    /// One publish call.
    pub publish: &'a Histogram,
    /// An event's age when the broker acknowledged it.
    pub age_at_publish: &'a Histogram,
}

fn by_label(labels: [&'static str; 3], counters: &[AtomicU64; 3]) -> [(&'static str, u64); 3] {
    std::array::from_fn(|i| (labels[i], counters[i].load(Ordering::Relaxed)))
}
