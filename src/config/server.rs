//! The listeners: the public ingress (`[server]`: limits, TLS, the
//! refusal budget, known senders, trusted proxies) and the operator
//! listener (`[admin]`), with their checks and [`Cidr`].

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{invalid, Config, ConfigError, Secret};

/// The HTTP ingress: the provider's callbacks, the task endpoints, `/healthz`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Largest accepted request body in bytes; larger bodies get 413. At
    /// most 64 MiB, and at most the broker's message limit (a Kafka topic's
    /// `max.message.bytes`, the NATS server's `max_payload`), checked at
    /// start when the broker answers.
    pub body_limit_bytes: usize,
    /// Longest wait for a request's headers, in milliseconds, counted from
    /// the moment the server waits for them: it also closes a keep-alive
    /// connection that stays idle that long.
    pub header_timeout_ms: u64,
    /// Longest time to receive a whole request body, in milliseconds; a
    /// slower one gets 408 and its connection is closed.
    pub body_timeout_ms: u64,
    /// Largest request head (request line and headers) in bytes; a larger
    /// one closes the connection.
    pub max_header_bytes: usize,
    /// Most connections served at once; more wait in the kernel's accept
    /// queue (no file descriptor is spent on them) until one closes.
    pub max_connections: usize,
    /// How long shutdown waits for open requests, in milliseconds; the
    /// connections still open then are dropped.
    pub shutdown_timeout_ms: u64,
    /// Most connections one client address may hold at once, once fewer
    /// than a quarter of `max_connections` are free. At the cap a
    /// new connection takes the place of that address's own oldest idle
    /// one; when all of them are busy, it waits (at most
    /// `header_timeout_ms`) for one of them to end. Known senders and
    /// trusted proxies are exempt.
    pub max_connections_per_client: usize,
    /// Slowest request body accepted, in bytes per second, after a grace
    /// of 2 s: a body behind that pace gets 408 and its connection is
    /// closed (0 turns it off; `body_timeout_ms` still applies).
    pub min_body_bytes_per_sec: u64,
    /// Known senders (the provider's addresses, CIDRs or single
    /// addresses). They are never charged or refused by the rate limits,
    /// never evicted, have `sender_connections` slots of their own and
    /// `sender_backlog_percent` of the backlog to themselves. Empty (the
    /// default): every address is treated alike.
    pub senders: Vec<String>,
    /// Connection slots reserved for known senders out of
    /// `max_connections`: other addresses are held to the rest. Only with
    /// `senders`.
    pub sender_connections: usize,
    /// Share of the outbox's backlog caps (`max_pending`,
    /// `max_pending_bytes`), in percent, that only known senders may fill:
    /// callbacks from other addresses get 503 once the backlog is past the
    /// rest. Only with `senders`.
    pub sender_backlog_percent: u8,
    /// Native TLS (HTTPS) on this listener. Unset: plain HTTP.
    pub tls: Option<TlsConfig>,
    /// What is limited per client address, and how the client's address is
    /// found behind proxies.
    pub rate_limit: RateLimitConfig,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            body_limit_bytes: 1024 * 1024,
            header_timeout_ms: 10_000,
            body_timeout_ms: 30_000,
            max_header_bytes: 16 * 1024,
            max_connections: 512,
            shutdown_timeout_ms: 15_000,
            max_connections_per_client: 64,
            min_body_bytes_per_sec: 1024,
            senders: Vec::new(),
            sender_connections: 64,
            sender_backlog_percent: 20,
            tls: None,
            rate_limit: RateLimitConfig::default(),
        }
    }
}

/// PEM files for native TLS; re-read when their modification time changes
/// or on SIGHUP, without dropping open connections.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The certificate chain, leaf first (PEM).
    pub cert: PathBuf,
    /// The private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// How often the files' modification times are checked, in milliseconds.
    #[serde(default = "default_tls_reload_check_ms")]
    pub reload_check_ms: u64,
}

fn default_tls_reload_check_ms() -> u64 {
    10_000
}

