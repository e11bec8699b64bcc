//! The health monitor: one loop per shard group in every engine node.
//!
//! Every `failover.probe_interval_ms` it probes each member (`pg_is_in_recovery()`, the timeline,
//! whether it is fenced, its WAL receiver, the replication lag) with a timeout, then [`decide`]s —
//! a pure function of what it saw — which member to write to, and whether to fence or promote.
//! Nodes never talk to each other: each asks the servers, so all nodes converge on the same master.
//!
//! - **Discovery**: the writable member is the one not in recovery and not fenced, on the group's
//!   term: the highest timeline any member was ever seen on (a standby streaming from a newer
//!   master shows it too). A member writable on an older timeline is an old master: never a write
//!   target, in either mode, even in a round where the newer master's probe went unanswered; in
//!   built-in mode it is fenced: `default_transaction_read_only = on`, so nothing can commit a
//!   write on it.
//! - **Silence, not errors**: only a member that gives *no answer* counts as failing (a server
//!   replying with an error, e.g. out of connection slots, is alive), and not even then while the
//!   engine's own queries on it keep succeeding (a probe that is merely slow on a loaded host). A
//!   probe that times out keeps its session: the next probe queues behind it on the same connection
//!   rather than racing to open new ones against a busy server. A server that stops answering
//!   while its sockets stay open (a frozen host, SIGSTOP, a partition that drops packets) is silent
//!   exactly like a dead one.
//! - **Failover** (built-in mode): when the master has been silent for `failures_before_promote`
//!   consecutive probes, the shadow is promoted (`pg_promote()`) — but only if the shadow itself has
//!   heard nothing from the master for `stream_timeout_ms`: its WAL receiver has not been streaming,
//!   or its last message from the master (`pg_stat_wal_receiver.last_msg_receipt_time`) is older
//!   than that, for the whole period. A shadow that still hears the master proves it alive: this
//!   node is merely cut off from it, and promoting would make two masters. A receiver that is only
//!   restarting does not count as lost until the whole period passed without contact. The engine
//!   keeps the shadow's `wal_receiver_timeout` at `stream_timeout_ms` (so an idle master is pinged
//!   at half of it and the receipt age stays meaningful) and the master's `wal_sender_timeout` at
//!   twice that. Promotion is idempotent, so two nodes doing it at once is harmless. Until a
//!   writable member is known the group has no writer and requests get 503 `unavailable`.
//! - **Synchronous replication**: with `failover.synchronous` the master commits only once the
//!   shadow has the WAL (`synchronous_standby_names` naming the shadow's `application_name`,
//!   `failover.shadow_name`, so no other walsender such as a pg_receivewal can acknowledge commits),
//!   so a 201 means two servers hold the order. When the shadow does not stream,
//!   `failover.shadow_loss` decides. `block` (default) keeps commits waiting until it streams again:
//!   a dead shadow stalls writes, but an old master cut off from engines and shadow can never
//!   acknowledge an order that the promoted shadow does not have, so no split brain can sell the
//!   same stock twice. A freshly promoted master stays synchronous too: it acknowledges nothing
//!   until its old master, healed ([`super::heal`]), streams from it. `degrade` switches the master
//!   to asynchronous commits after `shadow_loss_grace_ms`, and starts a promoted master
//!   asynchronous. Each round also tells the group whether its writer may acknowledge writes now
//!   ([`durable`]); the group makes writes wait for it.
//! - **External mode** (`failover.mode = "external"`, for Patroni, pg_auto_failover or a managed
//!   PostgreSQL): the engine never promotes, fences or changes a server setting. It only finds the
//!   writable member among the listed ones, follows it when it moves, and answers 503 meanwhile.

use super::tls::Endpoint;
use super::{Cluster, MemberStatus, Role, ShardGroup};
use crate::config::{FailoverConfig, FailoverMode, ShadowLossPolicy};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// One probe's findings.
#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    pub in_recovery: bool,
    pub timeline: i64,
    pub fenced: bool,
    /// On a master: the replay lag of the shadow (by `application_name`) in bytes, when it streams.
    pub standby_lag: Option<i64>,
    pub sync_names: String,
    /// On a standby whose WAL receiver streams: ms since its last message from the master.
    pub receipt_age_ms: Option<i64>,
    /// On a standby: a WAL receiver exists but its details are hidden from this role (neither
    /// superuser nor pg_read_all_stats), so whether it hears the master cannot be judged.
    pub receiver_hidden: bool,
    pub wal_receiver_timeout_ms: i64,
    pub wal_sender_timeout_ms: i64,
    /// On a master: whether a standby streams with `sync_state` sync or quorum (None: the
    /// walsenders' details are hidden from this role).
    pub sync_streaming: Option<bool>,
    /// `synchronous_commit` of the server.
    pub synchronous_commit: String,
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

