//! One local PostgreSQL server: create (initdb or a base backup), start, stop, rejoin; its
//! processes and signals are in [`super::signals`].

use super::{
    hand_to_postgres, remove_durably, run, run_with_input, running_as_root, write_durably,
    write_private, LocalError, ADMIN_ROLE,
};
use crate::config::Secret;
use crate::shard::heal::Rejoined;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

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

/// One local server.
#[derive(Debug, Clone)]
pub struct LocalServer {
    pub name: String,
    pub data_dir: PathBuf,
    pub(crate) socket_dir: PathBuf,
    pub(crate) log_file: PathBuf,
    pub port: u16,
    bin: PgBin,
    /// The superuser's name and password, for the commands run against the server.
    admin_user: String,
    admin_password: Secret,
    /// The folder holding the data directory is ours (a cluster folder's server folder) and may
    /// be handed to the `postgres` user; for a data directory given from outside it is not.
    pub(super) owns_folder: bool,
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
    /// A server of a cluster folder: `root/<name>/{data,run,server.log}`.
    pub fn new(bin: &PgBin, root: &Path, name: &str, port: u16, admin_password: Secret) -> Self {
        Self {
            name: name.to_string(),
            data_dir: root.join(name).join("data"),
            socket_dir: root.join(name).join("run"),
            log_file: root.join(name).join("server.log"),
            port,
            bin: bin.clone(),
            admin_user: ADMIN_ROLE.to_string(),
            admin_password,
            owns_folder: true,
        }
    }

    /// A server whose data directory is given directly (an old master to rejoin). Nothing
    /// around the data directory is touched: its socket and log go to a fresh folder of their own
    /// (a random name, created when the server starts) under the system's temporary directory.
    pub fn at(
        bin: &PgBin,
        data_dir: &Path,
        port: u16,
        admin_user: &str,
        admin_password: Secret,
    ) -> Self {
        let scratch = std::env::temp_dir().join(format!(
            "seckill-rejoin-{port}-{}",
            uuid::Uuid::new_v4().simple()
        ));
        Self {
            name: data_dir.display().to_string(),
            data_dir: data_dir.to_path_buf(),
            socket_dir: scratch.join("run"),
            log_file: scratch.join("server.log"),
            port,
            bin: bin.clone(),
            admin_user: admin_user.to_string(),
            admin_password,
            owns_folder: false,
        }
    }

