//! The load itself: callback bodies, keep-alive HTTP/1 connections, and the
//! closed and open loops.

use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{handshake, SendRequest};
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpSocket, TcpStream};

use super::report::{micros, Report};

/// The provider's documented callbacks (shared/kinovi-webhooks.txt);
/// `{ID}` becomes a unique suffix for taskId and orderId.
const SUCCESS: &str = r#"{"code":200,"message":"success","data":{"taskId":"task_{ID}","orderId":"order_{ID}","model":"seedance-20","state":"success","creditsUsed":200,"output":[{"url":"https://static.kinovi.ai/generated/video.mp4","width":1280,"height":720}],"error":null,"createTime":1735599634000,"completeTime":1735599754000,"updateTime":1735599754000}}"#;
const FAILURE: &str = r#"{"code":200,"message":"success","data":{"taskId":"task_{ID}","orderId":"order_{ID}","model":"seedance-20","state":"fail","creditsUsed":0,"output":null,"error":{"code":"2038","message":"Your input text violates platform rules. Please modify and try again."},"createTime":1735599634000,"completeTime":null,"updateTime":1735599754000}}"#;

/// A run-unique id prefix, so that a second run against the same data dir
/// is not deduplicated either.
pub fn run_prefix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    format!(
        "cl{:08x}",
        (nanos ^ (u64::from(std::process::id()) << 32)) as u32
    )
}

/// Distinct callbacks: one in five is a failure, the rest successes.
pub struct Bodies {
    prefix: String,
    next: AtomicU64,
}

impl Bodies {
    pub fn new() -> Self {
        Self::with_prefix(run_prefix())
    }

    /// Ids `{prefix}{counter:015}`: another prefix, another set of tasks.
    pub fn with_prefix(prefix: String) -> Self {
        Self {
            prefix,
            next: AtomicU64::new(0),
        }
    }

    pub fn next(&self) -> Bytes {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let template = if n % 5 == 4 { FAILURE } else { SUCCESS };
        // A 25-character id like the provider's "cl..." cuids.
        let id = format!("{}{n:015}", self.prefix);
        Bytes::from(template.replace("{ID}", &id))
    }
}

/// A loopback HTTP/1 server and the path requests go to.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub authority: String,
    pub path: String,
}

impl Target {
    /// `url` is `http://HOST:PORT[/PATH]`; a non-empty `path` wins over the URL's.
    pub fn parse(url: &str, path: &str) -> anyhow::Result<Self> {
        let rest = url
            .strip_prefix("http://")
            .with_context(|| format!("{url}: only http:// URLs"))?;
        let (authority, url_path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let addr = authority
            .to_socket_addrs()
            .with_context(|| format!("{url}: bad host:port"))?
            .next()
            .with_context(|| format!("{url}: no address"))?;
        if !addr.ip().is_loopback() {
            bail!("{url}: the benchmark only sends to loopback addresses");
        }
        let path = match (path, url_path) {
            ("", "") => "/",
            ("", p) => p,
            (p, _) => p,
        };
        Ok(Self {
            addr,
            authority: authority.to_string(),
            path: path.to_string(),
        })
    }

    pub fn with_path(&self, path: &str) -> Self {
        Self {
            path: path.to_string(),
            ..self.clone()
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}{}", self.authority, self.path)
    }
}

/// A TCP connection to `addr` from the loopback address `from` (any free
/// port), or from the system's choice when `None`.
pub async fn connect_from(addr: SocketAddr, from: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let Some(from) = from else {
        return TcpStream::connect(addr).await;
    };
    if !from.is_loopback() {
        return Err(std::io::Error::other(format!(
            "{from}: the benchmark only sends from loopback addresses"
        )));
    }
    let socket = match from {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(addr).await
}

/// One keep-alive HTTP/1 connection.
pub struct Conn {
    sender: SendRequest<Full<Bytes>>,
}

impl Conn {
    pub async fn open(target: &Target) -> anyhow::Result<Self> {
        Self::open_from(target, None).await
    }

    /// A connection from the loopback address `from` (see [`connect_from`]).
    pub async fn open_from(target: &Target, from: Option<IpAddr>) -> anyhow::Result<Self> {
        let stream = connect_from(target.addr, from).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) = handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Self { sender })
    }

    /// The server closed this connection (seen while it was idle): a
    /// request sent on it now would never leave.
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }

    /// Sends one request and reads the whole answer; returns status and body.
    pub async fn send(
        &mut self,
        target: &Target,
        method: &str,
        body: Bytes,
    ) -> anyhow::Result<(u16, Bytes)> {
        self.sender.ready().await?;
        let request = Request::builder()
            .method(method)
            .uri(&target.path)
            .header(HOST, &target.authority)
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(body))?;
        let response = self.sender.send_request(request).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }
}

/// When a closed loop stops.
#[derive(Clone, Copy)]
pub enum Stop {
    /// Run `warmup + measure`, count what completes within `measure`.
    Time { warmup: Duration, measure: Duration },
    /// Send exactly this many requests, count them all.
    Count(u64),
}

