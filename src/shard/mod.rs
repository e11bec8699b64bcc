//! Shard groups: a master and a shadow (streaming replica) per group, each with its own pool.
//!
//! A group knows which member it currently writes to (`writer`). At start that is the configured
//! master; the health monitor ([`monitor`]) probes every member, follows a promotion that another
//! engine node made, promotes the shadow itself when the master is dead (built-in failover), and
//! fences an old master that comes back.
//!
//! **One way in**: all database work goes through [`ShardGroup::run`]: reads too, so a client
//! reads its own writes. `run` bounds the whole piece of work (waiting for a connection included)
//! by one budget, and ends it the moment the group's writer moves: work still waiting on a master
//! that stopped answering (a frozen host keeps its sockets open) is given up as "outcome unknown"
//! instead of holding its caller until the budget runs out. A connection whose work was given up
//! mid-statement is closed, never handed to the next caller with an answer still in flight.
//! `run` fails with the shard layer's own error, [`GroupError`]: nothing sent ([`ShardError`]) or
//! what the database said ([`DbError`]), and so whether the work surely did not commit. Each
//! layer above wraps it in its own error.
//!
//! **Shares of the pool**: each piece of work says what it is ([`Work`]). Reads for clients get at
//! most a quarter of a group's connections and a bounded queue (beyond it: [`ShardError::Busy`],
//! 503 `overloaded`); the front door's reads (one per protected item at a time) an eighth of
//! their own, so a read flood cannot starve order tokens; transaction 1 batches at most half. Transaction 2, compensation, releases and
//! repairs take any free connection, so a flood of reads or of buyers can never starve the work
//! that creates orders and returns stock.
//!
//! **No shadow, no acknowledgement** (`failover.synchronous` with `shadow_loss = "block"`, the
//! default, for groups that have a shadow): the monitor tells each round whether the writer
//! commits synchronously to a streaming shadow ([`Durability`]). While it does not, a purchase
//! (transaction 1 on the item's group, and a check of the user's group before it) waits for it
//! within half its budget, then is refused before anything is sent ([`ShardError::NoShadow`],
//! 503 `shadow_unavailable`): nothing half-done, no stock held, and buying resumes by itself once
//! a shadow streams again ([`heal`] brings one back). Other writes are not refused up front: their
//! commits simply wait for the shadow (PostgreSQL's synchronous replication), so nothing is
//! acknowledged alone either way.
//!
//! **A term that only grows**: the group remembers the highest timeline any member was seen on.
//! A member writable on an older timeline is an old master, never a write target, whatever the
//! probes of the newer one say this round ([`decide::decide`]).

pub mod decide;
mod error;
pub mod heal;
pub mod monitor;
pub mod probe;
pub mod tls;

pub(crate) use error::{GroupError, ShardError};

use crate::config::Config;
use crate::db::DbError;
use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime, Timeouts,
};
use serde::Serialize;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tls::Endpoint;
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio_util::sync::CancellationToken;

/// No member is known to be writable.
const NO_WRITER: usize = usize::MAX;

/// Whether the group's writer may acknowledge a write now (module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Not judged (no monitor, or writes are not gated for this group).
    Unknown,
    /// The writer commits synchronously to a streaming shadow.
    Durable,
    /// It does not: writing work waits, then is refused.
    NotDurable,
}

/// The writer's replication, as the monitor last saw it.
#[derive(Debug, Clone, Default)]
pub struct Replication {
    /// A shadow streams from the writer (by its `application_name`).
    pub shadow_streaming: bool,
    /// The writer commits synchronously (`synchronous_standby_names` names a standby).
    pub synchronous: bool,
    pub(crate) lag_bytes: Option<i64>,
    /// When the writer last answered a probe.
    pub(crate) seen_at: Option<Instant>,
}

