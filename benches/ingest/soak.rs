//! The long-run figures (issue 25): a data dir pre-filled with millions of
//! tracked tasks, then an open-loop load of new tasks at a fixed rate, with
//! every figure per window (a minute in the soak, 10 s in the cold start):
//!
//! - the latency of each request from its due time (no coordinated omission),
//!   p50/p99/p99.9/max, from every request;
//! - hookbridge's own answer histogram and the pending log's write + fdatasync
//!   and the checkpoint's transaction (inserts, commit, sync), each the diff of
//!   two scrapes of `/metrics` at the window's ends (bucket bounds: "<= x ms");
//! - hookbridge's resident set (VmRSS) and the tracked tasks at the window's
//!   end, and the machine's load average (the cores are shared).
//!
//! `prefill` fills a data dir the way a long-running bridge leaves it:
//! COUNT distinct tasks appended through `hookbridge::outbox::Outbox` (group
//! commit from many concurrent appenders, as the server does), all of them
//! acknowledged as published, the outbox closed (its last checkpoint
//! written). Their dedup records are then in the task store, nothing pending.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hookbridge::config::OutboxConfig;
use hookbridge::outbox::Outbox;

use super::dedup_size::append_distinct;
use super::load::{self, Conn, Target};
use super::report::Percentiles;

/// Appends COUNT distinct tasks into DIR's outbox, acknowledges them all and
/// closes it.
pub async fn prefill(dir: &Path, count: u64, concurrency: usize) -> anyhow::Result<()> {
    println!(
        "== prefill: {count} tracked tasks, {concurrency} concurrent appenders, in {}",
        dir.display()
    );
    let config = OutboxConfig {
        data_dir: dir.to_path_buf(),
        ..OutboxConfig::default()
    };
    let outbox = Outbox::open(&config)?;
    let tracked_before = outbox.status()?.tasks_tracked;
    let start = Instant::now();
    // In steps that stay under the backlog cap; each step's events are
    // acknowledged as the relay would after the broker's ack.
    let step = config.max_pending.clamp(1, 500_000);
    let mut done = 0;
    while done < count {
        let n = step.min(count - done);
        let (seqs, _) = append_distinct(&outbox, n, concurrency).await?;
        for chunk in seqs.chunks(50_000) {
            outbox.complete(chunk.to_vec(), vec![]).await?;
        }
        done += n;
    }
    let appended = start.elapsed().as_secs_f64();
    let tracked = outbox.status()?.tasks_tracked;
    outbox.close().await;
    let total = start.elapsed().as_secs_f64();
    println!(
        "prefill: {count} tasks in {appended:.1} s ({:.0}/s), closed after {total:.1} s; tracked {tracked_before} -> {tracked}",
        count as f64 / appended
    );
    println!("RESULT prefill_s={total:.1} tracked={tracked}");
    Ok(())
}

/// What the soak measures, and how.
pub struct Settings {
    pub rate: u64,
    pub warmup: Duration,
    pub duration: Duration,
    pub window: Duration,
    pub connections: usize,
    pub server_pid: Option<u32>,
    /// Printed in front of each window's line ("minute", "10 s").
    pub label: String,
}

/// One scrape at a window's end.
#[derive(Default, Clone)]
struct Sample {
    /// Whether `/metrics` answered (RSS and load are read all the same).
    scraped: bool,
    /// Histogram name (without the prefix and `_duration_seconds`) ->
    /// cumulative count by bucket bound, in seconds (`+Inf` as infinity).
    buckets: BTreeMap<String, Vec<(f64, f64)>>,
    tracked: Option<f64>,
    rss_mib: Option<f64>,
    load1: Option<String>,
}

const HISTOGRAMS: [&str; 3] = ["webhook_answer", "outbox_fsync", "outbox_checkpoint"];

