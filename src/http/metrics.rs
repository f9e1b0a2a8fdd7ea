//! `GET /metrics` (admin listener): the Prometheus text format (0.0.4).
//!
//! A scrape builds a fresh registry from the instruments (the outbox's
//! `Stats` and [`Metrics`], the poller's [`PollStats`]), adds the gauges
//! read at that moment (backlog, oldest age, tasks, readiness), and
//! encodes it: nothing is registered twice and nothing grows. Reading the
//! gauges touches redb, so [`serve`] renders on the blocking pool, never
//! on an async worker. The families are registered one kind at a time:
//! plain counters, labelled counters, gauges, histograms.

use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use super::{ApiError, AppState};
use crate::metrics::Metrics;
use crate::outbox::Stats;
use crate::poll::PollStats;

/// What a scrape reads besides the counters: the values that cost a redb
/// read or a look at the workers.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    pub publisher: &'static str,
    pub oldest_pending_age_ms: Option<i64>,
    pub tracked_tasks: u64,
    /// What their records cost (`outbox.max_tracked_bytes`).
    pub tracked_bytes: u64,
    pub registered_tasks: u64,
    pub held_callbacks: u64,
    /// What the held callbacks cost (`provider.max_held_bytes`).
    pub held_bytes: u64,
    pub ready: bool,
}

/// The whole exposition: counters of `stats` and `poll`, the histograms,
/// and the gauges of `now`.
pub fn render(stats: &Stats, poll: &PollStats, now: &Snapshot) -> String {
    let mut registry = Registry::default();
    counters(&mut registry, stats, poll);
    labelled_counters(&mut registry, stats, poll, now);
    gauges(&mut registry, stats, poll, now);
    histograms(&mut registry, &stats.metrics);
    let mut out = String::new();
    if let Err(e) = prometheus_text::encode(&mut out, &registry) {
        // Writing into a String does not fail; should it, say so.
        tracing::error!(error = %e, "cannot encode the metrics");
    }
    out
}

