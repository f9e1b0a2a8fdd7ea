//! The accepted range of every duration, size and count, in one table.
//!
//! A value outside its range is refused at start with the key named: a
//! number that only makes sense near zero or near `u64::MAX` either turns a
//! protection off (`dedup_window_secs = u64::MAX` overflows to "expired"),
//! makes a check lie (`stall_secs = u64::MAX`), or makes a timer fire so
//! early that nothing can succeed (`body_timeout_ms = 1`).

use super::{Config, ConfigError, PublisherConfig};

/// One checked setting: its key, its value, and the inclusive bounds.
struct Range {
    key: &'static str,
    value: u64,
    min: u64,
    max: u64,
}

const SEC_PER_DAY: u64 = 86_400;
const MS_PER_HOUR: u64 = 3_600_000;
const MIB: u64 = 1024 * 1024;

fn r(key: &'static str, value: impl TryInto<u64>, min: u64, max: u64) -> Range {
    // A value that does not even fit u64 is out of range by definition.
    let value = value.try_into().unwrap_or(u64::MAX);
    Range {
        key,
        value,
        min,
        max,
    }
}

/// A retry backoff in milliseconds: its first delay (1 ms to a minute),
/// then its longest (from the first to an hour).
fn backoff(first: (&'static str, u64), longest: (&'static str, u64)) -> [Range; 2] {
    [
        r(first.0, first.1, 1, 60_000),
        r(longest.0, longest.1, first.1, MS_PER_HOUR),
    ]
}

/// Every range of `config`, the section's own ones only when it is in use.
fn ranges(c: &Config) -> Vec<Range> {
    let (s, o, h, p, rc) = (&c.server, &c.outbox, &c.health, &c.provider, &c.reconcile);
    let mut out = vec![
        r(
            "server.header_timeout_ms",
            s.header_timeout_ms,
            100,
            600_000,
        ),
        r(
            "server.body_timeout_ms",
            s.body_timeout_ms,
            1_000,
            MS_PER_HOUR,
        ),
        r(
            "server.shutdown_timeout_ms",
            s.shutdown_timeout_ms,
            1,
            600_000,
        ),
        r("server.max_header_bytes", s.max_header_bytes, 1024, MIB),
        r("server.max_connections", s.max_connections, 1, 100_000),
        r(
            "server.rate_limit.max_clients",
            s.rate_limit.max_clients,
            1,
            10_000_000,
        ),
        r("outbox.max_pending", o.max_pending, 1, 100_000_000),
        r("outbox.max_pending_bytes", o.max_pending_bytes, 1, 1 << 40),
        r(
            "outbox.dedup_window_secs",
            o.dedup_window_secs,
            1,
            365 * SEC_PER_DAY,
        ),
        r("outbox.relay_batch", o.relay_batch, 1, 100_000),
        r(
            "outbox.relay_batch_bytes",
            o.relay_batch_bytes,
            64 * 1024,
            1024 * MIB,
        ),
    ];
    out.extend(backoff(
        ("outbox.retry_initial_ms", o.retry_initial_ms),
        ("outbox.retry_max_ms", o.retry_max_ms),
    ));
    out.extend([
        r("outbox.refusal_attempts", o.refusal_attempts, 1, 1_000),
        r("outbox.shutdown_grace_ms", o.shutdown_grace_ms, 1, 600_000),
        r("outbox.keep_rejected", o.keep_rejected, 0, 100_000),
        r(
            "outbox.max_tracked_tasks",
            o.max_tracked_tasks,
            1,
            1_000_000_000,
        ),
        r("outbox.cache_mib", o.cache_mib, 1, 65_536),
        r("health.stall_secs", h.stall_secs, 1, SEC_PER_DAY),
        r("trace.max_bytes", c.trace.max_bytes, MIB, 16 * 1024 * MIB),
        r("trace.max_per_task", c.trace.max_per_task, 1, 1_000),
        r(
            "telemetry.export_timeout_ms",
            c.telemetry.export_timeout_ms,
            100,
            60_000,
        ),
        r("health.restart_backoff_ms", h.restart_backoff_ms, 1, 30_000),
        r("health.max_restarts", h.max_restarts, 0, 10_000),
        r(
            "health.restart_window_secs",
            h.restart_window_secs,
            1,
            SEC_PER_DAY,
        ),
        r(
            "provider.request_timeout_ms",
            p.request_timeout_ms,
            100,
            600_000,
        ),
        r("provider.max_in_flight", p.max_in_flight, 1, 1024),
        r("provider.requests_per_sec", p.requests_per_sec, 1, 100_000),
        r("provider.max_retries", p.max_retries, 0, 100),
    ]);
    out.extend(backoff(
        ("provider.retry_initial_ms", p.retry_initial_ms),
        ("provider.retry_max_ms", p.retry_max_ms),
    ));
    out.extend([
        r("provider.max_held", p.max_held, 1, 100_000_000),
        r(
            "provider.registry_cache_mib",
            p.registry_cache_mib,
            1,
            65_536,
        ),
        r(
            "reconcile.first_poll_after_secs",
            rc.first_poll_after_secs,
            0,
            7 * SEC_PER_DAY,
        ),
        r(
            "reconcile.deadline_secs",
            rc.deadline_secs,
            1,
            30 * SEC_PER_DAY,
        ),
        r(
            "reconcile.poll_initial_ms",
            rc.poll_initial_ms,
            1,
            MS_PER_HOUR,
        ),
        r(
            "reconcile.poll_max_ms",
            rc.poll_max_ms,
            rc.poll_initial_ms,
            24 * MS_PER_HOUR,
        ),
        r(
            "reconcile.unknown_task_grace_secs",
            rc.unknown_task_grace_secs,
            0,
            SEC_PER_DAY,
        ),
    ]);
    if let Some(tls) = &s.tls {
        out.push(r(
            "server.tls.reload_check_ms",
            tls.reload_check_ms,
            100,
            24 * MS_PER_HOUR,
        ));
    }
    if c.cluster.enabled {
        out.push(r("cluster.drain_ms", c.cluster.drain_ms, 0, 600_000));
    }
    match &c.publisher {
        PublisherConfig::File(_) => {}
        PublisherConfig::Kafka(k) => {
            out.push(r(
                "publisher.message_timeout_ms",
                k.message_timeout_ms,
                100,
                MS_PER_HOUR,
            ));
        }
        PublisherConfig::Nats(n) => {
            out.push(r(
                "publisher.ack_timeout_ms",
                n.ack_timeout_ms,
                100,
                600_000,
            ));
            if let Some(stream) = &n.stream {
                let window = stream.duplicate_window_secs;
                out.push(r(
                    "publisher.stream.duplicate_window_secs",
                    window,
                    1,
                    7 * SEC_PER_DAY,
                ));
            }
        }
    }
    out
}

/// Refuses the first value outside its range, naming its key and the range.
pub(super) fn check(config: &Config) -> Result<(), ConfigError> {
    for range in ranges(config) {
        if range.value < range.min || range.value > range.max {
            return Err(ConfigError::Invalid {
                key: range.key,
                reason: format!(
                    "must be between {} and {} (is {})",
                    range.min, range.max, range.value
                ),
            });
        }
    }
    Ok(())
}
