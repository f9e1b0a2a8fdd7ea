//! Who is calling, and what they may cost: the public listener's view of
//! client addresses.
//!
//! The provider sends each callback once and never retries, so every
//! protection here charges what gets **refused**, never what is accepted:
//!
//! - Valid callbacks pass at whatever rate the outbox can store. Only with
//!   known senders configured may `others_per_sec` hold every other address
//!   to a request rate.
//! - Every refusal (a 4xx answer, or a connection closed for a malformed or
//!   unfinished head) takes a token from the client's refusal bucket
//!   (governor's GCRA). A client with an empty bucket is in penalty for
//!   `penalty_secs`: its connections are closed at accept, before a byte is
//!   read, and a request that still reaches the router is answered 429
//!   before its body is read.
//! - Known senders (`server.senders`) are never charged, refused or
//!   evicted ([`super::serve`] gives them slots of their own).
//!
//! The client is the TCP peer, unless the peer is a trusted proxy: then the
//! right-most hop of the configured header (`X-Forwarded-For` or
//! `Forwarded`) that is not itself a trusted proxy. The other header, and
//! the header from any other peer, is ignored: a client cannot name itself.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde::Serialize;

use super::{close, ApiError};
use crate::config::{Cidr, ForwardedHeader, ServerConfig};
use crate::outbox::Stats;
use crate::sync::lock;

/// How many addresses each "top clients" table remembers.
const TOP_TRACKED: usize = 1024;

/// What the router learns of a request's client, for the handlers.
#[derive(Debug, Clone, Copy)]
pub struct ClientInfo {
    pub ip: IpAddr,
    /// A known sender (`server.senders`).
    pub sender: bool,
    /// The share of the backlog caps, in percent, this client may not
    /// fill (reserved for known senders); 0 for senders.
    pub reserved_percent: u8,
}

/// The public listener's client bookkeeping; one per listener.
pub struct Clients {
    senders: Vec<Cidr>,
    trusted: Vec<Cidr>,
    header: ForwardedHeader,
    refusals: Option<DefaultKeyedRateLimiter<IpAddr>>,
    others: Option<DefaultKeyedRateLimiter<IpAddr>>,
    penalty: Duration,
    max_clients: usize,
    reserved_percent: u8,
    /// Clients in penalty, until when.
    penalized: Mutex<HashMap<IpAddr, Instant>>,
    accepted: Mutex<Top>,
    refused: Mutex<Top>,
    clock: DefaultClock,
    stats: Arc<Stats>,
}

fn quota(per_sec: u32, burst: u32) -> Option<Quota> {
    let rate = NonZeroU32::new(per_sec)?;
    Some(Quota::per_second(rate).allow_burst(NonZeroU32::new(burst).unwrap_or(rate)))
}

