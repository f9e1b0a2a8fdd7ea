//! The accept loop: every connection served by hyper's HTTP/1 builder with
//! the configured limits, tracked so that shutdown can wait for it and then
//! drop it.
//!
//! - At most `max_connections` are served at once. A connection that
//!   arrives at the cap evicts an idle one, the oldest that never completed
//!   a request head first (a slow-loris), else the oldest idle keep-alive
//!   one; when every connection has a request in flight, new ones wait in
//!   the kernel's accept queue, which costs no file descriptor.
//! - hyper closes a connection whose request head is not complete within
//!   `header_timeout` (also an idle keep-alive connection) or is larger than
//!   `max_header_bytes`; the body deadline is the router's (`http::public`).
//! - On shutdown the listener is closed, every connection is asked to finish
//!   its request and close, and whatever is still open at `shutdown_timeout`
//!   is aborted: a body that never ends cannot hold the process.
//! - With TLS, the handshake must also finish within `header_timeout`; the
//!   certificate is re-read when its files change or on SIGHUP (new
//!   handshakes use it, open connections keep theirs).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::Request;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinSet;
use tower::ServiceExt;

use super::tls::Tls;
use crate::config::ServerConfig;

/// Delay after a failed `accept` (for example out of file descriptors)
/// before the next one, so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// What one listener enforces on its connections.
#[derive(Debug, Clone)]
pub struct Limits {
    pub header_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_connections: usize,
    pub shutdown_timeout: Duration,
}

impl Limits {
    /// The public listener's limits, from `[server]`.
    pub fn public(c: &ServerConfig) -> Self {
        Self {
            header_timeout: Duration::from_millis(c.header_timeout_ms),
            max_header_bytes: c.max_header_bytes,
            max_connections: c.max_connections,
            shutdown_timeout: Duration::from_millis(c.shutdown_timeout_ms),
        }
    }

    /// The admin listener: the same timeouts, few connections.
    pub fn admin(c: &ServerConfig) -> Self {
        Self {
            max_connections: 32,
            ..Self::public(c)
        }
    }
}

/// Serves `router` on `listener` until `shutdown` resolves, then closes the
/// listener, lets open requests finish for `limits.shutdown_timeout` and
/// drops the connections left. Returns once every connection task ended.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    mut tls: Option<Tls>,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_header_size(limits.max_header_bytes)
        .max_buf_size(limits.max_header_bytes.max(8192) * 2);
    let builder = Arc::new(builder);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let live = Arc::new(Live::default());
    let (closing_tx, closing) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut reload = tls.as_ref().map(|t| tokio::time::interval(t.check_every()));
    let mut hangup = Hangup(tls.as_ref().and_then(|_| hangup_signal()));
    tokio::pin!(shutdown);
    loop {
        while connections.try_join_next().is_some() {}
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            _ = tick(&mut reload) => {
                if let Some(tls) = &mut tls {
                    tls.reload_if_changed().await;
                }
                continue;
            }
            _ = hangup.recv() => {
                if let Some(tls) = &mut tls {
                    tls.reload().await;
                }
                continue;
            }
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                }
            }
        };
        let permit = match permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                // At the cap: make room by closing an idle connection, or
                // wait for one to end if every connection is busy.
                live.evict_one();
                tokio::select! {
                    _ = &mut shutdown => break,
                    permit = permits.clone().acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => break,
                    },
                }
            }
        };
        let state = live.add();
        let connection = Connection {
            builder: builder.clone(),
            service: WithPeer {
                router: router.clone(),
                peer,
                state: state.clone(),
            },
            handshake: tls.as_ref().map(|t| (t.acceptor(), limits.header_timeout)),
            closing: closing.clone(),
        };
        let live = live.clone();
        connections.spawn(async move {
            let _permit = permit;
            connection.run(stream).await;
            live.remove(state.id);
        });
    }
    drop(listener);
    let _ = closing_tx.send(true);
    let open = connections.len();
    let finished = tokio::time::timeout(limits.shutdown_timeout, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        tracing::warn!(
            open,
            left = connections.len(),
            "shutdown deadline reached; dropping open connections"
        );
        connections.shutdown().await;
    }
}

/// Resolves once shutdown began (the guard is not held across an await).
async fn closed(closing: &mut watch::Receiver<bool>) {
    let _ = closing.wait_for(|closing| *closing).await;
}

/// Ticks when TLS files should be checked; never without TLS.
async fn tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// SIGHUP while TLS is on (it reloads the certificate); never otherwise,
/// so that without TLS the signal keeps its default meaning.
struct Hangup(Option<tokio::signal::unix::Signal>);

impl Hangup {
    async fn recv(&mut self) {
        match &mut self.0 {
            Some(signal) => {
                if signal.recv().await.is_none() {
                    self.0 = None;
                }
            }
            None => std::future::pending().await,
        }
    }
}

