//! The attacks, each from the attacker addresses 127.0.0.2, 127.0.0.3, ...
//! (never the good sender's 127.0.0.1), on their own thread and runtime so
//! that the good sender's timers stay on time. Each stops when `stop` is
//! cancelled and ends within a few seconds of it.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::super::load::{connect_from, Bodies, Conn, Target};
use super::failure_kind;

/// How hard each attack pushes.
#[derive(Clone)]
pub struct Sizes {
    /// Attacker addresses: 127.0.0.2 ..= 127.0.0.(1 + attackers).
    pub attackers: u8,
    pub junk_connections: usize,
    /// Junk bodies per second in all; 0: as fast as they are answered.
    pub junk_rate: u64,
    pub slow_connections: usize,
    pub slow_content_length: u64,
    pub slow_byte_every: Duration,
    pub churn_rate: u64,
    /// How long a churned connection stays open after its answer.
    pub churn_hold: Duration,
    pub forged_connections: usize,
    /// Forged callbacks per second in all; 0: as fast as they are answered.
    pub forged_rate: u64,
    pub loris_connections: usize,
}

impl Sizes {
    /// The `i`-th attacker address, round robin.
    pub fn source(&self, i: usize) -> IpAddr {
        let n = usize::from(self.attackers.max(1));
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i % n) as u8))
    }
}

/// What the attack's requests got.
#[derive(Default)]
pub struct Counts {
    /// Requests sent (or connections opened, for the slow attacks).
    pub requests: AtomicU64,
    /// Answers by status, and requests that got no answer by kind.
    outcomes: Mutex<BTreeMap<String, u64>>,
    /// Refused: answered 4xx/5xx, or closed/reset with no answer.
    pub refused: AtomicU64,
    /// Connections the attacker could not open.
    pub connect_failed: AtomicU64,
    /// The first error message of a failed request.
    sample: Mutex<Option<String>>,
}