/// IPv4-mapped IPv6 addresses are their IPv4 address.
pub(super) fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl Clients {
    pub fn new(config: &ServerConfig, stats: Arc<Stats>) -> Self {
        // Validated at load; an invalid entry here names nobody.
        let cidrs = |list: &[String]| -> Vec<Cidr> {
            list.iter().filter_map(|c| Cidr::parse(c).ok()).collect()
        };
        let r = &config.rate_limit;
        let senders = cidrs(&config.senders);
        Self {
            refusals: quota(r.refusals_per_sec, r.refusal_burst).map(RateLimiter::keyed),
            others: if senders.is_empty() {
                None
            } else {
                quota(r.others_per_sec, r.others_burst).map(RateLimiter::keyed)
            },
            reserved_percent: if senders.is_empty() {
                0
            } else {
                config.sender_backlog_percent
            },
            senders,
            trusted: cidrs(&r.trusted_proxies),
            header: r.forwarded_header,
            penalty: Duration::from_secs(r.penalty_secs),
            max_clients: r.max_clients,
            penalized: Mutex::default(),
            accepted: Mutex::new(Top::default()),
            refused: Mutex::new(Top::default()),
            clock: DefaultClock::default(),
            stats,
        }
    }

    /// Whether `ip` is a known sender.
    pub fn is_sender(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.senders.iter().any(|c| c.contains(ip))
    }

    /// Whether `ip` is a trusted proxy (its connections carry many clients).
    pub fn is_proxy(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.trusted.iter().any(|c| c.contains(ip))
    }

    /// Whether senders are configured (then slots and backlog are shared out).
    pub fn has_senders(&self) -> bool {
        !self.senders.is_empty()
    }

    /// The client's address as this listener sees it.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = canonical(peer);
        if !self.is_proxy(peer) {
            return peer;
        }
        // Each trusted proxy appends the hop it received from: walk back
        // past our own proxies; the first other hop is the client.
        let hops = forwarded_for(headers, self.header);
        hops.iter()
            .rev()
            .map(|ip| canonical(*ip))
            .find(|ip| !self.is_proxy(*ip))
            .or_else(|| hops.first().copied().map(canonical))
            .unwrap_or(peer)
    }

    /// Whether `ip` is in penalty now (never a known sender).
    pub fn penalized(&self, ip: IpAddr) -> bool {
        let mut penalized = lock(&self.penalized);
        if penalized.is_empty() {
            return false;
        }
        match penalized.get(&ip) {
            Some(until) if *until > Instant::now() => true,
            Some(_) => {
                penalized.remove(&ip);
                false
            }
            None => false,
        }
    }

    /// A request or connection of `ip` was refused: charge its budget, and
    /// start a penalty when the budget is spent.
    pub fn charge(&self, ip: IpAddr) {
        if self.is_sender(ip) {
            return;
        }
        lock(&self.refused).add(ip);
        let Some(limiter) = &self.refusals else {
            return;
        };
        if limiter.len() >= self.max_clients {
            limiter.retain_recent();
        }
        if limiter.check_key(&ip).is_ok() {
            return;
        }
        let now = Instant::now();
        let mut penalized = lock(&self.penalized);
        if penalized.len() >= self.max_clients {
            penalized.retain(|_, until| *until > now);
        }
        if penalized.len() < self.max_clients || penalized.contains_key(&ip) {
            let fresh = penalized.insert(ip, now + self.penalty).is_none();
            if fresh {
                Stats::add(&self.stats.penalties, 1);
                tracing::info!(client = %ip, secs = self.penalty.as_secs(), "client past its refusal budget: refused for a while");
            }
        }
    }

    /// A connection of a client in penalty was closed at accept.
    pub fn refused_at_accept(&self, ip: IpAddr) {
        Stats::add(&self.stats.refused_penalty, 1);
        lock(&self.refused).add(ip);
    }

    /// A connection of `ip` was closed at accept because that address, or
    /// the listener for addresses other than known senders, had no slot.
    pub fn refused_at_capacity(&self, ip: IpAddr) {
        Stats::add(&self.stats.refused_connections, 1);
        lock(&self.refused).add(ip);
    }

    /// `ip`'s callback was accepted (answered 2xx).
    pub fn accepted(&self, ip: IpAddr) {
        lock(&self.accepted).add(ip);
    }

    /// `Err(wait)` when `ip` is over `others_per_sec` (never a sender).
    fn check_others(&self, ip: IpAddr) -> Result<(), Duration> {
        let Some(limiter) = &self.others else {
            return Ok(());
        };
        if limiter.len() >= self.max_clients {
            limiter.retain_recent();
        }
        limiter
            .check_key(&ip)
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// The top addresses of accepted and of refused callbacks, for
    /// `/admin/status`.
    pub fn top(&self, n: usize) -> TopClients {
        TopClients {
            accepted: lock(&self.accepted).top(n),
            refused: lock(&self.refused).top(n),
            penalized: lock(&self.penalized)
                .iter()
                .filter(|(_, until)| **until > Instant::now())
                .count(),
        }
    }
}

