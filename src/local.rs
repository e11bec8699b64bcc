//! Local PostgreSQL shard groups from the machine's own binaries: the dev cluster of `seckill dev`
//! and the servers the test harness starts.
//!
//! Each group is a master and a shadow made with `pg_basebackup -R` (a streaming replica whose
//! `application_name` is `shadow`), with synchronous replication switched on once the shadow
//! streams. PostgreSQL refuses to run as root, so when we are root every server command runs as the
//! `postgres` user (`runuser -u postgres --`) and the cluster folder is handed to that user. Each
//! server gets a socket directory of its own under the cluster folder and listens on 127.0.0.1.
//!
//! Binaries are found in `$SECKILL_PG_BIN`, else the newest `/usr/lib/postgresql/*/bin`, else
//! `pg_config --bindir`, else `PATH`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("PostgreSQL server binaries not found (looked in $SECKILL_PG_BIN, /usr/lib/postgresql/*/bin, pg_config, PATH); install them with `scripts/install-postgres.sh`")]
    NoBinaries,
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("port {port} (for server {server}) is already in use by {holder}; pick other ports with --base-port")]
    PortInUse {
        port: u16,
        server: String,
        holder: String,
    },
    #[error("server on port {port} did not become ready within {secs} s; see {log}")]
    NotReady { port: u16, secs: u64, log: String },
}

/// Where the PostgreSQL binaries are.
#[derive(Debug, Clone)]
pub struct PgBin {
    pub dir: PathBuf,
}

impl PgBin {
    pub fn locate() -> Result<Self, LocalError> {
        if let Ok(dir) = std::env::var("SECKILL_PG_BIN") {
            let dir = PathBuf::from(dir);
            if dir.join("initdb").exists() {
                return Ok(Self { dir });
            }
        }
        if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
            let mut versions: Vec<(u32, PathBuf)> = entries
                .flatten()
                .filter_map(|e| {
                    let v: u32 = e.file_name().to_str()?.parse().ok()?;
                    let bin = e.path().join("bin");
                    bin.join("initdb").exists().then_some((v, bin))
                })
                .collect();
            versions.sort();
            if let Some((_, dir)) = versions.pop() {
                return Ok(Self { dir });
            }
        }
        if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if dir.join("initdb").exists() {
                return Ok(Self { dir });
            }
        }
        if let Some(path) = std::env::var_os("PATH") {
            for dir in std::env::split_paths(&path) {
                if dir.join("initdb").exists() && dir.join("pg_ctl").exists() {
                    return Ok(Self { dir });
                }
            }
        }
        Err(LocalError::NoBinaries)
    }
}

pub fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Make `path` (and what is under it) belong to the `postgres` user when we are root.
pub fn hand_to_postgres(path: &Path) -> Result<(), LocalError> {
    if running_as_root() {
        run(
            "chown",
            Command::new("chown")
                .arg("-R")
                .arg("postgres:postgres")
                .arg(path),
        )?;
    }
    Ok(())
}

fn run(what: &str, cmd: &mut Command) -> Result<Output, LocalError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| LocalError::Command {
            what: what.to_string(),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(LocalError::Command {
            what: what.to_string(),
            detail: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            ),
        });
    }
    Ok(out)
}

/// One local server.
#[derive(Debug, Clone)]
pub struct LocalServer {
    pub name: String,
    pub data_dir: PathBuf,
    pub socket_dir: PathBuf,
    pub log_file: PathBuf,
    pub port: u16,
    bin: PgBin,
}

/// Settings written into every server's postgresql.conf.
#[derive(Debug, Clone)]
pub struct ServerTuning {
    /// Durability of the WAL on disk; tests switch it off for speed (they do not test OS crashes).
    pub fsync: bool,
    pub shared_buffers: &'static str,
    pub max_connections: u32,
}

impl Default for ServerTuning {
    fn default() -> Self {
        Self {
            fsync: true,
            shared_buffers: "128MB",
            max_connections: 300,
        }
    }
}

impl LocalServer {
    pub fn new(bin: &PgBin, root: &Path, name: &str, port: u16) -> Self {
        Self {
            name: name.to_string(),
            data_dir: root.join(name).join("data"),
            socket_dir: root.join(name).join("run"),
            log_file: root.join(name).join("server.log"),
            port,
            bin: bin.clone(),
        }
    }

    /// A server whose data directory is given directly (e.g. an old master to rejoin).
    pub fn at(bin: &PgBin, data_dir: &Path, port: u16) -> Self {
        let base = data_dir.parent().unwrap_or(data_dir);
        Self {
            name: data_dir.display().to_string(),
            data_dir: data_dir.to_path_buf(),
            socket_dir: base.join("run"),
            log_file: base.join("server.log"),
            port,
            bin: bin.clone(),
        }
    }