/// What a piece of database work is for (module docs: shares of the pool).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// Reads on behalf of clients: orders, sales, replays.
    Read = 0,
    /// Transaction 1: stock decrements and reservations.
    Reserve = 1,
    /// Transaction 2, compensation, releases, confirmations, sweeps, repairs, admin work.
    Settle = 2,
    /// The front door's reads of a protected item's rules and stock (one in flight per item
    /// and node): a share of their own, so a flood of client reads cannot starve order tokens.
    Door = 3,
}

impl Work {
    pub fn as_str(self) -> &'static str {
        match self {
            Work::Read => "read",
            Work::Reserve => "reserve",
            Work::Settle => "settle",
            Work::Door => "door",
        }
    }
}

/// Role of a member as last seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Writable.
    Master,
    /// In recovery: a streaming replica.
    #[default]
    Shadow,
    /// An old master kept read-only (`default_transaction_read_only = on`).
    Fenced,
    /// The last probe got no answer.
    Down,
}

/// What one member looked like at its last probe.
#[derive(Debug, Clone, Serialize, Default)]
pub struct MemberStatus {
    pub role: Role,
    pub healthy: bool,
    pub timeline: Option<i64>,
    /// Bytes the shadow's replay is behind the master's current WAL position.
    pub(crate) replication_lag_bytes: Option<i64>,
    pub(crate) last_error: Option<String>,
    pub(crate) consecutive_failures: u32,
}

pub struct Member {
    /// `master` or `shadow`: the role this member has in shards.toml (not necessarily now).
    pub(crate) configured_role: &'static str,
    pub endpoint: String,
    /// The engine's own connections (the pool's).
    pub conn: Endpoint,
    /// Administration: promotion, fencing, replication settings, and the health probes in
    /// built-in failover mode.
    pub admin: Endpoint,
    pub pool: Pool,
    pub(crate) probe_session: probe::ProbeSession,
    /// When work on this member last succeeded, in ms since the group was built: a member that
    /// answers the sale's queries is alive even when one probe of it is slow.
    last_ok_ms: AtomicU64,
}

impl Member {
    /// What the health monitor probes with: the admin endpoint when the engine manages failover
    /// (it reads the shadow's WAL receiver, which only privileged roles see), the application
    /// role otherwise.
    pub(crate) fn probe_endpoint(&self, config: &crate::config::FailoverConfig) -> &Endpoint {
        match config.mode {
            crate::config::FailoverMode::Builtin => &self.admin,
            crate::config::FailoverMode::External => &self.conn,
        }
    }
}

pub struct ShardGroup {
    pub name: String,
    pub members: Vec<Member>,
    writer: AtomicUsize,
    /// Cancelled when the writer changes: ends work bound to the old one.
    epoch: Mutex<CancellationToken>,
    status: Mutex<Vec<MemberStatus>>,
    failovers: AtomicU64,
    probed: std::sync::atomic::AtomicBool,
    born: Instant,
    reads: Semaphore,
    read_queue: Semaphore,
    reserves: Semaphore,
    doors: Semaphore,
    /// `seckill_db_work_total{group, work}` for read, reserve and settle.
    work_done: [metrics::Counter; 4],
    /// The highest timeline any member was seen on (module docs: a term that only grows).
    term: AtomicI64,
    /// Writes wait for a durable writer (module docs: no shadow, no acknowledgement).
    gate_writes: bool,
    durable: tokio::sync::watch::Sender<Durability>,
    replication: Mutex<Replication>,
    last_heal: Mutex<Option<heal::HealRecord>>,
    /// Heals that worked and that failed.
    heals: [AtomicU64; 2],
}

/// A running engine connection's session settings (see [`ShardGroup::new`]).
fn session_options(lock_timeout: Duration) -> String {
    // Every statement of the engine is built around an index. On the empty tables of a new
    // deployment the planner picks sequential scans, and a prepared statement keeps such a cached
    // generic plan while the table grows during the first sale, until autovacuum's ANALYZE
    // replaces it a minute later: full scans of reservations on the hot row's critical path.
    // Sequential scans stay possible where no index applies; they are only priced out.
    format!(
        "-c lock_timeout={} -c enable_seqscan=off",
        lock_timeout.as_millis().max(1)
    )
}

