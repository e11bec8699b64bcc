//! Bringing a local group up whatever happened before: kills, freezes, failovers, a dev cluster
//! stopped halfway.
//!
//! Only one member ever starts as a primary: the one [`choose_master`] picks from what the data
//! directories say of themselves (standby or not, newest timeline, how far the WAL goes), never
//! from which folder is called master. The other member is made a streaming standby of it
//! ([`LocalServer::rejoin`]: rewound, or rebuilt from a base backup) before the engine starts,
//! so the group has its synchronous shadow again from the first order on. A member whose rejoin
//! was cut short (its `data.rejoining` marker is there: the engine died during a pg_rewind or a
//! base backup) is never a candidate: it becomes the other's shadow from a fresh base backup.
//!
//! It also gives the health monitor's healer ([`crate::shard::heal`]) its hands on these
//! servers ([`ServerControl`]).

use super::server::DiskFacts;
use super::{LocalError, LocalGroup, LocalServer};
use crate::shard::heal::{Process, Rejoined, ServerControl};

/// What to do to get a group's master up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Start member `0` or `1` as the primary it is.
    Primary(usize),
    /// Both are standbys (a dev cluster stopped in the middle of a heal): start the one furthest
    /// along as a standby, then promote it.
    Promote(usize),
}

/// Which member of a group becomes its master, from the facts of the members whose data exists
/// (`None`: no data directory). Err names why no choice is safe.
pub(crate) fn choose_master(facts: [Option<DiskFacts>; 2]) -> Result<Start, String> {
    let primaries: Vec<usize> = (0..2)
        .filter(|&i| facts[i].is_some_and(|f| !f.standby))
        .collect();
    let tl = |i: usize| facts[i].map_or(0, |f| f.timeline);
    match primaries[..] {
        [i] => Ok(Start::Primary(i)),
        [a, b] if tl(a) != tl(b) => Ok(Start::Primary(if tl(a) > tl(b) { a } else { b })),
        [_, _] => Err(format!(
            "both are primaries on timeline {}: which one holds the acknowledged orders cannot be told",
            tl(0)
        )),
        _ => {
            // Standbys only: the newest history, then the furthest WAL, has every commit the
            // other has (commits were synchronous).
            let best = (0..2)
                .filter(|&i| facts[i].is_some())
                .max_by_key(|&i| facts[i].map(|f| (f.timeline, f.lsn)));
            best.map(Start::Promote)
                .ok_or_else(|| "neither member has a data directory".to_string())
        }
    }
}

impl LocalGroup {
    fn member(&self, i: usize) -> &LocalServer {
        if i == 0 {
            &self.master
        } else {
            &self.shadow
        }
    }

    /// Start a group whose data directories exist (one or both): everything left running from
    /// before is stopped first (thawed or killed when frozen), then the chosen master is started
    /// and the other member made its streaming standby. Returns the master's index.
    pub(crate) fn recover(&self, shadow_name: &str) -> Result<usize, LocalError> {
        for i in 0..2 {
            self.member(i).halt()?;
        }
        // A member whose rejoin was cut short is no candidate: it was being made the shadow of
        // the other, which holds every acknowledged order. It is rebuilt below.
        let mut facts = [None, None];
        for (i, f) in facts.iter_mut().enumerate() {
            let s = self.member(i);
            if s.exists() && !s.rejoin_cut_short() {
                *f = Some(s.disk_facts()?);
            }
        }
        if facts.iter().all(Option::is_none) {
            if let Some(i) = (0..2).find(|&i| self.member(i).rejoin_cut_short()) {
                let (s, other) = (self.member(i), self.member(1 - i));
                return Err(LocalError::Refused(format!(
                    "group {}: {} ({}) was being made the shadow of {} when its rejoin was cut \
                     short, and {} has no data directory ({}): no member holds the group's data. \
                     Restore {}'s data directory from a backup",
                    self.name,
                    s.name,
                    s.data_dir.display(),
                    other.name,
                    other.name,
                    other.data_dir.display(),
                    other.name,
                )));
            }
        }
        let start = choose_master(facts).map_err(|why| {
            LocalError::Refused(format!(
                "group {}: {} ({}) and {} ({}) {why}. Keep the one you trust and remove the \
                 other's data directory (`rm -rf` it, or better move it aside); it is then made \
                 anew as the shadow",
                self.name,
                self.master.name,
                self.master.data_dir.display(),
                self.shadow.name,
                self.shadow.data_dir.display(),
            ))
        })?;
        for i in 0..2 {
            let s = self.member(i);
            super::ports::check_port_free(s.port, &s.name)?;
        }
        let m = match start {
            Start::Primary(m) => {
                self.member(m).start()?;
                m
            }
            Start::Promote(m) => {
                let s = self.member(m);
                s.start()?;
                s.psql("postgres", "SELECT pg_promote(true, 60)")?;
                m
            }
        };
        let (master, other) = (self.member(m), self.member(1 - m));
        let how = other.rejoin("127.0.0.1", master.port, shadow_name, false)?;
        tracing::info!(group = %self.name, master = %master.name, shadow = %other.name, ?how,
            "group recovered: one master, its shadow following it");
        Ok(m)
    }
}

impl ServerControl for LocalServer {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn process(&self) -> Process {
        self.process_state()
    }

    fn kill(&self) -> Result<(), String> {
        self.kill_all().map_err(|e| e.to_string())
    }

    fn rejoin(
        &self,
        host: &str,
        port: u16,
        application_name: &str,
        rebuild: bool,
    ) -> Result<Rejoined, String> {
        LocalServer::rejoin(self, host, port, application_name, rebuild).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(standby: bool, timeline: i64, lsn: u64) -> Option<DiskFacts> {
        Some(DiskFacts {
            standby,
            clean: true,
            timeline,
            lsn,
        })
    }

    #[test]
    fn the_one_primary_is_the_master() {
        assert_eq!(
            choose_master([f(false, 1, 9), f(true, 1, 5)]),
            Ok(Start::Primary(0))
        );
        assert_eq!(
            choose_master([f(true, 2, 9), f(false, 2, 5)]),
            Ok(Start::Primary(1)),
            "after a failover the b member is the master"
        );
        assert_eq!(choose_master([None, f(false, 3, 1)]), Ok(Start::Primary(1)));
    }

    #[test]
    fn of_two_primaries_the_newer_timeline_wins() {
        // The old master was killed, the shadow promoted; both look like primaries on disk.
        assert_eq!(
            choose_master([f(false, 1, 900), f(false, 2, 100)]),
            Ok(Start::Primary(1)),
            "the old master's WAL may go further: it is still the old one"
        );
        assert!(choose_master([f(false, 4, 1), f(false, 4, 2)]).is_err());
    }

    #[test]
    fn of_two_standbys_the_furthest_is_promoted() {
        assert_eq!(
            choose_master([f(true, 2, 10), f(true, 2, 20)]),
            Ok(Start::Promote(1))
        );
        assert_eq!(
            choose_master([f(true, 3, 10), f(true, 2, 20)]),
            Ok(Start::Promote(0))
        );
        assert_eq!(choose_master([f(true, 1, 1), None]), Ok(Start::Promote(0)));
        assert!(choose_master([None, None]).is_err());
    }
}