    pub(super) fn cmd(&self, program: &str) -> Command {
        let path = self.bin.dir.join(program);
        let mut c = if running_as_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        };
        // libpq tools read it; never on a command line, where `ps` would show it.
        c.env("PGPASSWORD", self.admin_password.expose());
        c
    }

    /// The superuser's DSN of this server.
    pub fn admin_dsn(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user={} password={} dbname=seckill",
            self.port,
            self.admin_user,
            self.admin_password.expose()
        )
    }

    pub fn exists(&self) -> bool {
        self.data_dir.join("PG_VERSION").exists()
    }

    fn prepare_dirs(&self) -> Result<(), LocalError> {
        self.prepare_scratch()?;
        std::fs::create_dir_all(&self.socket_dir)?;
        hand_to_postgres(&self.socket_dir)?;
        if self.owns_folder {
            let base = self.data_dir.parent().unwrap_or(&self.data_dir);
            std::fs::create_dir_all(base)?;
            hand_to_postgres(base)?;
        }
        Ok(())
    }

    /// initdb a new master: password authentication (SCRAM) only, the superuser
    /// [`ADMIN_ROLE`] with the cluster's admin password.
    ///
    /// `wal_init_zero = off`: while `wal_keep_size` holds every segment of a young cluster,
    /// nothing is recycled and each new 16 MB WAL segment was zero-filled inside the commit that
    /// needed it (the p99 of accepted hot orders was 110-127 ms with zeroing, 34-44 ms without, on
    /// one cluster switched back and forth). The segment is still created at its full size and
    /// every commit is still fsynced here and on the shadow: durability does not change.
    pub(crate) fn init_master(&self, tuning: &ServerTuning) -> Result<(), LocalError> {
        self.prepare_dirs()?;
        let base = self.data_dir.parent().unwrap_or(&self.data_dir);
        let pwfile = base.join(".initdb-password");
        write_private(&pwfile, self.admin_password.expose())?;
        hand_to_postgres(&pwfile)?;
        let made = run(
            &format!("initdb of {}", self.name),
            self.cmd("initdb")
                .arg("-D")
                .arg(&self.data_dir)
                .args(["-U", &self.admin_user])
                .arg(format!("--pwfile={}", pwfile.display()))
                .args([
                    "--auth-local=scram-sha-256",
                    "--auth-host=scram-sha-256",
                    "--no-locale",
                    "-E",
                    "UTF8",
                ])
                // Tests run without fsync; a dev cluster's catalogs are on disk before it serves.
                .args((!tuning.fsync).then_some("--no-sync")),
        );
        let _ = std::fs::remove_file(&pwfile);
        made?;
        let conf = format!(
            "\n# seckill local cluster\nlisten_addresses = '127.0.0.1'\nmax_connections = {}\nshared_buffers = {}\n\
             password_encryption = 'scram-sha-256'\n\
             wal_level = replica\nmax_wal_senders = 10\nmax_replication_slots = 10\nwal_keep_size = '512MB'\n\
             hot_standby = on\nwal_log_hints = on\nfsync = {}\nfull_page_writes = on\nwal_init_zero = off\n\
             wal_sender_timeout = '3000ms'\nwal_receiver_timeout = '1500ms'\nwal_retrieve_retry_interval = '1s'\n\
             log_min_messages = warning\nlog_line_prefix = '%m [%p] '\n\
             # A setting per server, appended again at each start (below): base backups and rewinds copy this file.\n",
            tuning.max_connections,
            tuning.shared_buffers,
            if tuning.fsync { "on" } else { "off" },
        );
        append(&self.data_dir.join("postgresql.conf"), &conf)?;
        Ok(())
    }

    /// Make this server a streaming replica of the master at `host:port` (same superuser
    /// credentials).
    pub(crate) fn init_shadow_of_addr(&self, host: &str, port: u16) -> Result<(), LocalError> {
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
                .args(["-U", &self.admin_user, "-X", "stream", "-R", "-c", "fast"]),
        )?;
        self.follow(host, port, "shadow")
    }

    /// Point this (standby) server at the master at `host:port`, connecting as
    /// `application_name` (what `synchronous_standby_names` names). Any earlier
    /// `primary_conninfo` (its own, or the one a rewind copied from its source) is replaced.
    pub(crate) fn follow(
        &self,
        host: &str,
        port: u16,
        application_name: &str,
    ) -> Result<(), LocalError> {
        let password = self.admin_password.expose();
        if password.contains(['\'', '\\', ' ']) {
            return Err(LocalError::Refused(
                "a password with quotes, backslashes or spaces cannot be written into \
                 primary_conninfo here; set the standby up by hand (see README)"
                    .into(),
            ));
        }
        let auto = self.data_dir.join("postgresql.auto.conf");
        let kept: String = std::fs::read_to_string(&auto)
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.trim_start().starts_with("primary_conninfo"))
            .map(|l| format!("{l}\n"))
            .collect();
        let conninfo = format!(
            "primary_conninfo = 'host={host} port={port} user={} password={password} \
             application_name={application_name} connect_timeout=2 keepalives_idle=1 \
             keepalives_interval=1 keepalives_count=3'\n",
            self.admin_user
        );
        write_private(&auto, &(kept + &conninfo))?;
        std::fs::write(self.data_dir.join("standby.signal"), b"")?;
        hand_to_postgres(&self.data_dir)
    }

    /// The postmaster's pid from its lock file, if the file exists.
    pub(super) fn postmaster_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.data_dir.join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// For a server given from outside: its own fresh scratch folder (socket, log), private to
    /// the `postgres` user; refused if the name exists already.
    fn prepare_scratch(&self) -> Result<(), LocalError> {
        if self.owns_folder {
            return Ok(());
        }
        let Some(scratch) = self.socket_dir.parent() else {
            return Ok(());
        };
        if !scratch.exists() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new().mode(0o700).create(scratch)?;
            hand_to_postgres(scratch)?;
        }
        Ok(())
    }

    pub fn start(&self) -> Result<(), LocalError> {
        if self.is_running() {
            return Ok(());
        }
        self.prepare_scratch()?;
        self.kill_leftovers();
        self.own_settings()?;
        self.clear_stale_lock()?;
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

    /// Remove the lock files a crashed (not running) server left. PostgreSQL, and pg_rewind's
    /// single-user recovery, would refuse to start while a zombie holds the pid they name.
    pub(super) fn clear_stale_lock(&self) -> Result<(), LocalError> {
        if self.is_running() || self.postmaster_pid().is_none() {
            return Ok(());
        }
        std::fs::remove_file(self.data_dir.join("postmaster.pid"))?;
        let socket_lock = self.socket_dir.join(format!(".s.PGSQL.{}.lock", self.port));
        if socket_lock.exists() {
            std::fs::remove_file(socket_lock)?;
        }
        Ok(())
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
    pub(crate) fn stop(&self, mode: &str) -> Result<(), LocalError> {
        self.stop_within(mode, 60)
    }

    /// Run SQL through psql as the superuser, returning its unaligned output.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, LocalError> {
        self.psql_at("127.0.0.1", self.port, db, sql)
    }

    /// Run SQL through psql as this server's superuser on the server at `host:port` (the master
    /// it follows: same credentials).
    fn psql_at(&self, host: &str, port: u16, db: &str, sql: &str) -> Result<String, LocalError> {
        // The SQL goes in on stdin: it may hold a password.
        let out = run_with_input(
            &format!("psql on {host}:{port}"),
            self.cmd("psql")
                .args(["-h", host, "-p", &port.to_string()])
                .args(["-U", &self.admin_user])
                .args(["-d", db, "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1"]),
            Some(sql),
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// What `pg_controldata` says of the data directory: its system identifier (which cluster
    /// lineage it belongs to) and the timeline of its latest checkpoint.
    pub(crate) fn control_data(&self) -> Result<(String, i64), LocalError> {
        let out = run(
            &format!("pg_controldata of {}", self.name),
            self.cmd("pg_controldata").arg("-D").arg(&self.data_dir),
        )?;
        let text = String::from_utf8_lossy(&out.stdout);
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .ok_or_else(|| LocalError::Command {
                    what: "pg_controldata".into(),
                    detail: format!("no `{name}` in its output"),
                })
        };
        let id = field("Database system identifier:")?;
        let timeline = field("Latest checkpoint's TimeLineID:")?
            .parse()
            .map_err(|_| LocalError::Command {
                what: "pg_controldata".into(),
                detail: "an unreadable timeline".into(),
            })?;
        Ok((id, timeline))
    }

    /// Turn this server into a streaming standby of the master at `host:port`, whatever it was:
    /// an old master (rewound with `pg_rewind`), a standby that crashed (recovers as the standby
    /// it is), a standby on another history (rewound), or nothing usable (`rebuild`, a missing
    /// data directory, or a rewind that failed: a fresh base backup, the old data directory kept
    /// aside). The caller has made sure `host:port` is the group's master and this server is not.
    pub fn rejoin(
        &self,
        host: &str,
        port: u16,
        application_name: &str,
        rebuild: bool,
    ) -> Result<Rejoined, LocalError> {
        self.halt()?;
        // A rejoin cut short (the engine killed while pg_rewind or pg_basebackup ran, or before
        // the standby's settings were written) left a data directory that is neither the old
        // master nor a shadow: a fresh base backup is the one sure way on.
        let cut_short = self.rejoin_cut_short();
        if cut_short {
            self.kill_tools_on_data_dir();
            tracing::warn!(server = %self.name,
                "an earlier rejoin of this server was cut short: taking a fresh base backup");
        }
        self.mark_rejoining(host, port)?;
        if rebuild || cut_short || !self.exists() {
            return self.rebuild(host, port, application_name);
        }
        let disk = self.disk_facts()?;
        if disk.standby && !disk.clean {
            // pg_rewind would run it through crash recovery in single-user mode, which refuses a
            // standby: it recovers as the standby it is. If its history has left the master's it
            // will not stream, and the next heal rewinds it, shut down cleanly by then.
            self.become_shadow(host, port, application_name)?;
            return Ok(Rejoined::Restarted);
        }
        match self.rewind(host, port) {
            Ok(out) => {
                self.become_shadow(host, port, application_name)?;
                let text = String::from_utf8_lossy(&out.stdout).to_string()
                    + &String::from_utf8_lossy(&out.stderr);
                Ok(if text.contains("no rewind required") {
                    Rejoined::Restarted
                } else {
                    Rejoined::Rewound
                })
            }
            Err(e) => {
                tracing::warn!(server = %self.name, error = %e,
                    "pg_rewind failed; taking a fresh base backup (the old data directory is kept aside)");
                self.rebuild(host, port, application_name)
            }
        }
    }

    /// `pg_rewind` of this (stopped) server's data directory onto the master at `host:port`:
    /// on success it holds the master's history, "in archive recovery" with a `backup_label`,
    /// and is nobody's standby until [`Self::follow`] says whose.
    pub fn rewind(&self, host: &str, port: u16) -> Result<std::process::Output, LocalError> {
        // A freshly promoted master's control file still names its old timeline until its first
        // checkpoint: pg_rewind would compare timelines, find them equal and rewind nothing.
        self.psql_at(host, port, "postgres", "CHECKPOINT")?;
        run(
            &format!("pg_rewind of {}", self.name),
            self.cmd("pg_rewind")
                .arg("--target-pgdata")
                .arg(&self.data_dir)
                .arg(format!(
                    "--source-server=host={host} port={port} user={} dbname=postgres connect_timeout=5",
                    self.admin_user
                )),
        )
    }

    /// Written before a rejoin touches the data directory, removed once the directory is a
    /// standby's (`standby.signal` and `primary_conninfo` written): while it exists, the data
    /// directory is a shadow in the making, never a candidate master, whatever its control file
    /// says. Beside the data directory, not in it: pg_rewind removes files its source lacks, and
    /// a rebuild moves the directory aside.
    fn rejoin_marker(&self) -> PathBuf {
        let name = self
            .data_dir
            .file_name()
            .map_or("data".into(), |n| n.to_string_lossy().to_string());
        self.data_dir.with_file_name(format!("{name}.rejoining"))
    }

    /// An earlier rejoin of this server was cut short: its data directory (or what is left of
    /// it) holds nothing the group needs, the other member being the master it was to follow.
    pub(crate) fn rejoin_cut_short(&self) -> bool {
        self.rejoin_marker().exists()
    }

    fn mark_rejoining(&self, host: &str, port: u16) -> Result<(), LocalError> {
        // A shadow made for the first time has no folder yet.
        self.prepare_dirs()?;
        let marker = self.rejoin_marker();
        let text = format!(
            "{} is being made the shadow of the master at {host}:{port} (since {}, by process {}).\n\
             While this file exists, the next start takes a fresh base backup of the master for it \
             and keeps the old data directory aside.\n",
            self.data_dir.display(),
            chrono::Utc::now().to_rfc3339(),
            std::process::id()
        );
        write_durably(&marker, &text).map_err(|e| LocalError::Command {
            what: format!("writing the rejoin marker {}", marker.display()),
            detail: e.to_string(),
        })
    }

    /// The data directory is now a standby's: the marker goes, then the server starts.
    fn become_shadow(
        &self,
        host: &str,
        port: u16,
        application_name: &str,
    ) -> Result<(), LocalError> {
        self.follow(host, port, application_name)?;
        remove_durably(&self.rejoin_marker())?;
        self.start()
    }

    /// The data directory of a server whose creation was cut short (nothing was ever sold on
    /// it), removed with whatever still runs on it, and its rejoin marker.
    pub(crate) fn discard(&self) -> Result<(), LocalError> {
        self.halt()?;
        self.kill_tools_on_data_dir();
        if self.data_dir.exists() {
            std::fs::remove_dir_all(&self.data_dir)?;
        }
        let marker = self.rejoin_marker();
        if marker.exists() {
            std::fs::remove_file(&marker)?;
        }
        Ok(())
    }

    /// A fresh base backup of the master at `host:port`, started as its standby. The data
    /// directory it replaces is moved aside, never deleted; only the newest such copy is kept.
    fn rebuild(
        &self,
        host: &str,
        port: u16,
        application_name: &str,
    ) -> Result<Rejoined, LocalError> {
        if self.data_dir.exists() {
            let name = self
                .data_dir
                .file_name()
                .map_or("data".into(), |n| n.to_string_lossy().to_string());
            let prefix = format!("{name}.replaced-");
            if let Some(parent) = self.data_dir.parent().filter(|_| self.owns_folder) {
                for old in std::fs::read_dir(parent)?.flatten() {
                    if old.file_name().to_string_lossy().starts_with(&prefix) {
                        let _ = std::fs::remove_dir_all(old.path());
                    }
                }
            }
            let aside = self.data_dir.with_file_name(format!(
                "{prefix}{}",
                chrono::Utc::now().format("%Y%m%dT%H%M%S%3f")
            ));
            std::fs::rename(&self.data_dir, &aside)?;
            tracing::warn!(server = %self.name, aside = %aside.display(), "old data directory kept aside");
        }
        self.init_shadow_of_addr(host, port)?;
        self.become_shadow(host, port, application_name)?;
        Ok(Rejoined::Rebuilt)
    }

    /// This server's own settings, last in postgresql.conf (base backups and rewinds bring the
    /// source's file along).
    fn own_settings(&self) -> Result<(), LocalError> {
        let Some(tag) = self.title_tag() else {
            return Ok(());
        };
        let conf = self.data_dir.join("postgresql.conf");
        let Ok(text) = std::fs::read_to_string(&conf) else {
            return Ok(());
        };
        let line = format!("cluster_name = '{tag}'");
        let last = text
            .lines()
            .rfind(|l| l.trim_start().starts_with("cluster_name"));
        if last != Some(line.as_str()) {
            append(&conf, &format!("{line}\n"))?;
        }
        Ok(())
    }

    /// What the data directory says of itself, without starting the server.
    pub(crate) fn disk_facts(&self) -> Result<DiskFacts, LocalError> {
        let out = run(
            &format!("pg_controldata of {}", self.name),
            self.cmd("pg_controldata").arg("-D").arg(&self.data_dir),
        )?;
        let text = String::from_utf8_lossy(&out.stdout);
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        let state = field("Database cluster state:");
        let checkpoint_tli: i64 = field("Latest checkpoint's TimeLineID:")
            .parse()
            .unwrap_or(0);
        // A promotion writes its history file at once, its first checkpoint only later.
        let history_tli = std::fs::read_dir(self.data_dir.join("pg_wal"))
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| {
                        let name = e.file_name().to_string_lossy().to_string();
                        let tli = name.strip_suffix(".history")?;
                        i64::from_str_radix(tli, 16).ok()
                    })
                    .max()
                    .unwrap_or(0)
            })
            .unwrap_or(0);
        let standby_signal = self.data_dir.join("standby.signal").exists();
        Ok(DiskFacts {
            standby: standby_signal,
            clean: state == "shut down" || state == "shut down in recovery",
            timeline: checkpoint_tli.max(history_tli).max(1),
            lsn: lsn_value(&field("Latest checkpoint location:"))
                .max(lsn_value(&field("Minimum recovery ending location:"))),
        })
    }
}

/// What a data directory says of itself ([`LocalServer::disk_facts`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DiskFacts {
    /// It is set up as a standby (`standby.signal`).
    pub standby: bool,
    /// Shut down cleanly (not crashed, not running).
    pub clean: bool,
    /// The newest timeline it knows (its history files, its last checkpoint).
    pub timeline: i64,
    /// How far its WAL is known to go (its last checkpoint, or the end of its recovery).
    pub(crate) lsn: u64,
}

/// `X/Y` as PostgreSQL prints a WAL position, as a number (0 when unreadable).
fn lsn_value(text: &str) -> u64 {
    text.split_once('/')
        .and_then(|(hi, lo)| {
            Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
        })
        .unwrap_or(0)
}

fn append(path: &Path, text: &str) -> Result<(), LocalError> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(path)?;
    f.write_all(text.as_bytes())?;
    Ok(())
}