pub async fn run(target: Target, admin: Target, s: Settings) -> anyhow::Result<()> {
    let windows = (s.duration.as_secs_f64() / s.window.as_secs_f64()).ceil() as usize;
    println!(
        "== soak: {}/s new tasks for {:.0} s (+{:.0} s warm-up), figures per {} window, against {target}",
        s.rate,
        s.duration.as_secs_f64(),
        s.warmup.as_secs_f64(),
        s.label
    );
    let metrics = admin.with_path("/metrics");
    let first = scrape(&metrics, s.server_pid).await;
    // The open loop starts 20 ms from now (see `load::open_loop`).
    let from = tokio::time::Instant::now() + Duration::from_millis(20) + s.warmup;
    let (window, pid) = (s.window, s.server_pid);
    let sampler = tokio::spawn(async move {
        let mut samples = Vec::with_capacity(windows + 1);
        for k in 0..=windows {
            tokio::time::sleep_until(from + window * k as u32).await;
            samples.push(scrape(&metrics, pid).await);
        }
        samples
    });
    let report = load::open_loop(target, s.rate, s.warmup, s.duration, s.connections).await?;
    let samples = sampler.await?;

    let per = s.window.as_secs().max(1) as u32;
    let mut by_window: Vec<Vec<u32>> = vec![Vec::new(); windows.max(1)];
    for &(second, us) in &report.by_second {
        let w = ((second / per) as usize).min(by_window.len() - 1);
        by_window[w].push(us);
    }
    let ok: u64 = report
        .statuses
        .iter()
        .filter(|(status, _)| (200..300).contains(*status))
        .map(|(_, n)| n)
        .sum();
    let all = report.statuses.values().sum::<u64>() + report.errors;
    println!(
        "answers: {ok} 2xx of {all} ({} errors{})",
        report.errors,
        report
            .first_error
            .as_deref()
            .map_or(String::new(), |e| format!(", first: {e}"))
    );
    println!(
        "{:<8} {:>6} | {:>29} | {:>23} | {:>26} | {:>20} | {:>6} {:>9} {:>5}",
        s.label,
        "n",
        "from due ms p50/p99/p99.9/max",
        "own answer p50/p99/p99.9",
        "fsync n p99/p99.9/max (ms)",
        "checkpoint n p99/max",
        "RSS",
        "tracked",
        "load1"
    );
    let mut worst = (0.0f64, 0.0f64);
    let mut rss = Vec::new();
    let samples: Vec<Sample> = std::iter::once(first).chain(samples).collect();
    for (w, latencies) in by_window.iter_mut().enumerate() {
        let lat = Percentiles::of(latencies);
        let (p99, p999) = (lat.ms(0.99), lat.ms(0.999));
        if !lat.is_empty() {
            worst = (worst.0.max(p99), worst.1.max(p999));
        }
        // Sample 0 is before the warm-up; 1 is the window's start.
        let (a, b) = (samples.get(w + 1), samples.get(w + 2));
        let diff = |name: &str| match (a, b) {
            (Some(a), Some(b)) if a.scraped && b.scraped => Some(diff(a, b, name)),
            _ => None,
        };
        let own = diff("webhook_answer").map_or("-".into(), |d| {
            format!("{}/{}/{}", q(&d, 0.5), q(&d, 0.99), q(&d, 0.999))
        });
        let fsync = diff("outbox_fsync").map_or("-".into(), |d| {
            format!(
                "{:.0} {}/{}/{}",
                total(&d),
                q(&d, 0.99),
                q(&d, 0.999),
                q(&d, 1.0)
            )
        });
        let checkpoint = diff("outbox_checkpoint").map_or("-".into(), |d| {
            format!("{:.0} {}/{}", total(&d), q(&d, 0.99), q(&d, 1.0))
        });
        let rss_mib = b.and_then(|b| b.rss_mib);
        rss.extend(rss_mib);
        println!(
            "{:<8} {:>6} | {:>29} | {:>23} | {:>26} | {:>20} | {:>6} {:>9} {:>5}",
            w + 1,
            lat.len(),
            format!(
                "{:.2}/{:.2}/{:.2}/{:.1}",
                lat.ms(0.5),
                p99,
                p999,
                lat.ms(1.0)
            ),
            own,
            fsync,
            checkpoint,
            rss_mib.map_or("-".into(), |r| format!("{r:.0}")),
            b.and_then(|b| b.tracked)
                .map_or("-".into(), |t| format!("{t:.0}")),
            b.and_then(|b| b.load1.clone())
                .unwrap_or_else(|| "-".into()),
        );
    }
    let rss_first = rss.first().copied().unwrap_or(f64::NAN);
    let rss_last = rss.last().copied().unwrap_or(f64::NAN);
    let rss_max = rss.iter().copied().fold(f64::NAN, f64::max);
    println!(
        "worst window: p99 {:.2} ms, p99.9 {:.2} ms (goals: 2 ms, 10 ms); RSS {rss_first:.0} -> {rss_last:.0} MiB (max {rss_max:.0})",
        worst.0, worst.1
    );
    let mut every = report.latency;
    let lat = Percentiles::of(&mut every);
    println!(
        "whole run from due ms p50/p99/p99.9/max: {:.2}/{:.2}/{:.2}/{:.1}",
        lat.ms(0.5),
        lat.ms(0.99),
        lat.ms(0.999),
        lat.ms(1.0)
    );
    println!(
        "RESULT rps={:.0} p50_ms={:.2} p99_ms={:.2} p999_ms={:.2} max_ms={:.1} worst_p99_ms={:.2} worst_p999_ms={:.2} rss_first_mib={rss_first:.0} rss_last_mib={rss_last:.0} rss_max_mib={rss_max:.0} errors={} cpu_s={:.2}",
        ok as f64 / s.duration.as_secs_f64(),
        lat.ms(0.5),
        lat.ms(0.99),
        lat.ms(0.999),
        lat.ms(1.0),
        worst.0,
        worst.1,
        report.errors,
        super::report::cpu_secs()
    );
    Ok(())
}

