//! Shard groups: a master and a shadow (streaming replica) per group, each with its own pool.
//!
//! A group knows which member it currently writes to (`writer`). At start that is the configured
//! master; the health monitor ([`monitor`]) probes every member, follows a promotion that another
//! engine node made, promotes the shadow itself when the master is dead, and fences an old master
//! that comes back. All database work goes through [`ShardGroup::writer`]: reads too, so a client
//! reads its own writes.

pub mod admin;
pub mod monitor;

use crate::config::{Config, GroupConfig};
use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime,
};
use serde::Serialize;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use tokio_postgres::NoTls;

/// No member is known to be writable.
const NO_WRITER: usize = usize::MAX;

#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("shard group {group} has no writable master")]
    NoMaster { group: String },
    #[error("shard group {group}: cannot get a connection: {source}")]
    Pool { group: String, source: PoolError },
    #[error("shard group {group}: cannot build a pool: {reason}")]
    Build { group: String, reason: String },
    #[error("shard group {group}: invalid member DSN: {source}")]
    Dsn {
        group: String,
        source: tokio_postgres::Error,
    },
}

/// What one member looked like at its last probe.
#[derive(Debug, Clone, Serialize, Default)]
pub struct MemberStatus {
    /// `master`, `shadow`, `fenced` (an old master kept read-only), or `down` (last probe failed).
    pub role: String,
    pub healthy: bool,
    pub timeline: Option<i64>,
    /// Bytes the shadow's replay is behind the master's current WAL position.
    pub replication_lag_bytes: Option<i64>,
    pub last_error: Option<String>,
    pub consecutive_failures: u32,
}

pub struct Member {
    /// `master` or `shadow`: the role this member has in shards.toml (not necessarily now).
    pub configured_role: &'static str,
    pub dsn: String,
    pub endpoint: String,
    pub pg_config: tokio_postgres::Config,
    pub pool: Pool,
    pub probe_session: monitor::ProbeSession,
}

pub struct ShardGroup {
    pub name: String,
    pub members: Vec<Member>,
    writer: AtomicUsize,
    status: Mutex<Vec<MemberStatus>>,
    failovers: AtomicU64,
    probed: std::sync::atomic::AtomicBool,
}

