//! The health monitor: one loop per shard group in every engine node.
//!
//! Every `failover.probe_interval_ms` it probes each member (`pg_is_in_recovery()`, the timeline,
//! whether it is fenced, its WAL receiver, the replication lag) with a timeout, then decides which
//! member to write to. Nodes never talk to each other: each asks the servers, so all nodes converge
//! on the same master.
//!
//! - **Discovery**: the writable member is the one not in recovery and not fenced. If two are (an
//!   old master came back after its shadow was promoted), the higher timeline wins and the other is
//!   fenced: `default_transaction_read_only = on`, so nothing can commit a write on it.
//! - **Failover**: only a member that gives *no answer* counts as failing (a server replying with
//!   an error, e.g. out of connection slots, is alive). When the master has failed
//!   `failures_before_promote` consecutive probes, the shadow is promoted (`pg_promote()`) — but only
//!   if the shadow itself has lost its WAL stream from the master. A shadow that still streams proves
//!   the master alive: this node is merely cut off from it, and promoting would make two masters.
//!   Promotion is idempotent, so two nodes doing it at once is harmless. Until a writable member is
//!   known the group has no writer and requests get 503 `unavailable` with Retry-After.
//! - **Synchronous replication**: with `failover.synchronous` the master commits only once the shadow
//!   has the WAL (`synchronous_standby_names = '*'`), so a 201 means two servers hold the order. When
//!   no standby streams, `failover.shadow_loss` decides. `block` (default) keeps commits waiting until
//!   a shadow streams again: a dead shadow stalls writes, but an old master cut off from engines and
//!   shadow can never acknowledge an order that the promoted shadow does not have, so no split brain
//!   can sell the same stock twice. `degrade` switches the master to asynchronous commits after
//!   `shadow_loss_grace_ms`: the sale stays open when the shadow dies, at the price that a second
//!   failure in that window loses orders, and that under a network partition both sides may accept
//!   writes. Right after a promotion there is no standby at all, so the new master starts
//!   asynchronous; it turns synchronous again as soon as a rejoined shadow streams.

use super::{Cluster, MemberStatus, ShardGroup};
use crate::config::{FailoverConfig, ShadowLossPolicy};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

/// One probe's findings.
#[derive(Debug, Clone)]
pub struct Probe {
    pub in_recovery: bool,
    pub timeline: i64,
    pub fenced: bool,
    /// On a master: the largest replay lag of its standbys in bytes, and whether any streams.
    pub standby_lag: Option<i64>,
    pub sync_names: String,
    /// On a standby: its WAL receiver is streaming from a master right now.
    pub receiver_streaming: bool,
}

/// A probe that failed. `answered` tells a server that replied with an error (alive, e.g. out of
/// connection slots) from one that gave no answer; only the latter counts towards a failover.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ProbeError {
    pub message: String,
    pub answered: bool,
}

impl ProbeError {
    fn from_pg(e: &tokio_postgres::Error) -> Self {
        // A server starting up or shutting down (57P0x) answers but does not serve.
        let answered = e
            .as_db_error()
            .is_some_and(|db| !db.code().code().starts_with("57P"));
        Self {
            message: describe(e),
            answered,
        }
    }
}

const PROBE_SQL: &str = "SELECT pg_is_in_recovery(),
    CASE WHEN pg_is_in_recovery()
         THEN coalesce((SELECT received_tli FROM pg_stat_wal_receiver), 0)::bigint
         ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::bigint END,
    current_setting('default_transaction_read_only') = 'on',
    CASE WHEN pg_is_in_recovery() THEN NULL
         ELSE (SELECT max(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn))::bigint
               FROM pg_stat_replication WHERE state = 'streaming') END,
    current_setting('synchronous_standby_names'),
    coalesce((SELECT status = 'streaming' FROM pg_stat_wal_receiver), false)";

/// Probe one member over a fresh connection, bounded by `timeout` (a session used once).
pub async fn probe(
    config: &tokio_postgres::Config,
    timeout: Duration,
) -> Result<Probe, ProbeError> {
    ProbeSession::default().probe(config, timeout).await
}

async fn connect_probe(
    config: &tokio_postgres::Config,
) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), ProbeError> {
    let (client, conn) = config
        .connect(NoTls)
        .await
        .map_err(|e| ProbeError::from_pg(&e))?;
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((client, task))
}