/// `connections` connections, each sending its next callback as soon as the
/// previous one was answered.
pub async fn closed_loop(target: Target, connections: usize, stop: Stop) -> anyhow::Result<Report> {
    let target = Arc::new(target);
    let bodies = Arc::new(Bodies::new());
    let tickets = Arc::new(AtomicU64::new(0));
    let mut conns = Vec::with_capacity(connections);
    for _ in 0..connections {
        conns.push(Conn::open(&target).await.context("cannot connect")?);
    }
    let start = Instant::now();
    let (from, until) = match stop {
        Stop::Time { warmup, measure } => (start + warmup, Some(start + warmup + measure)),
        Stop::Count(_) => (start, None),
    };
    let workers: Vec<_> = conns
        .into_iter()
        .map(|mut conn| {
            let (target, bodies, tickets) = (target.clone(), bodies.clone(), tickets.clone());
            tokio::spawn(async move {
                let mut report = Report::default();
                loop {
                    let sent = Instant::now();
                    match (stop, until) {
                        (Stop::Count(n), _) if tickets.fetch_add(1, Ordering::Relaxed) >= n => {
                            break
                        }
                        (_, Some(until)) if sent >= until => break,
                        _ => {}
                    }
                    let result = conn.send(&target, "POST", bodies.next()).await;
                    let done = Instant::now();
                    let counted = done >= from && until.is_none_or(|u| done <= u);
                    match result {
                        Ok((status, _)) if counted => {
                            report.latency.push(micros(done - sent));
                            *report.statuses.entry(status).or_default() += 1;
                        }
                        Ok(_) => {}
                        Err(e) => {
                            report.record_error(&e);
                            conn = reconnect(&target).await;
                        }
                    }
                }
                report
            })
        })
        .collect();
    let mut total = Report::default();
    for worker in workers {
        total.merge(worker.await?);
    }
    total.window = match until {
        Some(until) => until - from,
        None => start.elapsed(),
    };
    Ok(total)
}

/// Retries (bounded) until a new connection is up; a dead server ends the run.
async fn reconnect(target: &Target) -> Conn {
    for _ in 0..50 {
        if let Ok(conn) = Conn::open(target).await {
            return conn;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("cannot reconnect to {target} for 5 s; giving up");
    std::process::exit(1);
}

/// Open loop: request `i` is due at `start + i / rate`; whichever pooled
/// connection is free takes the next due request. Latency counts from the
/// due time, so waiting for a free connection is part of it.
///
/// The due times come from a pacing thread that sleeps with the operating
/// system's high-resolution timer: tokio's timer wheel rounds every sleep
/// up to the next millisecond, which made requests leave 1 ms late on
/// average and counted the generator's own lag against the server.
pub async fn open_loop(
    target: Target,
    rate: u64,
    warmup: Duration,
    measure: Duration,
    connections: usize,
) -> anyhow::Result<Report> {
    anyhow::ensure!(rate > 0, "--rate must be positive");
    let target = Arc::new(target);
    let bodies = Arc::new(Bodies::new());
    let total = ((warmup + measure).as_secs_f64() * rate as f64) as u64;
    let mut conns = Vec::with_capacity(connections);
    for _ in 0..connections {
        conns.push(Conn::open(&target).await.context("cannot connect")?);
    }
    let start = Instant::now() + Duration::from_millis(20);
    let from = start + warmup;
    // Wall clock of second 0 of the "by second" lines, to line them up with logs.
    let unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis()
        + 20
        + warmup.as_millis();
    println!("measured window starts: unix_ms={unix_ms}");
    // Bounded: when every connection is busy the pacer waits too, and the
    // requests it then hands out late still count from their due times.
    let (due_tx, due_rx) = tokio::sync::mpsc::channel::<Instant>(connections.max(1) * 4);
    let pacer = std::thread::Builder::new()
        .name("pacer".into())
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
    let due_rx = Arc::new(tokio::sync::Mutex::new(due_rx));
    let workers: Vec<_> = conns
        .into_iter()
        .map(|mut conn| {
            let (target, bodies, due_rx) = (target.clone(), bodies.clone(), due_rx.clone());
            tokio::spawn(async move {
                let mut report = Report::default();
                let mut last = start;
                loop {
                    let Some(due) = due_rx.lock().await.recv().await else {
                        break;
                    };
                    let sent = Instant::now();
                    let result = conn.send(&target, "POST", bodies.next()).await;
                    let done = Instant::now();
                    last = last.max(done);
                    match result {
                        Ok((status, _)) if due >= from => {
                            report.latency.push(micros(done - due));
                            report.service.push(micros(done - sent));
                            report.send_lag.push(micros(sent - due));
                            let second = (due - from).as_secs() as u32;
                            report.by_second.push((second, micros(done - due)));
                            *report.statuses.entry(status).or_default() += 1;
                        }
                        Ok(_) => {}
                        Err(e) => {
                            report.record_error(&e);
                            conn = reconnect(&target).await;
                        }
                    }
                }
                report.tail = last.saturating_duration_since(start + warmup + measure);
                report
            })
        })
        .collect();
    let mut report = Report::default();
    for worker in workers {
        let r = worker.await?;
        let tail = r.tail;
        report.merge(r);
        report.tail = report.tail.max(tail);
    }
    if pacer.join().is_err() {
        bail!("the pacing thread panicked");
    }
    report.window = measure;
    Ok(report)
}