impl ShardGroup {
    /// `lock_timeout` bounds how long a statement of ours may queue for a row lock: a hot item's
    /// lock queue turns into a clean, surely-not-committed refusal instead of a client-side
    /// deadline whose outcome is unknown. (Not `statement_timeout`: cancelling a COMMIT that waits
    /// for the synchronous shadow would acknowledge a commit the shadow does not have.)
    pub fn new(
        config: &GroupConfig,
        connect_timeout: Duration,
        lock_timeout: Duration,
    ) -> Result<Self, ShardError> {
        let mut members = Vec::new();
        let dsns = std::iter::once(("master", &config.master))
            .chain(config.shadow.iter().map(|s| ("shadow", s)));
        for (role, dsn) in dsns {
            let mut pg_config: tokio_postgres::Config =
                dsn.parse().map_err(|source| ShardError::Dsn {
                    group: config.name.clone(),
                    source,
                })?;
            if pg_config.get_connect_timeout().is_none() {
                pg_config.connect_timeout(connect_timeout);
            }
            if pg_config.get_application_name().is_none() {
                pg_config.application_name("seckill");
            }
            if pg_config.get_options().is_none() {
                // Every statement of the engine is built around an index. On the empty tables of
                // a new deployment the planner picks sequential scans, and a prepared statement
                // keeps such a cached generic plan while the table grows during the first sale,
                // until autovacuum's ANALYZE replaces it a minute later: full scans of
                // reservations on the hot row's critical path. Sequential scans stay possible
                // where no index applies; they are only priced out.
                pg_config.options(format!(
                    "-c lock_timeout={} -c enable_seqscan=off",
                    lock_timeout.as_millis()
                ));
            }
            let manager = Manager::from_config(
                pg_config.clone(),
                NoTls,
                ManagerConfig {
                    recycling_method: RecyclingMethod::Fast,
                },
            );
            let pool = Pool::builder(manager)
                .max_size(config.pool_size)
                .runtime(Runtime::Tokio1)
                .wait_timeout(Some(Duration::from_secs(5)))
                .create_timeout(Some(connect_timeout))
                .recycle_timeout(Some(connect_timeout))
                .build()
                .map_err(|e| ShardError::Build {
                    group: config.name.clone(),
                    reason: e.to_string(),
                })?;
            members.push(Member {
                configured_role: role,
                dsn: dsn.clone(),
                endpoint: crate::config::endpoint_of(&pg_config).unwrap_or_default(),
                pg_config,
                pool,
                probe_session: Default::default(),
            });
        }
        let status = members
            .iter()
            .map(|m| MemberStatus {
                role: m.configured_role.to_string(),
                ..Default::default()
            })
            .collect();
        Ok(Self {
            name: config.name.clone(),
            members,
            writer: AtomicUsize::new(0),
            status: Mutex::new(status),
            failovers: AtomicU64::new(0),
            probed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Index of the member currently written to, if any.
    pub fn writer_index(&self) -> Option<usize> {
        match self.writer.load(Ordering::Acquire) {
            NO_WRITER => None,
            i => Some(i),
        }
    }

    pub(crate) fn set_writer(&self, index: Option<usize>) {
        self.writer
            .store(index.unwrap_or(NO_WRITER), Ordering::Release);
    }

    /// A connection to the writable member.
    pub async fn writer(&self) -> Result<Object, ShardError> {
        let idx = self.writer_index().ok_or_else(|| ShardError::NoMaster {
            group: self.name.clone(),
        })?;
        self.members[idx]
            .pool
            .get()
            .await
            .map_err(|source| ShardError::Pool {
                group: self.name.clone(),
                source,
            })
    }

    pub fn status(&self) -> Vec<MemberStatus> {
        lock(&self.status).clone()
    }

    pub(crate) fn update_status(&self, f: impl FnOnce(&mut Vec<MemberStatus>)) {
        f(&mut lock(&self.status));
    }

    pub fn failovers(&self) -> u64 {
        self.failovers.load(Ordering::Relaxed)
    }

    /// Record that the monitor has looked at this group; true if it had before.
    pub(crate) fn mark_probed(&self) -> bool {
        self.probed.swap(true, Ordering::AcqRel)
    }

    pub(crate) fn count_failover(&self) {
        self.failovers.fetch_add(1, Ordering::Relaxed);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// Every shard group of the configuration, indexed like `Config::groups`.
pub struct Cluster {
    pub groups: Vec<ShardGroup>,
    failover: crate::config::FailoverConfig,
}

impl Cluster {
    pub fn new(config: &Config) -> Result<Self, ShardError> {
        let timeout = Duration::from_millis(config.failover.probe_timeout_ms.max(1_000));
        let lock_timeout = config.request_timeout() * 3 / 5;
        let groups = config
            .groups
            .iter()
            .map(|g| ShardGroup::new(g, timeout, lock_timeout))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            groups,
            failover: config.failover.clone(),
        })
    }

    /// Probe every group once to find its writable member, never promoting anything: what
    /// one-shot commands and start-up need before they touch a group.
    pub async fn discover(&self) {
        let quiet = crate::config::FailoverConfig {
            enabled: false,
            ..self.failover.clone()
        };
        for g in &self.groups {
            monitor::check_group(g, &quiet).await;
        }
    }

    pub fn group(&self, idx: usize) -> &ShardGroup {
        &self.groups[idx]
    }

    pub fn by_name(&self, name: &str) -> Option<(usize, &ShardGroup)> {
        self.groups.iter().enumerate().find(|(_, g)| g.name == name)
    }

    /// True when every group has a member it writes to. The monitor clears a group's writer only
    /// once its master has failed `failures_before_promote` probes in a row (or turns out not to
    /// be writable), so one slow probe does not flip readiness.
    pub fn all_writable(&self) -> bool {
        self.groups.iter().all(|g| g.writer_index().is_some())
    }
}

/// The view of GET /v1/admin/groups and `seckill group status`.
pub fn groups_report(cluster: &Cluster) -> serde_json::Value {
    let groups: Vec<serde_json::Value> = cluster
        .groups
        .iter()
        .map(|g| {
            let writer = g.writer_index();
            let status = g.status();
            let members: Vec<serde_json::Value> = g
                .members
                .iter()
                .zip(status)
                .enumerate()
                .map(|(i, (m, s))| {
                    serde_json::json!({
                        "endpoint": m.endpoint,
                        "configured_role": m.configured_role,
                        "role": s.role,
                        "writable": writer == Some(i),
                        "healthy": s.healthy,
                        "timeline": s.timeline,
                        "replication_lag_bytes": s.replication_lag_bytes,
                        "consecutive_failures": s.consecutive_failures,
                        "last_error": s.last_error,
                    })
                })
                .collect();
            serde_json::json!({
                "name": g.name,
                "writable_master": writer.map(|i| g.members[i].endpoint.clone()),
                "failovers": g.failovers(),
                "members": members,
            })
        })
        .collect();
    serde_json::json!({ "groups": groups })
}