impl ShardGroup {
    /// `lock_timeout` bounds how long a statement of ours may queue for a row lock: a hot item's
    /// lock queue turns into a clean, surely-not-committed refusal instead of a client-side
    /// deadline whose outcome is unknown. (Not `statement_timeout`: cancelling a COMMIT that waits
    /// for the synchronous shadow would acknowledge a commit the shadow does not have.)
    // Long on purpose: the members, their pools and settings built in one pass, each step named.
    pub fn new(
        name: &str,
        pool_size: usize,
        resolved: Vec<crate::config::Member>,
        connect_timeout: Duration,
        lock_timeout: Duration,
        gate_writes: bool,
    ) -> Result<Self, ShardError> {
        let dsn_error = |reason: String| ShardError::Dsn {
            group: name.to_string(),
            reason,
        };
        let mut members = Vec::new();
        for m in resolved {
            let mut conn = Endpoint::new(&m.conn).map_err(dsn_error)?;
            let mut admin = Endpoint::new(&m.admin).map_err(dsn_error)?;
            for e in [&mut conn, &mut admin] {
                if e.pg.get_connect_timeout().is_none() {
                    e.pg.connect_timeout(connect_timeout);
                }
                if e.pg.get_application_name().is_none() {
                    e.pg.application_name("seckill");
                }
                // A partition that silently drops packets would otherwise leave a session
                // waiting for the kernel's default of minutes.
                e.pg.keepalives_idle(Duration::from_secs(5));
            }
            let mut engine = conn.pg.clone();
            if engine.get_options().is_none() {
                engine.options(session_options(lock_timeout));
            }
            let manager = Manager::from_config(
                engine,
                conn.tls.clone(),
                ManagerConfig {
                    recycling_method: RecyclingMethod::Fast,
                },
            );
            let pool = Pool::builder(manager)
                .max_size(pool_size)
                .runtime(Runtime::Tokio1)
                .create_timeout(Some(connect_timeout))
                .recycle_timeout(Some(connect_timeout))
                .build()
                .map_err(|e| dsn_error(format!("cannot build a pool: {e}")))?;
            members.push(Member {
                configured_role: m.role,
                endpoint: crate::config::endpoint_of(&conn.pg).unwrap_or_default(),
                conn,
                admin,
                pool,
                probe_session: Default::default(),
                last_ok_ms: AtomicU64::new(0),
            });
        }
        let status = members
            .iter()
            .map(|m| MemberStatus {
                role: if m.configured_role == "master" {
                    Role::Master
                } else {
                    Role::Shadow
                },
                ..Default::default()
            })
            .collect();
        let share = |divisor: usize| (pool_size / divisor).max(1);
        // Counter handles made now are the recorder's only if it exists already.
        let _ = crate::telemetry::recorder();
        let work_done = [Work::Read, Work::Reserve, Work::Settle, Work::Door].map(|w| {
            metrics::counter!(crate::telemetry::DB_WORK, "group" => name.to_string(), "work" => w.as_str())
        });
        Ok(Self {
            work_done,
            name: name.to_string(),
            members,
            writer: AtomicUsize::new(0),
            epoch: Mutex::new(CancellationToken::new()),
            status: Mutex::new(status),
            failovers: AtomicU64::new(0),
            probed: std::sync::atomic::AtomicBool::new(false),
            born: Instant::now(),
            reads: Semaphore::new(share(4)),
            read_queue: Semaphore::new(share(4) + 8 * pool_size),
            reserves: Semaphore::new(share(2)),
            doors: Semaphore::new(share(8)),
            term: AtomicI64::new(0),
            gate_writes,
            durable: tokio::sync::watch::channel(Durability::Unknown).0,
            replication: Mutex::new(Replication::default()),
            last_heal: Mutex::new(None),
            heals: [AtomicU64::new(0), AtomicU64::new(0)],
        })
    }

    /// The highest timeline any member was seen on.
    pub fn term(&self) -> i64 {
        self.term.load(Ordering::Acquire)
    }

