//! Rate limits (GCRA, `governor`) keyed by user or client IP, with bounded memory; and who the
//! client is when proxies stand in between.
//!
//! Limits are per engine node: N nodes behind a load balancer let a user through N times as often.
//! A key's state is dropped once the key has been idle long enough to be full again (every
//! `limiter_cleanup_ms`), and a limiter holds at most `max_limiter_keys` keys: when it is full and a
//! cleanup frees nothing (every key was busy in the last few seconds), requests are refused (429)
//! until keys go idle, so a flood of fresh keys costs bounded memory.

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use ipnet::IpNet;
use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A refusal of a limiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limited {
    /// Whole seconds, at least 1.
    pub retry_after: u64,
    /// The limiter is full of busy keys: nothing says this key was too fast.
    pub shed: bool,
}

/// A keyed GCRA limit, or none (disabled).
pub(crate) struct Limiter<K: Hash + Eq + Clone> {
    inner: Option<DefaultKeyedRateLimiter<K>>,
    max_keys: usize,
    started: Instant,
    last_cleanup_ms: AtomicU64,
}

impl<K: Hash + Eq + Clone> Limiter<K> {
    /// `per_second` sustained with `burst` at once; `None` when disabled.
    pub fn new(limit: Option<(u32, u32)>, max_keys: usize) -> Self {
        let inner = limit.and_then(|(per_second, burst)| {
            let quota = Quota::per_second(NonZeroU32::new(per_second)?)
                .allow_burst(NonZeroU32::new(burst)?);
            Some(DefaultKeyedRateLimiter::keyed(quota))
        });
        Self::with(inner, max_keys)
    }

    fn with(inner: Option<DefaultKeyedRateLimiter<K>>, max_keys: usize) -> Self {
        Self {
            inner,
            max_keys,
            started: Instant::now(),
            last_cleanup_ms: AtomicU64::new(0),
        }
    }

    /// A window of `cells` events per `period` (auto-block strikes).
    pub fn window(cells: u32, period: Duration, max_keys: usize) -> Self {
        let inner = NonZeroU32::new(cells).and_then(|n| {
            let quota = Quota::with_period(period / n.get())?.allow_burst(n);
            Some(DefaultKeyedRateLimiter::keyed(quota))
        });
        Self::with(inner, max_keys)
    }

    /// Ok, or when `key` may come again.
    pub fn check(&self, key: &K) -> Result<(), Limited> {
        let Some(l) = &self.inner else {
            return Ok(());
        };
        if l.len() >= self.max_keys {
            self.cleanup_soon();
            if l.len() >= self.max_keys {
                // Every remembered key is still busy: shed until some go idle.
                return Err(Limited {
                    retry_after: 1,
                    shed: true,
                });
            }
        }
        l.check_key(key).map(|_| ()).map_err(|n| Limited {
            retry_after: whole_seconds(n.wait_time_from(DefaultClock::default().now())),
            shed: false,
        })
    }

    /// A cleanup now, unless one ran in the last second.
    fn cleanup_soon(&self) {
        let now = self.started.elapsed().as_millis() as u64;
        let last = self.last_cleanup_ms.load(Ordering::Relaxed);
        if now >= last + 1000
            && self
                .last_cleanup_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.cleanup();
        }
    }

    /// Drop the state of keys that are full again.
    pub fn cleanup(&self) {
        if let Some(l) = &self.inner {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.inner.as_ref().map_or(0, |l| l.len())
    }
}

fn whole_seconds(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0).max(u64::from(d.as_secs() == 0))
}

/// The client of a request: the peer, unless the peer is a trusted proxy; then `X-Forwarded-For`
/// walked from the right (the end each proxy appends to; a client writes only at the left): the
/// first address that is not a trusted proxy. A hop that is not an address ends the walk at the
/// last good hop, so junk written by a client cannot move the key; when every hop is trusted, the
/// leftmost.
pub(crate) fn client_ip(
    peer: Option<IpAddr>,
    forwarded: Option<&str>,
    trusted: &[IpNet],
) -> Option<IpAddr> {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    let peer = peer.map(canonical)?;
    if !is_trusted(&peer) {
        return Some(peer);
    }
    let mut last = peer;
    for hop in forwarded.unwrap_or_default().rsplit(',') {
        let Ok(ip) = hop.trim().parse::<IpAddr>().map(canonical) else {
            return Some(last);
        };
        if !is_trusted(&ip) {
            return Some(ip);
        }
        last = ip;
    }
    Some(last)
}

