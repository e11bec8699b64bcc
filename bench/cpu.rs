//! Where a run's CPU went, read from /proc before and after it: the engine (every `seckill`
//! process), PostgreSQL by role (the servers the engine writes to, and their shadows, found by the
//! data directory each postgres process works in), the bench itself, and the machine's busy time
//! as a whole (/proc/stat), which the parts must add up to.
//!
//! A postgres process that ended during the run (a backend whose connection closed) is counted
//! through its postmaster, which reaped it (`cutime`/`cstime`).

use serde::Serialize;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

/// CPU ticks at one moment.
pub struct Snapshot {
    at: Instant,
    engine: u64,
    /// Ticks per PostgreSQL server, by port.
    servers: HashMap<u16, u64>,
    bench: u64,
    /// Busy ticks of the whole machine (every CPU, idle and iowait left out).
    busy: u64,
}

fn hz() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime + stime + cutime + cstime of a /proc/<pid>/stat, and its command name.
fn ticks(stat: &str) -> Option<(String, u64)> {
    let (head, rest) = stat.rsplit_once(')')?;
    let comm = head.split_once('(')?.1.to_string();
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, utime field 14 (index 11 here) .. cstime field 17.
    let sum = f
        .get(11..15)?
        .iter()
        .map(|v| v.parse::<u64>().unwrap_or(0))
        .sum();
    Some((comm, sum))
}

fn machine_busy() -> u64 {
    let Ok(text) = std::fs::read_to_string("/proc/stat") else {
        return 0;
    };
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
        return 0;
    };
    // user nice system idle iowait irq softirq steal
    line.split_whitespace()
        .skip(1)
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v.parse::<u64>().unwrap_or(0))
        .sum()
}

/// The port of the server whose data directory a postgres process works in.
fn port_of(pid: &str, cache: &mut HashMap<PathBuf, Option<u16>>) -> Option<u16> {
    let dir = std::fs::read_link(format!("/proc/{pid}/cwd")).ok()?;
    *cache.entry(dir.clone()).or_insert_with(|| {
        let text = std::fs::read_to_string(dir.join("postmaster.pid")).ok()?;
        text.lines().nth(3)?.trim().parse().ok()
    })
}

pub fn snapshot() -> Snapshot {
    let mut s = Snapshot {
        at: Instant::now(),
        engine: 0,
        servers: HashMap::new(),
        bench: 0,
        busy: machine_busy(),
    };
    let me = std::process::id().to_string();
    let mut dirs = HashMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let pid = entry.file_name().to_string_lossy().to_string();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((comm, t)) = ticks(&stat) else {
            continue;
        };
        if pid == me {
            s.bench = t;
        } else if comm == "seckill" {
            s.engine += t;
        } else if comm == "postgres" {
            if let Some(port) = port_of(&pid, &mut dirs) {
                *s.servers.entry(port).or_default() += t;
            }
        }
    }
    s
}

/// CPU seconds one process has used so far (its threads and reaped children included).
pub fn process_cpu_s(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    ticks(&stat).map(|(_, t)| t as f64 / hz())
}

/// CPU seconds every `seckill` process has used so far.
pub fn engine_cpu_s() -> f64 {
    snapshot().engine as f64 / hz()
}

/// What a run cost, in CPU seconds, and per order / per answer.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Cost {
    pub wall_s: f64,
    pub engine_s: f64,
    /// The servers written to (masters) and their shadows, at the end of the run.
    pub masters_s: f64,
    pub shadows_s: f64,
    pub bench_s: f64,
    /// The machine's busy time; the parts above add up to nearly all of it on a quiet machine.
    pub machine_busy_s: f64,
    pub orders: u64,
    pub answers: u64,
    /// Engine and PostgreSQL per accepted order, in µs.
    pub us_per_order: f64,
    pub engine_us_per_order: f64,
    pub masters_us_per_order: f64,
    pub shadows_us_per_order: f64,
    /// Accepted orders per CPU-second of engine and PostgreSQL.
    pub orders_per_cpu_s: f64,
    /// Engine and PostgreSQL per answer (every status), in µs.
    pub us_per_answer: f64,
    pub answers_per_cpu_s: f64,
}

