//! The failover decision: a pure function of what the monitor saw of a group's members this round
//! ([`Observations`]) and the failover configuration, answering which member to write to, and
//! whether to fence or promote ([`decide`]; the rules are the health monitor's module docs).

use super::probe::Probe;
use crate::config::{FailoverConfig, FailoverMode, ShadowLossPolicy};

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
pub(crate) struct Observations {
    pub seen: Vec<Seen>,
    /// The group's term: the highest timeline any member was seen on, this round included.
    pub term: i64,
    /// The member written to before this round.
    pub writer: Option<usize>,
    /// Per member: the timeline it was last seen on.
    pub(crate) last_timeline: Vec<Option<i64>>,
    /// Per member: a standby that has heard nothing from its master for `stream_timeout_ms`.
    pub(crate) lost_master: Vec<bool>,
    /// Whether the master committed synchronously to a streaming shadow when it last answered
    /// (None: this node never saw it answer).
    pub(crate) master_was_synchronous: Option<bool>,
}

/// What the monitor should do about a group this round.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Action {
    pub writer: Option<usize>,
    /// Old masters writable on an older timeline: make them read-only.
    pub fence: Vec<usize>,
    /// A shadow to promote (the writer stays unknown until it is writable).
    pub promote: Option<usize>,
    pub note: Option<Note>,
}

/// Why nothing (more) was done, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Note {
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
// Long on purpose: the rules in the order they apply, each ending the round; their order is
// what makes a promotion safe, and split up it would no longer read as one.
pub(crate) fn decide(obs: &Observations, config: &FailoverConfig) -> Action {
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