fn silence(timeout: Duration) -> ProbeError {
    ProbeError {
        message: format!("no answer within {} ms", timeout.as_millis()),
        answered: false,
    }
}

/// The monitor's own session with one member, kept between probes.
///
/// Not the pool: a pool would hide a dead server behind its idle connections and queue probes
/// behind the sale's queries. One dedicated session per member and node instead of a fresh
/// connection per probe: a fresh connection forks a backend on the server four times a second per
/// node, which under a storm costs the servers measurable CPU. It detects the same failures: a
/// dead or restarted server breaks the session, and a broken session is replaced by a fresh
/// connection within the same probe, so only a server that cannot be reached anew counts as silent.
#[derive(Default)]
pub struct ProbeSession {
    session: tokio::sync::Mutex<Option<(tokio_postgres::Client, tokio::task::JoinHandle<()>)>>,
}

impl ProbeSession {
    pub async fn probe(
        &self,
        config: &tokio_postgres::Config,
        timeout: Duration,
    ) -> Result<Probe, ProbeError> {
        let mut slot = self.session.lock().await;
        let work = async {
            if let Some((client, _)) = slot.as_ref().filter(|(c, _)| !c.is_closed()) {
                match client.query_one(PROBE_SQL, &[]).await {
                    Ok(row) => return Ok(Probe::from_row(&row)),
                    // The server answered with an error: it is alive; start afresh next time.
                    Err(e) if e.as_db_error().is_some() => {
                        Self::close(&mut slot);
                        return Err(ProbeError::from_pg(&e));
                    }
                    // The session broke (a restart, a dead server): try a fresh one now.
                    Err(_) => {}
                }
            }
            Self::close(&mut slot);
            let (client, task) = connect_probe(config).await?;
            let row = client
                .query_one(PROBE_SQL, &[])
                .await
                .map_err(|e| ProbeError::from_pg(&e));
            match row {
                Ok(row) => {
                    *slot = Some((client, task));
                    Ok(Probe::from_row(&row))
                }
                Err(e) => {
                    task.abort();
                    Err(e)
                }
            }
        };
        let outcome = tokio::time::timeout(timeout, work).await;
        match outcome {
            Ok(r) => r,
            Err(_) => {
                Self::close(&mut slot);
                Err(silence(timeout))
            }
        }
    }

    fn close(slot: &mut Option<(tokio_postgres::Client, tokio::task::JoinHandle<()>)>) {
        if let Some((_, task)) = slot.take() {
            task.abort();
        }
    }
}

impl Drop for ProbeSession {
    fn drop(&mut self) {
        Self::close(self.session.get_mut());
    }
}

impl Probe {
    fn from_row(row: &tokio_postgres::Row) -> Self {
        Probe {
            in_recovery: row.get(0),
            timeline: row.get(1),
            fenced: row.get(2),
            standby_lag: row.get(3),
            sync_names: row.get(4),
            receiver_streaming: row.get(5),
        }
    }
}

/// The server's own words for an error, not just "db error".
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => match std::error::Error::source(e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
    }
}

/// Run administrative statements on one member over a fresh connection, one at a time (several
/// in one simple query would form a transaction block, which ALTER SYSTEM refuses).
pub async fn admin(
    config: &tokio_postgres::Config,
    sql: &str,
    timeout: Duration,
) -> Result<(), String> {
    let work = async {
        let (client, conn) = config.connect(NoTls).await.map_err(|e| describe(&e))?;
        let conn_task = tokio::spawn(conn);
        let mut r = Ok(());
        for statement in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
            if let Err(e) = client.batch_execute(statement).await {
                r = Err(describe(&e));
                break;
            }
        }
        drop(client);
        conn_task.abort();
        r
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
    }
}

pub const FENCE_SQL: &str =
    "ALTER SYSTEM SET default_transaction_read_only = on; SELECT pg_reload_conf();";
pub const UNFENCE_SQL: &str =
    "ALTER SYSTEM RESET default_transaction_read_only; SELECT pg_reload_conf();";

fn sync_sql(names: &str) -> String {
    format!("ALTER SYSTEM SET synchronous_standby_names = '{names}'; SELECT pg_reload_conf();")
}

/// Per-group memory of the monitor between rounds.
#[derive(Default)]
struct GroupState {
    /// Since when the master has had no streaming standby.
    no_standby_since: Option<Instant>,
}

