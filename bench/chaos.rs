//! `--kill-master GROUP@SECONDS`: SIGKILL the current master of a local dev-cluster group mid-run;
//! `--freeze-master GROUP@SECONDS`: SIGSTOP every process of it instead (it stops answering with its
//! sockets open, as a frozen host or a network partition looks; it is thawed after the run). Then
//! measure the write outage from the acknowledged orders' timestamps.

use crate::sale::Acked;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// What happens to the master.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Kill,
    Freeze,
}

#[derive(Debug, Clone)]
pub struct Target {
    pub fault: Fault,
    pub group: String,
    pub cluster_dir: PathBuf,
    /// Admin token, to ask the engine which member is the master.
    pub token: String,
}

/// A fault dealt; a frozen server is continued when this is dropped, whatever happens to the run.
#[derive(Debug)]
pub struct Kill {
    pub member: String,
    pub at_s: f64,
    /// Processes stopped by a freeze, to continue after the run.
    pub frozen: Vec<i32>,
    pub thawed: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Outage {
    pub member: String,
    pub fault: &'static str,
    pub killed_at_s: f64,
    /// The longest time without an acknowledged order from the kill on.
    pub outage_s: f64,
    pub failures_after_kill: usize,
}

pub fn parse(fault: Fault, spec: &str, dir: &Path, token: &str) -> Result<(f64, Target), String> {
    let (group, at) = spec
        .split_once('@')
        .ok_or_else(|| format!("--kill-master/--freeze-master want GROUP@SECONDS, got {spec:?}"))?;
    let at: f64 = at.parse().map_err(|_| format!("bad seconds in {spec:?}"))?;
    Ok((
        at,
        Target {
            fault,
            group: group.to_string(),
            cluster_dir: dir.to_path_buf(),
            token: token.to_string(),
        },
    ))
}

/// Find the writable member of the group through the engine, then the local server listening on
/// that port (postmaster.pid line 4 is the port), and SIGKILL its postmaster.
pub async fn kill_master(
    url: &str,
    target: &Target,
    http: &reqwest::Client,
    now_s: f64,
) -> Result<Kill, String> {
    let groups: serde_json::Value = http
        .get(format!("{url}/v1/admin/groups"))
        .bearer_auth(&target.token)
        .send()
        .await
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())?;
    let endpoint = groups["groups"]
        .as_array()
        .and_then(|gs| gs.iter().find(|g| g["name"] == target.group.as_str()))
        .and_then(|g| g["writable_master"].as_str())
        .ok_or_else(|| format!("group {} has no writable master to kill", target.group))?
        .to_string();
    let port = endpoint.rsplit(':').next().unwrap_or("").to_string();
    let entries = std::fs::read_dir(&target.cluster_dir)
        .map_err(|e| format!("{}: {e}", target.cluster_dir.display()))?;
    for entry in entries.flatten() {
        let pid_file = entry.path().join("data").join("postmaster.pid");
        let Ok(text) = std::fs::read_to_string(&pid_file) else {
            continue;
        };
        let lines: Vec<&str> = text.lines().collect();
        if lines.get(3).map(|l| l.trim()) == Some(port.as_str()) {
            let pid: i32 = lines[0]
                .trim()
                .parse()
                .map_err(|_| "bad postmaster.pid".to_string())?;
            let mut frozen = Vec::new();
            match target.fault {
                Fault::Kill => {
                    // SAFETY: kill(2) on the pid the server wrote into its own pid file.
                    if unsafe { libc::kill(pid, libc::SIGKILL) } != 0 {
                        return Err(format!("kill {pid}: {}", std::io::Error::last_os_error()));
                    }
                }
                Fault::Freeze => {
                    // The postmaster first (it forks nothing new then), then its children until
                    // no unstopped one is left.
                    loop {
                        let new: Vec<i32> = server_processes(pid)
                            .into_iter()
                            .filter(|p| !frozen.contains(p))
                            .collect();
                        if new.is_empty() {
                            break;
                        }
                        for p in new {
                            // SAFETY: kill(2) on the server's own processes.
                            unsafe { libc::kill(p, libc::SIGSTOP) };
                            frozen.push(p);
                        }
                    }
                }
            }
            let what = match target.fault {
                Fault::Kill => "killed",
                Fault::Freeze => "froze (SIGSTOP)",
            };
            println!(
                "\n*** {what} master {endpoint} of {} (pid {pid}) at {now_s:.2} s ***",
                target.group
            );
            return Ok(Kill {
                member: endpoint,
                at_s: now_s,
                frozen,
                thawed: false,
            });
        }
    }
    Err(format!(
        "no local server listening on port {port} under {}",
        target.cluster_dir.display()
    ))
}

/// The postmaster and the processes it started.
fn server_processes(postmaster: i32) -> Vec<i32> {
    let mut pids = vec![postmaster];
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let ppid = std::fs::read_to_string(entry.path().join("stat"))
            .ok()
            .and_then(|stat| {
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                    .and_then(|p| p.parse::<i32>().ok())
            });
        if ppid == Some(postmaster) {
            pids.push(pid);
        }
    }
    pids
}

/// Continue a frozen server (after the run).
pub fn thaw(kill: &mut Kill) {
    for &p in &kill.frozen {
        // SAFETY: kill(2) on processes this run stopped.
        unsafe { libc::kill(p, libc::SIGCONT) };
    }
    if !kill.frozen.is_empty() {
        println!(
            "thawed {} (SIGCONT); the engine fences it as an old master",
            kill.member
        );
    }
    kill.thawed = true;
}

impl Drop for Kill {
    fn drop(&mut self) {
        if !self.thawed {
            thaw(self);
        }
    }
}

pub fn outage(kill: &Kill, acked: &[Acked], failures: &[f64]) -> Outage {
    let mut times: Vec<f64> = acked
        .iter()
        .map(|a| a.at_s)
        .filter(|&t| t >= kill.at_s)
        .collect();
    times.sort_by(f64::total_cmp);
    let mut last = kill.at_s;
    let mut longest = 0.0f64;
    for t in times {
        longest = longest.max(t - last);
        last = t;
    }
    Outage {
        member: kill.member.clone(),
        fault: if kill.frozen.is_empty() {
            "SIGKILL"
        } else {
            "SIGSTOP"
        },
        killed_at_s: kill.at_s,
        outage_s: longest,
        failures_after_kill: failures.iter().filter(|&&t| t >= kill.at_s).count(),
    }
}
