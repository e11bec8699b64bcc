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

use super::decide::{decide, Note, Observations, Seen};
use super::probe::{admin, durable, promote, sync_names_for, sync_sql, Probe, FENCE_SQL};
use super::{Cluster, MemberStatus, Role, ShardGroup};
use crate::config::{FailoverConfig, FailoverMode, ShadowLossPolicy};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

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
    ///
    /// A master that names the shadow but has no streaming walsender this round proves nothing
    /// either way, and leaves the last view as it was: its commits wait for the shadow, so none
    /// is acknowledged without it. That is what a master's last answer looks like when it is
    /// killed: a SIGKILLed postmaster's walsender exits at once, while the orphaned backend of
    /// the probe session may still answer one last probe. Taken as "asynchronous", that answer
    /// refused every promotion after it, and the group stayed without a master.
    fn note_master(&mut self, seen: &[Seen], shadow_name: &str) {
        let Some(p) = seen.iter().find_map(|s| match s {
            Seen::Up(p) if p.writable() => Some(p),
            _ => None,
        }) else {
            return;
        };
        let names_the_shadow = p.sync_names == sync_names_for(shadow_name) && p.commits_wait();
        if !names_the_shadow {
            self.master_was_synchronous = Some(false);
        } else if p.standby_lag.is_some() {
            self.master_was_synchronous = Some(true);
        }
    }
}

/// One round for one group, without the timer: what [`Cluster::discover`] runs.
pub(crate) async fn check_group(group: &ShardGroup, config: &FailoverConfig) {
    let mut state = GroupState::default();
    check_group_with(group, config, &mut state).await;
}

/// Rounds of the monitor for one group until it has a writable member or `limit` has passed;
/// whether it found one. What a starting node runs for a group it found without a master (see
/// [`super::Cluster::until_writable`]).
pub(crate) async fn until_writable(
    group: &ShardGroup,
    config: &FailoverConfig,
    limit: Duration,
) -> bool {
    let mut state = GroupState::default();
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(config.probe_interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        check_group_with(group, config, &mut state).await;
        if group.writer_answers() {
            return true;
        }
        if started.elapsed() >= limit {
            return false;
        }
    }
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

/// What a promoted master commits to: under `block` its shadow, whom it waits for (nothing is
/// acknowledged until the healed old master streams from it); otherwise nobody yet.
pub(crate) fn sync_names_after_promotion(config: &FailoverConfig) -> String {
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
pub(crate) async fn run(cluster: Arc<Cluster>, config: FailoverConfig, cancel: CancellationToken) {
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

    fn cfg() -> FailoverConfig {
        FailoverConfig::default()
    }

    #[test]
    fn under_block_a_master_without_a_shadow_stays_synchronous() {
        let mut state = GroupState::default();
        let promoted = Probe::answering(false, 2);
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
    fn a_master_whose_walsender_is_gone_keeps_its_synchronous_record() {
        let master = |streaming: bool, names: &str| {
            let p = Probe {
                standby_lag: streaming.then_some(0),
                sync_names: names.to_string(),
                ..Probe::answering(false, 1)
            };
            vec![Seen::Up(p), Seen::answering(true, 1)]
        };
        let named = sync_names_for("shadow");
        let mut state = GroupState::default();
        state.note_master(&master(true, &named), "shadow");
        assert_eq!(state.master_was_synchronous, Some(true));
        // Its last answer, killed: the walsender already gone, the names still set.
        state.note_master(&master(false, &named), "shadow");
        assert_eq!(state.master_was_synchronous, Some(true));
        // Not naming the shadow: its commits were acknowledged without it.
        state.note_master(&master(true, ""), "shadow");
        assert_eq!(state.master_was_synchronous, Some(false));
        // Naming it again, but not yet streamed from since: still unproven.
        state.note_master(&master(false, &named), "shadow");
        assert_eq!(state.master_was_synchronous, Some(false));
        state.note_master(&master(true, &named), "shadow");
        assert_eq!(state.master_was_synchronous, Some(true));
    }

    #[test]
    fn a_member_that_just_became_a_standby_is_not_lost_at_first_sight() {
        let mut state = GroupState::default();
        let t = Duration::from_millis(50);
        // Seen as a master for longer than the stream timeout, then as a standby whose receiver
        // is only starting: its silence as a standby has just begun.
        state.lost_master(&[Seen::answering(false, 1), Seen::answering(true, 1)], t);
        std::thread::sleep(Duration::from_millis(60));
        state.lost_master(&[Seen::answering(false, 1), Seen::answering(true, 1)], t);
        assert_eq!(
            state.lost_master(&[Seen::answering(true, 1), Seen::answering(false, 2)], t),
            vec![false, false]
        );
    }

    #[test]
    fn a_restarting_receiver_is_not_lost_until_the_stream_timeout() {
        let mut state = GroupState::default();
        let no_stream = vec![Seen::answering(false, 1), Seen::answering(true, 1)];
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
        let mut fresh = Probe::answering(true, 1);
        fresh.receipt_age_ms = Some(0);
        let streaming = vec![Seen::answering(false, 1), Seen::Up(fresh)];
        assert_eq!(
            state.lost_master(&streaming, Duration::from_millis(50)),
            vec![false, false]
        );
    }
}