    fn cmd(&self, program: &str) -> Command {
        let path = self.bin.dir.join(program);
        if running_as_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    pub fn dsn(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=seckill dbname=seckill",
            self.port
        )
    }

    pub fn exists(&self) -> bool {
        self.data_dir.join("PG_VERSION").exists()
    }

    fn prepare_dirs(&self) -> Result<(), LocalError> {
        let base = self.data_dir.parent().unwrap_or(&self.data_dir);
        std::fs::create_dir_all(&self.socket_dir)?;
        std::fs::create_dir_all(base)?;
        hand_to_postgres(base)
    }

    /// initdb a new master.
    pub fn init_master(&self, tuning: &ServerTuning) -> Result<(), LocalError> {
        self.prepare_dirs()?;
        run(
            &format!("initdb of {}", self.name),
            self.cmd("initdb").arg("-D").arg(&self.data_dir).args([
                "-U",
                "seckill",
                "--auth=trust",
                "--no-locale",
                "-E",
                "UTF8",
                "--no-sync",
            ]),
        )?;
        let conf = format!(
            "\n# seckill local cluster\nlisten_addresses = '127.0.0.1'\nmax_connections = {}\nshared_buffers = {}\n\
             wal_level = replica\nmax_wal_senders = 10\nmax_replication_slots = 10\nwal_keep_size = '512MB'\n\
             hot_standby = on\nwal_log_hints = on\nfsync = {}\nfull_page_writes = {}\n\
             wal_sender_timeout = '3000ms'\nwal_receiver_timeout = '1500ms'\nwal_retrieve_retry_interval = '1s'\n\
             log_min_messages = warning\nlog_line_prefix = '%m [%p] '\n",
            tuning.max_connections,
            tuning.shared_buffers,
            if tuning.fsync { "on" } else { "off" },
            if tuning.fsync { "on" } else { "off" },
        );
        append(&self.data_dir.join("postgresql.conf"), &conf)?;
        Ok(())
    }

    /// Make this server a streaming replica of `master` (which must be running).
    pub fn init_shadow_of(&self, master: &LocalServer) -> Result<(), LocalError> {
        self.init_shadow_of_addr("127.0.0.1", master.port)
    }

    /// Make this server a streaming replica of the master at `host:port`.
    pub fn init_shadow_of_addr(&self, host: &str, port: u16) -> Result<(), LocalError> {
        self.prepare_dirs()?;
        if self.data_dir.exists() {
            std::fs::remove_dir_all(&self.data_dir)?;
        }
        run(
            &format!("pg_basebackup for {}", self.name),
            self.cmd("pg_basebackup")
                .arg("-D")
                .arg(&self.data_dir)
                .args(["-h", host, "-p", &port.to_string()])
                .args(["-U", "seckill", "-X", "stream", "-R", "-c", "fast"]),
        )?;
        self.follow(host, port)
    }

    /// Point this (standby) server at the master at `host:port`.
    pub fn follow(&self, host: &str, port: u16) -> Result<(), LocalError> {
        append(
            &self.data_dir.join("postgresql.auto.conf"),
            &format!(
                "primary_conninfo = 'host={host} port={port} user=seckill application_name=shadow \
                 connect_timeout=2 keepalives_idle=1 keepalives_interval=1 keepalives_count=3'\n"
            ),
        )?;
        std::fs::write(self.data_dir.join("standby.signal"), b"")?;
        hand_to_postgres(&self.data_dir)
    }

    /// The postmaster's pid from its lock file, if the file exists.
    fn postmaster_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.data_dir.join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// True while the postmaster lives. A killed postmaster whose parent does not reap it stays
    /// a zombie: `kill(pid, 0)` (and so `pg_ctl status`) still finds it, so /proc decides.
    pub fn is_running(&self) -> bool {
        self.postmaster_pid().is_some_and(process_alive)
    }

    pub fn start(&self) -> Result<(), LocalError> {
        if self.is_running() {
            return Ok(());
        }
        if self.postmaster_pid().is_some() {
            // Left by a crash; PostgreSQL would refuse to start while a zombie holds the pid
            // named in its lock files.
            std::fs::remove_file(self.data_dir.join("postmaster.pid"))?;
            let socket_lock = self.socket_dir.join(format!(".s.PGSQL.{}.lock", self.port));
            if socket_lock.exists() {
                std::fs::remove_file(socket_lock)?;
            }
        }
        std::fs::create_dir_all(&self.socket_dir)?;
        hand_to_postgres(&self.socket_dir)?;
        if running_as_root() && !self.log_file.exists() {
            std::fs::write(&self.log_file, b"")?;
            hand_to_postgres(&self.log_file)?;
        }
        let opts = format!("-p {} -k {}", self.port, self.socket_dir.display());
        run(
            &format!("starting {}", self.name),
            self.cmd("pg_ctl")
                .arg("start")
                .arg("-D")
                .arg(&self.data_dir)
                .arg("-l")
                .arg(&self.log_file)
                .args(["-w", "-t", "60", "-o", &opts]),
        )?;
        self.wait_ready(Duration::from_secs(60))
    }

