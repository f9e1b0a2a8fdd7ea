//! The accept loop: every connection served by hyper's HTTP/1 builder with
//! the configured limits, tracked so that shutdown can wait for it and then
//! drop it.
//!
//! Connection slots are shared so that a flood from elsewhere cannot take
//! the sender's (on the public listener, with [`Clients`]):
//!
//! - A client in penalty ([`Clients`]) is closed at accept, before a byte
//!   is read. Once fewer than a quarter of the slots are free, a
//!   connection past `max_connections_per_client` takes the place of its
//!   address's own oldest idle connection; when all of them
//!   are busy it waits (off the accept loop, at most `max_connections` such
//!   connections, at most `header_timeout`) for one of them to end, and is
//!   closed only then.
//! - Known senders have `sender_connections` slots of their own, are never
//!   evicted and never capped per address. With senders configured, a
//!   connection from elsewhere that finds no slot (after an eviction) is
//!   closed; without them it waits in the kernel's accept queue, as every
//!   connection then does at the cap.
//! - At `max_connections`, an idle connection is evicted: from the address
//!   holding the most connections, never one with bytes waiting to be read,
//!   one that carried a valid callback last only when nothing else is left,
//!   the oldest first; and always gracefully (hyper closes an idle
//!   connection and a busy one after its answer, then the half-close below).
//! - A connection closed by an answer (`Connection: close`: 413, 408, 429,
//!   ... sent before the body was read) ends with a half-close and a bounded
//!   drain (at most twice the body limit plus 64 KiB, for at most 2 s), so the
//!   answer reaches a client that is still sending instead of being
//!   destroyed by the reset a close with unread bytes sends.
//! - hyper closes a connection whose request head is not complete within
//!   `header_timeout` (also an idle keep-alive connection) or is larger than
//!   `max_header_bytes`; such a malformed or unfinished head is charged to
//!   the client's refusal budget. The body deadline is the router's.
//! - On shutdown the listener is closed, every connection is asked to finish
//!   its request and close, and whatever is still open at `shutdown_timeout`
//!   is aborted: a body that never ends cannot hold the process.
//! - With TLS, the handshake must also finish within `header_timeout`; the
//!   certificate is re-read when its files change or on SIGHUP (new
//!   handshakes use it, open connections keep theirs).

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::Request;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tower::ServiceExt;

use super::clients::{canonical, Clients};
use super::tls::Tls;
use crate::config::ServerConfig;
use crate::sync::lock;

/// Delay after a failed `accept` (for example out of file descriptors)
/// before the next one, so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Longest drain of a closing connection's unread bytes.
const LINGER: Duration = Duration::from_secs(2);

/// What one listener enforces on its connections.
#[derive(Debug, Clone)]
pub struct Limits {
    pub header_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_connections: usize,
    /// Most connections of one non-sender address.
    pub max_per_client: usize,
    /// Slots only known senders may use (part of `max_connections`).
    pub sender_slots: usize,
    /// Most unread bytes drained from a closing connection.
    pub linger_bytes: usize,
    pub shutdown_timeout: Duration,
}

impl Limits {
    /// The public listener's limits, from `[server]`.
    pub fn public(c: &ServerConfig) -> Self {
        Self {
            header_timeout: Duration::from_millis(c.header_timeout_ms),
            max_header_bytes: c.max_header_bytes,
            max_connections: c.max_connections,
            max_per_client: c.max_connections_per_client,
            sender_slots: if c.senders.is_empty() {
                0
            } else {
                c.sender_connections
                    .min(c.max_connections.saturating_sub(1))
            },
            linger_bytes: c
                .body_limit_bytes
                .saturating_mul(2)
                .saturating_add(64 * 1024),
            shutdown_timeout: Duration::from_millis(c.shutdown_timeout_ms),
        }
    }

    /// The admin listener: the same timeouts, few connections.
    pub fn admin(c: &ServerConfig) -> Self {
        Self {
            max_connections: 32,
            max_per_client: 32,
            sender_slots: 0,
            linger_bytes: 128 * 1024,
            ..Self::public(c)
        }
    }
}

