//! Self-healing: every group back to a master and one streaming synchronous shadow.
//!
//! After a failover the old master is a server on an older timeline; a shadow may be dead, frozen,
//! or streaming from nowhere. Under `shadow_loss = "block"` such a group acknowledges nothing (no
//! shadow, no acknowledgement), so it must heal by itself, not wait for a person.
//!
//! The healer runs beside the health monitor, one loop per group, for the members whose servers
//! this process can control ([`ServerControl`]: the dev cluster's and the test harness's local
//! servers). Each round it looks at what the monitor saw of the group ([`super::ShardGroup`]'s
//! writer, member status and replication view) and at the member's process, and [`decide`]s —
//! a pure function — what to do with the member that is not the writer:
//!
//! - streaming from the writer: nothing (healthy);
//! - frozen (every process stopped, a hung host) for [`FROZEN_GRACE`]: killed, as a watchdog
//!   power-cycles a hung host; it heals as a dead one next;
//! - dead: rejoined ([`ServerControl::rejoin`]: `pg_rewind` onto the writer, else a fresh base
//!   backup, then started as a standby of the writer);
//! - an old master (writable or fenced on an older timeline): rejoined at once;
//! - a standby that does not stream for [`STREAM_GRACE`] (wrong timeline, wrong master) or a
//!   running server silent for [`SILENT_GRACE`]: rejoined.
//!
//! **Never two primaries.** Only the member that is *not* the writer is ever touched, and only
//! while the writer answered the monitor's last round; every rejoin makes a standby. A member on the
//! writer's own timeline that is writable too is left alone and reported: which of the two holds
//! the acknowledged orders is for a person to say. A failed rejoin is retried with a growing pause
//! ([`backoff`]); after two rejoins that did not bring the member back, by a fresh base backup
//! instead of a rewind.

use super::ShardGroup;
use serde::Serialize;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How long a member's processes may stay frozen before the healer kills them.
pub(crate) const FROZEN_GRACE: Duration = Duration::from_secs(1);
/// How long a running standby may go without streaming before it is rejoined.
pub(crate) const STREAM_GRACE: Duration = Duration::from_secs(5);
/// How long a running, unfrozen server may stay silent (crash recovery, start-up) before it is
/// rejoined.
pub(crate) const SILENT_GRACE: Duration = Duration::from_secs(20);
/// After a rejoin that worked, the time given to the member to stream before the next attempt.
pub(crate) const SETTLE: Duration = Duration::from_secs(8);
/// After a rejoin that failed, the first pause before the next one (doubling per attempt).
pub(crate) const FIRST_BACKOFF: Duration = Duration::from_secs(2);
/// The longest pause between two failed attempts.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How often each group is looked at.
const ROUND: Duration = Duration::from_millis(500);
/// The monitor's view of the writer must be this fresh for the healer to act on it.
const FRESH: Duration = Duration::from_secs(2);

/// What a member's server processes look like from the machine they run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Process {
    Running,
    /// Every process stopped (SIGSTOP): silent with its sockets open.
    Frozen,
    Stopped,
}

/// How a rejoin brought a member back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Rejoined {
    /// A standby whose history is the writer's: started again as it was.
    Restarted,
    /// Rewound onto the writer's timeline with `pg_rewind`.
    Rewound,
    /// Made anew from a base backup of the writer (its old data directory kept aside).
    Rebuilt,
}

/// Control over one member's server, from the machine it runs on. Blocking: the healer calls it
/// on a blocking thread.
pub trait ServerControl: Send + Sync + 'static {
    /// The server's name for logs and reports.
    fn name(&self) -> String;
    fn process(&self) -> Process;
    /// SIGKILL every process of the server.
    fn kill(&self) -> Result<(), String>;
    /// Make the server a streaming standby of the master at `host:port`, connecting as
    /// `application_name`: stop it, rewind it (`rebuild`: a base backup instead), start it.
    fn rejoin(
        &self,
        host: &str,
        port: u16,
        application_name: &str,
        rebuild: bool,
    ) -> Result<Rejoined, String>;
}

/// The servers of a cluster's members, `[group][member]` in configuration order.
pub(crate) type Servers = Vec<Vec<Arc<dyn ServerControl>>>;