/// One round for one group, without the timer: what [`Cluster::discover`] runs.
pub(crate) async fn check_group(group: &ShardGroup, config: &FailoverConfig) {
    let mut state = GroupState::default();
    check_group_with(group, config, &mut state).await;
}

async fn check_group_with(group: &ShardGroup, config: &FailoverConfig, state: &mut GroupState) {
    let timeout = Duration::from_millis(config.probe_timeout_ms);
    let probes = futures::future::join_all(
        group
            .members
            .iter()
            .map(|m| m.probe_session.probe(&m.pg_config, timeout)),
    )
    .await;
    let writer = group.writer_index();

    // Record what each member looks like.
    group.update_status(|status| {
        for (i, p) in probes.iter().enumerate() {
            let s: &mut MemberStatus = &mut status[i];
            match p {
                Ok(p) => {
                    s.healthy = true;
                    s.consecutive_failures = 0;
                    s.last_error = None;
                    s.timeline = Some(p.timeline);
                    s.role = if p.in_recovery {
                        "shadow"
                    } else if p.fenced {
                        "fenced"
                    } else {
                        "master"
                    }
                    .into();
                }
                Err(e) => {
                    s.healthy = false;
                    s.last_error = Some(e.message.clone());
                    if !e.answered {
                        s.role = "down".into();
                        s.consecutive_failures = s.consecutive_failures.saturating_add(1);
                    }
                }
            }
        }
        // Lag is measured on the master and shown on the standby(s).
        let lag = probes
            .iter()
            .find_map(|p| p.as_ref().ok().filter(|p| !p.in_recovery && !p.fenced))
            .and_then(|p| p.standby_lag);
        for (i, p) in probes.iter().enumerate() {
            if matches!(p, Ok(p) if p.in_recovery) {
                status[i].replication_lag_bytes = lag;
            } else {
                status[i].replication_lag_bytes = None;
            }
        }
    });

    // Writable candidates: answered, not in recovery, not fenced.
    let mut candidates: Vec<(usize, i64)> = probes
        .iter()
        .enumerate()
        .filter_map(|(i, p)| match p {
            Ok(p) if !p.in_recovery && !p.fenced => Some((i, p.timeline)),
            _ => None,
        })
        .collect();
    candidates.sort_by_key(|&(i, tl)| (std::cmp::Reverse(tl), Some(i) != writer));

    if let Some(&(best, best_tl)) = candidates.first() {
        // Split brain guard: anything else writable on an older timeline is fenced.
        for &(other, tl) in &candidates[1..] {
            if tl < best_tl {
                tracing::error!(group = %group.name, member = %group.members[other].endpoint,
                    timeline = tl, current_timeline = best_tl,
                    "old master is writable on an older timeline: fencing it");
                if let Err(e) = admin(&group.members[other].pg_config, FENCE_SQL, timeout).await {
                    tracing::error!(group = %group.name, error = %e, "fencing failed");
                }
            } else {
                tracing::error!(group = %group.name, "two writable members on the same timeline; keeping the current one");
            }
        }
        if writer != Some(best) {
            // The first round of a process only discovers where the master is (it may have moved
            // before this process started); later changes are failovers this node follows.
            if group.mark_probed() {
                tracing::warn!(group = %group.name, member = %group.members[best].endpoint,
                    timeline = best_tl, "writing to a new master");
                group.count_failover();
            } else {
                tracing::info!(group = %group.name, member = %group.members[best].endpoint,
                    timeline = best_tl, "the writable member is not the configured master");
            }
            group.set_writer(Some(best));
        }
        group.mark_probed();
        if let Ok(p) = &probes[best] {
            manage_sync(group, best, p, config, state, timeout).await;
        }
        return;
    }

    // No writable member. A writer that answers but is a standby or fenced (a stale view, or a
    // switchover in progress) is dropped at once: requests get 503 rather than read-only errors.
    if let Some(w) = writer {
        if probes[w].is_ok() {
            group.set_writer(None);
        }
    }
    // The master is dead when every member that gives no answer has failed long enough.
    let failures: Vec<u32> = group
        .status()
        .iter()
        .map(|s| s.consecutive_failures)
        .collect();
    let silent: Vec<usize> = probes
        .iter()
        .enumerate()
        .filter(|(_, p)| matches!(p, Err(e) if !e.answered))
        .map(|(i, _)| i)
        .collect();
    let dead_long = !silent.is_empty()
        && silent
            .iter()
            .all(|&i| failures[i] >= config.failures_before_promote);
    if dead_long {
        group.set_writer(None);
    }
    if !config.enabled || !dead_long {
        return;
    }
    // Promote only a shadow that has itself lost the master: if its WAL receiver still streams,
    // the master is alive and only this node cannot reach it (a partition), and promoting would
    // make two masters.
    let shadow = probes.iter().enumerate().find_map(|(i, p)| {
        matches!(p, Ok(p) if p.in_recovery && !p.receiver_streaming).then_some(i)
    });
    let Some(shadow) = shadow else {
        if probes.iter().any(|p| matches!(p, Ok(p) if p.in_recovery)) {
            tracing::error!(group = %group.name, "master unreachable from this node but its shadow still streams from it: not promoting");
        } else {
            tracing::error!(group = %group.name, "master down and no healthy shadow to promote");
        }
        return;
    };
    let member = &group.members[shadow];
    tracing::warn!(group = %group.name, member = %member.endpoint, "master unreachable: promoting the shadow");
    if let Err(e) = promote(&member.pg_config, timeout).await {
        tracing::error!(group = %group.name, error = %e, "promotion failed");
    }
    match member.probe_session.probe(&member.pg_config, timeout).await {
        Ok(p) if !p.in_recovery && !p.fenced => {
            tracing::warn!(group = %group.name, member = %member.endpoint, timeline = p.timeline, "failover complete");
            group.count_failover();
            group.set_writer(Some(shadow));
            state.no_standby_since = Some(Instant::now());
        }
        other => {
            tracing::error!(group = %group.name, probe = ?other.err(), "promoted shadow is not writable yet")
        }
    }
}

