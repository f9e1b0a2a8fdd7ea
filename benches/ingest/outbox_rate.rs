//! The outbox alone at a fixed rate: append latency without HTTP, the relay
//! or a broker, to tell storage stalls from everything else.
//!
//! Appends are due on a fixed timeline (as in the open loop) and each one is
//! timed from its due time. A stand-in for the relay deletes what was
//! appended every 10 ms, as if an instant broker acknowledged it, so the
//! file sees the same mix of inserts and deletes as in the server.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hookbridge::config::OutboxConfig;
use hookbridge::event::{self, Source};
use hookbridge::outbox::{Appended, Outbox};

use super::dedup_size::{task, TEMPLATE};
use super::load::run_prefix;

pub async fn run(dir: &Path, rate: u64, duration: Duration) -> anyhow::Result<()> {
    anyhow::ensure!(rate > 0, "--rate must be positive");
    println!(
        "== outbox-rate: {rate} appends/s for {:.0} s, outbox alone in {}",
        duration.as_secs_f64(),
        dir.display()
    );
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    let config = OutboxConfig {
        data_dir: dir.to_path_buf(),
        ..OutboxConfig::default()
    };
    let outbox = Outbox::open(&config)?;
    let template = Arc::new(event::parse(TEMPLATE.as_bytes(), Source::Webhook, 0)?);
    let prefix = format!("task_{}", run_prefix());
    let appended = Arc::new(Mutex::new(Vec::new()));
    let relay = {
        let (outbox, appended) = (outbox.clone(), appended.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(10)).await;
                let seqs = std::mem::take(&mut *appended.lock().expect("not poisoned"));
                if !seqs.is_empty() && outbox.complete(seqs, vec![]).await.is_err() {
                    return;
                }
            }
        })
    };
    let total = (duration.as_secs_f64() * rate as f64) as u64;
    let start = Instant::now() + Duration::from_millis(20);
    let mut appends = Vec::with_capacity(total as usize);
    for n in 0..total {
        let due = start + Duration::from_nanos(n * 1_000_000_000 / rate);
        tokio::time::sleep_until(due.into()).await;
        let (outbox, appended) = (outbox.clone(), appended.clone());
        let event = task(&template, &prefix, n);
        appends.push(tokio::spawn(async move {
            let outcome = outbox.append(event).await;
            let done = Instant::now();
            if let Ok(Appended::New { seq }) = outcome {
                appended.lock().expect("not poisoned").push(seq);
            }
            (due, done, outcome.is_ok())
        }));
    }
    let seconds = duration.as_secs() as usize + 1;
    let (mut worst, mut slow) = (vec![0u32; seconds], vec![0u32; seconds]);
    let (mut latency, mut failed) = (Vec::with_capacity(appends.len()), 0u64);
    for append in appends {
        let (due, done, ok) = append.await?;
        let us = (done - due).as_micros().min(u128::from(u32::MAX)) as u32;
        let second = ((due - start).as_secs() as usize).min(seconds - 1);
        worst[second] = worst[second].max(us);
        slow[second] += u32::from(us > 10_000);
        latency.push(us);
        failed += u64::from(!ok);
    }
    relay.abort();
    latency.sort_unstable();
    let ms = |q: f64| {
        let rank = ((q * latency.len() as f64).ceil() as usize).clamp(1, latency.len());
        f64::from(latency[rank - 1]) / 1e3
    };
    println!(
        "append latency from due time, ms p50/p90/p99/max : {:.2} / {:.2} / {:.2} / {:.2}  (n={}, failed {failed})",
        ms(0.5),
        ms(0.9),
        ms(0.99),
        ms(1.0),
        latency.len()
    );
    let join = |v: &[u32], f: &dyn Fn(u32) -> String| {
        v.iter().map(|&x| f(x)).collect::<Vec<_>>().join(" ")
    };
    println!(
        "max ms, by second     : {}",
        join(&worst, &|us| format!("{:.0}", f64::from(us) / 1e3))
    );
    println!(
        "appends > 10 ms, by s : {}",
        join(&slow, &|n| n.to_string())
    );
    println!(
        "RESULT p50_ms={:.2} p99_ms={:.2} max_ms={:.2} failed={failed}",
        ms(0.5),
        ms(0.99),
        ms(1.0)
    );
    Ok(())
}