/// What the member not written to is, as the monitor last saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// The writer's replication view shows it streaming.
    Streaming,
    /// A standby (in recovery) that is not streaming from the writer.
    Standby,
    /// Writable, or fenced, on a timeline older than the writer's: an old master.
    OldMaster,
    /// Writable on the writer's own timeline: two masters; for a person.
    Twin,
    /// No answer to the last probe.
    Silent,
}

/// Everything [`decide`] looks at for one member.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Facts {
    pub seen: Seen,
    pub process: Process,
    /// How long it has been in its current unhealthy state (frozen, not streaming, silent).
    pub(crate) unhealthy_for: Duration,
    /// Since the last rejoin, if there was one in this unhealthy spell.
    pub(crate) since_attempt: Option<Duration>,
    /// Whether that rejoin failed (an error, not merely no streaming yet).
    pub(crate) last_failed: bool,
    /// Rejoins made in this unhealthy spell.
    pub attempts: u32,
}

/// What to do with a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    Nothing,
    /// Give it time: it may heal by itself, or the last attempt may still be taking hold.
    Wait,
    Kill,
    Rejoin {
        rebuild: bool,
    },
    /// Two writable members on one timeline: report, never touch.
    Report,
}

/// The pause after the `attempts`-th rejoin failed: [`FIRST_BACKOFF`], doubling per attempt, at
/// most [`MAX_BACKOFF`].
pub fn backoff(attempts: u32) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(1 << attempts.saturating_sub(1).min(8))
        .min(MAX_BACKOFF)
}

/// The healing decision for the member that is not the writer (module docs).
pub(crate) fn decide(f: &Facts) -> Action {
    if f.seen == Seen::Streaming {
        return Action::Nothing;
    }
    if f.seen == Seen::Twin {
        return Action::Report;
    }
    let pause = if f.last_failed {
        backoff(f.attempts)
    } else {
        SETTLE
    };
    if f.since_attempt.is_some_and(|t| t < pause) {
        return Action::Wait;
    }
    // Two rejoins that did not bring it back: a fresh base backup.
    let rejoin = Action::Rejoin {
        rebuild: f.attempts >= 2,
    };
    match (f.process, f.seen) {
        (Process::Frozen, _) if f.unhealthy_for >= FROZEN_GRACE => Action::Kill,
        (Process::Frozen, _) => Action::Wait,
        (Process::Stopped, _) | (Process::Running, Seen::OldMaster) => rejoin,
        (Process::Running, Seen::Standby) if f.unhealthy_for >= STREAM_GRACE => rejoin,
        (Process::Running, Seen::Silent) if f.unhealthy_for >= SILENT_GRACE => rejoin,
        _ => Action::Wait,
    }
}

/// The last heal of a group, as `GET /v1/admin/groups` shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct HealRecord {
    /// The member healed (`host:port`).
    pub member: String,
    /// `kill`, `rejoin` or `rebuild`.
    pub(crate) action: &'static str,
    pub(crate) started_at: chrono::DateTime<chrono::Utc>,
    pub(crate) finished_at: Option<chrono::DateTime<chrono::Utc>>,
    /// `running`, `ok` or `failed`.
    pub outcome: &'static str,
    /// How the member came back, for a rejoin that worked.
    pub rejoined: Option<Rejoined>,
    pub error: Option<String>,
}

/// Per member: the healer's memory between rounds.
#[derive(Default, Clone, Copy)]
struct Memory {
    /// The unhealthy state it is in, and since when.
    state: Option<(Seen, Process, Instant)>,
    attempt_at: Option<Instant>,
    last_failed: bool,
    attempts: u32,
    reported: bool,
}

impl Memory {
    /// The facts of this round, with the time spent in the current unhealthy state.
    fn facts(&mut self, seen: Seen, process: Process, now: Instant) -> Facts {
        if seen == Seen::Streaming {
            *self = Memory::default();
        }
        let since = match self.state {
            Some((s, p, at)) if s == seen && p == process => at,
            _ => {
                self.state = Some((seen, process, now));
                now
            }
        };
        Facts {
            seen,
            process,
            unhealthy_for: now.duration_since(since),
            since_attempt: self.attempt_at.map(|t| now.duration_since(t)),
            last_failed: self.last_failed,
            attempts: self.attempts,
        }
    }
}

