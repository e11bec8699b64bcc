//! `[frontdoor]`: order-token keys, rate limits, the blocklist's refresh, auto-blocking.
//!
//! A sale opts into order tokens and challenges itself (its `protection`); what is configured here
//! is node-wide: the keys that sign tokens and challenges, the per-user and per-IP limits on the
//! challenge, order-token and buy endpoints, and how the shared blocklist is followed.

use super::{invalid, positive, secret, ConfigError, Secret};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FrontDoorConfig {
    /// HMAC keys of order tokens and challenges, newest first: the first signs, every one
    /// verifies, so a key rotates by putting the new one first and dropping the old one after
    /// `token_ttl_secs`. At least 32 characters each. `SECKILL_TOKEN_KEY` overrides them (several
    /// separated by commas). Default: none, and the engine makes a random key at start (tokens then
    /// verify on this node only; logged as a warning).
    pub token_keys: Vec<Secret>,
    /// Per-user limit on challenge, order-token and buy requests together. Default on, 5/s with a
    /// burst of 10.
    pub user_limit: LimitConfig,
    /// Per-IP limit on the same requests. Default off (20/s, burst 40 when enabled).
    pub ip_limit: IpLimitConfig,
    /// Most keys one limiter remembers; keys idle long enough to be full again are dropped every
    /// `limiter_cleanup_ms`, and beyond this many new keys are refused (429) until room is made.
    /// Default 1000000.
    pub(crate) max_limiter_keys: usize,
    /// How often idle limiter keys are dropped, in ms. Default 10000.
    pub(crate) limiter_cleanup_ms: u64,
    /// How often each node checks the shared blocklist (on the config group) for changes, in ms.
    /// Default 500: a block reaches every node within about a second.
    pub(crate) blocklist_refresh_ms: u64,
    /// Block a user who keeps hitting the rate limit. Default off.
    pub auto_block: AutoBlockConfig,
    /// The proof of work grows with the crowd: an item that served k challenges on this node in
    /// the last second hands out ones `1 + k / pow_crowd_step` times as hard as its sale's
    /// `pow_difficulty` (at most 8 times). 0: always the sale's. Default 1000.
    pub(crate) pow_crowd_step: u32,
}

impl Default for FrontDoorConfig {
    fn default() -> Self {
        Self {
            token_keys: Vec::new(),
            user_limit: LimitConfig {
                enabled: true,
                per_second: 5,
                burst: 10,
            },
            ip_limit: IpLimitConfig::default(),
            max_limiter_keys: 1_000_000,
            limiter_cleanup_ms: 10_000,
            blocklist_refresh_ms: 500,
            auto_block: AutoBlockConfig::default(),
            pow_crowd_step: 1_000,
        }
    }
}

/// A GCRA limit: `per_second` sustained, `burst` at once.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitConfig {
    pub enabled: bool,
    pub per_second: u32,
    pub burst: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IpLimitConfig {
    pub enabled: bool,
    pub per_second: u32,
    pub burst: u32,
    /// Proxies (CIDRs, e.g. `"10.0.0.0/8"`) whose `X-Forwarded-For` is believed. The client is the
    /// first address from the right of that header that is not a trusted proxy, when the peer
    /// itself is one; otherwise the peer. Default none: the peer address. IPv6 clients are keyed
    /// by their /64.
    pub trusted_proxies: Vec<String>,
}

impl Default for IpLimitConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            per_second: 20,
            burst: 40,
            trusted_proxies: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AutoBlockConfig {
    pub enabled: bool,
    /// A user answered `rate_limited` this many times within `window_secs` is blocked. Default 50.
    pub strikes: u32,
    /// Default 60.
    pub(crate) window_secs: u32,
    /// How long an automatic block lasts, in seconds (reason `auto`). Default 600.
    pub block_secs: u32,
}

impl Default for AutoBlockConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            strikes: 50,
            window_secs: 60,
            block_secs: 600,
        }
    }
}

