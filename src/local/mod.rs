//! Local PostgreSQL shard groups from the machine's own binaries: the dev cluster of `seckill dev`
//! and the servers the test harness starts.
//!
//! Each group is a master and a shadow made with `pg_basebackup -R` (a streaming replica whose
//! `application_name` is `shadow`), with synchronous replication switched on by the engine once
//! the shadow streams. Servers use password authentication (SCRAM) on 127.0.0.1 only, with two
//! roles: `seckill_admin` (superuser: migrations, promotion, fencing, replication) and `seckill`
//! (the engine's application role, given DML on the tables by the migrations). PostgreSQL refuses
//! to run as root, so when we are root every server command runs as the `postgres` user
//! (`runuser -u postgres --`) and each server's own folder is handed to that user — never the
//! cluster folder above it, nor anything outside it.
//!
//! A cluster folder carries a marker file; a folder that exists without it is refused, so a typo
//! in `--dir` can never chown or delete an unrelated tree. Secrets (database passwords, the
//! engine's tokens and keys) live in `secrets/` inside it, each file readable by its owner only.
//!
//! Binaries are found in `$SECKILL_PG_BIN`, else the newest `/usr/lib/postgresql/*/bin`, else
//! `pg_config --bindir`, else `PATH`.

mod ports;
mod recover;
pub mod rejoin;
mod server;
mod signals;

pub use recover::Start;
pub use server::{LocalServer, PgBin, ServerTuning};

use crate::config::Secret;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The superuser of local servers.
pub const ADMIN_ROLE: &str = "seckill_admin";
/// The engine's application role on local servers.
pub(crate) const APP_ROLE: &str = "seckill";
/// Marks a folder as a seckill cluster folder.
const MARKER: &str = ".seckill-cluster";
/// The `application_name` shadows of local groups stream with (`failover.shadow_name`'s default).
pub(crate) const SHADOW_NAME: &str = "shadow";

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
    #[error("{0}")]
    Refused(String),
}

pub(crate) fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Make `path` (and what is under it) belong to the `postgres` user when we are root.
pub(crate) fn hand_to_postgres(path: &Path) -> Result<(), LocalError> {
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

pub(crate) fn run(what: &str, cmd: &mut Command) -> Result<Output, LocalError> {
    run_with_input(what, cmd, None)
}

/// Run a command, feeding `input` to its standard input (SQL that may hold a password goes this
/// way, never on a command line, where any user's `ps` shows it).
pub(crate) fn run_with_input(
    what: &str,
    cmd: &mut Command,
    input: Option<&str>,
) -> Result<Output, LocalError> {
    use std::io::Write;
    let failed = |e: std::io::Error| LocalError::Command {
        what: what.to_string(),
        detail: e.to_string(),
    };
    let mut child = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(failed)?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(text.as_bytes()).map_err(failed)?;
    }
    let out = child.wait_with_output().map_err(failed)?;
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

/// A fresh random secret: 32 hex digits (128 bits).
pub(crate) fn random_secret() -> Secret {
    Secret::new(uuid::Uuid::new_v4().simple().to_string())
}

/// Write a small file and fsync it and its folder: a marker that must outlive a crash.
pub(crate) fn write_durably(path: &Path, text: &str) -> Result<(), LocalError> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    sync_folder_of(path)
}

/// Remove a file written by [`write_durably`], durably.
pub(crate) fn remove_durably(path: &Path) -> Result<(), LocalError> {
    std::fs::remove_file(path)?;
    sync_folder_of(path)
}

fn sync_folder_of(path: &Path) -> Result<(), LocalError> {
    if let Some(parent) = path.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

/// Write a file only its owner can read.
pub fn write_private(path: &Path, text: &str) -> Result<(), LocalError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
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
    /// Password of the application role.
    app_password: Secret,
}

