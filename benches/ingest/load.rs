//! The HTTP side of the benchmark: callback bodies, keep-alive HTTP/1
//! connections, the closed and open loops, and what they measured.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::client::conn::http1::{handshake, SendRequest};
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

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
        Self {
            prefix: run_prefix(),
            next: AtomicU64::new(0),
        }
    }

    fn next(&self) -> Bytes {
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
    addr: SocketAddr,
    authority: String,
    path: String,
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

    fn with_path(&self, path: &str) -> Self {
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

/// One keep-alive HTTP/1 connection.
struct Conn {
    sender: SendRequest<Full<Bytes>>,
}

impl Conn {
    async fn open(target: &Target) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(target.addr).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) = handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Self { sender })
    }

    /// Sends one request and reads the whole answer; returns status and body.
    async fn send(
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

/// What one loop measured; latencies in microseconds.
#[derive(Default)]
pub struct Report {
    /// The measured span (closed loop: the window; count mode: the whole run).
    pub window: Duration,
    /// Answer latency (open loop: from the due time).
    pub latency: Vec<u32>,
    /// Open loop only: from sending to the answer.
    pub service: Vec<u32>,
    /// Open loop only: how late the request left after its due time.
    pub send_lag: Vec<u32>,
    /// Open loop only: (second of the measured window it was due in, latency).
    pub by_second: Vec<(u32, u32)>,
    pub statuses: BTreeMap<u16, u64>,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Open loop only: how long after the last due time the last answer came.
    pub tail: Duration,
}

/// CPU seconds this process used so far (user + system), from /proc.
pub fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised name: state is the 1st, utime the 12th, stime the 13th.
    let after = stat.rsplit(") ").next().unwrap_or("");
    let ticks: u64 = after
        .split(' ')
        .skip(11)
        .take(2)
        .filter_map(|t| t.parse::<u64>().ok())
        .sum();
    // USER_HZ is 100 on Linux.
    ticks as f64 / 100.0
}

fn micros(d: Duration) -> u32 {
    d.as_micros().min(u128::from(u32::MAX)) as u32
}

impl Report {
    fn record_error(&mut self, e: &anyhow::Error) {
        self.errors += 1;
        self.first_error.get_or_insert_with(|| format!("{e:#}"));
    }