/// Serves `router` on `listener` until `shutdown` resolves, then closes the
/// listener, lets open requests finish for `limits.shutdown_timeout` and
/// drops the connections left. Returns once every connection task ended.
/// `clients` (the public listener) enables penalties, per-address caps and
/// known senders' slots.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    mut tls: Option<Tls>,
    clients: Option<Arc<Clients>>,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_header_size(limits.max_header_bytes)
        .max_buf_size(limits.max_header_bytes.max(8192) * 2);
    let builder = Arc::new(builder);
    let slots = Arc::new(Slots {
        shared: Arc::new(Semaphore::new(limits.max_connections - limits.sender_slots)),
        senders: Arc::new(Semaphore::new(limits.sender_slots)),
    });
    // Connections waiting for their address to fall under its cap.
    let waiters = Arc::new(Semaphore::new(limits.max_connections));
    let live = Arc::new(Live::default());
    let (closing_tx, closing) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut reload = tls.as_ref().map(|t| tokio::time::interval(t.check_every()));
    let mut hangup = Hangup(tls.as_ref().and_then(|_| hangup_signal()));
    tokio::pin!(shutdown);
    loop {
        reap(&mut connections);
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
        let ip = canonical(peer.ip());
        let Some(kind) = classify(clients.as_deref(), ip) else {
            continue;
        };
        let start = Start {
            serving: Serving {
                builder: builder.clone(),
                handshake: tls.as_ref().map(|t| (t.acceptor(), limits.header_timeout)),
                closing: closing.clone(),
                clients: clients.clone().filter(|_| kind == Kind::Other),
                linger_bytes: limits.linger_bytes,
            },
            router: router.clone(),
            live: live.clone(),
        };
        // The per-address cap only binds once the listener is filling up:
        // until then a heavy address costs nobody anything, and closing a
        // sender's idle connection could race its next request.
        let pressed = slots.shared.available_permits() < limits.max_connections / 4;
        if kind == Kind::Other
            && pressed
            && live.count(ip) >= limits.max_per_client
            && !live.evict_own(ip)
        {
            // Every connection of that address is busy: this one waits, off
            // the accept loop and bounded in number and time, for one of
            // them to end (a sender's burst is served late, never refused).
            let Ok(waiting) = waiters.clone().try_acquire_owned() else {
                if let Some(c) = &clients {
                    c.refused_at_capacity(ip);
                }
                tracing::debug!(client = %ip, "per-address connection cap: closed at accept");
                continue;
            };
            let (slots, limits, clients) = (slots.clone(), limits.clone(), clients.clone());
            connections.spawn(async move {
                let deadline = tokio::time::Instant::now() + limits.header_timeout;
                let permit = match start
                    .live
                    .wait_below(ip, limits.max_per_client, deadline)
                    .await
                {
                    true => slots.take_by(kind, &start.live, ip, deadline).await,
                    false => None,
                };
                drop(waiting);
                match permit {
                    Some(permit) => start.run(stream, peer, ip, kind, permit).await,
                    None => {
                        if let Some(c) = &clients {
                            c.refused_at_capacity(ip);
                        }
                    }
                }
            });
            continue;
        }
        let permit = match slots.try_take(kind) {
            Some(permit) => permit,
            None => {
                // At the cap: make room by closing an idle connection, or
                // wait for one to end if every connection is busy.
                live.evict_one(ip);
                if kind == Kind::Other && limits.sender_slots > 0 {
                    // Others never queue in front of a sender's connection.
                    match slots.wait(kind, Duration::from_millis(50)).await {
                        Some(permit) => permit,
                        None => {
                            if let Some(c) = &clients {
                                c.refused_at_capacity(ip);
                            }
                            continue;
                        }
                    }
                } else {
                    tokio::select! {
                        _ = &mut shutdown => break,
                        permit = slots.take(kind) => match permit {
                            Some(permit) => permit,
                            None => break,
                        },
                    }
                }
            }
        };
        connections.spawn(start.run(stream, peer, ip, kind, permit));
    }
    drop(listener);
    if closing_tx.send(true).is_err() {
        tracing::debug!("no connection was open at shutdown");
    }
    finish(connections, limits.shutdown_timeout).await;
}

/// What kind of client `ip` is on this listener; `None`: in penalty, and
/// its connection is dropped unread (the cheapest refusal there is).
fn classify(clients: Option<&Clients>, ip: IpAddr) -> Option<Kind> {
    Some(match clients {
        Some(c) if c.is_sender(ip) => Kind::Sender,
        Some(c) if c.is_proxy(ip) => Kind::Proxy,
        Some(c) if c.penalized(ip) => {
            c.refused_at_accept(ip);
            return None;
        }
        Some(_) => Kind::Other,
        None => Kind::Proxy,
    })
}

