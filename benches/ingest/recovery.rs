//! Start-up after a long outage: how long `Outbox::open` takes, and how much
//! memory it needs, when COUNT events are pending.
//!
//! Fills the outbox with COUNT distinct tasks (the provider's success body,
//! a video URL; no relay, so all stay pending) from many concurrent
//! appenders and closes it. Then a fresh process (this binary again, with
//! `--skip-fill`) times `Outbox::open` plus the first `status()`, what
//! stands between a restart and the first answer, and reports its own peak
//! RSS (VmHWM), which so holds the reopening alone and not the fill. The
//! files were just written, so the page cache is warm; `--skip-fill` by hand
//! reopens an existing dir as it is (drop the page cache before it for a
//! cold start). The bench runs with the system allocator, not the server's
//! jemalloc.

use std::path::Path;
use std::time::Instant;

use hookbridge::config::OutboxConfig;
use hookbridge::outbox::Outbox;

use super::dedup_size::append_distinct;

pub async fn run(
    dir: &Path,
    count: u64,
    concurrency: usize,
    skip_fill: bool,
) -> anyhow::Result<()> {
    let config = OutboxConfig {
        data_dir: dir.to_path_buf(),
        // The writer compares these as i64: u64::MAX would read as -1, "full".
        max_pending: i64::MAX as u64,
        max_pending_bytes: i64::MAX as u64,
        ..OutboxConfig::default()
    };
    if !skip_fill {
        println!(
            "== recovery: {count} pending events, {concurrency} concurrent appenders, in {}",
            dir.display()
        );
        if dir.exists() {
            std::fs::remove_dir_all(dir)?;
        }
        let secs = fill(&config, count, concurrency).await?;
        let rps = count as f64 / secs;
        println!("fill                  : {count} appends in {secs:.1} s, {rps:.0} appends/s");
        println!("RESULT fill_rps={rps:.0}");
        return reopen_in_child(dir, count).await;
    }

    let start = Instant::now();
    let outbox = Outbox::open(&config)?;
    let status = outbox.status()?;
    let open = start.elapsed().as_secs_f64();
    let first = Instant::now();
    let batch = outbox.read_batch(config.relay_batch, config.relay_batch * 16)?;
    let first_batch_ms = first.elapsed().as_secs_f64() * 1e3;
    let rss = peak_rss_mib();
    outbox.close().await;
    let size = dir_bytes(dir)?;

    let pending = status.pending;
    println!(
        "recovery: {pending} pending, open took {open:.2} s, data dir {:.0} MiB, peak RSS {} MiB (VmHWM)",
        mib(size),
        rss.map_or("-".to_string(), |r| format!("{r:.0}")),
    );
    println!(
        "first relay batch     : {} events read in {first_batch_ms:.1} ms; {:.0} B per pending event on disk, {:.0} B of JSON",
        batch.ready.len(),
        size as f64 / pending.max(1) as f64,
        status.pending_bytes as f64 / pending.max(1) as f64
    );
    println!(
        "RESULT open_s={open:.2} data_mib={:.0} rss_peak_mib={} pending={pending} first_batch_ms={first_batch_ms:.1}",
        mib(size),
        rss.map_or("-".to_string(), |r| format!("{r:.0}")),
    );
    Ok(())
}

/// Runs the reopening in a fresh process, passes its report on, and checks
/// that it found all COUNT events pending.
async fn reopen_in_child(dir: &Path, count: u64) -> anyhow::Result<()> {
    let output = tokio::process::Command::new(std::env::current_exe()?)
        .arg("recovery")
        .arg("--dir")
        .arg(dir)
        .arg("--skip-fill")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .output()
        .await?;
    let report = String::from_utf8_lossy(&output.stdout);
    print!("{report}");
    anyhow::ensure!(
        output.status.success(),
        "the reopening failed: {}",
        output.status
    );
    let expected = format!(" pending={count} ");
    anyhow::ensure!(
        report
            .lines()
            .any(|l| l.starts_with("RESULT ") && l.contains(&expected)),
        "{count} appended but not all found pending after reopening"
    );
    Ok(())
}

/// Appends COUNT distinct tasks and closes the outbox; returns the seconds
/// the appends took.
async fn fill(config: &OutboxConfig, count: u64, concurrency: usize) -> anyhow::Result<f64> {
    let outbox = Outbox::open(config)?;
    let (_, secs) = append_distinct(&outbox, count, concurrency).await?;
    outbox.close().await;
    Ok(secs)
}

/// VmHWM of this process, in MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Bytes of every file under `dir` (whatever the storage's layout).
fn dir_bytes(dir: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            dir_bytes(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
