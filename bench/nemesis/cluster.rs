//! The system under test: a `seckill dev` process of the nemesis's own (its folder, its ports),
//! with `--engines 2` a second engine node beside it (`seckill serve` on the same shards.toml, as a
//! second host behind one load balancer), and the faults dealt to them: servers killed or frozen,
//! the command SIGKILLed or stopped and started again, an engine frozen (a hung host), the second
//! engine SIGKILLed and started again, keys moved live.

use rand::Rng;
use seckill::local::{LocalCluster, LocalServer};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `seckill dev` the nemesis runs (and restarts).
pub struct Dev {
    pub exe: PathBuf,
    pub dir: PathBuf,
    pub base_port: u16,
    pub listen: String,
    child: Option<Child>,
}

impl Dev {
    pub fn new(exe: PathBuf, dir: PathBuf, base_port: u16, listen: String) -> Self {
        Self {
            exe,
            dir,
            base_port,
            listen,
            child: None,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.listen)
    }

    /// Start the command and wait (bounded) for its welcome; its log goes to `dev.log`.
    pub fn start(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.with_extension("dev.log"))
            .map_err(|e| e.to_string())?;
        let mut child = Command::new(&self.exe)
            .arg("dev")
            .arg("--dir")
            .arg(&self.dir)
            .args(["--base-port", &self.base_port.to_string()])
            .args(["--listen", &self.listen])
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("{}: {e}", self.exe.display()))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("seckill dev is up") {
                    let _ = tx.send(());
                }
            }
        });
        if rx.recv_timeout(Duration::from_secs(180)).is_err() {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "seckill dev did not come up within 180 s (see {})",
                self.dir.with_extension("dev.log").display()
            ));
        }
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL of the command alone: its servers run on (or stay frozen) without it.
    pub fn crash(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Ctrl-C: the engine stops, then its servers.
    pub fn interrupt(&mut self) -> Result<(), String> {
        let Some(mut c) = self.child.take() else {
            return Ok(());
        };
        // SAFETY: plain kill(2) of our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(90) {
            if let Ok(Some(_)) = c.try_wait() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = c.kill();
        let _ = c.wait();
        Err("seckill dev did not stop within 90 s of Ctrl-C".into())
    }

    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The servers, as handles (nothing is started).
    pub fn servers(&self) -> Result<LocalCluster, String> {
        LocalCluster::open(&self.dir, self.base_port, 2).map_err(|e| e.to_string())
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        if self.interrupt().is_err() {
            if let Ok(c) = self.servers() {
                c.stop_all("immediate");
            }
        }
    }
}

/// The second engine node: `seckill serve` on the dev cluster's shards.toml. It runs the same
/// monitors as the engine of `seckill dev` (it follows failovers, may promote a shadow itself) but
/// heals nothing: rejoining an old master needs its data directory, which only `seckill dev` has.
pub struct Serve {
    pub exe: PathBuf,
    pub dir: PathBuf,
    pub listen: String,
    child: Option<Child>,
}

impl Serve {
    pub fn new(exe: PathBuf, dir: PathBuf, listen: String) -> Self {
        Self {
            exe,
            dir,
            listen,
            child: None,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.listen)
    }

    /// Start it and wait (bounded) until it answers; its log goes to `serve.log`.
    pub async fn start(&mut self, http: &reqwest::Client) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.with_extension("serve.log"))
            .map_err(|e| e.to_string())?;
        let mut child = Command::new(&self.exe)
            .arg("serve")
            .arg("--config")
            .arg(self.dir.join("shards.toml"))
            .args(["--listen", &self.listen])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("{}: {e}", self.exe.display()))?;
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(120) {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "seckill serve exited ({status}) before it answered (see {})",
                    self.dir.with_extension("serve.log").display()
                ));
            }
            let answered = http
                .get(format!("{}/v1/time", self.url()))
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if answered {
                self.child = Some(child);
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        Err("seckill serve did not answer within 120 s".into())
    }

    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    /// None while it runs; what it exited with, if it exited on its own.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGKILL (a frozen one too).
    pub fn crash(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Ctrl-C, bounded; then SIGKILL.
    pub fn stop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        let pid = c.id() as i32;
        // SAFETY: plain kill(2) of our own child.
        unsafe {
            libc::kill(pid, libc::SIGCONT);
            libc::kill(pid, libc::SIGINT);
        }
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        self.stop();
    }
}

/// SIGSTOP of one process for `secs`, then SIGCONT (a hung host that comes back). The process is
/// continued even if it was killed meanwhile: a signal to a reaped pid may reach a newer process
/// only once the pid is reused, which a run's few hundred processes do not wrap around to.
fn freeze_process(pid: i32, secs: u64) -> Result<(), String> {
    // SAFETY: plain kill(2) of our own child.
    if unsafe { libc::kill(pid, libc::SIGSTOP) } != 0 {
        return Err(format!(
            "SIGSTOP of {pid}: {}",
            std::io::Error::last_os_error()
        ));
    }
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(secs)).await;
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGCONT) };
    });
    Ok(())
}