/// The cost between two snapshots. `roles` maps a server's port to whether it is a master.
pub fn cost(
    before: &Snapshot,
    after: &Snapshot,
    roles: &HashMap<u16, bool>,
    orders: u64,
    answers: u64,
) -> Cost {
    let hz = hz();
    let secs = |t: u64| t as f64 / hz;
    let mut masters = 0;
    let mut shadows = 0;
    for (port, t) in &after.servers {
        let Some(&master) = roles.get(port) else {
            continue;
        };
        let d = t.saturating_sub(before.servers.get(port).copied().unwrap_or(0));
        if master {
            masters += d;
        } else {
            shadows += d;
        }
    }
    let engine = secs(after.engine.saturating_sub(before.engine));
    let (masters, shadows) = (secs(masters), secs(shadows));
    let total = engine + masters + shadows;
    let per = |s: f64, n: u64| if n > 0 { s * 1e6 / n as f64 } else { 0.0 };
    let rate = |n: u64| if total > 0.0 { n as f64 / total } else { 0.0 };
    Cost {
        wall_s: after.at.duration_since(before.at).as_secs_f64(),
        engine_s: engine,
        masters_s: masters,
        shadows_s: shadows,
        bench_s: secs(after.bench.saturating_sub(before.bench)),
        machine_busy_s: secs(after.busy.saturating_sub(before.busy)),
        orders,
        answers,
        us_per_order: per(total, orders),
        engine_us_per_order: per(engine, orders),
        masters_us_per_order: per(masters, orders),
        shadows_us_per_order: per(shadows, orders),
        orders_per_cpu_s: rate(orders),
        us_per_answer: per(total, answers),
        answers_per_cpu_s: rate(answers),
    }
}

impl Cost {
    pub fn print(&self) {
        let accounted = self.engine_s + self.masters_s + self.shadows_s + self.bench_s;
        println!(
            "cpu over {:.1} s: engine {:.2} s, masters {:.2} s, shadows {:.2} s, bench {:.2} s \
             ({:.0}% of the machine's busy {:.2} s)",
            self.wall_s,
            self.engine_s,
            self.masters_s,
            self.shadows_s,
            self.bench_s,
            if self.machine_busy_s > 0.0 {
                100.0 * accounted / self.machine_busy_s
            } else {
                0.0
            },
            self.machine_busy_s
        );
        if self.orders > 0 {
            println!(
                "cost per order     {:.0} µs (engine {:.0}, masters {:.0}, shadows {:.0}): {:.0} orders per CPU-second",
                self.us_per_order,
                self.engine_us_per_order,
                self.masters_us_per_order,
                self.shadows_us_per_order,
                self.orders_per_cpu_s
            );
        }
        println!(
            "cost per answer    {:.1} µs: {:.0} answers per CPU-second",
            self.us_per_answer, self.answers_per_cpu_s
        );
    }
}

/// Which server ports are masters (true) and shadows (false), as the engine sees them now.
pub async fn roles(http: &reqwest::Client, url: &str, token: &str) -> HashMap<u16, bool> {
    let mut roles = HashMap::new();
    let Ok(r) = http
        .get(format!("{url}/v1/admin/groups"))
        .bearer_auth(token)
        .send()
        .await
    else {
        return roles;
    };
    let Ok(groups) = r.json::<serde_json::Value>().await else {
        return roles;
    };
    for g in groups["groups"].as_array().into_iter().flatten() {
        for m in g["members"].as_array().into_iter().flatten() {
            let port = m["endpoint"]
                .as_str()
                .and_then(|e| e.rsplit_once(':'))
                .and_then(|(_, p)| p.parse().ok());
            if let Some(port) = port {
                roles.insert(port, m["writable"] == true);
            }
        }
    }
    roles
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_give_the_name_and_all_four_times() {
        let stat = "4242 (postgres) S 1 2 3 4 5 6 7 8 9 10 100 20 3 4 20 0 1";
        assert_eq!(ticks(stat), Some(("postgres".to_string(), 127)));
        // A name with a parenthesis and spaces in it.
        let odd = "7 (a) b (c) R 1 2 3 4 5 6 7 8 9 10 1 1 1 1";
        assert_eq!(ticks(odd), Some(("a) b (c".to_string(), 4)));
    }
}