/// `/admin/status`'s `clients`.
#[derive(Debug, Serialize)]
pub struct TopClients {
    pub accepted: Vec<ClientCount>,
    pub refused: Vec<ClientCount>,
    /// Clients in penalty right now.
    pub penalized: usize,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ClientCount {
    pub address: IpAddr,
    pub count: u64,
}

/// The heaviest addresses, approximately (Space-Saving: a newcomer at the
/// cap takes the place of the lightest entry and inherits its count, so a
/// heavy address is never pushed out by a stream of one-off ones).
#[derive(Default)]
struct Top {
    counts: HashMap<IpAddr, u64>,
}

impl Top {
    fn add(&mut self, ip: IpAddr) {
        if let Some(count) = self.counts.get_mut(&ip) {
            *count += 1;
            return;
        }
        let mut inherited = 0;
        if self.counts.len() >= TOP_TRACKED {
            if let Some((&lightest, &count)) = self.counts.iter().min_by_key(|(_, c)| **c) {
                self.counts.remove(&lightest);
                inherited = count;
            }
        }
        self.counts.insert(ip, inherited + 1);
    }

    fn top(&self, n: usize) -> Vec<ClientCount> {
        let mut all: Vec<ClientCount> = self
            .counts
            .iter()
            .map(|(address, count)| ClientCount {
                address: *address,
                count: *count,
            })
            .collect();
        all.sort_by(|a, b| b.count.cmp(&a.count).then(a.address.cmp(&b.address)));
        all.truncate(n);
        all
    }
}

/// Every address of the configured header, in header order; unparsable
/// entries are skipped.
fn forwarded_for(headers: &HeaderMap, header: ForwardedHeader) -> Vec<IpAddr> {
    let values = |name| headers.get_all(name).iter().filter_map(|v| v.to_str().ok());
    match header {
        ForwardedHeader::XForwardedFor => values("x-forwarded-for")
            .flat_map(|v| v.split(','))
            .filter_map(|hop| parse_hop(hop.trim()))
            .collect(),
        // `Forwarded: for=a;proto=https, for=b`: one element per hop.
        ForwardedHeader::Forwarded => values("forwarded")
            .flat_map(|v| v.split(','))
            .filter_map(|element| {
                element.split(';').find_map(|pair| {
                    let (key, value) = pair.trim().split_once('=')?;
                    key.trim()
                        .eq_ignore_ascii_case("for")
                        .then(|| parse_hop(value.trim().trim_matches('"')))
                        .flatten()
                })
            })
            .collect(),
    }
}

/// `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1` or `[2001:db8::1]:5678`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse() {
        return Some(ip);
    }
    if let Ok(addr) = hop.parse::<SocketAddr>() {
        return Some(addr.ip());
    }
    hop.strip_prefix('[')
        .and_then(|rest| rest.split_once(']'))
        .and_then(|(ip, _)| ip.parse().ok())
}