    /// Raise the term to `timeline` if it is higher; the term after.
    pub(crate) fn raise_term(&self, timeline: i64) -> i64 {
        self.term
            .fetch_max(timeline, Ordering::AcqRel)
            .max(timeline)
    }

    pub fn durability(&self) -> Durability {
        *self.durable.borrow()
    }

    pub fn replication(&self) -> Replication {
        lock(&self.replication).clone()
    }

    /// What the monitor saw of the writer's replication this round, and what it means.
    pub(crate) fn set_replication(&self, view: Replication, durable: bool) {
        *lock(&self.replication) = view;
        if self.gate_writes {
            let d = if durable {
                Durability::Durable
            } else {
                Durability::NotDurable
            };
            self.durable
                .send_if_modified(|now| std::mem::replace(now, d) != d);
        }
    }

    /// Wait within `budget` for a writer that may acknowledge writes (module docs); refused with
    /// [`ShardError::NoShadow`] when none comes.
    pub(crate) async fn await_durable(&self, budget: Duration) -> Result<(), ShardError> {
        if !self.gate_writes || *self.durable.borrow() != Durability::NotDurable {
            return Ok(());
        }
        let mut rx = self.durable.subscribe();
        let came = tokio::time::timeout(budget, async {
            rx.wait_for(|d| *d != Durability::NotDurable).await.is_ok()
        })
        .await;
        match came {
            Ok(true) => Ok(()),
            _ => Err(ShardError::NoShadow {
                group: self.name.clone(),
            }),
        }
    }

    /// The last heal of this group (see [`heal`]).
    pub fn last_heal(&self) -> Option<heal::HealRecord> {
        lock(&self.last_heal).clone()
    }

    /// Heals that worked and that failed, in this process.
    pub fn heals(&self) -> (u64, u64) {
        (
            self.heals[0].load(Ordering::Relaxed),
            self.heals[1].load(Ordering::Relaxed),
        )
    }

    pub(crate) fn heal_started(&self, member: usize, action: &'static str) -> heal::HealRecord {
        let record = heal::HealRecord {
            member: self.members[member].endpoint.clone(),
            action,
            started_at: chrono::Utc::now(),
            finished_at: None,
            outcome: "running",
            rejoined: None,
            error: None,
        };
        *lock(&self.last_heal) = Some(record.clone());
        record
    }

    pub(crate) fn heal_finished(
        &self,
        mut record: heal::HealRecord,
        result: Result<Option<heal::Rejoined>, String>,
    ) {
        record.finished_at = Some(chrono::Utc::now());
        match result {
            Ok(how) => {
                record.outcome = "ok";
                record.rejoined = how;
                self.heals[0].fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                record.outcome = "failed";
                record.error = Some(e);
                self.heals[1].fetch_add(1, Ordering::Relaxed);
            }
        }
        *lock(&self.last_heal) = Some(record);
    }

    /// Index of the member currently written to, if any.
    pub fn writer_index(&self) -> Option<usize> {
        match self.writer.load(Ordering::Acquire) {
            NO_WRITER => None,
            i => Some(i),
        }
    }

    /// There is a writer and its last probe was answered (as a master, or with an error: a
    /// server out of connection slots is alive). A writer gone silent stays the writer for
    /// `failures_before_promote` probes (one slow probe must not move it), so the writer alone
    /// does not say that there is a master to write to.
    pub(crate) fn writer_answers(&self) -> bool {
        self.writer_index()
            .is_some_and(|w| self.status().get(w).is_some_and(|s| s.role != Role::Down))
    }

    /// Point the group at a member (or at none). When that changes, work still running on the
    /// old writer is ended (module docs).
    pub(crate) fn set_writer(&self, index: Option<usize>) {
        let new = index.unwrap_or(NO_WRITER);
        if self.writer.swap(new, Ordering::AcqRel) != new {
            let old = std::mem::replace(&mut *lock(&self.epoch), CancellationToken::new());
            old.cancel();
        }
    }