/// What is limited per client address on the public listener.
///
/// Valid callbacks are never rate limited (unless `others_per_sec` is set
/// with `senders`): the provider never retries, so a 429 would be a lost
/// callback. What is charged is what gets refused: every 4xx answer
/// (invalid body, wrong token, oversize, unknown path, slow body) and every
/// connection closed for a malformed or unfinished request head takes a
/// token from the client's refusal bucket. A client with an empty bucket
/// is refused for `penalty_secs`: its new connections are closed at
/// accept (429 before the body is read when it comes through a trusted
/// proxy). Known senders are never charged.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Refused requests per second one client address may cause in the
    /// long run; 0 turns the refusal budget off.
    pub refusals_per_sec: u32,
    /// Refused requests one client address may cause at once above that rate.
    pub refusal_burst: u32,
    /// How long a client past its refusal budget is refused, in seconds.
    pub penalty_secs: u64,
    /// With `server.senders` set: requests per second (valid or not) that
    /// any OTHER address may send; past it, 429. 0 (the default) leaves
    /// valid callbacks unlimited. Refused at start without senders, since
    /// it would then limit the provider too.
    pub others_per_sec: u32,
    /// Requests another address may send at once above `others_per_sec`.
    pub others_burst: u32,
    /// Most client addresses tracked at once; past it, idle ones are forgotten.
    pub max_clients: usize,
    /// Proxies (CIDRs such as `10.0.0.0/8` or single addresses) whose
    /// `forwarded_header` names the client. From any other peer the
    /// header is ignored.
    pub trusted_proxies: Vec<String>,
    /// The one header trusted proxies name the client in:
    /// `x-forwarded-for` (the default) or `forwarded` (RFC 7239). The
    /// other is ignored, and only the hops appended by trusted proxies
    /// count: the client is the right-most hop that is not a trusted proxy.
    pub forwarded_header: ForwardedHeader,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            refusals_per_sec: 10,
            refusal_burst: 200,
            penalty_secs: 30,
            others_per_sec: 0,
            others_burst: 0,
            max_clients: 100_000,
            trusted_proxies: Vec::new(),
            forwarded_header: ForwardedHeader::XForwardedFor,
        }
    }
}

/// The header trusted proxies use to name the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ForwardedHeader {
    #[serde(rename = "x-forwarded-for")]
    XForwardedFor,
    #[serde(rename = "forwarded")]
    Forwarded,
}

/// The operator listener: `/admin/*` and readiness.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address to listen on; port 0 picks a free port. Beyond loopback a
    /// `token` is required.
    pub listen: SocketAddr,
    /// Bearer token for `/admin/*`, at least 16 characters. Unset: reads are
    /// open to the (loopback) listener, and `POST`s still need an
    /// `Authorization` header, which a browser cannot send cross-site.
    pub token: Option<Secret>,
    /// Host names accepted in the `Host` header besides `localhost`, the
    /// loopback addresses and the listen address (e.g. a proxy's name).
    pub allowed_hosts: Vec<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9091)),
            token: None,
            allowed_hosts: Vec::new(),
        }
    }
}

impl Config {
    /// The listeners' own rules (their numbers are in `ranges`).
    pub(super) fn validate_server(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        if s.max_connections_per_client == 0 {
            return invalid("server.max_connections_per_client", "must be at least 1");
        }
        for sender in &s.senders {
            if let Err(reason) = Cidr::parse(sender) {
                return invalid("server.senders", &reason);
            }
        }
        if !s.senders.is_empty() {
            if s.sender_connections >= s.max_connections {
                return invalid(
                    "server.sender_connections",
                    "must be less than server.max_connections (others need slots too)",
                );
            }
            if s.sender_backlog_percent > 90 {
                return invalid("server.sender_backlog_percent", "must be at most 90");
            }
        }
        let r = &s.rate_limit;
        if r.refusals_per_sec > 0 && r.refusal_burst == 0 {
            return invalid("server.rate_limit.refusal_burst", "must be at least 1");
        }
        if r.penalty_secs > 86_400 {
            return invalid("server.rate_limit.penalty_secs", "must be at most 86400");
        }
        if r.others_per_sec > 0 {
            if s.senders.is_empty() {
                return invalid(
                    "server.rate_limit.others_per_sec",
                    "needs server.senders: without them it would rate limit the provider",
                );
            }
            if r.others_burst == 0 {
                return invalid("server.rate_limit.others_burst", "must be at least 1");
            }
        }
        for proxy in &r.trusted_proxies {
            match Cidr::parse(proxy) {
                Err(reason) => return invalid("server.rate_limit.trusted_proxies", &reason),
                // A /0 trusts every peer: any client could name any address.
                Ok(cidr) if cidr.prefix == 0 => {
                    return invalid(
                        "server.rate_limit.trusted_proxies",
                        &format!("{proxy:?} would trust every peer; list the proxies"),
                    )
                }
                Ok(_) => {}
            }
        }
        let a = &self.admin;
        if let Some(token) = &a.token {
            if token.expose().chars().count() < 16 {
                return invalid("admin.token", "must be at least 16 characters");
            }
        } else if !a.listen.ip().is_loopback() {
            return invalid(
                "admin.listen",
                "a listener beyond loopback needs admin.token",
            );
        }
        Ok(())
    }
}

/// An address block such as `10.0.0.0/8`, or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Result<Self, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{text:?} is not an address or CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{text:?} has an invalid prefix length"))?,
            None => max,
        };
        Ok(Self { addr, prefix })
    }

    /// Whether `ip` is inside the block (IPv4-mapped IPv6 counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let (a, b, bits) = match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => (u32::from(a) as u128, u32::from(b) as u128, 32),
            (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), 128),
            _ => return false,
        };
        let host_bits = bits - u32::from(self.prefix);
        let mask = if host_bits >= 128 {
            0
        } else {
            u128::MAX << host_bits
        };
        a & mask == b & mask
    }
}
