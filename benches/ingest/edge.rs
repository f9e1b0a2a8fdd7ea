//! Good callbacks while the edge is under attack: the same open-loop load
//! as `fixed-rate`, alone, during a slow-loris (connections that keep
//! sending half a request head, reconnecting when closed) or during a junk
//! flood (invalid 1 MiB bodies on keep-alive connections). The attack runs
//! on its own thread and runtime, so the measuring loop's timers stay on
//! time; both share the machine with the server, as a real attack would.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::load::{self, Conn, Target};

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Attack {
    None,
    Loris,
    Junk,
}

/// What the attack did, for the report.
#[derive(Default)]
struct Counts {
    /// Slow-loris connections the server closed.
    closed: AtomicU64,
    /// Junk bodies answered (any status).
    answered: AtomicU64,
    /// Junk bodies answered 4xx.
    refused: AtomicU64,
}

pub struct Settings {
    pub attack: Attack,
    pub rate: u64,
    pub warmup: Duration,
    pub duration: Duration,
    pub loris: usize,
    pub junk_connections: usize,
    /// Junk bodies per second in all; 0 sends them as fast as answered.
    pub junk_rate: u64,
}

pub async fn run(target: Target, s: Settings) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let attacker = {
        let (target, stop, counts) = (target.clone(), stop.clone(), counts.clone());
        let (attack, loris, junk, junk_rate) = (s.attack, s.loris, s.junk_connections, s.junk_rate);
        std::thread::Builder::new()
            .name("attack".into())
            .spawn(move || -> anyhow::Result<()> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async move {
                    match attack {
                        Attack::None => {}
                        Attack::Loris => slow_loris(&target, loris, &stop, &counts).await,
                        Attack::Junk => junk_flood(&target, junk, junk_rate, &stop, &counts).await,
                    }
                });
                Ok(())
            })?
    };
    // Let the attack reach its full size before the measured load starts.
    tokio::time::sleep(Duration::from_secs(1)).await;
    println!(
        "== edge: {}/s good callbacks for {:.0} s, attack: {:?}",
        s.rate,
        s.duration.as_secs_f64(),
        s.attack
    );
    let started = Instant::now();
    let report = load::open_loop(target, s.rate, s.warmup, s.duration, 32).await?;
    let span = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let attacked = attacker
        .join()
        .map_err(|_| anyhow::anyhow!("the attack thread panicked"))?;
    attacked?;
    match s.attack {
        Attack::None => {}
        Attack::Loris => println!(
            "slow-loris            : {} connections held; {} closed by the server ({:.0}/s)",
            s.loris,
            counts.closed.load(Ordering::Relaxed),
            counts.closed.load(Ordering::Relaxed) as f64 / span
        ),
        Attack::Junk => println!(
            "junk flood            : {} bodies of 1 MiB answered ({:.0}/s), {} refused with 4xx",
            counts.answered.load(Ordering::Relaxed),
            counts.answered.load(Ordering::Relaxed) as f64 / span,
            counts.refused.load(Ordering::Relaxed)
        ),
    }
    report.print_open(s.rate);
    Ok(())
}

/// `n` connections that each send half a request head and wait; when the
/// server closes one, it is opened again.
async fn slow_loris(target: &Target, n: usize, stop: &AtomicBool, counts: &Counts) {
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/js",
        target.path, target.authority
    );
    let tasks = (0..n).map(|_| async {
        while !stop.load(Ordering::Relaxed) {
            let Ok(mut stream) = TcpStream::connect(target.addr).await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            if stream.write_all(head.as_bytes()).await.is_err() {
                continue;
            }
            // Held until the server closes it, or the run ends.
            let mut buf = [0u8; 512];
            loop {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                match tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf)).await
                {
                    Ok(Ok(0)) | Ok(Err(_)) => {
                        counts.closed.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    Ok(Ok(_)) | Err(_) => {}
                }
            }
        }
    });
    futures::future::join_all(tasks).await;
}

/// Invalid 1 MiB bodies on `connections` keep-alive connections, paced to
/// `rate` per second in all (0: as fast as they are answered).
async fn junk_flood(
    target: &Target,
    connections: usize,
    rate: u64,
    stop: &AtomicBool,
    counts: &Counts,
) {
    let body = Bytes::from(vec![b'x'; 1024 * 1024 - 64]);
    let start = Instant::now();
    let tickets = AtomicU64::new(0);
    let tasks = (0..connections.max(1)).map(|_| async {
        let mut conn = None;
        while !stop.load(Ordering::Relaxed) {
            let i = tickets.fetch_add(1, Ordering::Relaxed);
            if let Some(nanos) = (i * 1_000_000_000).checked_div(rate) {
                tokio::time::sleep_until((start + Duration::from_nanos(nanos)).into()).await;
            }
            if conn.is_none() {
                conn = Conn::open(target).await.ok();
            }
            let Some(c) = conn.as_mut() else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            match c.send(target, "POST", body.clone()).await {
                Ok((status, _)) => {
                    counts.answered.fetch_add(1, Ordering::Relaxed);
                    if (400..500).contains(&status) {
                        counts.refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(_) => conn = None,
            }
        }
    });
    futures::future::join_all(tasks).await;
}