/// Lets open requests finish for `timeout`, then drops the connections
/// left; every ending is reported (a panic as a panic).
async fn finish(mut connections: JoinSet<()>, timeout: Duration) {
    let open = connections.len();
    let finished = tokio::time::timeout(timeout, async {
        while let Some(ended) = connections.join_next().await {
            report(ended);
        }
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

/// What a connection needs to be served, taken at accept.
struct Start {
    serving: Serving,
    router: Router,
    live: Arc<Live>,
}

/// How a listener serves each of its connections.
struct Serving {
    builder: Arc<http1::Builder>,
    handshake: Option<(tokio_rustls::TlsAcceptor, Duration)>,
    closing: watch::Receiver<bool>,
    /// Where a malformed or unfinished head is charged (non-senders only).
    clients: Option<Arc<Clients>>,
    linger_bytes: usize,
}

impl Start {
    /// Serves the connection on its slot until it ends.
    async fn run(
        self,
        stream: TcpStream,
        peer: SocketAddr,
        ip: IpAddr,
        kind: Kind,
        permit: OwnedSemaphorePermit,
    ) {
        let probe = probe_of(&stream);
        let state = self.live.add(ip, kind == Kind::Sender, probe);
        let connection = Connection {
            serving: self.serving,
            service: WithPeer {
                router: self.router,
                peer,
                state: state.clone(),
            },
        };
        connection.run(stream).await;
        self.live.remove(&state);
        drop(permit);
    }
}

/// Collects the connection tasks that ended, reporting any that panicked.
fn reap(connections: &mut JoinSet<()>) {
    while let Some(ended) = connections.try_join_next() {
        report(ended);
    }
}

fn report(ended: Result<(), tokio::task::JoinError>) {
    if let Err(e) = ended {
        if e.is_panic() {
            tracing::error!(panic = %crate::sync::panic_message(&*e.into_panic()), "a connection task panicked");
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A known sender.
    Sender,
    /// A trusted proxy, or any peer of a listener without client rules.
    Proxy,
    Other,
}

/// The connection slots: shared ones, and the senders' own.
struct Slots {
    shared: Arc<Semaphore>,
    senders: Arc<Semaphore>,
}

impl Slots {
    fn try_take(&self, kind: Kind) -> Option<OwnedSemaphorePermit> {
        self.shared.clone().try_acquire_owned().ok().or_else(|| {
            (kind == Kind::Sender)
                .then(|| self.senders.clone().try_acquire_owned().ok())
                .flatten()
        })
    }

    /// A slot once one is free; `None` when the semaphores are closed.
    async fn take(&self, kind: Kind) -> Option<OwnedSemaphorePermit> {
        if kind == Kind::Sender {
            tokio::select! {
                p = self.shared.clone().acquire_owned() => p.ok(),
                p = self.senders.clone().acquire_owned() => p.ok(),
            }
        } else {
            self.shared.clone().acquire_owned().await.ok()
        }
    }

    /// A slot by `deadline`, evicting an idle connection first if none is
    /// free (for a connection that waited for its address's cap).
    async fn take_by(
        &self,
        kind: Kind,
        live: &Live,
        ip: IpAddr,
        deadline: tokio::time::Instant,
    ) -> Option<OwnedSemaphorePermit> {
        if let Some(permit) = self.try_take(kind) {
            return Some(permit);
        }
        live.evict_one(ip);
        tokio::time::timeout_at(deadline, self.take(kind))
            .await
            .ok()
            .flatten()
    }

    /// A slot within `wait`, if one frees up.
    async fn wait(&self, kind: Kind, wait: Duration) -> Option<OwnedSemaphorePermit> {
        tokio::time::timeout(wait, self.take(kind))
            .await
            .ok()
            .flatten()
    }
}

/// Resolves once shutdown began (the guard is not held across an await).
async fn closed(closing: &mut watch::Receiver<bool>) {
    if closing.wait_for(|closing| *closing).await.is_err() {
        // The accept loop is gone: that is shutdown too.
    }
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

/// A second handle on the socket, to peek at unread bytes without taking
/// them from hyper. `None` when the socket cannot be duplicated (then the
/// connection is never evicted).
fn probe_of(stream: &TcpStream) -> Option<std::net::TcpStream> {
    let dup = socket2::SockRef::from(stream).try_clone().ok()?;
    Some(dup.into())
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
    ip: IpAddr,
    sender: bool,
    /// Request heads completed on this connection.
    requests: AtomicU64,
    /// Requests being handled right now.
    in_flight: AtomicUsize,
    /// Bytes read from the client.
    read: AtomicU64,
    /// The last answer on this connection accepted a callback.
    valid_last: AtomicBool,
    /// An answer said `Connection: close`, maybe before its request was
    /// read whole: the close drains what the client still sends.
    linger: AtomicBool,
    evicted: AtomicBool,
    evict: Notify,
    probe: Option<std::net::TcpStream>,
}

impl ConnState {
    fn idle(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
    }

    /// Whether the client has sent bytes hyper has not read yet (its next
    /// request): such a connection is never evicted.
    fn unread(&self) -> bool {
        let Some(probe) = &self.probe else {
            return true;
        };
        let mut byte = [0u8; 1];
        // The socket is non-blocking (tokio set it so): `WouldBlock` means
        // nothing is waiting; 0 means the client closed its side.
        matches!(probe.peek(&mut byte), Ok(n) if n > 0)
    }

    fn evictable(&self) -> bool {
        !self.sender && !self.evicted.load(Ordering::Relaxed) && self.idle() && !self.unread()
    }

    fn evict(&self) {
        self.evicted.store(true, Ordering::Relaxed);
        self.evict.notify_one();
    }
}

/// The open connections, oldest first, and how many each address holds.
#[derive(Default)]
struct Live {
    next_id: AtomicU64,
    open: Mutex<Open>,
    /// Notified whenever a connection ends.
    freed: Notify,
}

#[derive(Default)]
struct Open {
    by_id: BTreeMap<u64, Arc<ConnState>>,
    per_ip: HashMap<IpAddr, usize>,
}

impl Live {
    fn add(&self, ip: IpAddr, sender: bool, probe: Option<std::net::TcpStream>) -> Arc<ConnState> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(ConnState {
            id,
            ip,
            sender,
            requests: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            read: AtomicU64::new(0),
            valid_last: AtomicBool::new(false),
            linger: AtomicBool::new(false),
            evicted: AtomicBool::new(false),
            evict: Notify::new(),
            probe,
        });
        let mut open = lock(&self.open);
        open.by_id.insert(id, state.clone());
        *open.per_ip.entry(ip).or_default() += 1;
        state
    }

    fn remove(&self, state: &ConnState) {
        let mut open = lock(&self.open);
        open.by_id.remove(&state.id);
        if let Some(n) = open.per_ip.get_mut(&state.ip) {
            *n -= 1;
            if *n == 0 {
                open.per_ip.remove(&state.ip);
            }
        }
        drop(open);
        self.freed.notify_waiters();
    }

    /// Waits until `ip` holds fewer than `cap` connections; false at
    /// `deadline`.
    async fn wait_below(&self, ip: IpAddr, cap: usize, deadline: tokio::time::Instant) -> bool {
        loop {
            let freed = self.freed.notified();
            if self.count(ip) < cap {
                return true;
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return false;
            }
        }
    }

    fn count(&self, ip: IpAddr) -> usize {
        lock(&self.open).per_ip.get(&ip).copied().unwrap_or(0)
    }

    /// Evicts `ip`'s own oldest idle connection; false when it has none.
    fn evict_own(&self, ip: IpAddr) -> bool {
        let open = lock(&self.open);
        let victim = open
            .by_id
            .values()
            .filter(|c| c.ip == ip && c.evictable())
            .min_by_key(|c| (c.valid_last.load(Ordering::Relaxed), c.id));
        match victim {
            Some(victim) => {
                victim.evict();
                true
            }
            None => false,
        }
    }

    /// Evicts one idle connection to make room for one from `newcomer`:
    /// from the address holding the most connections (the newcomer's own
    /// on a tie), one that carried a valid callback last only when no other
    /// is left, the oldest first. None while a victim is still closing or
    /// nothing is evictable.
    fn evict_one(&self, newcomer: IpAddr) {
        let open = lock(&self.open);
        let closing = open
            .by_id
            .values()
            .any(|c| c.evicted.load(Ordering::Relaxed));
        if closing {
            // Its slot comes back soon; no need to cut another connection.
            return;
        }
        let victim = open
            .by_id
            .values()
            .filter(|c| c.evictable())
            .min_by_key(|c| {
                let held = open.per_ip.get(&c.ip).copied().unwrap_or(0);
                (
                    c.valid_last.load(Ordering::Relaxed),
                    std::cmp::Reverse(held),
                    c.ip != newcomer,
                    c.id,
                )
            });
        if let Some(victim) = victim {
            tracing::debug!(connection = victim.id, client = %victim.ip, "idle connection evicted at the cap");
            victim.evict();
        }
    }
}

/// The router, with the peer's address for the client rules, counting the
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
        let callback = request.uri().path() == "/webhooks/kinovi";
        let state = self.state.clone();
        state.requests.fetch_add(1, Ordering::Relaxed);
        state.in_flight.fetch_add(1, Ordering::AcqRel);
        let answer = self.router.clone().oneshot(request);
        Box::pin(async move {
            let response = answer.await;
            if let Ok(response) = &response {
                let valid = callback && response.status().is_success();
                state.valid_last.store(valid, Ordering::Relaxed);
                if response
                    .headers()
                    .get(hyper::header::CONNECTION)
                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"))
                {
                    state.linger.store(true, Ordering::Relaxed);
                }
            }
            state.in_flight.fetch_sub(1, Ordering::AcqRel);
            response
        })
    }
}

struct Connection {
    serving: Serving,
    service: WithPeer,
}

impl Connection {
    async fn run(mut self, stream: TcpStream) {
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY; serving without it");
        }
        let state = self.service.state.clone();
        let peer = self.service.peer;
        let stream = Linger::new(stream, state.clone(), self.serving.linger_bytes);
        let io: Box<dyn Io> = match self.serving.handshake.take() {
            None => Box::new(stream),
            Some((acceptor, limit)) => {
                let accepted = tokio::select! {
                    accepted = tokio::time::timeout(limit, acceptor.accept(stream)) => accepted,
                    _ = closed(&mut self.serving.closing) => return,
                    _ = state.evict.notified() => return,
                };
                match accepted {
                    Ok(Ok(tls)) => Box::new(tls),
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        self.charge();
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        self.charge();
                        return;
                    }
                }
            }
        };
        let connection = self
            .serving
            .builder
            .serve_connection(TokioIo::new(io), self.service.clone());
        tokio::pin!(connection);
        let result = tokio::select! {
            result = connection.as_mut() => result,
            _ = closed(&mut self.serving.closing) => {
                connection.as_mut().graceful_shutdown();
                connection.await
            }
            _ = state.evict.notified() => {
                connection.as_mut().graceful_shutdown();
                connection.await
            }
        };
        if let Err(e) = result {
            tracing::debug!(%peer, error = %e, "connection closed with an error");
            // A malformed head, or one that never finished although bytes
            // came: the client's doing. An idle keep-alive connection that
            // times out is not charged.
            let unfinished = e.is_timeout()
                && state.read.load(Ordering::Relaxed) > 0
                && state.requests.load(Ordering::Relaxed) == 0;
            if e.is_parse() || e.is_parse_too_large() || unfinished {
                self.charge();
            }
        }
    }

    fn charge(&self) {
        if let Some(clients) = &self.serving.clients {
            clients.charge(canonical(self.service.peer.ip()));
        }
    }
}

/// The TCP stream under hyper (and TLS): counts what is read, and ends the
/// connection with a half-close and a bounded drain, so that an answer
/// written before the request was read whole is not destroyed by the reset
/// a close with unread bytes would send.
struct Linger {
    stream: TcpStream,
    state: Arc<ConnState>,
    /// Bytes still allowed to be drained.
    budget: usize,
    drain: Option<Pin<Box<tokio::time::Sleep>>>,
    shut: bool,
}

impl Linger {
    fn new(stream: TcpStream, state: Arc<ConnState>, budget: usize) -> Self {
        Self {
            stream,
            state,
            budget,
            drain: None,
            shut: false,
        }
    }
}

impl AsyncRead for Linger {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.state.read.fetch_add(n as u64, Ordering::Relaxed);
        }
        polled
    }
}

impl AsyncWrite for Linger {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    /// Sends FIN; then, when an answer closed the connection (maybe before
    /// its request was read whole), reads and drops what the client still
    /// sends until it closes too, the budget is spent or [`LINGER`] passed.
    /// An idle connection closes at once: nothing is left to read.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.shut {
            match Pin::new(&mut this.stream).poll_shutdown(cx) {
                Poll::Ready(Ok(())) => this.shut = true,
                // Already reset or closed by the client: nothing to save.
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
            if !this.state.linger.load(Ordering::Relaxed) {
                return Poll::Ready(Ok(()));
            }
            this.drain = Some(Box::pin(tokio::time::sleep(LINGER)));
        }
        let mut scratch = [0u8; 8192];
        loop {
            if this.budget == 0 {
                return Poll::Ready(Ok(()));
            }
            if let Some(deadline) = &mut this.drain {
                if deadline.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Ok(()));
                }
            }
            let want = this.budget.min(scratch.len());
            let mut buf = ReadBuf::new(&mut scratch[..want]);
            match Pin::new(&mut this.stream).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => this.budget -= buf.filled().len(),
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
