//! The server side of the benchmark: the trivial axum handler for the
//! baseline, and the probes of a running hookbridge (health, outbox depth).

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::Empty;
use hyper::client::conn::http1::handshake;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::load::{Conn, Target};

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

/// Answers every `POST /v1/traces` on `listen` (a loopback address) 200 and
/// drops the body, for `duration`; then prints what it received.
pub async fn otlp_sink(listen: std::net::SocketAddr, duration: Duration) -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    if !listen.ip().is_loopback() {
        bail!("otlp-sink listens on loopback only, not {listen}");
    }
    let received = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    let counted = received.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: Bytes| {
            let counted = counted.clone();
            async move {
                counted.0.fetch_add(1, Ordering::Relaxed);
                counted.1.fetch_add(body.len() as u64, Ordering::Relaxed);
                [(CONTENT_TYPE, "application/x-protobuf")]
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    println!("otlp-sink: listening on {listen}");
    // Ends after `duration`, or on SIGTERM or Ctrl-C, and reports.
    let stop = async move {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut term) => {
                    term.recv().await;
                }
                Err(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(duration) => {}
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
        }
    };
    let served = axum::serve(listener, app).with_graceful_shutdown(stop);
    served.await.context("otlp-sink failed")?;
    println!(
        "otlp-sink: {} export requests, {} bytes",
        received.0.load(Ordering::Relaxed),
        received.1.load(Ordering::Relaxed)
    );
    Ok(())
}
