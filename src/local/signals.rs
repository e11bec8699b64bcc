//! A local server's processes: what runs (the postmaster and its children, leftovers of an earlier
//! run), and the signals the fault tests and the healer send them (SIGKILL, SIGSTOP/SIGCONT, a
//! halt that stops whatever state the server is in).

use super::server::LocalServer;
use super::*;
use crate::shard::heal::Process;
use std::time::{Duration, Instant};

impl LocalServer {
    /// True while the postmaster lives. A killed postmaster whose parent does not reap it stays
    /// a zombie: `kill(pid, 0)` (and so `pg_ctl status`) still finds it, so /proc decides.
    pub(crate) fn is_running(&self) -> bool {
        self.postmaster_pid().is_some_and(process_alive)
    }

    /// SIGKILL the postmaster, as a machine or process crash would.
    pub fn kill9(&self) -> Result<(), LocalError> {
        let pid_file = std::fs::read_to_string(self.data_dir.join("postmaster.pid"))?;
        let pid: i32 = pid_file
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .ok_or_else(|| LocalError::Command {
                what: "kill".into(),
                detail: "no pid in postmaster.pid".into(),
            })?;
        // SAFETY: plain kill(2) of a pid we read from the server's own pid file.
        if unsafe { libc::kill(pid, libc::SIGKILL) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(())
    }

    /// The postmaster and every process it started (backends, walsender, checkpointer, ...).
    pub(super) fn processes(&self) -> Result<Vec<i32>, LocalError> {
        let root = self.postmaster_pid().ok_or_else(|| LocalError::Command {
            what: "signal".into(),
            detail: format!("{} has no postmaster.pid", self.name),
        })?;
        let mut pids = vec![root];
        for entry in std::fs::read_dir("/proc")?.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // The parent pid is the second field after the parenthesised command name.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<i32>().ok());
            if ppid == Some(root) {
                pids.push(pid);
            }
        }
        Ok(pids)
    }

    pub(super) fn signal_all(&self, signal: i32) -> Result<(), LocalError> {
        for pid in self.processes()? {
            // SAFETY: plain kill(2) of the server's own processes.
            unsafe { libc::kill(pid, signal) };
        }
        Ok(())
    }

    /// SIGSTOP every process of the server: it stops answering while its sockets stay open, as a
    /// frozen host or a network partition looks from outside. The postmaster first (so it forks
    /// nothing new), then its children until no unstopped one is left.
    pub fn freeze(&self) -> Result<(), LocalError> {
        let mut stopped = std::collections::HashSet::new();
        loop {
            let pids = self.processes()?;
            let new: Vec<i32> = pids.into_iter().filter(|p| !stopped.contains(p)).collect();
            if new.is_empty() {
                return Ok(());
            }
            for pid in new {
                // SAFETY: plain kill(2) of the server's own processes.
                unsafe { libc::kill(pid, libc::SIGSTOP) };
                stopped.insert(pid);
            }
        }
    }

    /// SIGCONT every process of a frozen server.
    pub fn thaw(&self) -> Result<(), LocalError> {
        self.signal_all(libc::SIGCONT)
    }

    /// Stop the server whatever its state: a fast shutdown, else an immediate one, else SIGKILL
    /// of every process (a frozen server answers no signal but that one).
    pub fn halt(&self) -> Result<(), LocalError> {
        if self.process_state() == Process::Frozen {
            self.kill_all()?;
        }
        if self.is_running()
            && self.stop_within("fast", 10).is_err()
            && self.stop_within("immediate", 10).is_err()
        {
            self.kill_all()?;
        }
        self.kill_leftovers();
        self.clear_stale_lock()
    }

    pub(super) fn stop_within(&self, mode: &str, secs: u32) -> Result<(), LocalError> {
        if !self.is_running() {
            return Ok(());
        }
        run(
            &format!("stopping {}", self.name),
            self.cmd("pg_ctl")
                .arg("stop")
                .arg("-D")
                .arg(&self.data_dir)
                .args(["-m", mode, "-w", "-t", &secs.to_string()]),
        )
        .map(|_| ())
    }

