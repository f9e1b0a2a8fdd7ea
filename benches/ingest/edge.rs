//! The edge under attack (issue 19): good callbacks from the sender's
//! address, 127.0.0.1, while an attack comes from other loopback addresses
//! (127.0.0.2 and up), against hookbridge with its default limits.
//!
//! One phase per run: the good sender opens its keep-alive pool, the attack
//! starts and gets a second to reach its size, then the good callbacks go
//! out on a fixed timeline (pooled, plus a trickle each on a fresh
//! connection; in the burst phase also 3,000 at once). Printed: good p50/p99
//! from the due time and its ratio to the quiet phase's p99, every good
//! callback LOST (any answer but 200, or none) by kind, what the attack's
//! requests got, and hookbridge's CPU time (from /proc/PID/stat) per
//! refused attack request. The goal of every phase: p99 within 2x of
//! quiet, 0 lost.

#[path = "edge/attack.rs"]
mod attack;
#[path = "edge/good.rs"]
mod good;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

pub use attack::Sizes;
pub use good::Load;

use super::load::Target;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Attack {
    /// No attack: the reference.
    Quiet,
    /// The sender's own burst: 3,000 callbacks from 127.0.0.1 over 16
    /// keep-alive connections, as fast as answered.
    Burst,
    /// Invalid 1 MiB bodies on keep-alive connections.
    Junk,
    /// Connections that declare a body and send a byte of it every few seconds.
    Slow,
    /// New connections each doing `GET /healthz`, held open a while.
    Churn,
    /// Valid-looking callbacks for random task ids.
    Forged,
    /// Half a request head, then nothing (slow-loris).
    Loris,
}

pub struct Settings {
    pub attack: Attack,
    pub load: Load,
    pub sizes: Sizes,
    /// Callbacks in the burst phase, and their connections.
    pub burst: u64,
    pub burst_connections: usize,
    /// Seconds the attack runs before the good callbacks start.
    pub ramp: Duration,
    /// hookbridge's process id, for its CPU time.
    pub server_pid: Option<u32>,
    /// The quiet phase's good p99, for the ratio.
    pub quiet_p99_ms: Option<f64>,
}

/// The good sender's answer timed out.
#[derive(Debug, thiserror::Error)]
#[error("no answer within the timeout")]
struct Timeout;

/// What a failed request looked like: the kinds the report counts.
fn failure_kind(e: &anyhow::Error) -> &'static str {
    for cause in e.chain() {
        if cause.is::<Timeout>() {
            return "timeout";
        }
        if let Some(h) = cause.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() {
                return "closed-without-answer";
            }
            if h.is_canceled() {
                return "canceled";
            }
            if h.is_closed() {
                return "closed";
            }
            if h.is_body_write_aborted() {
                return "body-write-aborted";
            }
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            return match io.kind() {
                ConnectionReset => "reset",
                ConnectionRefused => "connect-refused",
                BrokenPipe => "broken-pipe",
                ConnectionAborted => "aborted",
                TimedOut => "timeout",
                _ => "io-error",
            };
        }
    }
    "other-error"
}

/// utime + stime of `pid`, in clock ticks (USER_HZ, 100 a second).
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(") ")?.1;
    let fields: Vec<&str> = after.split(' ').collect();
    // After the name: state is the 1st field, utime the 12th, stime the 13th.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn percentile_ms(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    f64::from(sorted[rank - 1]) / 1e3
}

/// "-" for a figure that does not exist (NaN, no reference).
fn fig(v: Option<f64>, decimals: usize) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.decimals$}"),
        _ => "-".into(),
    }
}