    fn wait_ready(&self, limit: Duration) -> Result<(), LocalError> {
        let start = Instant::now();
        while start.elapsed() < limit {
            let ok = self
                .cmd("pg_isready")
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-q"])
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(LocalError::NotReady {
            port: self.port,
            secs: limit.as_secs(),
            log: self.log_file.display().to_string(),
        })
    }

    /// Stop: `fast` rolls back sessions and shuts down cleanly; `immediate` is a crash-like stop.
    pub fn stop(&self, mode: &str) -> Result<(), LocalError> {
        if !self.is_running() {
            return Ok(());
        }
        run(
            &format!("stopping {}", self.name),
            self.cmd("pg_ctl")
                .arg("stop")
                .arg("-D")
                .arg(&self.data_dir)
                .args(["-m", mode, "-w", "-t", "60"]),
        )?;
        Ok(())
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
    fn processes(&self) -> Result<Vec<i32>, LocalError> {
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

    fn signal_all(&self, signal: i32) -> Result<(), LocalError> {
        for pid in self.processes()? {
            // SAFETY: plain kill(2) of the server's own processes.
            unsafe { libc::kill(pid, signal) };
        }
        Ok(())
    }

    /// SIGSTOP every process of the server: it stops answering while its sockets stay open, as a
    /// frozen host or a network partition looks from outside.
    pub fn freeze(&self) -> Result<(), LocalError> {
        self.signal_all(libc::SIGSTOP)
    }

    /// SIGCONT every process of a frozen server.
    pub fn thaw(&self) -> Result<(), LocalError> {
        self.signal_all(libc::SIGCONT)
    }

    /// Run SQL through psql as the `seckill` superuser, returning its unaligned output.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, LocalError> {
        let out = run(
            &format!("psql on {}", self.name),
            self.cmd("psql")
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "seckill",
                ])
                .args([
                    "-d",
                    db,
                    "-X",
                    "-q",
                    "-t",
                    "-A",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-c",
                    sql,
                ]),
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Turn an old master into a standby of the master at `host:port` with pg_rewind (falling back
    /// to a fresh base backup when rewinding is impossible).
    pub fn rejoin(&self, host: &str, port: u16) -> Result<(), LocalError> {
        self.stop("fast").or_else(|_| self.stop("immediate"))?;
        let rewind = run(
            &format!("pg_rewind of {}", self.name),
            self.cmd("pg_rewind")
                .arg("--target-pgdata")
                .arg(&self.data_dir)
                .arg(format!(
                    "--source-server=host={host} port={port} user=seckill dbname=postgres"
                )),
        );
        match rewind {
            Ok(_) => self.follow(host, port)?,
            Err(e) => {
                tracing::warn!(server = %self.name, error = %e, "pg_rewind failed; taking a fresh base backup");
                self.init_shadow_of_addr(host, port)?;
            }
        }
        self.start()
    }
}

/// Whether `pid` is a live process (not a zombie).
fn process_alive(pid: i32) -> bool {
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

fn append(path: &Path, text: &str) -> Result<(), LocalError> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(path)?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// A master and a shadow.
#[derive(Debug, Clone)]
pub struct LocalGroup {
    pub name: String,
    pub master: LocalServer,
    pub shadow: LocalServer,
}

/// Several local groups under one folder.
#[derive(Debug, Clone)]
pub struct LocalCluster {
    pub root: PathBuf,
    pub groups: Vec<LocalGroup>,
}

impl LocalCluster {
    /// Describe `groups` groups under `root` on ports `base_port..` (two per group).
    pub fn layout(root: &Path, base_port: u16, groups: usize) -> Result<Self, LocalError> {
        let bin = PgBin::locate()?;
        let groups = (0..groups)
            .map(|i| {
                let name = format!("g{i}");
                let port = base_port + 2 * i as u16;
                LocalGroup {
                    master: LocalServer::new(&bin, root, &format!("{name}-a"), port),
                    shadow: LocalServer::new(&bin, root, &format!("{name}-b"), port + 1),
                    name,
                }
            })
            .collect();
        Ok(Self {
            root: root.to_path_buf(),
            groups,
        })
    }

    /// Create what is missing and start everything; reuses existing data directories.
    pub fn ensure_running(&self, tuning: &ServerTuning) -> Result<(), LocalError> {
        std::fs::create_dir_all(&self.root)?;
        hand_to_postgres(&self.root)?;
        let mut started: Vec<&LocalServer> = Vec::new();
        let result = self.start_groups(tuning, &mut started);
        if result.is_err() {
            // Leave nothing half-started behind: the next attempt would trip over it.
            for s in started.iter().rev() {
                if let Err(e) = s.stop("fast").or_else(|_| s.stop("immediate")) {
                    tracing::warn!(server = %s.name, error = %e, "stop failed");
                }
            }
        }
        result
    }

    fn start_groups<'a>(
        &'a self,
        tuning: &ServerTuning,
        started: &mut Vec<&'a LocalServer>,
    ) -> Result<(), LocalError> {
        let mut start = |s: &'a LocalServer| -> Result<(), LocalError> {
            if s.is_running() {
                return Ok(());
            }
            check_port_free(s.port, &s.name)?;
            s.start()?;
            started.push(s);
            Ok(())
        };
        for g in &self.groups {
            let fresh = !g.master.exists() && !g.shadow.exists();
            if fresh {
                g.master.init_master(tuning)?;
            }
            // After a failover the "b" server may be the master; start whatever exists.
            for s in [&g.master, &g.shadow] {
                if s.exists() {
                    start(s)?;
                }
            }
            if fresh {
                g.master.psql("postgres", "CREATE DATABASE seckill")?;
            }
            if !g.shadow.exists() {
                g.shadow.init_shadow_of(&g.master)?;
                start(&g.shadow)?;
            }
        }
        Ok(())
    }

    pub fn stop_all(&self, mode: &str) {
        for g in &self.groups {
            for s in [&g.shadow, &g.master] {
                // A frozen server (SIGSTOP) would never act on the stop signal.
                if s.is_running() {
                    let _ = s.thaw();
                }
                if let Err(e) = s.stop(mode) {
                    tracing::warn!(server = %s.name, error = %e, "stop failed");
                }
            }
        }
    }

    /// A shards.toml for this cluster.
    pub fn shards_toml(&self, listen: &str, admin_token: &str) -> String {
        let mut t = format!(
            "# Generated by seckill for the local cluster under {}.\n\n[server]\nlisten = \"{listen}\"\nadmin_token = \"{admin_token}\"\n",
            self.root.display()
        );
        for g in &self.groups {
            t.push_str(&format!(
                "\n[[groups]]\nname = \"{}\"\nmaster = \"{}\"\nshadow = \"{}\"\npool_size = 16\n",
                g.name,
                g.master.dsn(),
                g.shadow.dsn()
            ));
        }
        t
    }
}

/// Refuse, with the port and its holder named, a port another process holds.
fn check_port_free(port: u16, server: &str) -> Result<(), LocalError> {
    if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
        return Ok(());
    }
    Err(LocalError::PortInUse {
        port,
        server: server.to_string(),
        holder: port_holder(port),
    })
}

/// Who holds a local TCP port, as far as /proc tells: a listening process, or an outgoing
/// connection (the port lies in the kernel's ephemeral range).
fn port_holder(port: u16) -> String {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = f
                .get(1)
                .and_then(|a| a.rsplit_once(':'))
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) {
                // State 0A is LISTEN.
                inodes.push((f.get(3) == Some(&"0A"), f.get(9).unwrap_or(&"").to_string()));
            }
        }
    }
    let Some((listening, inode)) = inodes.into_iter().max_by_key(|(l, _)| *l) else {
        return "unknown".into();
    };
    let target = format!("socket:[{inode}]");
    let owner = std::fs::read_dir("/proc").ok().and_then(|procs| {
        procs.flatten().find_map(|p| {
            let fds = std::fs::read_dir(p.path().join("fd")).ok()?;
            let holds = fds.flatten().any(|fd| {
                std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy() == target)
            });
            holds.then(|| {
                let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
                format!("{} (pid {})", comm.trim(), p.file_name().to_string_lossy())
            })
        })
    });
    match (listening, owner) {
        (true, Some(o)) => format!("{o}, listening"),
        (true, None) => "a listening socket of another user".into(),
        (false, Some(o)) => format!("an outgoing connection of {o}"),
        (false, None) => "an outgoing connection (the port is in the ephemeral range)".into(),
    }
}

/// A free TCP port on 127.0.0.1 (best effort: another process may take it before we bind).
pub fn free_port() -> Result<u16, LocalError> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_taken_port_is_refused_with_its_holder_named() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let e = super::check_port_free(port, "g0-a")
            .unwrap_err()
            .to_string();
        assert!(e.contains(&port.to_string()) && e.contains("g0-a"), "{e}");
        assert!(e.contains("listening"), "the holder is named: {e}");
        drop(listener);
        assert!(super::check_port_free(port, "g0-a").is_ok());
    }
}