/// `$1`: the shadow's application_name.
const PROBE_SQL: &str = "SELECT pg_is_in_recovery(),
    CASE WHEN pg_is_in_recovery()
         THEN coalesce((SELECT received_tli FROM pg_stat_wal_receiver), 0)::bigint
         ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::bigint END,
    current_setting('default_transaction_read_only') = 'on',
    CASE WHEN pg_is_in_recovery() THEN NULL
         ELSE (SELECT max(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn))::bigint
               FROM pg_stat_replication WHERE state = 'streaming' AND application_name = $1) END,
    current_setting('synchronous_standby_names'),
    (SELECT (extract(epoch FROM clock_timestamp() - last_msg_receipt_time) * 1000)::bigint
       FROM pg_stat_wal_receiver WHERE status = 'streaming'),
    coalesce((SELECT status IS NULL FROM pg_stat_wal_receiver), false),
    (SELECT setting::bigint FROM pg_settings WHERE name = 'wal_receiver_timeout'),
    (SELECT setting::bigint FROM pg_settings WHERE name = 'wal_sender_timeout'),
    CASE WHEN pg_is_in_recovery() THEN false
         ELSE (SELECT CASE WHEN count(*) = 0 THEN false
                           WHEN bool_and(state IS NULL) THEN NULL
                           ELSE coalesce(bool_or(state = 'streaming'
                                                 AND sync_state IN ('sync', 'quorum')), false) END
               FROM pg_stat_replication) END,
    current_setting('synchronous_commit')";

/// Probe one member over a fresh connection, bounded by `timeout` (a session used once).
pub async fn probe(
    config: &Endpoint,
    shadow_name: &str,
    timeout: Duration,
) -> Result<Probe, ProbeError> {
    ProbeSession::default()
        .probe(config, shadow_name, timeout)
        .await
}

async fn connect_probe(config: &Endpoint) -> Result<Session, ProbeError> {
    config.connect().await.map_err(|e| ProbeError::from_pg(&e))
}

fn silence(timeout: Duration) -> ProbeError {
    ProbeError {
        message: format!("no answer within {} ms", timeout.as_millis()),
        answered: false,
    }
}

use super::tls::Session;

/// The monitor's own session with one member, kept between probes.
///
/// Not the pool: a pool would hide a dead server behind its idle connections and queue probes
/// behind the sale's queries. One dedicated session per member and node instead of a fresh
/// connection per probe: a fresh connection forks a backend on the server four times a second per
/// node, which under a storm costs the servers measurable CPU. A broken session (a dead or
/// restarted server) is replaced by a fresh connection within the same probe; a probe that merely
/// timed out keeps the session, so a slow answer never sets off a burst of new connections.
#[derive(Default)]
pub struct ProbeSession {
    session: tokio::sync::Mutex<Option<Session>>,
}