impl LocalCluster {
    /// The cluster under `root` with `groups` groups on ports `base_port..` (two per group):
    /// creates the folder (with its marker and database passwords) when it does not exist, and
    /// refuses a folder that exists but is not a seckill cluster folder.
    pub fn open(root: &Path, base_port: u16, groups: usize) -> Result<Self, LocalError> {
        let bin = PgBin::locate()?;
        let marker = root.join(MARKER);
        if root.exists() && !marker.exists() {
            let empty = std::fs::read_dir(root)?.next().is_none();
            if !empty {
                return Err(LocalError::Refused(format!(
                    "{} exists and is not a seckill cluster folder (no {MARKER} file); refusing to \
                     touch it. Choose another --dir, or remove it if it is an old dev cluster \
                     (those used trust authentication and must be made anew)",
                    root.display()
                )));
            }
        }
        std::fs::create_dir_all(root.join("secrets"))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(root.join("secrets"), std::fs::Permissions::from_mode(0o700))?;
        }
        if !marker.exists() {
            std::fs::write(&marker, "seckill cluster folder\n")?;
        }
        let mut cluster = Self {
            root: root.to_path_buf(),
            groups: Vec::new(),
            app_password: Secret::new(""),
        };
        cluster.app_password = cluster.secret("db-app-password")?;
        let admin = cluster.secret("db-admin-password")?;
        cluster.groups = (0..groups)
            .map(|i| {
                let name = format!("g{i}");
                let port = base_port + 2 * i as u16;
                let server = |suffix: &str, port| {
                    LocalServer::new(&bin, root, &format!("{name}-{suffix}"), port, admin.clone())
                };
                LocalGroup {
                    master: server("a", port),
                    shadow: server("b", port + 1),
                    name,
                }
            })
            .collect();
        Ok(cluster)
    }

    /// A secret kept in the cluster folder (`secrets/<name>`, mode 0600), made on first use.
    pub(crate) fn secret(&self, name: &str) -> Result<Secret, LocalError> {
        let path = self.root.join("secrets").join(name);
        if let Ok(text) = std::fs::read_to_string(&path) {
            if !text.trim().is_empty() {
                return Ok(Secret::new(text.trim()));
            }
        }
        let s = random_secret();
        write_private(&path, s.expose())?;
        Ok(s)
    }

    /// Create what is missing and start everything; reuses existing data directories. On failure
    /// it stops what it started, so the next attempt starts clean.
    pub fn ensure_running(&self, tuning: &ServerTuning) -> Result<(), LocalError> {
        let mut started: Vec<&LocalServer> = Vec::new();
        let result = self.start_groups(tuning, &mut started);
        if result.is_err() {
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
        for g in &self.groups {
            // Written before a group's master is made, removed once it has its roles and
            // database: a group still marked was never whole, the engine never started on it, and
            // nothing was sold on it. It is made anew.
            let creating = self.root.join(format!("{}.creating", g.name));
            let has_data = |s: &LocalServer| s.exists() || s.rejoin_cut_short();
            if creating.exists() {
                tracing::warn!(group = %g.name, "the group's creation was cut short: it is made anew");
                for s in [&g.master, &g.shadow] {
                    s.discard()?;
                }
            } else if has_data(&g.master) || has_data(&g.shadow) {
                // Whatever happened before: one master, its shadow following it (recover.rs).
                started.extend([&g.master, &g.shadow]);
                g.recover(SHADOW_NAME)?;
                continue;
            }
            for s in [&g.master, &g.shadow] {
                ports::check_port_free(s.port, &s.name)?;
            }
            write_durably(&creating, "this group is being created\n")?;
            g.master.init_master(tuning)?;
            g.master.start()?;
            started.push(&g.master);
            g.master.psql(
                "postgres",
                &format!(
                    "CREATE ROLE {APP_ROLE} LOGIN PASSWORD '{}'",
                    self.app_password.expose()
                ),
            )?;
            g.master.psql(
                "postgres",
                &format!("CREATE DATABASE seckill OWNER {ADMIN_ROLE}"),
            )?;
            remove_durably(&creating)?;
            // Made as a rejoin is (marked until it is a standby's): a start cut short during the
            // base backup rebuilds it at the next.
            started.push(&g.shadow);
            g.shadow
                .rejoin("127.0.0.1", g.master.port, SHADOW_NAME, true)?;
        }
        Ok(())
    }

    /// The healer's hands on every server, `[group][member]` in the order of
    /// [`Self::shards_toml`] (master, then shadow).
    pub fn servers(&self) -> crate::shard::heal::Servers {
        self.groups
            .iter()
            .map(|g| {
                vec![
                    std::sync::Arc::new(g.master.clone())
                        as std::sync::Arc<dyn crate::shard::heal::ServerControl>,
                    std::sync::Arc::new(g.shadow.clone()),
                ]
            })
            .collect()
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

    /// The application role's DSN of a server of this cluster.
    pub fn dsn(&self, server: &LocalServer) -> String {
        format!(
            "host=127.0.0.1 port={} user={APP_ROLE} password={} dbname=seckill",
            server.port,
            self.app_password.expose()
        )
    }

    /// The superuser's DSN of a server of this cluster.
    pub fn admin_dsn(&self, server: &LocalServer) -> String {
        server.admin_dsn()
    }

    /// A shards.toml for this cluster: groups with application and admin DSNs, and the given
    /// `[server]`, `[auth]` and `[payments]` secrets.
    pub fn shards_toml(&self, listen: &str, secrets: &EngineSecrets) -> String {
        let mut t = format!(
            "# Generated by seckill for the local cluster under {}.\n# It holds secrets: keep it private (mode 0600).\n\n\
             [server]\nlisten = \"{listen}\"\nadmin_token = \"{}\"\n\n\
             [auth]\nusers = \"jwt\"\nhs256_secret = \"{}\"\n\n\
             [payments]\nsecret = \"{}\"\n\n\
             [frontdoor]\ntoken_keys = [{}]\n",
            self.root.display(),
            secrets.admin_token.expose(),
            secrets.user_token_secret.expose(),
            secrets.payment_secret.expose(),
            secrets
                .token_key
                .expose()
                .split(',')
                .map(|k| format!("\"{}\"", k.trim()))
                .collect::<Vec<_>>()
                .join(", "),
        );
        for g in &self.groups {
            t.push_str(&format!(
                "\n[[groups]]\nname = \"{}\"\nmaster = \"{}\"\nshadow = \"{}\"\n\
                 master_admin = \"{}\"\nshadow_admin = \"{}\"\npool_size = 16\n",
                g.name,
                self.dsn(&g.master),
                self.dsn(&g.shadow),
                g.master.admin_dsn(),
                g.shadow.admin_dsn(),
            ));
        }
        t
    }
}

/// The engine's own secrets, as `seckill dev` and the tests hand them to it.
#[derive(Debug, Clone)]
pub struct EngineSecrets {
    pub admin_token: Secret,
    pub user_token_secret: Secret,
    pub payment_secret: Secret,
    /// The order-token key (several, newest first, separated by commas).
    pub token_key: Secret,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_that_is_not_a_cluster_folder_is_refused() {
        if PgBin::locate().is_err() {
            return;
        }
        let dir = std::env::temp_dir().join(format!("seckill-notours-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("precious.txt"), "keep me").unwrap();
        let e = LocalCluster::open(&dir, 40000, 1).unwrap_err().to_string();
        assert!(e.contains("not a seckill cluster folder"), "{e}");
        assert_eq!(
            std::fs::read_to_string(dir.join("precious.txt")).unwrap(),
            "keep me"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn secrets_are_private_files_made_once() {
        if PgBin::locate().is_err() {
            return;
        }
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("seckill-secrets-{}", std::process::id()));
        let c = LocalCluster::open(&dir, 40000, 1).unwrap();
        let a = c.secret("x").unwrap();
        assert_eq!(c.secret("x").unwrap(), a, "made once, then read");
        let mode = std::fs::metadata(dir.join("secrets/x"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
