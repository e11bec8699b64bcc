//! The front door: what stands between a crowd of scripts and the order path.
//!
//! Per sale and opt-in (a sale's `protection`): the order URL carries a per-user order token that
//! is handed out only after the start ([`token`]), optionally behind a challenge ([`challenge`]).
//! Per node and always: rate limits per user and per client IP ([`limits`]) and the shared
//! blocklist ([`blocklist`]).
//!
//! **Cheapest check first**, so a refused request costs no database work: IP blocklist → IP limit
//! → user token (JWT, [`crate::auth`]) → user blocklist → order token signature (or, on a
//! protected item's plain URL, `token_required` from the cached [`rules`]) → user limit → then
//! the order service's sold-out fast path → admission → coalescer. Only the first request for an
//! item on a node reads its rules from the database; a challenge solution is recorded once, on
//! the user's group, when it is exchanged for a token.
//!
//! A request the front door turns away gets a [`Refusal`]; its own database work (a rule read, a
//! solution recorded) fails with the shard layer's [`GroupError`] as it is.

pub mod blocklist;
pub mod challenge;
pub mod crowd;
pub mod keys;
pub mod limits;
pub mod rules;
pub mod token;

use crate::config::frontdoor::AutoBlockConfig;
use crate::config::Config;
use crate::domain::{ChallengeKind, ItemId, Protection, SaleId, UserId};
use crate::router::Router;
use crate::shard::{Cluster, GroupError, Work};
use chrono::{DateTime, Utc};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Why the front door refused a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("blocked: {0}")]
    Blocked(String),
    #[error("too many requests; retry after {retry_after} s")]
    RateLimited { retry_after: u64 },
    #[error("this sale sells through order URLs: get an order token first")]
    TokenRequired,
    #[error("{0}")]
    InvalidToken(&'static str),
    #[error("the order token has expired: get a new one")]
    TokenExpired,
    #[error("{0}")]
    ChallengeFailed(challenge::Failed),
}

pub struct FrontDoor {
    keys: keys::Keys,
    keys_configured: bool,
    users: limits::Limiter<UserId>,
    ips: limits::Limiter<IpAddr>,
    ip_limit_on: bool,
    /// Rate-limit refusals per user, for automatic blocks.
    strikes: limits::Limiter<UserId>,
    auto_block: AutoBlockConfig,
    trusted: Vec<ipnet::IpNet>,
    pub blocklist: blocklist::Blocklist,
    pub rules: rules::RulesCache,
    /// Challenges served per item, for the proof of work's difficulty.
    crowd: crowd::Crowd,
    /// Automatic blocks to write to the shared table.
    pending_blocks: Mutex<Vec<UserId>>,
    cluster: Arc<Cluster>,
    router: Arc<Router>,
    config_group: String,
    timeout: Duration,
}

pub fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

impl FrontDoor {
    pub fn new(config: &Config, cluster: Arc<Cluster>, router: Arc<Router>) -> Self {
        let f = &config.frontdoor;
        if f.token_keys.is_empty() {
            tracing::warn!(
                "no frontdoor.token_keys (SECKILL_TOKEN_KEY): protected sales cannot be created, and \
                 the order tokens of existing ones are signed with a random key that verifies on this \
                 node only"
            );
        }
        let max = f.max_limiter_keys;
        let limit = |on: bool, per_second, burst| on.then_some((per_second, burst));
        Self {
            keys: keys::Keys::new(&f.token_keys),
            keys_configured: !f.token_keys.is_empty(),
            users: limits::Limiter::new(
                limit(
                    f.user_limit.enabled,
                    f.user_limit.per_second,
                    f.user_limit.burst,
                ),
                max,
            ),
            ips: limits::Limiter::new(
                limit(f.ip_limit.enabled, f.ip_limit.per_second, f.ip_limit.burst),
                max,
            ),
            ip_limit_on: f.ip_limit.enabled,
            strikes: limits::Limiter::window(
                if f.auto_block.enabled {
                    f.auto_block.strikes
                } else {
                    0
                },
                Duration::from_secs(f.auto_block.window_secs.into()),
                max,
            ),
            auto_block: f.auto_block.clone(),
            trusted: f.trusted_proxies(),
            blocklist: blocklist::Blocklist::default(),
            crowd: crowd::Crowd::new(f.pow_crowd_step),
            rules: rules::RulesCache::new(
                cluster.clone(),
                router.clone(),
                config.request_timeout(),
            ),
            pending_blocks: Mutex::new(Vec::new()),
            cluster,
            router,
            config_group: config.config_group().to_string(),
            timeout: config.request_timeout(),
        }
    }