impl ProbeSession {
    pub async fn probe(
        &self,
        config: &Endpoint,
        shadow_name: &str,
        timeout: Duration,
    ) -> Result<Probe, ProbeError> {
        let Ok(mut slot) = tokio::time::timeout(timeout, self.session.lock()).await else {
            return Err(silence(timeout));
        };
        let work = async {
            if let Some((client, _)) = slot.as_ref().filter(|(c, _)| !c.is_closed()) {
                match client.query_one(PROBE_SQL, &[&shadow_name]).await {
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
                .query_one(PROBE_SQL, &[&shadow_name])
                .await
                .map_err(|e| ProbeError::from_pg(&e));
            *slot = Some((client, task));
            row.map(|row| Probe::from_row(&row))
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(silence(timeout)),
        }
    }

    fn close(slot: &mut Option<Session>) {
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
            receipt_age_ms: row.get(5),
            receiver_hidden: row.get(6),
            wal_receiver_timeout_ms: row.get::<_, Option<i64>>(7).unwrap_or(0),
            wal_sender_timeout_ms: row.get::<_, Option<i64>>(8).unwrap_or(0),
            sync_streaming: row.get(9),
            synchronous_commit: row.get(10),
        }
    }

    fn writable(&self) -> bool {
        !self.in_recovery && !self.fenced
    }
}

/// Whether a master that answered `p` acknowledges a commit only once a standby has it: a
/// standby named in `synchronous_standby_names`, commits that wait for it, and (where this role
/// may see it) one streaming in sync.
pub fn durable(p: &Probe) -> bool {
    let waits = matches!(
        p.synchronous_commit.as_str(),
        "on" | "remote_write" | "remote_apply"
    );
    !p.in_recovery && waits && !p.sync_names.trim().is_empty() && p.sync_streaming != Some(false)
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
pub async fn admin(config: &Endpoint, sql: &str, timeout: Duration) -> Result<(), String> {
    let work = async {
        let (client, conn_task) = config.connect().await.map_err(|e| describe(&e))?;
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

/// `synchronous_standby_names` that names exactly the shadow (quoted: the name is the
/// application_name verbatim), or "" for asynchronous commits.
pub fn sync_names_for(shadow_name: &str) -> String {
    format!("\"{}\"", shadow_name.replace('"', ""))
}

fn sync_sql(names: &str) -> String {
    format!(
        "ALTER SYSTEM SET synchronous_standby_names = '{}'; SELECT pg_reload_conf();",
        names.replace('\'', "''")
    )
}

/// What the monitor saw of one member this round.
#[derive(Debug, Clone, PartialEq)]
pub enum Seen {
    Up(Probe),
    /// The server replied with an error: alive, but not serving the probe.
    Refused,
    /// No answer to the probe, but the engine's own work on it succeeded meanwhile: alive, busy.
    Busy,
    /// No answer at all, for this many rounds in a row.
    Silent {
        rounds: u32,
    },
}

/// Everything [`decide`] looks at.
#[derive(Debug, Clone)]
pub struct Observations {
    pub seen: Vec<Seen>,
    /// The group's term: the highest timeline any member was seen on, this round included.
    pub term: i64,
    /// The member written to before this round.
    pub writer: Option<usize>,
    /// Per member: the timeline it was last seen on.
    pub last_timeline: Vec<Option<i64>>,
    /// Per member: a standby that has heard nothing from its master for `stream_timeout_ms`.
    pub lost_master: Vec<bool>,
    /// Whether the master committed synchronously to a streaming shadow when it last answered
    /// (None: this node never saw it answer).
    pub master_was_synchronous: Option<bool>,
}

/// What the monitor should do about a group this round.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Action {
    pub writer: Option<usize>,
    /// Old masters writable on an older timeline: make them read-only.
    pub fence: Vec<usize>,
    /// A shadow to promote (the writer stays unknown until it is writable).
    pub promote: Option<usize>,
    pub note: Option<Note>,
}

/// Why nothing (more) was done, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Note {
    TwoWritableSameTimeline,
    /// The only writable member is on a timeline older than the term: an old master.
    OnlyAnOldMaster,
    ShadowStillHearsMaster,
    ShadowHidesItsReceiver,
    NoShadowToPromote,
    /// The master was asynchronous when last seen (e.g. right after a failover, before its new
    /// shadow streamed): its shadow may lack acknowledged orders.
    MasterWasAsynchronous,
}

/// The decision of one round, from what was seen (module docs).
pub fn decide(obs: &Observations, config: &FailoverConfig) -> Action {
    let builtin = config.mode == FailoverMode::Builtin;
    // Writable members: answered as a master, or the current writer still serving our queries.
    let writable: Vec<(usize, i64)> = obs
        .seen
        .iter()
        .enumerate()
        .filter_map(|(i, s)| match s {
            Seen::Up(p) if p.writable() => Some((i, p.timeline)),
            Seen::Busy | Seen::Refused if obs.writer == Some(i) => {
                Some((i, obs.last_timeline[i].unwrap_or(0)))
            }
            _ => None,
        })
        .collect();
    // Writable on an older timeline than the term: an old master, whatever else answered.
    let (mut candidates, old): (Vec<_>, Vec<_>) =
        writable.into_iter().partition(|&(_, tl)| tl >= obs.term);
    let fence: Vec<usize> = old
        .iter()
        .filter(|&&(i, _)| builtin && matches!(obs.seen[i], Seen::Up(_)))
        .map(|&(i, _)| i)
        .collect();
    candidates.sort_by_key(|&(i, tl)| (std::cmp::Reverse(tl), Some(i) != obs.writer));
    if let Some(&(best, best_tl)) = candidates.first() {
        let twins = candidates[1..].iter().any(|&(_, tl)| tl == best_tl);
        return Action {
            writer: Some(best),
            fence,
            note: twins.then_some(Note::TwoWritableSameTimeline),
            ..Default::default()
        };
    }
    if !old.is_empty() {
        // Whatever the newer master's probe said this round, writes never go back to an old one.
        return Action {
            writer: None,
            fence,
            note: Some(Note::OnlyAnOldMaster),
            ..Default::default()
        };
    }
    // No writable member. A writer that answers as a standby or fenced (a stale view, or a
    // switchover in progress) is dropped at once: requests get 503 rather than read-only errors.
    let mut writer = obs.writer.filter(|&w| !matches!(obs.seen[w], Seen::Up(_)));
    // The master is dead when it (or, with no writer known, some member) has been silent long
    // enough.
    let dead = |i: usize| matches!(obs.seen[i], Seen::Silent { rounds } if rounds >= config.failures_before_promote);
    let dead_long = match obs.writer {
        Some(w) => dead(w),
        None => (0..obs.seen.len()).any(dead),
    };
    if dead_long {
        writer = None;
    }
    if !builtin || !config.enabled || !dead_long {
        return Action {
            writer,
            ..Default::default()
        };
    }
    let standbys: Vec<usize> = obs
        .seen
        .iter()
        .enumerate()
        .filter(|(_, s)| matches!(s, Seen::Up(p) if p.in_recovery))
        .map(|(i, _)| i)
        .collect();
    let mut promote = standbys.iter().copied().find(|&i| obs.lost_master[i]);
    let must_be_synchronous = config.synchronous && config.shadow_loss == ShadowLossPolicy::Block;
    if promote.is_some() && must_be_synchronous && obs.master_was_synchronous == Some(false) {
        return Action {
            writer,
            note: Some(Note::MasterWasAsynchronous),
            ..Default::default()
        };
    }
    if !obs.lost_master.iter().any(|l| *l) {
        promote = None;
    }
    let note = match (promote, standbys.first()) {
        (Some(_), _) => None,
        (None, None) => Some(Note::NoShadowToPromote),
        (None, Some(&i)) => Some(match &obs.seen[i] {
            Seen::Up(p) if p.receiver_hidden => Note::ShadowHidesItsReceiver,
            _ => Note::ShadowStillHearsMaster,
        }),
    };
    Action {
        writer,
        promote,
        note,
        ..Default::default()
    }
}

/// Per-group memory of the monitor between rounds.
#[derive(Default)]
struct GroupState {
    /// Since when the master has had no streaming shadow.
    no_standby_since: Option<Instant>,
    /// Per member: when it last heard its master (standbys), or when it was last seen as
    /// anything but a standby.
    heard_master_at: Vec<Option<Instant>>,
    /// Whether the master, when it last answered, committed synchronously to a streaming shadow
    /// (None: never seen answering).
    master_was_synchronous: Option<bool>,
}

impl GroupState {
    /// Track each standby's contact with its master; true per member that lost it.
    fn lost_master(&mut self, seen: &[Seen], stream_timeout: Duration) -> Vec<bool> {
        let now = Instant::now();
        self.heard_master_at.resize(seen.len(), None);
        seen.iter()
            .zip(self.heard_master_at.iter_mut())
            .map(|(s, heard)| {
                let at = heard.get_or_insert(now);
                match s {
                    Seen::Up(p) if p.in_recovery => {
                        if p.receiver_hidden {
                            // Cannot be judged: never call it lost.
                            *at = now;
                        } else if let Some(age) = p.receipt_age_ms {
                            let last = now
                                .checked_sub(Duration::from_millis(age.max(0) as u64))
                                .unwrap_or(now);
                            *at = (*at).max(last);
                        }
                        now.duration_since(*at) >= stream_timeout
                    }
                    // Not (seen as) a standby this round: its silence as a standby starts only
                    // once it is one, so a member that just became a standby (a rejoined old
                    // master, one this node could not reach) is never lost at first sight.
                    _ => {
                        *at = now;
                        false
                    }
                }
            })
            .collect()
    }

    /// Remember whether the master, when it last answered, committed synchronously to a
    /// streaming shadow: only then does the shadow hold every acknowledged order.
    fn note_master(&mut self, seen: &[Seen], shadow_name: &str) {
        if let Some(p) = seen.iter().find_map(|s| match s {
            Seen::Up(p) if p.writable() => Some(p),
            _ => None,
        }) {
            self.master_was_synchronous =
                Some(p.standby_lag.is_some() && p.sync_names == sync_names_for(shadow_name));
        }
    }
}

/// One round for one group, without the timer: what [`Cluster::discover`] runs.
pub(crate) async fn check_group(group: &ShardGroup, config: &FailoverConfig) {
    let mut state = GroupState::default();
    check_group_with(group, config, &mut state).await;
}

/// Probe every member and classify what answered.
async fn observe(group: &ShardGroup, config: &FailoverConfig) -> (Vec<Seen>, Vec<Option<Probe>>) {
    let timeout = Duration::from_millis(config.probe_timeout_ms);
    let since = group.clock();
    let probes = futures::future::join_all(group.members.iter().map(|m| {
        m.probe_session
            .probe(m.probe_endpoint(config), &config.shadow_name, timeout)
    }))
    .await;
    let mut seen = Vec::with_capacity(probes.len());
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
                        Role::Shadow
                    } else if p.fenced {
                        Role::Fenced
                    } else {
                        Role::Master
                    };
                    seen.push(Seen::Up(p.clone()));
                }
                Err(e) if e.answered => {
                    s.healthy = false;
                    s.last_error = Some(e.message.clone());
                    seen.push(Seen::Refused);
                }
                Err(_) if group.answered_since(i, since) => {
                    // Slow to probe, but serving the sale: alive.
                    s.consecutive_failures = 0;
                    seen.push(Seen::Busy);
                }
                Err(e) => {
                    s.healthy = false;
                    s.last_error = Some(e.message.clone());
                    s.role = Role::Down;
                    s.consecutive_failures = s.consecutive_failures.saturating_add(1);
                    seen.push(Seen::Silent {
                        rounds: s.consecutive_failures,
                    });
                }
            }
        }
        // Lag is measured on the master and shown on the standby(s).
        let lag = probes
            .iter()
            .find_map(|p| p.as_ref().ok().filter(|p| p.writable()))
            .and_then(|p| p.standby_lag);
        for (i, p) in probes.iter().enumerate() {
            status[i].replication_lag_bytes = match p {
                Ok(p) if p.in_recovery => lag,
                _ => None,
            };
        }
    });
    (seen, probes.into_iter().map(Result::ok).collect())
}