pub async fn run(target: Target, s: Settings) -> anyhow::Result<()> {
    let sizes = &s.sizes;
    let attackers = format!("127.0.0.2-127.0.0.{}", 1 + sizes.attackers.max(1));
    let what = match s.attack {
        Attack::Quiet => "no attack (the reference)".to_string(),
        Attack::Burst => format!(
            "the sender's burst: {} callbacks from 127.0.0.1 over {} keep-alive connections",
            s.burst, s.burst_connections
        ),
        Attack::Junk => format!(
            "{} connections posting invalid 1 MiB bodies ({}) from {attackers}",
            sizes.junk_connections,
            per_sec(sizes.junk_rate)
        ),
        Attack::Slow => format!(
            "{} connections declaring Content-Length: {}, a byte every {:.0} s, from {attackers}",
            sizes.slow_connections,
            sizes.slow_content_length,
            sizes.slow_byte_every.as_secs_f64()
        ),
        Attack::Churn => format!(
            "{} new connections/s, each GET /healthz then held {:.1} s, from {attackers}",
            sizes.churn_rate,
            sizes.churn_hold.as_secs_f64()
        ),
        Attack::Forged => format!(
            "valid-looking callbacks for random task ids on {} connections ({}) from {attackers}",
            sizes.forged_connections,
            per_sec(sizes.forged_rate)
        ),
        Attack::Loris => format!(
            "{} connections sending half a request head, from {attackers}",
            sizes.loris_connections
        ),
    };
    println!("== edge {:?}: {what}", s.attack);
    println!(
        "good sender (127.0.0.1): {}/s on {} keep-alive connections + {}/s on fresh connections, {:.0} s (+{:.0} s warm-up)",
        s.load.rate,
        s.load.pool,
        s.load.fresh_rate,
        s.load.duration.as_secs_f64(),
        s.load.warmup.as_secs_f64()
    );
    // The pool exists before the attack, as the provider's would.
    let sender = good::Sender::open(&target, &s.load).await?;
    let cpu0 = s.server_pid.and_then(cpu_ticks);
    let started = Instant::now();
    let stop = CancellationToken::new();
    let counts = Arc::new(attack::Counts::default());
    let attacker = {
        let (target, stop, counts, sizes) =
            (target.clone(), stop.clone(), counts.clone(), sizes.clone());
        let kind = s.attack;
        std::thread::Builder::new()
            .name("attack".into())
            .spawn(move || -> anyhow::Result<()> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async move {
                    match kind {
                        Attack::Quiet | Attack::Burst => {}
                        Attack::Junk => attack::junk(&target, &sizes, &stop, &counts).await,
                        Attack::Slow => attack::slow_bodies(&target, &sizes, &stop, &counts).await,
                        Attack::Churn => attack::churn(&target, &sizes, &stop, &counts).await,
                        Attack::Forged => attack::forged(&target, &sizes, &stop, &counts).await,
                        Attack::Loris => attack::loris(&target, &sizes, &stop, &counts).await,
                    }
                });
                Ok(())
            })?
    };
    if !matches!(s.attack, Attack::Quiet | Attack::Burst) {
        tokio::time::sleep(s.ramp).await;
    }
    let burst = async {
        if s.attack != Attack::Burst {
            return Ok(None);
        }
        // In the measured window, beside the steady callbacks.
        tokio::time::sleep(s.load.warmup).await;
        good::burst(&target, s.burst, s.burst_connections, s.load.timeout)
            .await
            .map(Some)
    };
    let (steady, burst) = tokio::join!(sender.run(&s.load), burst);
    let (mut steady, burst) = (steady?, burst?);
    stop.cancel();
    attacker
        .join()
        .map_err(|_| anyhow::anyhow!("the attack thread panicked"))??;
    let span = started.elapsed();
    let cpu1 = s.server_pid.and_then(cpu_ticks);

    // The good callbacks: the steady ones' latency, every one's fate.
    let mut latency = std::mem::take(&mut steady.latency);
    latency.sort_unstable();
    let (p50, p90, p99, max) = (
        percentile_ms(&latency, 0.50),
        percentile_ms(&latency, 0.90),
        percentile_ms(&latency, 0.99),
        percentile_ms(&latency, 1.0),
    );
    let ratio = s.quiet_p99_ms.filter(|q| *q > 0.0).map(|q| p99 / q);
    let mut all = good::Tally::default();
    all.merge(steady);
    let mut burst_line = None;
    if let Some((b, took)) = burst {
        burst_line = Some((
            b.statuses.get(&200).copied().unwrap_or(0),
            b.statuses.get(&429).copied().unwrap_or(0),
            b.statuses
                .iter()
                .filter(|(s, _)| **s != 200 && **s != 429)
                .map(|(_, n)| n)
                .sum::<u64>(),
            b.failures.values().sum::<u64>(),
            took,
            b.kinds(),
        ));
        all.merge(b);
    }
    let lost = all.lost();
    println!(
        "good callbacks        : {} sent; {} ({} pooled connections found closed and replaced)",
        all.sent,
        all.kinds(),
        all.stale
    );
    println!(
        "good latency from due time, ms p50/p90/p99/max : {p50:.2} / {p90:.2} / {p99:.2} / {max:.2}  (n={}, answered 200 in the measured window)",
        latency.len()
    );
    println!(
        "p99 against quiet     : {}x (quiet p99 {} ms)",
        fig(ratio, 2),
        fig(s.quiet_p99_ms, 2)
    );
    let lost_kinds: Vec<String> = all
        .statuses
        .iter()
        .filter(|(s, _)| **s != 200)
        .map(|(s, n)| format!("{s}={n}"))
        .chain(all.failures.iter().map(|(k, n)| format!("{k}={n}")))
        .collect();
    println!(
        "good callbacks LOST   : {lost}{}",
        if lost_kinds.is_empty() {
            String::new()
        } else {
            format!(" ({})", lost_kinds.join(" "))
        }
    );
    for (kind, e) in &all.samples {
        println!("first {kind:<16}: {e}");
    }
    if let Some((ok, s429, other, errors, took, kinds)) = &burst_line {
        println!(
            "burst                 : {} callbacks in {:.2} s: 200={ok} 429={s429} other={other} connection-errors={errors} ({kinds})",
            s.burst,
            took.as_secs_f64()
        );
    }
    let requests = counts.requests.load(Ordering::Relaxed);
    let refused = counts.refused.load(Ordering::Relaxed);
    if !matches!(s.attack, Attack::Quiet | Attack::Burst) {
        println!(
            "attack                : {requests} requests over {:.1} s, refused {refused}; answers: {}; connects failed {}",
            span.as_secs_f64(),
            counts.outcomes(),
            counts.connect_failed.load(Ordering::Relaxed)
        );
        if let Some(e) = counts.sample() {
            println!("attack's first error  : {e}");
        }
    }
    let cpu_s = match (cpu0, cpu1) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / 100.0),
        _ => None,
    };
    let per_refused = cpu_s
        .filter(|_| refused > 0)
        .map(|c| c * 1e6 / refused as f64);
    let per_request = cpu_s
        .filter(|_| requests > 0)
        .map(|c| c * 1e6 / requests as f64);
    println!(
        "hookbridge CPU        : {} s over {:.1} s; {} us per refused request; {} us per attack request",
        fig(cpu_s, 2),
        span.as_secs_f64(),
        fig(per_refused, 0),
        fig(per_request, 0)
    );
    let p99_ok = match ratio {
        Some(r) => r <= 2.0,
        None => s.attack == Attack::Quiet,
    };
    println!(
        "goal (p99 <= 2x quiet, 0 lost): {} (p99 {}x, lost {lost})",
        if p99_ok && lost == 0 { "MET" } else { "MISSED" },
        fig(ratio, 2)
    );
    let (b200, b429, bother, berr) =
        burst_line
            .as_ref()
            .map_or(("-".into(), "-".into(), "-".into(), "-".into()), |b| {
                (
                    b.0.to_string(),
                    b.1.to_string(),
                    b.2.to_string(),
                    b.3.to_string(),
                )
            });
    println!(
        "RESULT p50_ms={} p99_ms={} p99_ratio={} lost={lost} good_sent={} attack_requests={requests} refused={refused} hookbridge_cpu_s={} cpu_us_per_refused={} burst_200={b200} burst_429={b429} burst_other={bother} burst_errors={berr}",
        fig(Some(p50), 2),
        fig(Some(p99), 2),
        fig(ratio, 2),
        all.sent,
        fig(cpu_s, 2),
        fig(per_refused, 0),
    );
    Ok(())
}

fn per_sec(rate: u64) -> String {
    if rate == 0 {
        "as fast as answered".into()
    } else {
        format!("{rate}/s in all")
    }
}
