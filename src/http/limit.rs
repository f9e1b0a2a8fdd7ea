//! Rate limits on the public listener: one token bucket for the whole
//! listener and one per client address (governor's GCRA). The client is the
//! TCP peer, unless the peer is a trusted proxy: then the right-most address
//! of `X-Forwarded-For` (or `Forwarded: for=`) that is not itself a trusted
//! proxy. Headers from any other peer are ignored, so they cannot be used to
//! dodge the per-client bucket.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};

use super::ApiError;
use crate::config::{Cidr, RateLimitConfig};
use crate::outbox::Stats;

/// The buckets and who may speak for a client.
pub struct RateLimit {
    global: Option<DefaultDirectRateLimiter>,
    per_client: Option<DefaultKeyedRateLimiter<IpAddr>>,
    max_clients: usize,
    trusted: Vec<Cidr>,
    clock: DefaultClock,
    stats: Arc<Stats>,
}

fn quota(per_sec: u32, burst: u32) -> Option<Quota> {
    let rate = NonZeroU32::new(per_sec)?;
    Some(Quota::per_second(rate).allow_burst(NonZeroU32::new(burst).unwrap_or(rate)))
}

impl RateLimit {
    pub fn new(config: &RateLimitConfig, stats: Arc<Stats>) -> Self {
        Self {
            global: quota(config.global_per_sec, config.global_burst).map(RateLimiter::direct),
            per_client: quota(config.per_client_per_sec, config.per_client_burst)
                .map(RateLimiter::keyed),
            max_clients: config.max_clients,
            // Validated at load; an invalid entry here trusts nobody.
            trusted: config
                .trusted_proxies
                .iter()
                .filter_map(|c| Cidr::parse(c).ok())
                .collect(),
            clock: DefaultClock::default(),
            stats,
        }
    }

    /// The client's address as this listener sees it.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let trusted = |ip: IpAddr| self.trusted.iter().any(|c| c.contains(ip));
        if !trusted(peer) {
            return peer;
        }
        // The nearest hop is appended last: walk back past our own proxies.
        let hops = forwarded_for(headers);
        hops.iter()
            .rev()
            .find(|ip| !trusted(**ip))
            .or(hops.first())
            .copied()
            .unwrap_or(peer)
    }

    /// `Err(wait)` when `client` or the listener is over its rate.
    fn check(&self, client: IpAddr) -> Result<(), Duration> {
        let now = self.clock.now();
        if let Some(limiter) = &self.per_client {
            if limiter.len() >= self.max_clients {
                limiter.retain_recent();
            }
            limiter
                .check_key(&client)
                .map_err(|not_until| not_until.wait_time_from(now))?;
        }
        if let Some(limiter) = &self.global {
            limiter
                .check()
                .map_err(|not_until| not_until.wait_time_from(now))?;
        }
        Ok(())
    }
}

/// Every address of `X-Forwarded-For`, else of `Forwarded`'s `for=`, in
/// header order; unparsable entries are skipped.
fn forwarded_for(headers: &HeaderMap) -> Vec<IpAddr> {
    let xff: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|hop| parse_hop(hop.trim()))
        .collect();
    if !xff.is_empty() {
        return xff;
    }
    headers
        .get_all("forwarded")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split([',', ';']))
        .filter_map(|pair| {
            let (key, value) = pair.trim().split_once('=')?;
            key.eq_ignore_ascii_case("for")
                .then(|| parse_hop(value.trim().trim_matches('"')))
                .flatten()
        })
        .collect()
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

/// The middleware: 429 with `Retry-After` past either bucket, counted.
pub async fn enforce(
    State(limit): State<Arc<RateLimit>>,
    request: Request,
    next: Next,
) -> Response {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip());
    let client = limit.client(peer, request.headers());
    match limit.check(client) {
        Ok(()) => next.run(request).await,
        Err(wait) => {
            Stats::add(&limit.stats.rate_limited, 1);
            tracing::debug!(%client, "rate limited");
            ApiError::RateLimited(wait.as_secs().max(1)).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(trusted: &[&str]) -> RateLimit {
        let config = RateLimitConfig {
            trusted_proxies: trusted.iter().map(|s| s.to_string()).collect(),
            ..RateLimitConfig::default()
        };
        RateLimit::new(&config, Arc::default())
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(*k, v.parse().unwrap());
        }
        map
    }

    #[test]
    fn forwarded_headers_count_only_from_trusted_proxies() {
        let limit = limit(&["10.0.0.0/8", "::1"]);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let xff = headers(&[("x-forwarded-for", "203.0.113.9, 198.51.100.7, 10.1.2.3")]);
        assert_eq!(limit.client(ip("10.0.0.1"), &xff), ip("198.51.100.7"));
        assert_eq!(limit.client(ip("192.0.2.1"), &xff), ip("192.0.2.1"));
        let fwd = headers(&[("forwarded", "for=\"[2001:db8::1]:4711\";proto=https")]);
        assert_eq!(limit.client(ip("::1"), &fwd), ip("2001:db8::1"));
        let all_ours = headers(&[("x-forwarded-for", "10.0.0.2")]);
        assert_eq!(limit.client(ip("10.0.0.1"), &all_ours), ip("10.0.0.2"));
        let junk = headers(&[("x-forwarded-for", "not-an-ip")]);
        assert_eq!(limit.client(ip("10.0.0.1"), &junk), ip("10.0.0.1"));
    }

    #[test]
    fn a_burst_past_the_client_bucket_is_refused_and_others_pass() {
        let config = RateLimitConfig {
            per_client_per_sec: 1,
            per_client_burst: 3,
            ..RateLimitConfig::default()
        };
        let limit = RateLimit::new(&config, Arc::default());
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let passed = (0..10).filter(|_| limit.check(a).is_ok()).count();
        assert_eq!(passed, 3);
        assert!(limit.check(a).unwrap_err() > Duration::ZERO);
        assert!(limit.check(b).is_ok());
    }
}