impl FrontDoorConfig {
    /// `SECKILL_TOKEN_KEY` (comma-separated, newest first) overrides `token_keys`.
    pub(super) fn apply_env(&mut self) {
        if let Some(keys) = secret::from_env("SECKILL_TOKEN_KEY") {
            self.token_keys = keys
                .expose()
                .split(',')
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .map(Secret::new)
                .collect();
        }
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        for (i, k) in self.token_keys.iter().enumerate() {
            if k.len() < 32 {
                return Err(invalid(
                    format!("frontdoor.token_keys[{i}]"),
                    "must be at least 32 characters (or set SECKILL_TOKEN_KEY)",
                ));
            }
        }
        for (name, l) in [
            ("frontdoor.user_limit", self.user_limit),
            (
                "frontdoor.ip_limit",
                LimitConfig {
                    enabled: self.ip_limit.enabled,
                    per_second: self.ip_limit.per_second,
                    burst: self.ip_limit.burst,
                },
            ),
        ] {
            positive(&format!("{name}.per_second"), l.per_second.into())?;
            positive(&format!("{name}.burst"), l.burst.into())?;
        }
        for (i, cidr) in self.ip_limit.trusted_proxies.iter().enumerate() {
            if parse_net(cidr).is_none() {
                return Err(invalid(
                    format!("frontdoor.ip_limit.trusted_proxies[{i}]"),
                    "must be an IP address or a CIDR such as 10.0.0.0/8",
                ));
            }
        }
        positive("frontdoor.max_limiter_keys", self.max_limiter_keys as u64)?;
        positive("frontdoor.limiter_cleanup_ms", self.limiter_cleanup_ms)?;
        positive("frontdoor.blocklist_refresh_ms", self.blocklist_refresh_ms)?;
        let a = &self.auto_block;
        positive("frontdoor.auto_block.strikes", a.strikes.into())?;
        positive("frontdoor.auto_block.window_secs", a.window_secs.into())?;
        positive("frontdoor.auto_block.block_secs", a.block_secs.into())
    }

    /// The trusted proxies, parsed (validation has checked them).
    pub fn trusted_proxies(&self) -> Vec<ipnet::IpNet> {
        self.ip_limit
            .trusted_proxies
            .iter()
            .filter_map(|c| parse_net(c))
            .collect()
    }
}

/// An address (as its own /32 or /128) or a CIDR; IPv4-mapped IPv6 ones as IPv4 (as client
/// addresses are compared).
pub(crate) fn parse_net(text: &str) -> Option<ipnet::IpNet> {
    let text = text.trim();
    let net = text
        .parse::<ipnet::IpNet>()
        .ok()
        .map(|n| n.trunc())
        .or_else(|| {
            text.parse::<std::net::IpAddr>()
                .ok()
                .map(ipnet::IpNet::from)
        })?;
    if let ipnet::IpNet::V6(v6) = net {
        if let (Some(v4), true) = (v6.addr().to_ipv4_mapped(), v6.prefix_len() >= 96) {
            return ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
                .ok()
                .map(ipnet::IpNet::V4);
        }
    }
    Some(net)
}

#[cfg(test)]
mod tests {
    use super::parse_net;

    #[test]
    fn nets_parse_canonically() {
        assert_eq!(parse_net("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(
            parse_net(" 192.0.2.1 ").unwrap().to_string(),
            "192.0.2.1/32"
        );
        assert_eq!(
            parse_net("::ffff:192.0.2.1").unwrap().to_string(),
            "192.0.2.1/32"
        );
        assert_eq!(
            parse_net("::ffff:192.0.2.0/120").unwrap().to_string(),
            "192.0.2.0/24"
        );
        assert_eq!(
            parse_net("2001:db8::1/64").unwrap().to_string(),
            "2001:db8::/64"
        );
        assert!(parse_net("nonsense").is_none());
    }
}