/// Heal every group whose servers are in `servers` until `cancel` fires.
pub(crate) async fn run(
    cluster: Arc<super::Cluster>,
    servers: Servers,
    shadow_name: String,
    cancel: CancellationToken,
) {
    let loops = servers.into_iter().enumerate().map(|(g, members)| {
        let (cluster, cancel, shadow_name) = (cluster.clone(), cancel.clone(), shadow_name.clone());
        async move {
            let group = cluster.group(g);
            if members.len() != group.members.len() {
                tracing::error!(group = %group.name, "healer: servers do not match the group's members");
                return;
            }
            let mut memory = vec![Memory::default(); members.len()];
            let mut tick = tokio::time::interval(ROUND);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tick.tick() => {}
                }
                heal_round(group, &members, &mut memory, &shadow_name).await;
            }
        }
    });
    futures::future::join_all(loops).await;
}

/// What the monitor's last round says of member `i`, given the writer `w`.
fn seen(group: &ShardGroup, w: usize, i: usize) -> Seen {
    let status = group.status();
    let replication = group.replication();
    let (writer, member) = (&status[w], &status[i]);
    use super::Role;
    match member.role {
        _ if replication.shadow_streaming && member.healthy && member.role == Role::Shadow => {
            Seen::Streaming
        }
        Role::Down => Seen::Silent,
        Role::Shadow => Seen::Standby,
        Role::Fenced => Seen::OldMaster,
        Role::Master => match (member.timeline, writer.timeline) {
            (Some(m), Some(wt)) if m < wt => Seen::OldMaster,
            _ => Seen::Twin,
        },
    }
}