/// The histograms, tracked tasks, RSS and load average now. Each scrape
/// on a connection of its own: the admin listener closes idle ones.
async fn scrape(metrics: &Target, pid: Option<u32>) -> Sample {
    let mut sample = Sample::default();
    let answer = async {
        let mut conn = Conn::open(metrics).await?;
        conn.send(metrics, "GET", Bytes::new()).await
    };
    match answer.await {
        Ok((200, body)) => {
            sample.scraped = true;
            parse_metrics(&String::from_utf8_lossy(&body), &mut sample);
        }
        Ok((status, _)) => eprintln!("soak: GET {metrics}: {status}"),
        Err(e) => eprintln!("soak: GET {metrics}: {e:#}"),
    }
    if let Some(pid) = pid {
        sample.rss_mib = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|status| {
                let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
                let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
                Some(kib / 1024.0)
            });
    }
    sample.load1 = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string));
    sample
}

/// The histograms and the tracked tasks of a `/metrics` text.
fn parse_metrics(text: &str, sample: &mut Sample) {
    for name in HISTOGRAMS {
        sample.buckets.entry(name.to_string()).or_default();
    }
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("hookbridge_") else {
            continue;
        };
        if let Some(value) = rest.strip_prefix("outbox_tracked_tasks ") {
            sample.tracked = value.trim().parse().ok();
            continue;
        }
        let Some((name, rest)) = rest.split_once("_duration_seconds_bucket{le=\"") else {
            continue;
        };
        let Some((le, count)) = rest.split_once("\"} ") else {
            continue;
        };
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().unwrap_or(f64::NAN)
        };
        if let Ok(count) = count.trim().parse::<f64>() {
            sample
                .buckets
                .entry(name.to_string())
                .or_default()
                .push((le, count));
        }
    }
}

/// The histogram's counts between two scrapes, by bucket bound.
fn diff(a: &Sample, b: &Sample, name: &str) -> Vec<(f64, f64)> {
    let (Some(a), Some(b)) = (a.buckets.get(name), b.buckets.get(name)) else {
        return Vec::new();
    };
    b.iter()
        .map(|&(le, n)| {
            let before = a.iter().find(|(l, _)| *l == le).map_or(0.0, |(_, c)| *c);
            (le, n - before)
        })
        .collect()
}

fn total(d: &[(f64, f64)]) -> f64 {
    d.last().map_or(0.0, |(_, n)| *n)
}

/// The bound of the bucket holding quantile `p`, in ms ("-" when empty,
/// ">10s" past the last bound).
fn q(d: &[(f64, f64)], p: f64) -> String {
    let n = total(d);
    if n <= 0.0 {
        return "-".into();
    }
    let rank = (p * n).ceil().max(1.0);
    match d.iter().find(|(_, c)| *c >= rank) {
        Some((le, _)) if le.is_finite() => {
            let ms = le * 1e3;
            if ms < 1.0 {
                format!("{ms:.2}")
            } else {
                format!("{ms:.0}")
            }
        }
        _ => ">10s".into(),
    }
}

/// Drops DIR's files (recursively) from the page cache, as after a reboot:
/// `posix_fadvise(DONTNEED)` on each, after writing back what is dirty.
/// Only these files are touched, not the machine's whole cache.
pub fn evict_cache(dir: &Path) -> anyhow::Result<()> {
    let mut bytes = 0u64;
    let mut files = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                stack.push(entry.path());
                continue;
            }
            let file = std::fs::File::open(entry.path())?;
            file.sync_all()?;
            rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed)?;
            bytes += meta.len();
            files += 1;
        }
    }
    println!(
        "evicted {files} files ({:.0} MiB) of {} from the page cache",
        bytes as f64 / (1024.0 * 1024.0),
        dir.display()
    );
    Ok(())
}