async fn check_group_with(group: &ShardGroup, config: &FailoverConfig, state: &mut GroupState) {
    let timeout = Duration::from_millis(config.probe_timeout_ms);
    let (seen, probes) = observe(group, config).await;
    let term = probes
        .iter()
        .flatten()
        .fold(group.term(), |_, p| group.raise_term(p.timeline));
    state.note_master(&seen, &config.shadow_name);
    let obs = Observations {
        master_was_synchronous: state.master_was_synchronous,
        lost_master: state.lost_master(&seen, Duration::from_millis(config.stream_timeout_ms)),
        last_timeline: group.status().iter().map(|s| s.timeline).collect(),
        writer: group.writer_index(),
        term,
        seen,
    };
    let action = decide(&obs, config);
    log_note(group, action.note);
    for &i in &action.fence {
        tracing::error!(group = %group.name, member = %group.members[i].endpoint,
            "old master is writable on an older timeline: fencing it");
        if let Err(e) = admin(&group.members[i].admin, FENCE_SQL, timeout).await {
            tracing::error!(group = %group.name, error = %e, "fencing failed");
        }
    }
    follow_writer(group, obs.writer, action.writer);
    if let Some(shadow) = action.promote {
        promote_shadow(group, shadow, config, state).await;
    }
    let Some((w, p)) = group
        .writer_index()
        .and_then(|w| probes[w].as_ref().map(|p| (w, p)))
    else {
        return;
    };
    let mut p = p.clone();
    if config.mode == FailoverMode::Builtin {
        if let Some(names) = manage_replication(group, w, &p, &probes, config, state).await {
            // In effect from the reload on: the named shadow, if it streams, is now the
            // synchronous one.
            p.sync_streaming = Some(!names.is_empty() && p.standby_lag.is_some());
            p.sync_names = names;
        }
    }
    note_replication(group, &p);
}