async fn heal_round(
    group: &ShardGroup,
    members: &[Arc<dyn ServerControl>],
    memory: &mut [Memory],
    shadow_name: &str,
) {
    let Some(w) = group.writer_index() else {
        return;
    };
    // Only on a fresh view of a writer that answered: a writer that went silent may be failing
    // over right now, and what it said of its shadow is stale.
    if group
        .replication()
        .seen_at
        .is_none_or(|t| t.elapsed() >= FRESH)
    {
        return;
    }
    let now = Instant::now();
    for i in (0..members.len()).filter(|&i| i != w) {
        let control = members[i].clone();
        let process = {
            let c = control.clone();
            tokio::task::spawn_blocking(move || c.process())
                .await
                .unwrap_or(Process::Running)
        };
        let facts = memory[i].facts(seen(group, w, i), process, now);
        match decide(&facts) {
            Action::Nothing | Action::Wait => {}
            Action::Report => {
                if !memory[i].reported {
                    memory[i].reported = true;
                    tracing::error!(group = %group.name, member = %group.members[i].endpoint,
                        "two writable members on the same timeline: not healing either; keep the \
                         one that holds the acknowledged orders and rebuild the other as the shadow");
                }
            }
            Action::Kill => {
                let record = group.heal_started(i, "kill");
                tracing::warn!(group = %group.name, member = %group.members[i].endpoint,
                    server = %control.name(), "member frozen: killing it, it rejoins as the shadow");
                let result = tokio::task::spawn_blocking(move || control.kill())
                    .await
                    .unwrap_or_else(|e| Err(e.to_string()));
                // A kill is the first half of a heal: the rejoin follows at once.
                group.heal_finished(record, result.map(|()| None));
            }
            Action::Rejoin { rebuild } => {
                let (host, port) = group.members[w].conn.host_port();
                let action = if rebuild { "rebuild" } else { "rejoin" };
                let record = group.heal_started(i, action);
                tracing::warn!(group = %group.name, member = %group.members[i].endpoint,
                    server = %control.name(), master = %group.members[w].endpoint, rebuild,
                    "healing: making the member a streaming shadow of the master");
                let app = shadow_name.to_string();
                let result =
                    tokio::task::spawn_blocking(move || control.rejoin(&host, port, &app, rebuild))
                        .await
                        .unwrap_or_else(|e| Err(e.to_string()));
                match &result {
                    Ok(how) => {
                        tracing::warn!(group = %group.name, member = %group.members[i].endpoint, ?how, "healed: the member follows the master")
                    }
                    Err(e) => {
                        tracing::error!(group = %group.name, member = %group.members[i].endpoint, error = %e, "healing failed; retrying later")
                    }
                }
                // Forgotten once the member streams.
                memory[i].attempts += 1;
                memory[i].last_failed = result.is_err();
                memory[i].attempt_at = Some(Instant::now());
                group.heal_finished(record, result.map(Some));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(seen: Seen, process: Process, unhealthy_secs: u64) -> Facts {
        Facts {
            seen,
            process,
            unhealthy_for: Duration::from_secs(unhealthy_secs),
            since_attempt: None,
            last_failed: false,
            attempts: 0,
        }
    }

    #[test]
    fn a_streaming_shadow_is_left_alone() {
        assert_eq!(
            decide(&facts(Seen::Streaming, Process::Running, 100)),
            Action::Nothing
        );
    }

    #[test]
    fn a_dead_member_is_rejoined_at_once() {
        for seen in [Seen::Silent, Seen::Standby, Seen::OldMaster] {
            assert_eq!(
                decide(&facts(seen, Process::Stopped, 0)),
                Action::Rejoin { rebuild: false },
                "{seen:?}"
            );
        }
    }

    #[test]
    fn an_old_master_is_rejoined_at_once() {
        assert_eq!(
            decide(&facts(Seen::OldMaster, Process::Running, 0)),
            Action::Rejoin { rebuild: false }
        );
    }

    #[test]
    fn a_frozen_member_is_killed_after_the_grace() {
        assert_eq!(
            decide(&facts(Seen::Silent, Process::Frozen, 0)),
            Action::Wait
        );
        assert_eq!(
            decide(&facts(Seen::Silent, Process::Frozen, 1)),
            Action::Kill
        );
    }

    #[test]
    fn a_standby_gets_time_to_stream() {
        assert_eq!(
            decide(&facts(Seen::Standby, Process::Running, 2)),
            Action::Wait
        );
        assert_eq!(
            decide(&facts(Seen::Standby, Process::Running, 5)),
            Action::Rejoin { rebuild: false }
        );
        assert_eq!(
            decide(&facts(Seen::Silent, Process::Running, 10)),
            Action::Wait,
            "a server in crash recovery is silent for a while"
        );
        assert_eq!(
            decide(&facts(Seen::Silent, Process::Running, 20)),
            Action::Rejoin { rebuild: false }
        );
    }

    #[test]
    fn two_masters_on_one_timeline_are_never_touched() {
        for process in [Process::Running, Process::Stopped, Process::Frozen] {
            assert_eq!(decide(&facts(Seen::Twin, process, 1000)), Action::Report);
        }
    }

    #[test]
    fn failed_attempts_back_off_then_rebuild() {
        let mut f = facts(Seen::Standby, Process::Running, 100);
        f.attempts = 1;
        f.since_attempt = Some(Duration::from_secs(3));
        assert_eq!(decide(&f), Action::Wait, "the last rejoin is taking hold");
        f.since_attempt = Some(SETTLE);
        assert_eq!(decide(&f), Action::Rejoin { rebuild: false });
        f.last_failed = true;
        f.since_attempt = Some(FIRST_BACKOFF);
        assert_eq!(
            decide(&f),
            Action::Rejoin { rebuild: false },
            "a failed rejoin is retried soon"
        );
        f.attempts = 3;
        f.since_attempt = Some(FIRST_BACKOFF * 3);
        assert_eq!(decide(&f), Action::Wait, "backoff doubles per attempt");
        f.since_attempt = Some(backoff(3));
        assert_eq!(decide(&f), Action::Rejoin { rebuild: true });
        assert_eq!((backoff(1), backoff(30)), (FIRST_BACKOFF, MAX_BACKOFF));
    }

    #[test]
    fn memory_counts_time_in_one_state_and_forgets_on_streaming() {
        let mut m = Memory::default();
        let t0 = Instant::now();
        let f = m.facts(Seen::Standby, Process::Running, t0);
        assert_eq!(f.unhealthy_for, Duration::ZERO);
        let f = m.facts(Seen::Standby, Process::Running, t0 + Duration::from_secs(6));
        assert_eq!(f.unhealthy_for, Duration::from_secs(6));
        // A different state starts its own clock.
        let f = m.facts(Seen::Silent, Process::Running, t0 + Duration::from_secs(7));
        assert_eq!(f.unhealthy_for, Duration::ZERO);
        m.attempts = 3;
        m.attempt_at = Some(t0);
        let f = m.facts(
            Seen::Streaming,
            Process::Running,
            t0 + Duration::from_secs(8),
        );
        assert_eq!((f.attempts, f.since_attempt), (0, None));
    }
}