/// The middleware: refuses clients in penalty (and others over
/// `others_per_sec`) before the body is read, and charges every refusal.
pub async fn guard(
    State(clients): State<Arc<Clients>>,
    mut request: Request,
    next: Next,
) -> Response {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip());
    let ip = clients.client(peer, request.headers());
    let sender = clients.is_sender(ip);
    if !sender {
        if clients.penalized(ip) {
            clients.refused_at_accept(ip);
            let secs = clients.penalty.as_secs().max(1);
            return close(ApiError::RateLimited(secs).into_response());
        }
        if let Err(wait) = clients.check_others(ip) {
            Stats::add(&clients.stats.rate_limited, 1);
            lock(&clients.refused).add(ip);
            return close(ApiError::RateLimited(wait.as_secs().max(1)).into_response());
        }
    }
    request.extensions_mut().insert(ClientInfo {
        ip,
        sender,
        reserved_percent: if sender { 0 } else { clients.reserved_percent },
    });
    let callback = request.uri().path() == "/webhooks/kinovi";
    let response = next.run(request).await;
    let status = response.status();
    if status.is_client_error() && status != StatusCode::TOO_MANY_REQUESTS {
        clients.charge(ip);
    } else if callback && status.is_success() {
        clients.accepted(ip);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RateLimitConfig;

    fn clients(trusted: &[&str], header: ForwardedHeader) -> Clients {
        let config = ServerConfig {
            rate_limit: RateLimitConfig {
                trusted_proxies: trusted.iter().map(|s| s.to_string()).collect(),
                forwarded_header: header,
                ..RateLimitConfig::default()
            },
            ..ServerConfig::default()
        };
        Clients::new(&config, Arc::default())
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(*k, v.parse().unwrap());
        }
        map
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn forwarded_headers_count_only_from_trusted_proxies() {
        let xff_mode = clients(&["10.0.0.0/8", "::1"], ForwardedHeader::XForwardedFor);
        let xff = headers(&[("x-forwarded-for", "203.0.113.9, 198.51.100.7, 10.1.2.3")]);
        assert_eq!(xff_mode.client(ip("10.0.0.1"), &xff), ip("198.51.100.7"));
        assert_eq!(xff_mode.client(ip("192.0.2.1"), &xff), ip("192.0.2.1"));
        let all_ours = headers(&[("x-forwarded-for", "10.0.0.2")]);
        assert_eq!(xff_mode.client(ip("10.0.0.1"), &all_ours), ip("10.0.0.2"));
        let junk = headers(&[("x-forwarded-for", "not-an-ip")]);
        assert_eq!(xff_mode.client(ip("10.0.0.1"), &junk), ip("10.0.0.1"));

        let fwd_mode = clients(&["10.0.0.0/8", "::1"], ForwardedHeader::Forwarded);
        let fwd = headers(&[("forwarded", "for=\"[2001:db8::1]:4711\";proto=https")]);
        assert_eq!(fwd_mode.client(ip("::1"), &fwd), ip("2001:db8::1"));
        let two = headers(&[("forwarded", "for=192.0.2.60;proto=http, for=10.0.0.7")]);
        assert_eq!(fwd_mode.client(ip("10.0.0.1"), &two), ip("192.0.2.60"));
    }

    /// A client-supplied header of the other kind never takes priority over
    /// the one the proxy writes.
    #[test]
    fn only_the_configured_header_names_the_client() {
        let fwd_mode = clients(&["10.0.0.0/8"], ForwardedHeader::Forwarded);
        let spoofed = headers(&[
            ("x-forwarded-for", "203.0.113.1"),
            ("forwarded", "for=198.51.100.9"),
        ]);
        assert_eq!(
            fwd_mode.client(ip("10.0.0.1"), &spoofed),
            ip("198.51.100.9")
        );
        let xff_mode = clients(&["10.0.0.0/8"], ForwardedHeader::XForwardedFor);
        assert_eq!(xff_mode.client(ip("10.0.0.1"), &spoofed), ip("203.0.113.1"));
        // A client writing its own X-Forwarded-For: the proxy appends the
        // real peer, and only that right-most untrusted hop counts.
        let prepended = headers(&[("x-forwarded-for", "1.1.1.1, 198.51.100.20")]);
        assert_eq!(
            xff_mode.client(ip("10.0.0.1"), &prepended),
            ip("198.51.100.20")
        );
    }

    #[test]
    fn refusals_past_the_budget_start_a_penalty_and_senders_are_never_charged() {
        let config = ServerConfig {
            senders: vec!["192.0.2.0/24".into()],
            rate_limit: RateLimitConfig {
                refusals_per_sec: 1,
                refusal_burst: 3,
                penalty_secs: 60,
                ..RateLimitConfig::default()
            },
            ..ServerConfig::default()
        };
        let clients = Clients::new(&config, Arc::default());
        let (attacker, other, sender) = (ip("198.51.100.1"), ip("198.51.100.2"), ip("192.0.2.7"));
        for _ in 0..3 {
            clients.charge(attacker);
        }
        assert!(!clients.penalized(attacker), "within its burst");
        clients.charge(attacker);
        assert!(clients.penalized(attacker));
        assert!(!clients.penalized(other), "others are not charged for it");
        for _ in 0..100 {
            clients.charge(sender);
        }
        assert!(!clients.penalized(sender));
        let top = clients.top(5);
        assert_eq!(
            top.refused[0],
            ClientCount {
                address: attacker,
                count: 4
            }
        );
        assert_eq!(top.penalized, 1);
    }

    #[test]
    fn the_top_table_keeps_heavy_addresses_through_a_stream_of_new_ones() {
        let mut top = Top::default();
        for _ in 0..50 {
            top.add(ip("192.0.2.1"));
        }
        for i in 0..10_000u32 {
            top.add(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)));
        }
        assert_eq!(top.counts.len(), TOP_TRACKED);
        assert_eq!(top.top(1)[0].address, ip("192.0.2.1"));
    }
}