/// Tell the group what its writer's replication looked like this round (a writer that did not
/// answer leaves the last view as it was).
fn note_replication(group: &ShardGroup, p: &Probe) {
    let view = super::Replication {
        shadow_streaming: p.standby_lag.is_some() || p.sync_streaming == Some(true),
        synchronous: !p.sync_names.trim().is_empty(),
        lag_bytes: p.standby_lag,
        seen_at: Some(Instant::now()),
    };
    let was = group.durability();
    group.set_replication(view, durable(p));
    let now = group.durability();
    if was != now && now == super::Durability::NotDurable {
        tracing::warn!(group = %group.name,
            "no shadow streams synchronously from the master: writes wait, then get 503 shadow_unavailable");
    } else if was == super::Durability::NotDurable && now == super::Durability::Durable {
        tracing::warn!(group = %group.name, "a shadow streams synchronously again: writes resume");
    }
}

fn log_note(group: &ShardGroup, note: Option<Note>) {
    match note {
        Some(Note::TwoWritableSameTimeline) => tracing::error!(group = %group.name,
            "two writable members on the same timeline; keeping the current one"),
        Some(Note::OnlyAnOldMaster) => tracing::warn!(group = %group.name, term = group.term(),
            "the only writable member is on an older timeline than the group's term: not writing to it"),
        Some(Note::ShadowStillHearsMaster) => tracing::error!(group = %group.name,
            "master unreachable from this node but its shadow still hears it: not promoting"),
        Some(Note::ShadowHidesItsReceiver) => tracing::error!(group = %group.name,
            "master unreachable, but the shadow's WAL receiver is hidden from this role \
             (grant pg_read_all_stats): not promoting"),
        Some(Note::NoShadowToPromote) => {
            tracing::error!(group = %group.name, "master down and no healthy shadow to promote")
        }
        Some(Note::MasterWasAsynchronous) => tracing::error!(group = %group.name,
            "master down, but it was not committing synchronously to its shadow when last seen: \
             not promoting (the shadow may lack acknowledged orders; promote by hand to accept that)"),
        None => {}
    }
}

fn follow_writer(group: &ShardGroup, before: Option<usize>, after: Option<usize>) {
    if before != after {
        if let Some(best) = after {
            // The first round of a process only discovers where the master is (it may have moved
            // before this process started); later changes are failovers this node follows.
            if group.mark_probed() {
                tracing::warn!(group = %group.name, member = %group.members[best].endpoint,
                    "writing to a new master");
                group.count_failover();
            } else {
                tracing::info!(group = %group.name, member = %group.members[best].endpoint,
                    "the writable member is not the configured master");
            }
        } else if before.is_some() {
            tracing::warn!(group = %group.name, "no writable master: requests get 503 until one is found");
        }
        group.set_writer(after);
    }
    group.mark_probed();
}