    fn epoch(&self) -> CancellationToken {
        lock(&self.epoch).clone()
    }

    fn now_ms(&self) -> u64 {
        self.born.elapsed().as_millis() as u64
    }

    /// True when work on member `i` succeeded at or after `since` (from [`Self::clock`]).
    pub(crate) fn answered_since(&self, i: usize, since: u64) -> bool {
        self.members[i].last_ok_ms.load(Ordering::Relaxed) >= since.max(1)
    }

    /// The group's clock for [`Self::answered_since`].
    pub(crate) fn clock(&self) -> u64 {
        self.now_ms()
    }

    /// Run `work` on the writable member's connection (module docs): waiting for a share of the
    /// pool and a connection within `budget`, then the work itself within `budget`.
    ///
    /// Errors ([`GroupError`]): [`ShardError`] when no connection could be had (nothing was sent:
    /// surely not committed), [`DbError`] from the work itself, and [`DbError::Lost`] when the
    /// budget ran out or the writer moved while the work was under way (outcome unknown).
    pub async fn run<T>(
        &self,
        kind: Work,
        budget: Duration,
        work: impl AsyncFnOnce(&mut Object) -> Result<T, DbError>,
    ) -> Result<T, GroupError> {
        self.work_done[kind as usize].increment(1);
        let started = Instant::now();
        if kind == Work::Reserve {
            // At most half the budget: the work itself still gets its own.
            self.await_durable(budget / 2).await?;
        }
        let _shares = self.shares(kind, budget).await?;
        // The epoch first: `set_writer` moves the writer before it ends the old epoch, so work
        // bound to an old writer always holds that writer's epoch (at worst a new writer with the
        // old epoch, given up once too often: harmless).
        let epoch = self.epoch();
        let idx = self.writer_index().ok_or_else(|| ShardError::NoMaster {
            group: self.name.clone(),
        })?;
        let member = &self.members[idx];
        let left = budget.saturating_sub(started.elapsed());
        let timeouts = Timeouts {
            wait: Some(left),
            create: Some(left),
            recycle: Some(left),
        };
        let mut client = tokio::select! {
            got = member.pool.timeout_get(&timeouts) => got.map_err(|e| match e {
                PoolError::Timeout(_) => ShardError::Exhausted { group: self.name.clone() },
                source => ShardError::Pool { group: self.name.clone(), source },
            })?,
            _ = epoch.cancelled() => return Err(ShardError::NoMaster { group: self.name.clone() }.into()),
        };
        // The work itself gets the whole budget: statements are sized against it (`lock_timeout`
        // is 3/5 of it), and running out mid-statement means "outcome unknown", which a wait in
        // the queue above must not turn a clean refusal into.
        let outcome = tokio::select! {
            r = tokio::time::timeout(budget, work(&mut client)) => r.ok(),
            _ = epoch.cancelled() => None,
        };
        Ok(self.settle(member, client, outcome, &epoch, budget)?)
    }

    /// The shares of the pool `kind` waits for within `budget` (module docs): reads take a place
    /// in the bounded read queue (none left: busy), then a permit of the read share; transaction
    /// 1 batches a permit of theirs; settling work takes any free connection.
    async fn shares(
        &self,
        kind: Work,
        budget: Duration,
    ) -> Result<(Option<SemaphorePermit<'_>>, Option<SemaphorePermit<'_>>), ShardError> {
        let queued = match kind {
            Work::Read => Some(
                self.read_queue
                    .try_acquire()
                    .map_err(|_| ShardError::Busy {
                        group: self.name.clone(),
                    })?,
            ),
            _ => None,
        };
        let share = match kind {
            Work::Read => &self.reads,
            Work::Reserve => &self.reserves,
            Work::Door => &self.doors,
            Work::Settle => return Ok((queued, None)),
        };
        let exhausted = || ShardError::Exhausted {
            group: self.name.clone(),
        };
        let permit = tokio::time::timeout(budget, share.acquire())
            .await
            .map_err(|_| exhausted())?
            .map_err(|_| exhausted())?;
        Ok((queued, Some(permit)))
    }