impl Counts {
    fn status(&self, status: u16) {
        self.add(status.to_string());
        if status >= 400 {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn failed(&self, kind: &str) {
        self.add(kind.to_string());
        self.refused.fetch_add(1, Ordering::Relaxed);
    }

    fn failed_with(&self, e: &anyhow::Error) {
        self.failed(failure_kind(e));
        let mut sample = self.sample.lock().unwrap_or_else(|e| e.into_inner());
        sample.get_or_insert_with(|| format!("{e:#}"));
    }

    pub fn sample(&self) -> Option<String> {
        self.sample
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn add(&self, key: String) {
        let mut map = self.outcomes.lock().unwrap_or_else(|e| e.into_inner());
        *map.entry(key).or_default() += 1;
    }

    /// "400=5300 closed=12".
    pub fn outcomes(&self) -> String {
        let map = self.outcomes.lock().unwrap_or_else(|e| e.into_inner());
        if map.is_empty() {
            return "none".into();
        }
        map.iter()
            .map(|(k, n)| format!("{k}={n}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Keep-alive connections posting `body()` as fast as answered, or paced
/// to `rate` per second in all.
async fn flood(
    target: &Target,
    sizes: &Sizes,
    connections: usize,
    rate: u64,
    body: impl Fn() -> Bytes + Clone + Send + 'static,
    stop: &CancellationToken,
    counts: &Arc<Counts>,
) {
    let start = Instant::now();
    let tickets = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for c in 0..connections.max(1) {
        let (target, stop, counts, tickets, body) = (
            target.clone(),
            stop.clone(),
            counts.clone(),
            tickets.clone(),
            body.clone(),
        );
        let from = sizes.source(c);
        tasks.spawn(async move {
            let mut conn: Option<Conn> = None;
            while !stop.is_cancelled() {
                let i = tickets.fetch_add(1, Ordering::Relaxed);
                if let Some(nanos) = (i * 1_000_000_000).checked_div(rate) {
                    let due = start + Duration::from_nanos(nanos);
                    tokio::select! {
                        _ = tokio::time::sleep_until(due.into()) => {}
                        _ = stop.cancelled() => break,
                    }
                }
                if conn.is_none() {
                    let opened = tokio::select! {
                        c = Conn::open_from(&target, Some(from)) => c,
                        _ = stop.cancelled() => break,
                    };
                    match opened {
                        Ok(c) => conn = Some(c),
                        Err(_) => {
                            counts.connect_failed.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    }
                }
                let Some(c) = conn.as_mut() else { continue };
                counts.requests.fetch_add(1, Ordering::Relaxed);
                let sent = tokio::select! {
                    r = tokio::time::timeout(Duration::from_secs(10), c.send(&target, "POST", body())) => r,
                    _ = stop.cancelled() => break,
                };
                match sent {
                    Ok(Ok((status, _))) => counts.status(status),
                    Ok(Err(e)) => {
                        counts.failed_with(&e);
                        conn = None;
                    }
                    Err(_) => {
                        counts.failed("timeout");
                        conn = None;
                    }
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// Invalid 1 MiB bodies (not JSON).
pub async fn junk(target: &Target, sizes: &Sizes, stop: &CancellationToken, counts: &Arc<Counts>) {
    let body = Bytes::from(vec![b'x'; 1024 * 1024 - 64]);
    let (n, rate) = (sizes.junk_connections, sizes.junk_rate);
    flood(target, sizes, n, rate, move || body.clone(), stop, counts).await;
}

/// Valid-looking callbacks for tasks nobody created: random ids.
pub async fn forged(
    target: &Target,
    sizes: &Sizes,
    stop: &CancellationToken,
    counts: &Arc<Counts>,
) {
    let bodies = Arc::new(Bodies::with_prefix(format!(
        "forged{:08x}",
        rand::random::<u32>()
    )));
    let (n, rate) = (sizes.forged_connections, sizes.forged_rate);
    flood(target, sizes, n, rate, move || bodies.next(), stop, counts).await;
}

/// The status of an HTTP/1 answer read from `stream`: `Ok(None)` when the
/// server closed without one.
async fn read_status(stream: &mut TcpStream) -> std::io::Result<Option<u16>> {
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = head.iter().position(|b| *b == b'\n') {
            // "HTTP/1.1 200 OK\r\n"
            let line = String::from_utf8_lossy(&head[..end]);
            let status = line.split(' ').nth(1).and_then(|s| s.parse().ok());
            return Ok(Some(status.unwrap_or(0)));
        }
        if head.len() > 4096 {
            return Ok(Some(0));
        }
    }
}

fn io_kind(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::ConnectionReset => "reset",
        std::io::ErrorKind::BrokenPipe => "broken-pipe",
        _ => "io-error",
    }
}

/// Connections that declare a body and send it a byte at a time; when the
/// server answers or closes one, another is opened.
pub async fn slow_bodies(
    target: &Target,
    sizes: &Sizes,
    stop: &CancellationToken,
    counts: &Arc<Counts>,
) {
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        target.path, target.authority, sizes.slow_content_length
    );
    let body = slow_writer(sizes.slow_byte_every);
    held(
        target,
        sizes,
        sizes.slow_connections,
        head,
        body,
        stop,
        counts,
    )
    .await;
}

/// Half a request head, then nothing.
pub async fn loris(target: &Target, sizes: &Sizes, stop: &CancellationToken, counts: &Arc<Counts>) {
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/js",
        target.path, target.authority
    );
    let idle = slow_writer(Duration::ZERO);
    held(
        target,
        sizes,
        sizes.loris_connections,
        head,
        idle,
        stop,
        counts,
    )
    .await;
}

/// A byte every `every` (never when zero).
fn slow_writer(every: Duration) -> Option<Duration> {
    (!every.is_zero()).then_some(every)
}

/// `n` connections that each write `head`, then a byte every `trickle` (if
/// any), until the server answers or closes; then another is opened.
async fn held(
    target: &Target,
    sizes: &Sizes,
    n: usize,
    head: String,
    trickle: Option<Duration>,
    stop: &CancellationToken,
    counts: &Arc<Counts>,
) {
    let head = Arc::new(head);
    let mut tasks = JoinSet::new();
    for c in 0..n {
        let (addr, head, stop, counts) = (target.addr, head.clone(), stop.clone(), counts.clone());
        let from = sizes.source(c);
        tasks.spawn(async move {
            while !stop.is_cancelled() {
                // A full accept queue can hold a connect for long: the run's end wins.
                let connected = tokio::select! {
                    c = connect_from(addr, Some(from)) => c,
                    _ = stop.cancelled() => return,
                };
                let Ok(mut stream) = connected else {
                    counts.connect_failed.fetch_add(1, Ordering::Relaxed);
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                        _ = stop.cancelled() => return,
                    }
                };
                counts.requests.fetch_add(1, Ordering::Relaxed);
                let written = tokio::select! {
                    w = stream.write_all(head.as_bytes()) => w,
                    _ = stop.cancelled() => return,
                };
                if let Err(e) = written {
                    counts.failed(io_kind(&e));
                    continue;
                }
                // Held until the server answers or closes, or the run ends.
                let mut next_byte = trickle.map(|t| tokio::time::Instant::now() + t);
                loop {
                    let byte = async {
                        match next_byte {
                            Some(at) => tokio::time::sleep_until(at).await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        answer = read_status(&mut stream) => {
                            match answer {
                                Ok(Some(status)) => counts.status(status),
                                Ok(None) => counts.failed("closed"),
                                Err(e) => counts.failed(io_kind(&e)),
                            }
                            break;
                        }
                        _ = byte => {
                            if let Err(e) = stream.write_all(b" ").await {
                                counts.failed(io_kind(&e));
                                break;
                            }
                            next_byte = trickle.map(|t| tokio::time::Instant::now() + t);
                        }
                    }
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// `GET /healthz` on a new connection `churn_rate` times a second; each
/// connection stays open `churn_hold` after its answer (or until the
/// server closes it), then is closed.
pub async fn churn(target: &Target, sizes: &Sizes, stop: &CancellationToken, counts: &Arc<Counts>) {
    let request = Arc::new(format!(
        "GET /healthz HTTP/1.1\r\nHost: {}\r\n\r\n",
        target.authority
    ));
    let every = Duration::from_secs_f64(1.0 / sizes.churn_rate.max(1) as f64);
    let mut ticks = tokio::time::interval(every);
    let mut conns = JoinSet::new();
    let mut i = 0usize;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.cancelled() => break,
        }
        while conns.try_join_next().is_some() {}
        let (addr, request, stop, counts) =
            (target.addr, request.clone(), stop.clone(), counts.clone());
        let (from, hold) = (sizes.source(i), sizes.churn_hold);
        i += 1;
        conns.spawn(async move {
            let connected = tokio::select! {
                c = connect_from(addr, Some(from)) => c,
                _ = stop.cancelled() => return,
            };
            let Ok(mut stream) = connected else {
                counts.connect_failed.fetch_add(1, Ordering::Relaxed);
                return;
            };
            counts.requests.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = stream.write_all(request.as_bytes()).await {
                counts.failed(io_kind(&e));
                return;
            }
            let answer = tokio::select! {
                a = tokio::time::timeout(Duration::from_secs(5), read_status(&mut stream)) => a,
                _ = stop.cancelled() => return,
            };
            match answer {
                Ok(Ok(Some(status))) => counts.status(status),
                Ok(Ok(None)) => return counts.failed("closed"),
                Ok(Err(e)) => return counts.failed(io_kind(&e)),
                Err(_) => return counts.failed("timeout"),
            }
            // Idle and open: a connection slot the server has to account for.
            let mut rest = [0u8; 1024];
            let until = tokio::time::Instant::now() + hold;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => return,
                    _ = stop.cancelled() => return,
                    r = stream.read(&mut rest) => match r {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    },
                }
            }
        });
    }
    while conns.join_next().await.is_some() {}
}
