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

#[cfg(test)]
impl Seen {
    /// A test's member that answered ([`Probe::answering`]).
    pub(crate) fn answering(in_recovery: bool, timeline: i64) -> Self {
        Seen::Up(Probe::answering(in_recovery, timeline))
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> FailoverConfig {
        FailoverConfig::default()
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

    #[test]
    fn healthy_group_keeps_its_master() {
        let a = decide(
            &obs(
                vec![Seen::answering(false, 1), Seen::answering(true, 1)],
                Some(0),
                vec![false; 2],
            ),
            &cfg(),
        );
        assert_eq!(a.writer, Some(0));
        assert_eq!(a.promote, None);
        assert!(a.fence.is_empty());
    }

    #[test]
    fn old_master_on_older_timeline_is_fenced() {
        let a = decide(
            &obs(
                vec![Seen::answering(false, 1), Seen::answering(false, 2)],
                Some(0),
                vec![false; 2],
            ),
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
                vec![Seen::answering(false, 1), Seen::Silent { rounds: 1 }],
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
    fn external_mode_never_fences_or_promotes() {
        let ext = FailoverConfig {
            mode: FailoverMode::External,
            ..cfg()
        };
        let a = decide(
            &obs(
                vec![Seen::answering(false, 1), Seen::answering(false, 2)],
                Some(0),
                vec![false; 2],
            ),
            &ext,
        );
        assert_eq!((a.writer, a.fence.len()), (Some(1), 0));
        let dead = obs(
            vec![Seen::Silent { rounds: 9 }, Seen::answering(true, 1)],
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
                vec![Seen::Silent { rounds: 1 }, Seen::answering(true, 1)],
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
            &obs(
                vec![Seen::Busy, Seen::answering(true, 1)],
                Some(0),
                vec![false, true],
            ),
            &cfg(),
        );
        assert_eq!((a.writer, a.promote), (Some(0), None));
    }

    #[test]
    fn dead_master_and_lost_shadow_promote() {
        let a = decide(
            &obs(
                vec![Seen::Silent { rounds: 3 }, Seen::answering(true, 1)],
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
                vec![Seen::Silent { rounds: 5 }, Seen::answering(true, 1)],
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
            vec![Seen::Silent { rounds: 3 }, Seen::answering(true, 1)],
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
    fn disabled_failover_only_drops_the_writer() {
        let off = FailoverConfig {
            enabled: false,
            ..cfg()
        };
        let a = decide(
            &obs(
                vec![Seen::Silent { rounds: 5 }, Seen::answering(true, 1)],
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
            &obs(
                vec![Seen::answering(true, 1), Seen::answering(true, 1)],
                Some(0),
                vec![false; 2],
            ),
            &cfg(),
        );
        assert_eq!(a.writer, None);
    }
}