/// Talks to the engine as its admin.
pub struct Admin {
    pub http: reqwest::Client,
    pub url: String,
    pub token: String,
}

impl Admin {
    pub async fn get(&self, path: &str) -> Result<Value, String> {
        let r = self
            .http
            .get(format!("{}{path}", self.url))
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = r.status();
        let body: Value = r.json().await.map_err(|e| e.to_string())?;
        if !status.is_success() {
            return Err(format!("{path}: {status} {body}"));
        }
        Ok(body)
    }

    pub async fn post(&self, path: &str, body: Value) -> Result<(u16, Value), String> {
        let r = self
            .http
            .post(format!("{}{path}", self.url))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = r.status().as_u16();
        Ok((status, r.json().await.unwrap_or(Value::Null)))
    }

    /// Every group has a master and a synchronous streaming shadow, writes durable.
    pub async fn whole(&self) -> bool {
        let Ok(g) = self.get("/v1/admin/groups").await else {
            return false;
        };
        g["groups"].as_array().is_some_and(|gs| {
            gs.iter().all(|g| {
                g["writable_master"].is_string()
                    && g["shadow_streaming"] == true
                    && g["synchronous"] == true
                    && g["writes"] == "durable"
            })
        })
    }

    pub async fn until_whole(&self, limit: Duration) -> Result<Duration, String> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if self.whole().await {
                return Ok(start.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Err(format!(
            "the cluster is not whole {} s after the last fault: {:?}",
            limit.as_secs(),
            self.get("/v1/admin/groups").await
        ))
    }

    /// The master (`true`) or the shadow of group `g`, as the engine sees it now.
    async fn member(&self, servers: &LocalCluster, g: usize, master: bool) -> Option<LocalServer> {
        let groups = self.get("/v1/admin/groups").await.ok()?;
        let writer = groups["groups"][g]["writable_master"].as_str()?.to_string();
        let group = &servers.groups[g];
        let a_is_master = writer.ends_with(&format!(":{}", group.master.port));
        Some(if a_is_master == master {
            group.master.clone()
        } else {
            group.shadow.clone()
        })
    }
}

/// A fault the nemesis can deal.
#[derive(Debug, Clone)]
pub enum Fault {
    Kill {
        group: usize,
        master: bool,
    },
    Freeze {
        group: usize,
        master: bool,
        secs: u64,
    },
    /// SIGKILL of `seckill dev` (its servers run on), then a start.
    CrashEngine,
    /// Ctrl-C of `seckill dev` (its servers stop), then a start.
    RestartCluster,
    /// SIGSTOP of the engine of `seckill dev` alone (its servers run on), SIGCONT `secs` later.
    FreezeEngine {
        secs: u64,
    },
    /// SIGKILL of the second engine node, then a start.
    CrashSecondEngine,
    /// SIGSTOP of the second engine node, SIGCONT `secs` later.
    FreezeSecondEngine {
        secs: u64,
    },
    MoveItem {
        item: u64,
    },
    MoveSlot {
        item: u64,
    },
    /// Two faults a moment apart.
    Pair(Box<Fault>, Box<Fault>, u64),
}

impl Fault {
    pub fn kind(&self) -> String {
        match self {
            Fault::Kill { master: true, .. } => "SIGKILL of a master".into(),
            Fault::Kill { master: false, .. } => "SIGKILL of a shadow".into(),
            Fault::Freeze { master: true, .. } => "SIGSTOP of a master".into(),
            Fault::Freeze { master: false, .. } => "SIGSTOP of a shadow".into(),
            Fault::CrashEngine => "SIGKILL of the engine, restart".into(),
            Fault::RestartCluster => "restart of the whole dev cluster".into(),
            Fault::FreezeEngine { .. } => "SIGSTOP of the engine".into(),
            Fault::CrashSecondEngine => "SIGKILL of the second engine, restart".into(),
            Fault::FreezeSecondEngine { .. } => "SIGSTOP of the second engine".into(),
            Fault::MoveItem { .. } => "live move of an item".into(),
            Fault::MoveSlot { .. } => "live move of a hash slot".into(),
            Fault::Pair(..) => "two faults close together".into(),
        }
    }