/// IPv4-mapped IPv6 addresses as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The rate-limit key of an address: itself for IPv4, its /64 for IPv6 (one subscriber usually
/// holds a whole /64).
pub(crate) fn ip_key(ip: IpAddr) -> IpAddr {
    match canonical(ip) {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn the_peer_is_the_client_unless_it_is_a_trusted_proxy() {
        let trusted = nets(&["10.0.0.0/8"]);
        assert_eq!(
            client_ip(Some(ip("203.0.113.9")), Some("1.2.3.4"), &trusted),
            Some(ip("203.0.113.9")),
            "an untrusted peer's header is ignored"
        );
        assert_eq!(
            client_ip(Some(ip("10.0.0.2")), Some("6.6.6.6, 198.51.100.7, 10.0.0.9"), &trusted),
            Some(ip("198.51.100.7")),
            "read from the right, skipping trusted hops; the client's own left part is not believed"
        );
        assert_eq!(
            client_ip(Some(ip("10.0.0.2")), None, &trusted),
            Some(ip("10.0.0.2"))
        );
        assert_eq!(
            client_ip(Some(ip("10.0.0.2")), Some("10.1.1.1, 10.2.2.2"), &trusted),
            Some(ip("10.1.1.1")),
            "all trusted: the leftmost"
        );
        assert_eq!(
            client_ip(
                Some(ip("10.0.0.2")),
                Some("garbage, 198.51.100.7"),
                &trusted
            ),
            Some(ip("198.51.100.7")),
            "junk a client wrote at the left does not move the key"
        );
        assert_eq!(
            client_ip(
                Some(ip("10.0.0.2")),
                Some("198.51.100.7, junk, 10.0.0.9"),
                &trusted
            ),
            Some(ip("10.0.0.9")),
            "a malformed hop ends the walk at the last good one"
        );
        assert_eq!(
            client_ip(Some(ip("10.0.0.2")), Some(""), &trusted),
            Some(ip("10.0.0.2"))
        );
        assert_eq!(
            client_ip(Some(ip("::ffff:203.0.113.9")), None, &[]),
            Some(ip("203.0.113.9"))
        );
    }

    #[test]
    fn ipv6_clients_are_keyed_by_their_64() {
        assert_eq!(ip_key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(
            ip_key(ip("2001:db8:1:2:ffff::9")),
            ip_key(ip("2001:db8:1:2::7"))
        );
        assert_ne!(ip_key(ip("2001:db8:1:3::1")), ip_key(ip("2001:db8:1:2::1")));
        assert_eq!(ip_key(ip("192.0.2.1")), ip("192.0.2.1"));
    }

    #[test]
    fn a_burst_passes_then_the_key_waits_and_others_do_not() {
        let l: Limiter<u64> = Limiter::new(Some((5, 10)), 100);
        let passed = (0..40).filter(|_| l.check(&1).is_ok()).count();
        assert!((10..=11).contains(&passed), "{passed}");
        let wait = l.check(&1).unwrap_err();
        assert!(
            wait.retry_after >= 1 && !wait.shed,
            "Retry-After is at least a second"
        );
        assert!(l.check(&2).is_ok(), "another key is not affected");
        let off: Limiter<u64> = Limiter::new(None, 100);
        assert!((0..1000).all(|_| off.check(&1).is_ok()));
    }

    #[test]
    fn the_number_of_keys_is_bounded() {
        // 1/s with a burst of 10: a key that took one cell is full again only after a second.
        let l: Limiter<u64> = Limiter::new(Some((1, 10)), 50);
        for k in 0..50 {
            assert!(l.check(&k).is_ok());
        }
        assert_eq!(
            l.check(&999),
            Err(Limited {
                retry_after: 1,
                shed: true
            }),
            "full of busy keys: shed"
        );
        assert_eq!(l.len(), 50);
    }

    #[test]
    fn whole_seconds_round_up_to_at_least_one() {
        assert_eq!(whole_seconds(Duration::from_millis(10)), 1);
        assert_eq!(whole_seconds(Duration::from_millis(1000)), 1);
        assert_eq!(whole_seconds(Duration::from_millis(1001)), 2);
        assert_eq!(whole_seconds(Duration::ZERO), 1);
    }
}