fn hangup_signal() -> Option<tokio::signal::unix::Signal> {
    use tokio::signal::unix::{signal, SignalKind};
    signal(SignalKind::hangup()).ok()
}

/// Both kinds of stream behind one type, so one hyper connection type
/// serves plain and TLS connections.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// What the accept loop knows of one open connection, to pick which one
/// to evict at the cap.
struct ConnState {
    /// Accept order: lower is older.
    id: u64,
    /// Request heads completed on this connection.
    requests: AtomicU64,
    /// Requests being handled right now.
    in_flight: AtomicUsize,
    evicted: AtomicBool,
    evict: Notify,
}

/// The open connections, oldest first.
#[derive(Default)]
struct Live {
    next_id: AtomicU64,
    open: Mutex<BTreeMap<u64, Arc<ConnState>>>,
}

impl Live {
    fn add(&self) -> Arc<ConnState> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(ConnState {
            id,
            requests: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            evicted: AtomicBool::new(false),
            evict: Notify::new(),
        });
        if let Ok(mut open) = self.open.lock() {
            open.insert(id, state.clone());
        }
        state
    }

    fn remove(&self, id: u64) {
        if let Ok(mut open) = self.open.lock() {
            open.remove(&id);
        }
    }

    /// Closes the oldest idle connection that never completed a request
    /// head, else (when no such one is on its way out already) the oldest
    /// idle keep-alive one; none while every one is busy.
    fn evict_one(&self) {
        let Ok(open) = self.open.lock() else { return };
        let idle = |c: &&Arc<ConnState>| c.in_flight.load(Ordering::Acquire) == 0;
        let fresh = |c: &&Arc<ConnState>| c.requests.load(Ordering::Relaxed) == 0;
        let evicted = |c: &&Arc<ConnState>| c.evicted.load(Ordering::Relaxed);
        let mut headless = open.values().filter(idle).filter(fresh);
        let victim = match headless.find(|c| !evicted(c)) {
            Some(victim) => Some(victim),
            // A never-finished head is closing already: its permit comes
            // back soon, no need to cut a client's keep-alive connection.
            None if open
                .values()
                .filter(idle)
                .filter(fresh)
                .any(|c| evicted(&c)) =>
            {
                None
            }
            None => open.values().filter(idle).find(|c| !evicted(c)),
        };
        if let Some(victim) = victim {
            victim.evicted.store(true, Ordering::Relaxed);
            victim.evict.notify_one();
        }
    }
}

/// The router, with the peer's address for the rate limiter, counting the
/// connection's requests for eviction.
#[derive(Clone)]
struct WithPeer {
    router: Router,
    peer: SocketAddr,
    state: Arc<ConnState>,
}

type Answer = Pin<Box<dyn Future<Output = Result<axum::response::Response, Infallible>> + Send>>;

impl hyper::service::Service<Request<Incoming>> for WithPeer {
    type Response = axum::response::Response;
    type Error = Infallible;
    type Future = Answer;

    fn call(&self, mut request: Request<Incoming>) -> Self::Future {
        request.extensions_mut().insert(ConnectInfo(self.peer));
        let state = self.state.clone();
        state.requests.fetch_add(1, Ordering::Relaxed);
        state.in_flight.fetch_add(1, Ordering::AcqRel);
        let answer = self.router.clone().oneshot(request);
        Box::pin(async move {
            let response = answer.await;
            state.in_flight.fetch_sub(1, Ordering::AcqRel);
            response
        })
    }
}

struct Connection {
    builder: Arc<http1::Builder>,
    service: WithPeer,
    handshake: Option<(tokio_rustls::TlsAcceptor, Duration)>,
    closing: watch::Receiver<bool>,
}

impl Connection {
    async fn run(mut self, stream: TcpStream) {
        let state = self.service.state.clone();
        tokio::select! {
            _ = self.serve(stream) => {}
            _ = state.evict.notified() => {
                tracing::debug!(connection = state.id, "idle connection evicted at the cap");
            }
        }
    }

    async fn serve(&mut self, stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        let peer = self.service.peer;
        let io: Box<dyn Io> = match self.handshake.take() {
            None => Box::new(stream),
            Some((acceptor, limit)) => {
                let accepted = tokio::select! {
                    accepted = tokio::time::timeout(limit, acceptor.accept(stream)) => accepted,
                    _ = closed(&mut self.closing) => return,
                };
                match accepted {
                    Ok(Ok(tls)) => Box::new(tls),
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                }
            }
        };
        let connection = self
            .builder
            .serve_connection(TokioIo::new(io), self.service.clone());
        tokio::pin!(connection);
        let result = tokio::select! {
            result = connection.as_mut() => result,
            _ = closed(&mut self.closing) => {
                connection.as_mut().graceful_shutdown();
                connection.await
            }
        };
        if let Err(e) = result {
            tracing::debug!(%peer, error = %e, "connection closed with an error");
        }
    }
}