/// Promote a shadow and make it a usable master: not fenced (a fence may have come along from an
/// old master through pg_rewind), and asynchronous until a new shadow streams, since none does yet.
/// Idempotent: promoting a server that is no longer in recovery only reports that.
pub async fn promote(config: &tokio_postgres::Config, timeout: Duration) -> Result<(), String> {
    if let Err(e) = admin(
        config,
        "SELECT pg_promote(true, 30)",
        Duration::from_secs(35),
    )
    .await
    {
        if !e.contains("not in progress") {
            return Err(e);
        }
        tracing::info!("shadow was already promoted (by another engine node)");
    }
    let setup = format!(
        "ALTER SYSTEM RESET default_transaction_read_only; {}",
        sync_sql("")
    );
    admin(config, &setup, timeout).await
}

/// Keep the master's synchronous replication setting in line with the policy (module docs).
async fn manage_sync(
    group: &ShardGroup,
    master: usize,
    probe: &Probe,
    config: &FailoverConfig,
    state: &mut GroupState,
    timeout: Duration,
) {
    let streaming = probe.standby_lag.is_some();
    let desired = if !config.synchronous {
        ""
    } else if streaming {
        state.no_standby_since = None;
        "*"
    } else {
        let since = *state.no_standby_since.get_or_insert_with(Instant::now);
        let degrade = config.shadow_loss == ShadowLossPolicy::Degrade
            && since.elapsed() >= Duration::from_millis(config.shadow_loss_grace_ms);
        if degrade || probe.sync_names.is_empty() {
            ""
        } else {
            "*"
        }
    };
    if probe.sync_names != desired {
        tracing::warn!(group = %group.name, from = %probe.sync_names, to = desired, "changing synchronous_standby_names");
        if let Err(e) = admin(
            &group.members[master].pg_config,
            &sync_sql(desired),
            timeout,
        )
        .await
        {
            tracing::error!(group = %group.name, error = %e, "cannot change synchronous replication");
        }
    }
}

/// Run the monitor for every group until `cancel` fires. Each group has its own loop, so a slow
/// promotion in one group never delays the probes of another.
pub async fn run(cluster: Arc<Cluster>, config: FailoverConfig, cancel: CancellationToken) {
    let loops = (0..cluster.groups.len()).map(|g| {
        let (cluster, config, cancel) = (cluster.clone(), config.clone(), cancel.clone());
        async move {
            let mut state = GroupState::default();
            let mut tick = tokio::time::interval(Duration::from_millis(config.probe_interval_ms));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tick.tick() => {}
                }
                check_group_with(cluster.group(g), &config, &mut state).await;
            }
        }
    });
    futures::future::join_all(loops).await;
}