async fn promote_shadow(
    group: &ShardGroup,
    shadow: usize,
    config: &FailoverConfig,
    state: &mut GroupState,
) {
    let timeout = Duration::from_millis(config.probe_timeout_ms);
    let member = &group.members[shadow];
    tracing::warn!(group = %group.name, member = %member.endpoint,
        "master silent and the shadow lost it too: promoting the shadow");
    if let Err(e) = promote(&member.admin, timeout, &sync_names_after_promotion(config)).await {
        tracing::error!(group = %group.name, error = %e, "promotion failed");
    }
    match member
        .probe_session
        .probe(member.probe_endpoint(config), &config.shadow_name, timeout)
        .await
    {
        Ok(p) if p.writable() => {
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
/// old master through pg_rewind), committing synchronously to `sync_names` (empty: asynchronous).
/// Idempotent: promoting a server that is no longer in recovery only reports that.
pub async fn promote(config: &Endpoint, timeout: Duration, sync_names: &str) -> Result<(), String> {
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
        sync_sql(sync_names)
    );
    admin(config, &setup, timeout).await
}

/// What a promoted master commits to: under `block` its shadow, whom it waits for (nothing is
/// acknowledged until the healed old master streams from it); otherwise nobody yet.
pub fn sync_names_after_promotion(config: &FailoverConfig) -> String {
    if config.synchronous && config.shadow_loss == ShadowLossPolicy::Block {
        sync_names_for(&config.shadow_name)
    } else {
        String::new()
    }
}

/// The `synchronous_standby_names` the policy wants on the master now (module docs), for a group
/// that has a shadow (`has_shadow`; one without has chosen a single server).
fn desired_sync_names(
    probe: &Probe,
    config: &FailoverConfig,
    state: &mut GroupState,
    has_shadow: bool,
) -> Option<String> {
    let named = sync_names_for(&config.shadow_name);
    if !config.synchronous || !has_shadow {
        return Some(String::new());
    }
    if probe.standby_lag.is_some() {
        state.no_standby_since = None;
        return Some(named);
    }
    let since = *state.no_standby_since.get_or_insert_with(Instant::now);
    match config.shadow_loss {
        // No shadow, no acknowledgement: commits wait for one, however long it takes.
        ShadowLossPolicy::Block => Some(named),
        ShadowLossPolicy::Degrade
            if since.elapsed() >= Duration::from_millis(config.shadow_loss_grace_ms)
                || probe.sync_names.is_empty() =>
        {
            Some(String::new())
        }
        // Synchronous to something else (e.g. '*' from an older version): name the shadow.
        ShadowLossPolicy::Degrade if probe.sync_names != named => Some(named),
        ShadowLossPolicy::Degrade => None,
    }
}

/// Keep synchronous replication and the replication timeouts in line with the policy; the
/// `synchronous_standby_names` it set, if it changed them.
async fn manage_replication(
    group: &ShardGroup,
    master: usize,
    probe: &Probe,
    probes: &[Option<Probe>],
    config: &FailoverConfig,
    state: &mut GroupState,
) -> Option<String> {
    let timeout = Duration::from_millis(config.probe_timeout_ms);
    let has_shadow = group.members.len() > 1;
    let mut changed = None;
    if let Some(desired) = desired_sync_names(probe, config, state, has_shadow) {
        if probe.sync_names != desired {
            tracing::warn!(group = %group.name, from = %probe.sync_names, to = %desired, "changing synchronous_standby_names");
            let sql = sync_sql(&desired);
            match admin(&group.members[master].admin, &sql, timeout).await {
                Ok(()) => {
                    // What the master does from now on (the reload takes effect at once).
                    state.master_was_synchronous =
                        Some(!desired.is_empty() && probe.standby_lag.is_some());
                    changed = Some(desired);
                }
                Err(e) => {
                    tracing::error!(group = %group.name, error = %e, "cannot change synchronous replication")
                }
            }
        }
    }
    let receiver_ms = config.stream_timeout_ms as i64;
    let sender_ms = 2 * receiver_ms;
    let mut settings: Vec<(usize, String)> = Vec::new();
    if probe.wal_sender_timeout_ms != sender_ms {
        settings.push((
            master,
            format!(
                "ALTER SYSTEM SET wal_sender_timeout = '{sender_ms}ms'; SELECT pg_reload_conf();"
            ),
        ));
    }
    for (i, p) in probes.iter().enumerate() {
        if let Some(p) = p.as_ref().filter(|p| p.in_recovery) {
            if p.wal_receiver_timeout_ms != receiver_ms {
                settings.push((
                    i,
                    format!(
                        "ALTER SYSTEM SET wal_receiver_timeout = '{receiver_ms}ms'; \
                     ALTER SYSTEM SET wal_retrieve_retry_interval = '1s'; SELECT pg_reload_conf();"
                    ),
                ));
            }
        }
    }
    for (i, sql) in settings {
        tracing::info!(group = %group.name, member = %group.members[i].endpoint, "setting replication timeouts");
        if let Err(e) = admin(&group.members[i].admin, &sql, timeout).await {
            tracing::error!(group = %group.name, error = %e, "cannot set replication timeouts");
        }
    }
    changed
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

#[cfg(test)]
mod tests {
    use super::*;

    fn up(recovery: bool, timeline: i64) -> Seen {
        Seen::Up(Probe {
            in_recovery: recovery,
            timeline,
            fenced: false,
            standby_lag: None,
            sync_names: String::new(),
            receipt_age_ms: None,
            receiver_hidden: false,
            wal_receiver_timeout_ms: 0,
            wal_sender_timeout_ms: 0,
            sync_streaming: Some(false),
            synchronous_commit: "on".into(),
        })
    }

    fn obs(seen: Vec<Seen>, writer: Option<usize>, lost: Vec<bool>) -> Observations {
        let term = seen
            .iter()
            .filter_map(|s| match s {
                Seen::Up(p) => Some(p.timeline),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        Observations {
            last_timeline: vec![Some(1); seen.len()],
            term,
            seen,
            writer,
            lost_master: lost,
            master_was_synchronous: None,
        }
    }

    fn cfg() -> FailoverConfig {
        FailoverConfig::default()
    }

    #[test]
    fn healthy_group_keeps_its_master() {
        let a = decide(
            &obs(vec![up(false, 1), up(true, 1)], Some(0), vec![false; 2]),
            &cfg(),
        );
        assert_eq!(a.writer, Some(0));
        assert_eq!(a.promote, None);
        assert!(a.fence.is_empty());
    }

    #[test]
    fn old_master_on_older_timeline_is_fenced() {
        let a = decide(
            &obs(vec![up(false, 1), up(false, 2)], Some(0), vec![false; 2]),
            &cfg(),
        );
        assert_eq!(a.writer, Some(1));
        assert_eq!(a.fence, vec![0]);
    }

    /// The newer master's probe goes unanswered for one round while the old master, writable on
    /// an older timeline (external mode never fences it), answers: writes must not go back to it.
    #[test]
    fn one_missed_probe_never_sends_writes_to_an_old_master() {
        for mode in [FailoverMode::Builtin, FailoverMode::External] {
            let config = FailoverConfig { mode, ..cfg() };
            let mut o = obs(
                vec![up(false, 1), Seen::Silent { rounds: 1 }],
                Some(1),
                vec![false; 2],
            );
            o.last_timeline = vec![Some(1), Some(2)];
            o.term = 2;
            let a = decide(&o, &config);
            assert_ne!(
                a.writer,
                Some(0),
                "{mode:?}: the old master is never written to"
            );
            assert_eq!(a.promote, None);
            assert_eq!(
                a.fence,
                if mode == FailoverMode::Builtin {
                    vec![0]
                } else {
                    vec![]
                },
                "{mode:?}"
            );
            // Also when this node has no writer yet (it just started, or lost it).
            o.writer = None;
            assert_eq!(decide(&o, &config).writer, None, "{mode:?}");
        }
    }

    #[test]
    fn durable_needs_a_synchronous_streaming_standby_and_waiting_commits() {
        let master = |names: &str, streaming: Option<bool>, commit: &str| Probe {
            sync_names: names.into(),
            sync_streaming: streaming,
            synchronous_commit: commit.into(),
            ..match up(false, 1) {
                Seen::Up(p) => p,
                _ => unreachable!(),
            }
        };
        assert!(durable(&master("\"shadow\"", Some(true), "on")));
        assert!(
            durable(&master("pb", None, "on")),
            "walsenders hidden from this role: the setting decides (commits wait)"
        );
        assert!(!durable(&master("", Some(true), "on")), "asynchronous");
        assert!(
            !durable(&master("\"shadow\"", Some(false), "on")),
            "no standby streams"
        );
        assert!(!durable(&master("\"shadow\"", Some(true), "local")));
    }

    #[test]
    fn under_block_a_master_without_a_shadow_stays_synchronous() {
        let mut state = GroupState::default();
        let promoted = match up(false, 2) {
            Seen::Up(p) => p,
            _ => unreachable!(),
        };
        assert_eq!(
            desired_sync_names(&promoted, &cfg(), &mut state, true),
            Some(sync_names_for("shadow")),
            "a promoted master acknowledges nothing alone"
        );
        assert_eq!(
            desired_sync_names(&promoted, &cfg(), &mut state, false),
            Some(String::new()),
            "a group configured without a shadow has nothing to wait for"
        );
        let degrade = FailoverConfig {
            shadow_loss: ShadowLossPolicy::Degrade,
            ..cfg()
        };
        assert_eq!(
            desired_sync_names(&promoted, &degrade, &mut state, true),
            Some(String::new())
        );
        assert_eq!(sync_names_after_promotion(&cfg()), "\"shadow\"");
        assert_eq!(sync_names_after_promotion(&degrade), "");
    }

    #[test]
    fn external_mode_never_fences_or_promotes() {
        let ext = FailoverConfig {
            mode: FailoverMode::External,
            ..cfg()
        };
        let a = decide(
            &obs(vec![up(false, 1), up(false, 2)], Some(0), vec![false; 2]),
            &ext,
        );
        assert_eq!((a.writer, a.fence.len()), (Some(1), 0));
        let dead = obs(
            vec![Seen::Silent { rounds: 9 }, up(true, 1)],
            Some(0),
            vec![false, true],
        );
        let a = decide(&dead, &ext);
        assert_eq!((a.writer, a.promote), (None, None));
    }

    #[test]
    fn one_silent_round_changes_nothing() {
        let a = decide(
            &obs(
                vec![Seen::Silent { rounds: 1 }, up(true, 1)],
                Some(0),
                vec![false, true],
            ),
            &cfg(),
        );
        assert_eq!(
            a.writer,
            Some(0),
            "the writer stays until the master is dead long enough"
        );
        assert_eq!(a.promote, None);
    }

    #[test]
    fn a_busy_master_is_alive() {
        let a = decide(
            &obs(vec![Seen::Busy, up(true, 1)], Some(0), vec![false, true]),
            &cfg(),
        );
        assert_eq!((a.writer, a.promote), (Some(0), None));
    }

    #[test]
    fn dead_master_and_lost_shadow_promote() {
        let a = decide(
            &obs(
                vec![Seen::Silent { rounds: 3 }, up(true, 1)],
                Some(0),
                vec![false, true],
            ),
            &cfg(),
        );
        assert_eq!((a.writer, a.promote), (None, Some(1)));
    }

    #[test]
    fn shadow_that_still_hears_the_master_is_not_promoted() {
        let a = decide(
            &obs(
                vec![Seen::Silent { rounds: 5 }, up(true, 1)],
                Some(0),
                vec![false, false],
            ),
            &cfg(),
        );
        assert_eq!((a.writer, a.promote), (None, None));
        assert_eq!(a.note, Some(Note::ShadowStillHearsMaster));
    }

    #[test]
    fn a_shadow_of_an_asynchronous_master_is_not_promoted_under_block() {
        let mut o = obs(
            vec![Seen::Silent { rounds: 3 }, up(true, 1)],
            Some(0),
            vec![false, true],
        );
        o.master_was_synchronous = Some(false);
        let a = decide(&o, &cfg());
        assert_eq!((a.writer, a.promote), (None, None));
        assert_eq!(a.note, Some(Note::MasterWasAsynchronous));
        // Under degrade, availability was chosen: promote.
        let degrade = FailoverConfig {
            shadow_loss: ShadowLossPolicy::Degrade,
            ..cfg()
        };
        assert_eq!(decide(&o, &degrade).promote, Some(1));
        o.master_was_synchronous = Some(true);
        assert_eq!(decide(&o, &cfg()).promote, Some(1));
    }

    #[test]
    fn a_member_that_just_became_a_standby_is_not_lost_at_first_sight() {
        let mut state = GroupState::default();
        let t = Duration::from_millis(50);
        // Seen as a master for longer than the stream timeout, then as a standby whose receiver
        // is only starting: its silence as a standby has just begun.
        state.lost_master(&[up(false, 1), up(true, 1)], t);
        std::thread::sleep(Duration::from_millis(60));
        state.lost_master(&[up(false, 1), up(true, 1)], t);
        assert_eq!(
            state.lost_master(&[up(true, 1), up(false, 2)], t),
            vec![false, false]
        );
    }

    #[test]
    fn disabled_failover_only_drops_the_writer() {
        let off = FailoverConfig {
            enabled: false,
            ..cfg()
        };
        let a = decide(
            &obs(
                vec![Seen::Silent { rounds: 5 }, up(true, 1)],
                Some(0),
                vec![false, true],
            ),
            &off,
        );
        assert_eq!((a.writer, a.promote), (None, None));
    }

    #[test]
    fn writer_answering_as_standby_is_dropped_at_once() {
        let a = decide(
            &obs(vec![up(true, 1), up(true, 1)], Some(0), vec![false; 2]),
            &cfg(),
        );
        assert_eq!(a.writer, None);
    }

    #[test]
    fn a_restarting_receiver_is_not_lost_until_the_stream_timeout() {
        let mut state = GroupState::default();
        let no_stream = vec![up(false, 1), up(true, 1)];
        // Receiver not streaming (starting/waiting) on the first look: not lost yet.
        assert_eq!(
            state.lost_master(&no_stream, Duration::from_millis(50)),
            vec![false, false]
        );
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(
            state.lost_master(&no_stream, Duration::from_millis(50)),
            vec![false, true]
        );
        // Streaming again with a fresh message: heard.
        let mut fresh = match up(true, 1) {
            Seen::Up(p) => p,
            _ => unreachable!(),
        };
        fresh.receipt_age_ms = Some(0);
        let streaming = vec![up(false, 1), Seen::Up(fresh)];
        assert_eq!(
            state.lost_master(&streaming, Duration::from_millis(50)),
            vec![false, false]
        );
    }
}