fn load(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// The counters without labels.
fn counters(r: &mut Registry, stats: &Stats, poll: &PollStats) {
    for (name, help, value) in [
        (
            "hookbridge_events_accepted",
            "Callbacks stored durably for publishing (conflicts included)",
            load(&stats.accepted),
        ),
        (
            "hookbridge_events_duplicate",
            "Callbacks answered 200 as a repeat of an accepted (taskId, state)",
            load(&stats.duplicates),
        ),
        (
            "hookbridge_events_stale",
            "Callbacks answered 200 but not published: the task had reached a later state",
            load(&stats.stale),
        ),
        (
            "hookbridge_events_conflict",
            "Terminal states after another terminal state, published with conflictsWith",
            load(&stats.conflicts),
        ),
        (
            "hookbridge_client_penalties",
            "Client addresses put in penalty for spending their refusal budget",
            load(&stats.penalties),
        ),
        (
            "hookbridge_storage_errors",
            "Outbox commits that failed (their requests were refused)",
            load(&stats.storage_errors),
        ),
        (
            "hookbridge_dead_letters_dropped",
            "Oldest dead letters deleted at outbox.max_dead_letters or max_dead_letter_bytes",
            load(&stats.dead_dropped),
        ),
        (
            "hookbridge_dead_letters_buried",
            "Dead letters deleted for good by an operator (POST /admin/dead-letters/bury)",
            load(&stats.dead_buried),
        ),
        (
            "hookbridge_log_damaged_ranges",
            "Damaged ranges of the pending log found at start (skipped, kept as dead letters)",
            load(&stats.log_damaged_ranges),
        ),
        (
            "hookbridge_log_damaged_bytes",
            "Bytes in those damaged ranges",
            load(&stats.log_damaged_bytes),
        ),
        (
            "hookbridge_log_torn_bytes",
            "Bytes of a torn final write (never answered) cut from the pending log at start",
            load(&stats.log_torn_bytes),
        ),
        (
            "hookbridge_storage_files_set_aside",
            "Damaged database files (outbox.redb, tasks.redb) set aside at start for fresh ones",
            load(&stats.stores_set_aside),
        ),
        (
            "hookbridge_provider_polls",
            "Status requests sent to the provider (each attempt)",
            load(&poll.polls),
        ),
        (
            "hookbridge_provider_poll_errors",
            "Status requests that failed: 429, 5xx, network, timeout, unreadable",
            load(&poll.poll_errors),
        ),
        (
            "hookbridge_provider_auth_failures",
            "401/403 answers of the provider that halted polling and verification",
            load(&poll.auth_failures),
        ),
        (
            "hookbridge_tls_reload_failures",
            "TLS certificate reloads that failed (the current certificate was kept)",
            stats.metrics.tls_reload_failures(),
        ),
    ] {
        r.register(name, help, ConstCounter::new(value));
    }
}

/// A counter family with one label.
type Labelled = Family<[(&'static str, &'static str); 1], Counter>;

/// The counters with one label (reason, class, broker, task).
fn labelled_counters(r: &mut Registry, stats: &Stats, poll: &PollStats, now: &Snapshot) {
    let m = &stats.metrics;
    let provider_dead = [
        ("stuck", load(&poll.stuck)),
        ("unknown_task", load(&poll.unknown_tasks)),
        ("unconfirmed", load(&poll.unconfirmed)),
        (
            "unreadable_registration",
            load(&poll.unreadable_registrations),
        ),
    ];
    for (name, help, label, values) in [
        (
            "hookbridge_events_rejected",
            "Request bodies refused with a 4xx, by reason",
            "reason",
            m.rejected_by_reason().to_vec(),
        ),
        (
            "hookbridge_requests_refused",
            "Requests refused unread or unstored: outbox full or reserved for known senders (503), client in penalty (closed at accept, or 429), no connection slot (closed at accept), over others_per_sec (429)",
            "reason",
            vec![
                ("full", load(&stats.refused_full)),
                ("reserved", load(&stats.refused_reserved)),
                ("penalty", load(&stats.refused_penalty)),
                ("no_slot", load(&stats.refused_connections)),
                ("rate_limited", load(&stats.rate_limited)),
            ],
        ),
        (
            "hookbridge_task_records_evicted",
            "Dedup records evicted at outbox.max_tracked_tasks/max_tracked_bytes, by task state",
            "task",
            vec![
                ("finished", load(&stats.evicted_finished)),
                ("unfinished", load(&stats.evicted_unfinished)),
            ],
        ),
        (
            "hookbridge_events_published",
            "Events acknowledged by the broker",
            "broker",
            vec![(now.publisher, load(&stats.published))],
        ),
        (
            "hookbridge_publish_retries",
            "Messages sent again, by error class",
            "class",
            vec![
                ("transient", load(&stats.publish_retries)),
                ("refused", load(&stats.refusals)),
                ("isolation", m.retried_alone_total()),
            ],
        ),
        (
            "hookbridge_events_dead_lettered",
            "Events moved to the dead letters, by reason class",
            "class",
            m.dead_by_class().into_iter().chain(provider_dead).collect(),
        ),
    ] {
        let family = Labelled::default();
        for (value, n) in values {
            family.get_or_create(&[(label, value)]).inc_by(n);
        }
        r.register(name, help, family);
    }
}

/// The gauges: the backlog, what the stores hold, progress, readiness.
fn gauges(r: &mut Registry, stats: &Stats, poll: &PollStats, now: &Snapshot) {
    let seconds = |ms: i64| ms as f64 / 1000.0;
    for (name, help, value) in [
        (
            "hookbridge_outbox_pending_events",
            "Events stored and not yet acknowledged by the broker",
            load(&stats.pending) as f64,
        ),
        (
            "hookbridge_relay_refused_events",
            "Pending events the broker refused where they go, each waiting out its own backoff",
            load(&stats.refusing) as f64,
        ),
        (
            "hookbridge_outbox_pending_bytes",
            "Bytes of the pending events",
            load(&stats.pending_bytes) as f64,
        ),
        (
            "hookbridge_outbox_oldest_pending_age_seconds",
            "Age of the oldest pending event (0 when none)",
            seconds(now.oldest_pending_age_ms.unwrap_or(0)),
        ),
        (
            "hookbridge_outbox_dead_letters",
            "Dead letters kept now",
            load(&stats.dead) as f64,
        ),
        (
            "hookbridge_outbox_tracked_tasks",
            "Tasks with a dedup record within the window",
            now.tracked_tasks as f64,
        ),
        (
            "hookbridge_outbox_tracked_bytes",
            "Bytes of the dedup records (task id + 65 each), against outbox.max_tracked_bytes",
            now.tracked_bytes as f64,
        ),
        (
            "hookbridge_relay_last_progress_timestamp_seconds",
            "When the relay last moved the queue forward or found it empty (Unix time)",
            seconds(stats.relay_progress_at.load(Ordering::Relaxed)),
        ),
        (
            "hookbridge_registered_tasks",
            "Registered tasks not finished yet (polled when their callback is late)",
            now.registered_tasks as f64,
        ),
        (
            "hookbridge_held_callbacks",
            "Callbacks held until the provider confirms them (verify mode)",
            now.held_callbacks as f64,
        ),
        (
            "hookbridge_held_callback_bytes",
            "Bytes of the held callbacks, against provider.max_held_bytes",
            now.held_bytes as f64,
        ),
        (
            "hookbridge_poll_halted",
            "1 when the provider refused the API key and polling stopped",
            flag(poll.halted().is_some()),
        ),
        (
            "hookbridge_ready",
            "1 when /readyz answers 200",
            flag(now.ready),
        ),
    ] {
        r.register(name, help, ConstGauge::new(value));
    }
}

fn histograms(r: &mut Registry, m: &Metrics) {
    let h = m.histograms();
    for (name, help, histogram) in [
        (
            "hookbridge_webhook_answer_duration_seconds",
            "Time to answer a callback once its body is read: parse, dedup, the shared fsync",
            h.answer,
        ),
        (
            "hookbridge_outbox_group_commit_size",
            "Requests written together in one synced group of the pending log",
            h.group_commit,
        ),
        (
            "hookbridge_outbox_fsync_duration_seconds",
            "Time of one write and fdatasync of the pending log (a group commit)",
            h.fsync,
        ),
        (
            "hookbridge_outbox_checkpoint_duration_seconds",
            "Time of one checkpoint of the dedup records into the task store: inserts, commit, sync",
            h.checkpoint,
        ),
        (
            "hookbridge_publish_duration_seconds",
            "Time of one publish call (a batch) until the broker answered",
            h.publish,
        ),
        (
            "hookbridge_event_age_at_publish_seconds",
            "From an event's receivedAt to the broker's acknowledgement",
            h.age_at_publish,
        ),
    ] {
        r.register(name, help, histogram.clone());
    }
}

fn flag(on: bool) -> f64 {
    f64::from(u8::from(on))
}

/// `GET /metrics`. The gauges read redb: on the blocking pool.
pub async fn serve(State(state): State<AppState>) -> Result<Response, ApiError> {
    let body = tokio::task::spawn_blocking(move || {
        let status = state
            .outbox
            .status()
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        let registry = |e: crate::poll::RegistryError| {
            tracing::warn!(error = %e, "cannot read the task registry's sizes; reporting 0");
            (0, 0)
        };
        // A registry that cannot be counted is a warning of `/readyz` (its
        // gauges say 0 for want of a value, and the error is logged).
        let (registered_tasks, held_callbacks) =
            state.tasks.registry.counts().unwrap_or_else(registry);
        let (_, held_bytes) = state.tasks.registry.held_size().unwrap_or_else(registry);
        let now = Snapshot {
            publisher: state.publisher_name,
            oldest_pending_age_ms: status.oldest_pending_age_ms,
            tracked_tasks: status.tasks_tracked,
            tracked_bytes: state.outbox.tracked_bytes(),
            registered_tasks,
            held_callbacks,
            held_bytes,
            ready: super::ready::problems(&state.health, &state.outbox).is_empty(),
        };
        Ok::<_, ApiError>(render(state.outbox.stats(), &state.tasks.stats, &now))
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    Ok((
        [(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)],
        body,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Reject;

    #[test]
    fn every_series_exists_from_the_start_with_its_help() {
        let stats = Stats::default();
        stats.metrics.rejected(Reject::BadToken);
        stats.metrics.relay_dead_lettered(0, 2, 1);
        stats.metrics.time_commit(3, || ());
        let text = render(&stats, &PollStats::default(), &Snapshot::default());
        let lines = text.lines().map(|l| Ok(l.to_string()));
        let scrape = prometheus_parse::Scrape::parse(lines).unwrap();
        let names: std::collections::BTreeSet<&str> =
            scrape.samples.iter().map(|s| s.metric.as_str()).collect();
        assert_eq!(names.len(), 53, "{names:#?}");
        for name in &names {
            assert!(name.starts_with("hookbridge_"), "{name}");
            let family = ["_count", "_sum"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|base| names.contains(base))
                .unwrap_or(name);
            assert!(scrape.docs.contains_key(family), "{family} has a HELP line");
        }
        assert!(text.contains("hookbridge_events_rejected_total{reason=\"bad_token\"} 1\n"));
        assert!(text.contains("hookbridge_events_dead_lettered_total{class=\"unencodable\"} 2\n"));
        assert!(
            text.contains("hookbridge_outbox_group_commit_size_sum 3.0\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE hookbridge_ready gauge\nhookbridge_ready 0.0\n"));
    }
}