    /// The client address of a request (see [`limits::client_ip`]).
    pub(crate) fn client_ip(
        &self,
        peer: Option<IpAddr>,
        forwarded: Option<&str>,
    ) -> Option<IpAddr> {
        limits::client_ip(peer, forwarded, &self.trusted)
    }

    /// The IP blocklist, then the IP limit.
    pub(crate) fn check_ip(&self, ip: Option<IpAddr>) -> Result<(), Refusal> {
        let Some(ip) = ip else {
            return Ok(());
        };
        if let Some(reason) = self.blocklist.ip(ip, now_ms()) {
            return Err(Refusal::Blocked(format!(
                "this address is blocked ({reason})"
            )));
        }
        if self.ip_limit_on {
            self.ips
                .check(&limits::ip_key(ip))
                .map_err(|l| Refusal::RateLimited {
                    retry_after: l.retry_after,
                })?;
        }
        Ok(())
    }

    /// The user blocklist.
    pub(crate) fn check_user(&self, user: UserId) -> Result<(), Refusal> {
        match self.blocklist.user(user, now_ms()) {
            Some(reason) => Err(Refusal::Blocked(format!("this user is blocked ({reason})"))),
            None => Ok(()),
        }
    }

    /// The user's rate limit. A user who keeps hitting it is blocked when auto-blocking is on
    /// (a limiter shedding because it is full counts against nobody).
    pub(crate) fn limit_user(&self, user: UserId) -> Result<(), Refusal> {
        let Err(limited) = self.users.check(&user) else {
            return Ok(());
        };
        if self.auto_block.enabled && !limited.shed {
            if let Err(strike) = self.strikes.check(&user) {
                if !strike.shed {
                    self.block_automatically(user);
                }
            }
        }
        Err(Refusal::RateLimited {
            retry_after: limited.retry_after,
        })
    }

    fn block_automatically(&self, user: UserId) {
        let until = now_ms() + i64::from(self.auto_block.block_secs) * 1000;
        if !self.blocklist.block_user_here(user, "auto", until) {
            return; // blocked here already: written (or about to be)
        }
        if let Ok(mut pending) = self.pending_blocks.lock() {
            if pending.len() < 10_000 {
                pending.push(user);
            }
        }
        tracing::warn!(%user, block_secs = self.auto_block.block_secs, "user blocked automatically: kept hitting the rate limit");
    }

    /// Verify the order token of an order URL for this sale, item and user.
    pub(crate) fn verify_token(
        &self,
        token: &str,
        sale: SaleId,
        item: ItemId,
        user: UserId,
    ) -> Result<token::Grant, Refusal> {
        token::verify(&self.keys, token, (sale, item, user), now_ms()).map_err(|e| match e {
            token::TokenError::Invalid(why) => Refusal::InvalidToken(why),
            token::TokenError::Expired => Refusal::TokenExpired,
        })
    }

    /// A challenge of `p`'s kind for this buyer. It expires `token_ttl_secs` after the later of now
    /// and the start, so one fetched during the countdown is still good at the start.
    pub fn challenge(
        &self,
        p: &Protection,
        b: &challenge::Binding,
        starts_at: DateTime<Utc>,
    ) -> Option<challenge::Challenge> {
        let now = now_ms();
        let expires = now.max(starts_at.timestamp_millis()) / 1000 + i64::from(p.token_ttl_secs);
        match p.challenge {
            ChallengeKind::None => None,
            ChallengeKind::Pow => {
                let factor = self.crowd.serve(b.sale, b.item, now);
                let difficulty = p.pow_difficulty.saturating_mul(factor);
                Some(challenge::pow(&self.keys, b, difficulty, expires))
            }
            ChallengeKind::Question => Some(challenge::question(&self.keys, b, now, expires)),
        }
    }

