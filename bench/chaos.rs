//! `--kill-master GROUP@SECONDS`: SIGKILL the current master of a local dev-cluster group mid-run;
//! `--freeze-master GROUP@SECONDS`: SIGSTOP every process of it instead (it stops answering with its
//! sockets open, as a frozen host or a network partition looks; it is thawed after the run);
//! `--kill-shadow GROUP@SECONDS`: SIGKILL the group's shadow (no acknowledgement until one streams
//! again);
//! `--move-to GROUP@SECONDS`: move the hot item to GROUP live (`POST /v1/admin/moves`). Then
//! measure the write outage from the acknowledged orders' timestamps (and for a move, the write
//! pause the engine measured).

use crate::sale::Acked;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// What happens to the master.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Kill,
    Freeze,
    KillShadow,
    /// Move this item key to the group.
    Move(u64),
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
    /// What was done: `SIGKILL`, `SIGSTOP`, `SIGKILL of the shadow`, `move`.
    pub fault: &'static str,
    pub at_s: f64,
    /// Processes stopped by a freeze, to continue after the run.
    pub frozen: Vec<i32>,
    pub thawed: bool,
    /// The move started, for `--move-to`.
    pub move_id: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Outage {
    pub member: String,
    pub fault: &'static str,
    pub killed_at_s: f64,
    /// The longest time without an acknowledged order from the kill on.
    pub outage_s: f64,
    pub failures_after_kill: usize,
    /// For a move: the write pause the engine measured (fence to the new group going live).
    pub write_pause_ms: Option<i64>,
}

pub fn parse(fault: Fault, spec: &str, dir: &Path, token: &str) -> Result<(f64, Target), String> {
    let (group, at) = spec.split_once('@').ok_or_else(|| {
        format!("--kill-master/--freeze-master/--kill-shadow/--move-to want GROUP@SECONDS, got {spec:?}")
    })?;
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
// Long on purpose: one fault from start to healed, its steps in the order they happen.
pub async fn kill_master(
    url: &str,
    target: &Target,
    http: &reqwest::Client,
    now_s: f64,
) -> Result<Kill, String> {
    if let Fault::Move(key) = target.fault {
        return start_move(url, target, http, now_s, key).await;
    }
    let groups: serde_json::Value = http
        .get(format!("{url}/v1/admin/groups"))
        .bearer_auth(&target.token)
        .send()
        .await
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())?;
    let group = groups["groups"]
        .as_array()
        .and_then(|gs| gs.iter().find(|g| g["name"] == target.group.as_str()));
    let endpoint = match target.fault {
        Fault::KillShadow => group
            .and_then(|g| g["members"].as_array())
            .and_then(|ms| ms.iter().find(|m| m["writable"] == false))
            .and_then(|m| m["endpoint"].as_str()),
        _ => group.and_then(|g| g["writable_master"].as_str()),
    }
    .ok_or_else(|| format!("group {} has no such member to hit", target.group))?
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
                Fault::Kill | Fault::KillShadow => {
                    // SAFETY: kill(2) on the pid the server wrote into its own pid file.
                    if unsafe { libc::kill(pid, libc::SIGKILL) } != 0 {
                        return Err(format!("kill {pid}: {}", std::io::Error::last_os_error()));
                    }
                }
                Fault::Freeze | Fault::Move(_) => {
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
                Fault::Kill => "killed master",
                Fault::KillShadow => "killed shadow",
                _ => "froze (SIGSTOP) master",
            };
            println!(
                "\n*** {what} {endpoint} of {} (pid {pid}) at {now_s:.2} s ***",
                target.group
            );
            return Ok(Kill {
                fault: match target.fault {
                    Fault::Kill => "SIGKILL",
                    Fault::KillShadow => "SIGKILL of the shadow",
                    _ => "SIGSTOP",
                },
                member: endpoint,
                at_s: now_s,
                frozen,
                thawed: false,
                move_id: None,
            });
        }
    }
    Err(format!(
        "no local server listening on port {port} under {}",
        target.cluster_dir.display()
    ))
}

/// Ask the engine to move the item to the group.
async fn start_move(
    url: &str,
    target: &Target,
    http: &reqwest::Client,
    now_s: f64,
    key: u64,
) -> Result<Kill, String> {
    let get = |path: String| async move {
        http.get(format!("{url}{path}"))
            .bearer_auth(&target.token)
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json::<serde_json::Value>()
            .await
            .map_err(|e| e.to_string())
    };
    // `next`: the group after the item's own, in the configuration's order.
    let to = if target.group == "next" {
        let home = get(format!("/v1/admin/route/items/{key}")).await?["group"].clone();
        let groups = get("/v1/admin/groups".to_string()).await?;
        let names: Vec<String> = groups["groups"]
            .as_array()
            .map(|gs| {
                gs.iter()
                    .filter_map(|g| g["name"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        let at = names.iter().position(|n| home == n.as_str()).unwrap_or(0);
        names
            .get((at + 1) % names.len().max(1))
            .cloned()
            .ok_or("no groups")?
    } else {
        target.group.clone()
    };
    let r = http
        .post(format!("{url}/v1/admin/moves"))
        .bearer_auth(&target.token)
        .json(&serde_json::json!({"kind": "items", "key": key, "to": to}))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = r.status();
    let body: serde_json::Value = r.json().await.map_err(|e| e.to_string())?;
    if status != reqwest::StatusCode::ACCEPTED {
        return Err(format!("the move was refused ({status}): {body}"));
    }
    let id = body["move_id"].as_u64().unwrap_or_default();
    println!(
        "\n*** moving item {key} {} -> {to} (move {id}) at {now_s:.2} s ***",
        body["from"].as_str().unwrap_or("?"),
    );
    Ok(Kill {
        fault: "move",
        member: format!("item {key} -> {to}"),
        at_s: now_s,
        frozen: Vec::new(),
        thawed: true,
        move_id: Some(id),
    })
}

/// The write pause of a move, once it has switched (waits up to 30 s).
pub async fn write_pause(
    url: &str,
    token: &str,
    http: &reqwest::Client,
    move_id: u64,
) -> Option<i64> {
    for _ in 0..300 {
        let m: serde_json::Value = http
            .get(format!("{url}/v1/admin/moves/{move_id}"))
            .bearer_auth(token)
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        if let Some(p) = m["write_pause_ms"].as_i64() {
            return Some(p);
        }
        if ["failed", "cancelled"].contains(&m["phase"].as_str().unwrap_or("")) {
            println!("move {move_id} ended {}: {}", m["phase"], m["error"]);
            return None;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    None
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
            "thawed {} (SIGCONT), if seckill dev's healer had not killed and rewound it already",
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
        fault: kill.fault,
        killed_at_s: kill.at_s,
        outage_s: longest,
        failures_after_kill: failures.iter().filter(|&&t| t >= kill.at_s).count(),
        write_pause_ms: None,
    }
}