    fn merge(&mut self, other: Report) {
        self.latency.extend(other.latency);
        self.service.extend(other.service);
        self.send_lag.extend(other.send_lag);
        self.by_second.extend(other.by_second);
        for (status, n) in other.statuses {
            *self.statuses.entry(status).or_default() += n;
        }
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    fn ok(&self) -> u64 {
        self.statuses
            .iter()
            .filter(|(s, _)| (200..300).contains(*s))
            .map(|(_, n)| n)
            .sum()
    }

    fn statuses_line(&self) -> String {
        let mut parts: Vec<String> = self
            .statuses
            .iter()
            .map(|(s, n)| format!("{s}={n}"))
            .collect();
        parts.push(format!("errors={}", self.errors));
        parts.join(" ")
    }

    pub fn print_closed(mut self, connections: usize) {
        let rate = self.ok() as f64 / self.window.as_secs_f64();
        let mut latency = std::mem::take(&mut self.latency);
        let lat = Percentiles::of(&mut latency);
        println!("connections           : {connections}");
        println!("measured              : {:.2} s", self.window.as_secs_f64());
        println!("accepted (2xx) /s     : {rate:.0}");
        println!("statuses              : {}", self.statuses_line());
        println!("latency ms p50/p90/p99/max : {lat}");
        if let Some(e) = &self.first_error {
            println!("first error           : {e}");
        }
        let cpu = cpu_secs();
        println!("process CPU so far    : {cpu:.2} s");
        println!(
            "RESULT rps={rate:.0} p50_ms={:.2} p99_ms={:.2} errors={} non2xx={} cpu_s={cpu:.2}",
            lat.ms(0.50),
            lat.ms(0.99),
            self.errors,
            lat.0.len() as u64 - self.ok()
        );
    }

    pub fn print_open(mut self, rate: u64) {
        let done = self.ok() as f64 / self.window.as_secs_f64();
        let (mut latency, mut service, mut lag) = (
            std::mem::take(&mut self.latency),
            std::mem::take(&mut self.service),
            std::mem::take(&mut self.send_lag),
        );
        let lat = Percentiles::of(&mut latency);
        let service = Percentiles::of(&mut service);
        let lag = Percentiles::of(&mut lag);
        println!("offered /s            : {rate}");
        println!("answered (2xx) /s     : {done:.0}");
        println!("statuses              : {}", self.statuses_line());
        println!("latency from due time, ms p50/p90/p99/max : {lat}");
        println!("  of which send lag (generator timer), ms  : {lag}");
        println!("service time (send->answer), ms            : {service}");
        println!(
            "last answer after last due time : {:.1} ms",
            self.tail.as_secs_f64() * 1e3
        );
        // When the slow answers happened: steady, or bursts (GC, a big commit, the relay)?
        let seconds = self.window.as_secs() as usize + 1;
        let (mut worst, mut slow) = (vec![0u32; seconds], vec![0u32; seconds]);
        for &(second, us) in &self.by_second {
            let i = (second as usize).min(seconds - 1);
            worst[i] = worst[i].max(us);
            slow[i] += u32::from(us > 10_000);
        }
        let line = |v: &[u32], f: &dyn Fn(u32) -> String| {
            v.iter().map(|&x| f(x)).collect::<Vec<_>>().join(" ")
        };
        println!(
            "max ms, by second     : {}",
            line(&worst, &|us| format!("{:.0}", f64::from(us) / 1e3))
        );
        println!(
            "answers > 10 ms, by s : {}",
            line(&slow, &|n| n.to_string())
        );
        if let Some(e) = &self.first_error {
            println!("first error           : {e}");
        }
        let cpu = cpu_secs();
        println!("process CPU so far    : {cpu:.2} s");
        println!(
            "RESULT rps={done:.0} p50_ms={:.2} p99_ms={:.2} max_ms={:.2} service_p99_ms={:.2} errors={} cpu_s={cpu:.2}",
            lat.ms(0.50),
            lat.ms(0.99),
            lat.ms(1.0),
            service.ms(0.99),
            self.errors
        );
    }
}

/// Sorted latencies in microseconds.
struct Percentiles<'a>(&'a [u32]);

impl<'a> Percentiles<'a> {
    fn of(v: &'a mut [u32]) -> Self {
        v.sort_unstable();
        Self(v)
    }

    fn ms(&self, q: f64) -> f64 {
        if self.0.is_empty() {
            return f64::NAN;
        }
        let rank = ((q * self.0.len() as f64).ceil() as usize).clamp(1, self.0.len());
        f64::from(self.0[rank - 1]) / 1e3
    }
}