    /// Check a solution and record it as used (on the user's group): each works once, and a
    /// question's first answer uses it up even when wrong.
    pub(crate) async fn accept_solution(
        &self,
        p: &Protection,
        b: &challenge::Binding,
        solution: &challenge::Solution,
        starts_at: DateTime<Utc>,
    ) -> Result<Result<(), Refusal>, GroupError> {
        let starts = starts_at.timestamp_millis();
        let verified = match challenge::verify(&self.keys, p, b, solution, now_ms(), starts) {
            Ok(v) => v,
            Err(f) => return Ok(Err(Refusal::ChallengeFailed(f))),
        };
        let Some(expires) = DateTime::<Utc>::from_timestamp(verified.expires, 0) else {
            return Ok(Err(Refusal::ChallengeFailed(challenge::Failed(
                "the salt is not one of ours",
            ))));
        };
        let fresh = self
            .cluster
            .group(self.router.user_group(b.user))
            .run(Work::Settle, self.timeout, async |c| {
                let n = c
                    .execute(
                        &c.prepare_cached(
                            "INSERT INTO challenge_uses (key, expires_at) VALUES ($1, $2)
                             ON CONFLICT (key) DO NOTHING",
                        )
                        .await?,
                        &[&verified.replay_key.as_slice(), &expires],
                    )
                    .await?;
                Ok(n == 1)
            })
            .await?;
        Ok(match (fresh, verified.then_fail) {
            (false, _) => Err(Refusal::ChallengeFailed(challenge::Failed(
                "this challenge has been used already: get a new one",
            ))),
            (true, Some(failed)) => Err(Refusal::ChallengeFailed(failed)),
            (true, None) => Ok(()),
        })
    }

    /// Whether order tokens are signed with configured keys (shared by every node) rather than
    /// a random key of this process.
    pub(crate) fn keys_configured(&self) -> bool {
        self.keys_configured
    }

    /// An order token for this grant.
    pub(crate) fn issue_token(&self, g: &token::Grant) -> String {
        token::issue(&self.keys, g)
    }

    /// Drop idle limiter keys.
    pub(crate) fn cleanup_limiters(&self) {
        self.users.cleanup();
        self.ips.cleanup();
        self.strikes.cleanup();
    }

    /// Write pending automatic blocks, then reload the blocklist if it changed (the front door's
    /// background task, every `frontdoor.blocklist_refresh_ms`).
    pub(crate) async fn refresh_blocklist(&self) {
        let Some((g, _)) = self.cluster.by_name(&self.config_group) else {
            return;
        };
        let pending: Vec<UserId> = match self.pending_blocks.lock() {
            Ok(mut p) => std::mem::take(&mut *p),
            Err(_) => Vec::new(),
        };
        let secs = self.auto_block.block_secs;
        let result = self
            .cluster
            .group(g)
            .run(Work::Settle, self.timeout, async |c| {
                for user in &pending {
                    blocklist::add(
                        c,
                        blocklist::Kind::User,
                        &user.to_string(),
                        "auto",
                        Some(secs),
                    )
                    .await?;
                }
                Ok(self.blocklist.refresh(c).await?)
            })
            .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "cannot read the blocklist");
            if let Ok(mut p) = self.pending_blocks.lock() {
                p.extend(pending);
            }
        }
    }

    /// Forget challenge solutions whose challenges have expired, and blocklist entries that
    /// expired a day ago.
    pub(crate) async fn purge(&self) {
        for group in &self.cluster.groups {
            let purged = group
                .run(Work::Settle, self.timeout, async |c| {
                    Ok(c.execute(
                        "DELETE FROM challenge_uses WHERE expires_at < now() - interval '1 minute'",
                        &[],
                    )
                    .await?)
                })
                .await;
            if let Err(e) = purged {
                tracing::debug!(group = %group.name, error = %e, "challenge records not purged");
            }
        }
        if let Some((g, _)) = self.cluster.by_name(&self.config_group) {
            let purged = self
                .cluster
                .group(g)
                .run(Work::Settle, self.timeout, async |c| {
                    Ok(blocklist::purge_expired(c).await?)
                })
                .await;
            if let Err(e) = purged {
                tracing::debug!(error = %e, "expired blocklist entries not purged");
            }
        }
    }
}