    /// What the work's outcome means for the member and its connection: an answer marks the
    /// member alive; a connection whose answer may still arrive (lost, or given up
    /// mid-statement) is never returned to the pool.
    fn settle<T>(
        &self,
        member: &Member,
        client: Object,
        outcome: Option<Result<T, DbError>>,
        epoch: &CancellationToken,
        budget: Duration,
    ) -> Result<T, DbError> {
        match outcome {
            Some(r) => {
                if r.is_ok() || matches!(r, Err(DbError::Rejected { .. } | DbError::Busy(_))) {
                    member.last_ok_ms.store(self.now_ms(), Ordering::Relaxed);
                }
                if matches!(r, Err(DbError::Lost(_))) {
                    drop(Object::take(client));
                }
                r
            }
            None => {
                // Given up mid-statement: the answer may still arrive on this connection.
                drop(Object::take(client));
                let why = if epoch.is_cancelled() {
                    "the group's master changed while the work was under way".to_string()
                } else {
                    format!("no answer within {} ms", budget.as_millis())
                };
                Err(DbError::Lost(why))
            }
        }
    }

    /// A connection to the writable member, outside [`Self::run`]'s budget and shares: for
    /// one-shot tools (the CLI) and tests. The engine's own work goes through `run`.
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
    /// The group holding the router-config table, the blocklist and the moves.
    config_group: usize,
}

impl Cluster {
    pub fn new(config: &Config) -> Result<Self, ShardError> {
        let timeout = Duration::from_millis(config.failover.probe_timeout_ms.max(1_000));
        let lock_timeout = config.request_timeout() * 3 / 5;
        let f = &config.failover;
        let blocks = f.synchronous && f.shadow_loss == crate::config::ShadowLossPolicy::Block;
        let mut groups = Vec::new();
        for g in &config.groups {
            let members = config.members(g).map_err(|e| ShardError::Dsn {
                group: g.name.clone(),
                reason: e.to_string(),
            })?;
            // A group without a shadow has chosen one server: nothing to wait for.
            let gate = blocks && members.len() > 1;
            groups.push(ShardGroup::new(
                &g.name,
                g.pool_size,
                members,
                timeout,
                lock_timeout,
                gate,
            )?);
        }
        // The configuration's checks make sure it names one of the groups.
        let config_group = config
            .groups
            .iter()
            .position(|g| g.name == config.config_group())
            .unwrap_or(0);
        Ok(Self {
            groups,
            failover: config.failover.clone(),
            config_group,
        })
    }

    /// The index of the config group.
    pub(crate) fn config_group(&self) -> usize {
        self.config_group
    }

    /// Probe every group once to find its writable member, never promoting anything: what
    /// one-shot commands and start-up need before they touch a group.
    pub(crate) async fn discover(&self) {
        let quiet = crate::config::FailoverConfig {
            enabled: false,
            ..self.failover.clone()
        };
        for g in &self.groups {
            monitor::check_group(g, &quiet).await;
        }
    }

    /// Wait, at most `limit`, until every group has a writable master, running the monitor's
    /// rounds on the groups found without one: in built-in mode they may promote a shadow whose
    /// master is gone, as the monitor would a moment later. A node restarted while another node
    /// (or Patroni) fails a group over, or the only node started after a master died while none
    /// ran, then comes up instead of failing at its migrations and layout check. Only the
    /// groups `needed` are waited for; returns those still without a writer.
    pub(crate) async fn until_writable(
        &self,
        needed: &[usize],
        limit: std::time::Duration,
    ) -> Vec<String> {
        let waiting: Vec<&ShardGroup> = needed
            .iter()
            .map(|&i| &self.groups[i])
            .filter(|g| !g.writer_answers())
            .collect();
        for g in &waiting {
            tracing::warn!(group = %g.name, wait_s = limit.as_secs(),
                "no writable master at start: waiting for one, the health monitor running");
        }
        let found = futures::future::join_all(
            waiting
                .iter()
                .map(|g| monitor::until_writable(g, &self.failover, limit)),
        )
        .await;
        let mut missing = Vec::new();
        for (g, found) in waiting.iter().zip(found) {
            if found {
                tracing::info!(group = %g.name, "the group has a writable master: starting");
            } else {
                missing.push(g.name.clone());
            }
        }
        missing
    }