    /// A fault drawn from `rng`: servers most often, the engine and moves less. With two engines,
    /// one fault in four is dealt to an engine node (a draw of its own first, so that one engine's
    /// schedules stay what they were for a seed).
    pub fn draw(rng: &mut impl Rng, items: &[u64], pairs: bool, engines: u32) -> Fault {
        if engines > 1 && rng.random_range(0..4) == 0 {
            return match rng.random_range(0..3) {
                0 => Fault::FreezeEngine {
                    secs: rng.random_range(1..9),
                },
                1 => Fault::CrashSecondEngine,
                _ => Fault::FreezeSecondEngine {
                    secs: rng.random_range(1..9),
                },
            };
        }
        let group = rng.random_range(0..2);
        let item = items[rng.random_range(0..items.len())];
        let n: u32 = rng.random_range(0..100);
        match n {
            0..=19 => Fault::Kill {
                group,
                master: true,
            },
            20..=31 => Fault::Kill {
                group,
                master: false,
            },
            32..=43 => Fault::Freeze {
                group,
                master: true,
                secs: rng.random_range(1..6),
            },
            44..=51 => Fault::Freeze {
                group,
                master: false,
                secs: rng.random_range(1..6),
            },
            52..=61 => Fault::CrashEngine,
            62..=69 => Fault::RestartCluster,
            70..=79 => Fault::MoveItem { item },
            80..=85 => Fault::MoveSlot { item },
            _ if pairs => Fault::Pair(
                Box::new(Fault::draw(rng, items, false, engines)),
                Box::new(Fault::draw(rng, items, false, engines)),
                rng.random_range(0..1000),
            ),
            _ => Fault::Kill {
                group,
                master: true,
            },
        }
    }
}

/// Deal `fault`; a description of what was hit, or why it could not be dealt.
pub async fn deal(
    fault: &Fault,
    dev: &mut Dev,
    second: &mut Option<Serve>,
    admin: &Admin,
) -> Result<String, String> {
    match fault {
        Fault::Kill { group, master } | Fault::Freeze { group, master, .. } => {
            let servers = dev.servers()?;
            let s = admin
                .member(&servers, *group, *master)
                .await
                .ok_or_else(|| format!("group g{group} has no master the engine knows of now"))?;
            if let Fault::Freeze { secs, .. } = fault {
                s.freeze().map_err(|e| e.to_string())?;
                let (thawed, secs) = (s.clone(), *secs);
                // Thawed later, unless the healer killed it first (then nothing is stopped).
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(secs)).await;
                    let _ = thawed.thaw();
                });
                Ok(format!("{} for {secs} s", s.name))
            } else {
                s.kill9().map_err(|e| e.to_string())?;
                Ok(s.name.clone())
            }
        }
        Fault::CrashEngine => {
            dev.crash();
            dev.start()?;
            Ok("seckill dev".into())
        }
        Fault::RestartCluster => {
            dev.interrupt()?;
            dev.start()?;
            Ok("seckill dev and its servers".into())
        }
        Fault::FreezeEngine { secs } => {
            let pid = dev.pid().ok_or("seckill dev is not running")?;
            freeze_process(pid, *secs)?;
            Ok(format!("the engine of seckill dev for {secs} s"))
        }
        Fault::CrashSecondEngine => {
            let s = second.as_mut().ok_or("no second engine")?;
            s.crash();
            s.start(&admin.http).await?;
            Ok("seckill serve".into())
        }
        Fault::FreezeSecondEngine { secs } => {
            let pid = second
                .as_ref()
                .and_then(Serve::pid)
                .ok_or("no second engine running")?;
            freeze_process(pid, *secs)?;
            Ok(format!("seckill serve for {secs} s"))
        }
        Fault::MoveItem { item } | Fault::MoveSlot { item } => {
            let route = admin.get(&format!("/v1/admin/route/items/{item}")).await?;
            let from = route["group"].as_str().unwrap_or("g0");
            let to = if from == "g0" { "g1" } else { "g0" };
            let body = match fault {
                Fault::MoveSlot { .. } => {
                    json!({"kind": "items", "slot": route["slot"], "to": to, "complete": true})
                }
                _ => json!({"kind": "items", "key": item, "to": to, "complete": true}),
            };
            let (status, answer) = admin.post("/v1/admin/moves", body.clone()).await?;
            // An item moved by key routes apart from its slot, so the slot may already live on
            // the group the item's route pointed away from: then the slot moves the other way.
            let slot_already_there = matches!(fault, Fault::MoveSlot { .. })
                && status == 422
                && answer["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains("already lives on group"));
            let (from, to, status, answer) = if slot_already_there {
                let mut body = body;
                body["to"] = json!(from);
                let (status, answer) = admin.post("/v1/admin/moves", body).await?;
                (to, from, status, answer)
            } else {
                (from, to, status, answer)
            };
            if status != 202 {
                return Err(format!("move refused ({status}): {}", answer["code"]));
            }
            Ok(format!(
                "item {item} (slot {}) {from} -> {to}, move {}",
                route["slot"], answer["move_id"]
            ))
        }
        Fault::Pair(a, b, gap_ms) => {
            let first = Box::pin(deal(a, dev, second, admin)).await;
            tokio::time::sleep(Duration::from_millis(*gap_ms)).await;
            let then = Box::pin(deal(b, dev, second, admin)).await;
            if let (Err(e), Err(f)) = (&first, &then) {
                return Err(format!("{e}; {f}"));
            }
            Ok(format!(
                "{} ({}), {gap_ms} ms later {} ({})",
                a.kind(),
                outcome(first),
                b.kind(),
                outcome(then)
            ))
        }
    }
}

fn outcome(r: Result<String, String>) -> String {
    r.unwrap_or_else(|e| format!("not dealt: {e}"))
}

/// The secret `seckill dev` keeps in its folder.
pub fn secret(dir: &Path, name: &str) -> Result<String, String> {
    std::fs::read_to_string(dir.join("secrets").join(name))
        .map(|s| s.trim().to_string())
        .map_err(|e| format!("{}/secrets/{name}: {e}", dir.display()))
}