    /// SIGKILL the postmaster and every process of the server, and wait (bounded) until they are
    /// gone: a new postmaster refuses to start while an old backend holds the shared memory.
    pub(crate) fn kill_all(&self) -> Result<(), LocalError> {
        let mut pids = self.processes().unwrap_or_default();
        pids.extend(self.leftovers());
        kill_and_wait(&pids);
        Ok(())
    }

    /// Running, frozen (its postmaster stopped by a signal) or stopped.
    pub(crate) fn process_state(&self) -> Process {
        match self.postmaster_pid() {
            Some(pid) if process_alive(pid) => match process_status(pid) {
                Some('T' | 't') => Process::Frozen,
                _ => Process::Running,
            },
            _ => Process::Stopped,
        }
    }

    /// The name every process of this server carries in its title (`cluster_name`), so that its
    /// backends are found even after their postmaster died; None for a data directory given from
    /// outside.
    pub(super) fn title_tag(&self) -> Option<String> {
        self.owns_folder
            .then(|| format!("seckill-{}-{}", self.name, self.port))
    }

    /// Processes of this server whose postmaster is gone (SIGKILLed alone while they were frozen,
    /// say), found by their title.
    pub(super) fn leftovers(&self) -> Vec<i32> {
        let Some(tag) = self.title_tag() else {
            return Vec::new();
        };
        let prefix = format!("postgres: {tag}: ");
        processes_where(|args| args.first().is_some_and(|a| a.starts_with(&prefix)))
    }

    /// The live processes running one of `tools` (program names, or arguments such as
    /// `--single`) with this server's data directory as an argument: what a rejoin or a creation
    /// left running, and the `runuser` wrapping each when we run as root.
    pub fn tool_processes(&self, tools: &[&str]) -> Vec<i32> {
        let dir = self.data_dir.to_string_lossy().to_string();
        let me = std::process::id() as i32;
        let tool = |a: &String| {
            let base = a.rsplit('/').next().unwrap_or(a);
            tools.contains(&base) || tools.contains(&a.as_str())
        };
        processes_where(|args| args.contains(&dir) && args.iter().any(tool))
            .into_iter()
            .filter(|&pid| pid != me)
            .collect()
    }

    pub(super) fn kill_leftovers(&self) {
        let alive = self.postmaster_pid().is_some_and(process_alive);
        if alive {
            return;
        }
        kill_and_wait(&self.leftovers());
    }

    /// SIGKILL what an interrupted rejoin or creation may have left running on this data
    /// directory (the engine dies, its children do not): a pg_rewind or pg_basebackup, the
    /// single-user server pg_rewind runs for crash recovery, an initdb and its bootstrap server.
    pub(super) fn kill_tools_on_data_dir(&self) {
        let tools =
            self.tool_processes(&["pg_rewind", "pg_basebackup", "initdb", "--single", "--boot"]);
        for &pid in &tools {
            tracing::warn!(server = %self.name, pid, "stopping a tool an interrupted rejoin left running");
        }
        kill_and_wait(&tools);
    }
}

/// SIGKILL `pids` (this server's processes, or tools working on its data directory) and wait,
/// bounded, until they are gone: a new postmaster refuses to start while an old backend holds the
/// shared memory, and a tool must not write into a directory being replaced.
fn kill_and_wait(pids: &[i32]) {
    for &pid in pids {
        // SAFETY: plain kill(2) of processes found as this server's own (by pid file, title, or
        // data directory argument).
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let start = Instant::now();
    while pids.iter().any(|&p| process_alive(p)) && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The live processes whose command line (its arguments, split) satisfies `matches`.
fn processes_where(matches: impl Fn(&[String]) -> bool) -> Vec<i32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let args: Vec<String> = cmdline
                .split(|&b| b == 0)
                .map(|a| String::from_utf8_lossy(a).to_string())
                .collect();
            matches(&args).then_some(pid)
        })
        .filter(|&pid| process_alive(pid))
        .collect()
}

/// The state letter of a process (R, S, D, T, Z, ...).
pub(super) fn process_status(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

/// Whether `pid` is a live process (not a zombie).
pub(super) fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) if std::path::Path::new("/proc/self").exists() => false,
        // SAFETY: kill(2) with signal 0 only checks that the pid exists.
        Err(_) => unsafe { libc::kill(pid, 0) == 0 },
    }
}