    pub fn failover(&self) -> &crate::config::FailoverConfig {
        &self.failover
    }

    pub fn group(&self, idx: usize) -> &ShardGroup {
        &self.groups[idx]
    }

    pub(crate) fn by_name(&self, name: &str) -> Option<(usize, &ShardGroup)> {
        self.groups.iter().enumerate().find(|(_, g)| g.name == name)
    }

    /// True when every group has a member it writes to. The monitor clears a group's writer only
    /// once its master has failed `failures_before_promote` probes in a row (or turns out not to
    /// be writable), so one slow probe does not flip readiness.
    pub(crate) fn all_writable(&self) -> bool {
        self.groups.iter().all(|g| g.writer_index().is_some())
    }
}

/// The view of GET /v1/admin/groups and `seckill group status`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct GroupsReport {
    pub groups: Vec<GroupView>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct GroupView {
    pub name: String,
    /// The member written to, if any (`host:port`).
    pub writable_master: Option<String>,
    /// The highest timeline any member was seen on: a member writable on an older one is an old
    /// master and never written to.
    pub term: i64,
    /// A shadow streams from the master.
    pub shadow_streaming: bool,
    /// The master commits synchronously to its shadow.
    pub synchronous: bool,
    /// Whether writes are acknowledged now: `durable`, `not_durable` (no shadow streams under
    /// `shadow_loss = "block"`: writes get 503 `shadow_unavailable`), or `unknown` (not gated).
    pub writes: &'static str,
    /// How far the shadow's replay is behind the master, in bytes.
    pub(crate) replication_lag_bytes: Option<i64>,
    /// Failovers this engine node has seen.
    pub failovers: u64,
    /// The last time this node healed a member of the group (`seckill dev` and the test harness
    /// heal their own servers), if it did.
    pub last_heal: Option<heal::HealRecord>,
    pub members: Vec<MemberView>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct MemberView {
    pub endpoint: String,
    /// `master` or `shadow`: its role in shards.toml.
    pub(crate) configured_role: &'static str,
    pub role: Role,
    pub writable: bool,
    pub healthy: bool,
    pub timeline: Option<i64>,
    pub(crate) replication_lag_bytes: Option<i64>,
    pub(crate) consecutive_failures: u32,
    pub(crate) last_error: Option<String>,
}

pub(crate) fn groups_report(cluster: &Cluster) -> GroupsReport {
    let groups = cluster
        .groups
        .iter()
        .map(|g| {
            let writer = g.writer_index();
            let members = g
                .members
                .iter()
                .zip(g.status())
                .enumerate()
                .map(|(i, (m, s))| MemberView {
                    endpoint: m.endpoint.clone(),
                    configured_role: m.configured_role,
                    role: s.role,
                    writable: writer == Some(i),
                    healthy: s.healthy,
                    timeline: s.timeline,
                    replication_lag_bytes: s.replication_lag_bytes,
                    consecutive_failures: s.consecutive_failures,
                    last_error: s.last_error,
                })
                .collect();
            let replication = g.replication();
            GroupView {
                name: g.name.clone(),
                writable_master: writer.map(|i| g.members[i].endpoint.clone()),
                term: g.term(),
                shadow_streaming: replication.shadow_streaming,
                synchronous: replication.synchronous,
                writes: match g.durability() {
                    Durability::Unknown => "unknown",
                    Durability::Durable => "durable",
                    Durability::NotDurable => "not_durable",
                },
                replication_lag_bytes: replication.lag_bytes,
                failovers: g.failovers(),
                last_heal: g.last_heal(),
                members,
            }
        })
        .collect();
    GroupsReport { groups }
}