impl fmt::Display for Percentiles<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:.2} / {:.2} / {:.2} / {:.2}  (n={})",
            self.ms(0.50),
            self.ms(0.90),
            self.ms(0.99),
            self.ms(1.0),
            self.0.len()
        )
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
    let tickets = Arc::new(AtomicU64::new(0));
    let total = ((warmup + measure).as_secs_f64() * rate as f64) as u64;
    let mut conns = Vec::with_capacity(connections);
    for _ in 0..connections {
        conns.push(Conn::open(&target).await.context("cannot connect")?);
    }
    let start = Instant::now() + Duration::from_millis(20);
    let from = start + warmup;
    let workers: Vec<_> = conns
        .into_iter()
        .map(|mut conn| {
            let (target, bodies, tickets) = (target.clone(), bodies.clone(), tickets.clone());
            tokio::spawn(async move {
                let mut report = Report::default();
                let mut last = start;
                loop {
                    let i = tickets.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        break;
                    }
                    let due = start + Duration::from_nanos(i * 1_000_000_000 / rate);
                    tokio::time::sleep_until(due.into()).await;
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
    report.window = measure;
    Ok(report)
}

/// An axum server on 127.0.0.1:0 whose handler reads the body and answers
/// 200 with hookbridge's answer body, on its own runtime.
pub fn trivial_server(threads: usize) -> anyhow::Result<(tokio::runtime::Runtime, Target)> {
    use axum::routing::post;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .thread_name("baseline-server")
        .enable_all()
        .build()?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/webhooks/kinovi",
        post(|_body: Bytes| async {
            ([(CONTENT_TYPE, "application/json")], r#"{"message":"ok"}"#)
        }),
    );
    rt.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
        axum::serve(listener, app).await
    });
    let target = Target::parse(&format!("http://{addr}"), "/webhooks/kinovi")?;
    Ok((rt, target))
}

/// Reads `/admin/status` over one kept connection.
struct StatusProbe {
    target: Target,
    conn: Option<Conn>,
}

impl StatusProbe {
    fn new(target: &Target) -> Self {
        Self {
            target: target.with_path("/admin/status"),
            conn: None,
        }
    }

    /// `outbox.pending`; `None` when the server cannot be asked right now.
    async fn pending(&mut self) -> Option<u64> {
        if self.conn.is_none() {
            self.conn = Conn::open(&self.target).await.ok();
        }
        let conn = self.conn.as_mut()?;
        match conn.send(&self.target, "GET", Bytes::new()).await {
            Ok((200, body)) => {
                let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
                v["outbox"]["pending"].as_u64()
            }
            _ => {
                self.conn = None;
                None
            }
        }
    }
}

const POLL: Duration = Duration::from_millis(20);

/// Waits (the broker comes back meanwhile) until the outbox is empty, and
/// reports how fast it emptied once publishing started.
pub async fn drain(target: &Target, timeout: Duration) -> anyhow::Result<()> {
    let mut probe = StatusProbe::new(target);
    let initial = probe.pending().await.context("cannot read /admin/status")?;
    anyhow::ensure!(initial > 0, "nothing pending: was the broker really down?");
    println!("drain: posted; {initial} pending; waiting for the broker");
    let deadline = Instant::now() + timeout;
    let mut unchanged_at = Instant::now();
    let mut first: Option<(Instant, u64, u128)> = None;
    loop {
        anyhow::ensure!(
            Instant::now() < deadline,
            "outbox not drained after {timeout:?} (first publish seen: {})",
            first.is_some()
        );
        tokio::time::sleep(POLL).await;
        let Some(pending) = probe.pending().await else {
            continue;
        };
        let now = Instant::now();
        if first.is_none() {
            if pending >= initial {
                unchanged_at = now;
                continue;
            }
            let unix_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_millis();
            first = Some((now, pending, unix_ms));
        }
        if pending == 0 {
            let (first_at, first_pending, unix_ms) = first.expect("set above");
            let span = now - unchanged_at;
            let rate = initial as f64 / span.as_secs_f64();
            let after_first = (now - first_at).as_secs_f64();
            println!("first publish seen at : unix_ms={unix_ms}");
            println!("drained               : {initial} events in {:.2} s (from the last poll before the first publish)", span.as_secs_f64());
            println!("drain rate /s         : {rate:.0}  (conservative; {:.0}/s counted from the first drop)",
                first_pending as f64 / after_first.max(1e-3));
            println!("RESULT drain_rps={rate:.0} events={initial} first_publish_unix_ms={unix_ms}");
            return Ok(());
        }
    }
}

/// Polls until the outbox is empty; returns the pending count at the start
/// and how long it took.
pub async fn wait_drained(target: &Target, timeout: Duration) -> anyhow::Result<(u64, Duration)> {
    let mut probe = StatusProbe::new(target);
    let start = Instant::now();
    let mut first = None;
    while start.elapsed() < timeout {
        if let Some(pending) = probe.pending().await {
            first.get_or_insert(pending);
            if pending == 0 {
                return Ok((first.unwrap_or(0), start.elapsed()));
            }
        }
        tokio::time::sleep(POLL).await;
    }
    bail!("outbox still not empty after {timeout:?}")
}

/// Polls GET until it answers 200.
pub async fn wait_http(target: &Target, timeout: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if let Ok(stream) = TcpStream::connect(target.addr).await {
            if let Ok((mut sender, conn)) = handshake(TokioIo::new(stream)).await {
                tokio::spawn(conn);
                let request = Request::get(&target.path)
                    .header(HOST, &target.authority)
                    .body(Empty::<Bytes>::new())?;
                if let Ok(r) = sender.send_request(request).await {
                    if r.status().is_success() {
                        return Ok(());
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{target} did not answer 200 within {timeout:?}")
}
