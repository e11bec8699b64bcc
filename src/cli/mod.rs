//! The `seckill` command line: `dev`, `serve`, `token`, `migrate`, `check-config`, `shard-map`,
//! `reconcile`, `group`.

mod dev;
pub mod group;
mod sale;
mod shard_map;

pub(crate) use shard_map::ShardMapAction;

use crate::app::Application;
use crate::config::Config;
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "seckill",
    version,
    about = "Flash-sale order engine on sharded PostgreSQL"
)]
pub struct Cli {
    /// Log lines as text, or as one JSON object per line (for log shippers). `RUST_LOG` filters.
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the whole system on this machine: local shard groups (master + streaming shadow each,
    /// two by default), migrations, a demo sale, and the HTTP server. Ctrl-C stops everything.
    Dev {
        /// Folder for the servers' data (reused on the next start).
        #[arg(long, default_value = ".seckill-dev")]
        dir: PathBuf,
        /// First of the PostgreSQL ports (two per group: master, shadow). The default range lies
        /// below Linux's ephemeral ports (32768-60999), which outgoing connections borrow.
        #[arg(long, default_value_t = 25432)]
        base_port: u16,
        /// Number of shard groups.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=16))]
        groups: u16,
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// Serve one transaction per request instead of coalescing (for comparison).
        #[arg(long)]
        no_coalesce: bool,
        /// Record this configuration's routing layout as the cluster's even though it routes
        /// existing keys to other groups (after moving their data): see docs/dba.md "Changing the layout".
        #[arg(long)]
        accept_layout_change: bool,
    },
    /// Serve the API for the cluster described by a shards.toml.
    Serve {
        #[arg(long, default_value = "shards.toml")]
        config: PathBuf,
        /// Listen here instead of `server.listen`.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// One transaction per request instead of coalescing (`coalesce.enabled = false`).
        #[arg(long)]
        no_coalesce: bool,
        /// Record this configuration's routing layout as the cluster's even though it routes
        /// existing keys to other groups (after moving their data): see docs/dba.md "Changing the layout".
        #[arg(long)]
        accept_layout_change: bool,
    },
    /// Mint a user token (HS256, signed with `auth.hs256_secret` or SECKILL_USER_TOKEN_SECRET) and
    /// print it: for the dev cluster, tests and the bench.
    Token {
        /// The configuration holding the secret (default: the dev cluster's).
        #[arg(long, default_value = ".seckill-dev/shards.toml")]
        config: PathBuf,
        /// The user id (the token's `sub`).
        #[arg(long)]
        user: u64,
        /// How long the token is valid, in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl_secs: u64,
    },
    /// Sign a payment callback's body (read from stdin) as the payment service does, and print the
    /// `Seckill-Signature` header value (with `payments.secret` or SECKILL_PAYMENT_SECRET): to try
    /// the payment path by hand without putting the secret on a command line.
    SignPayment {
        #[arg(long, default_value = ".seckill-dev/shards.toml")]
        config: PathBuf,
    },
    /// Print the OpenAPI 3.1 document of the API (the repository's openapi.json is this).
    Openapi,
    /// Apply migrations to every group's master and exit.
    Migrate {
        #[arg(long, default_value = "shards.toml")]
        config: PathBuf,
        /// Adopt groups whose schema was applied by hand (the retired schema/seckill.sql): record
        /// migrations 1..=N as applied without running them, then stop. Run `seckill migrate`
        /// afterwards for the rest. N is the newest migration that file held (its header says).
        #[arg(long, value_name = "N")]
        baseline: Option<u32>,
    },
    /// Check a shards.toml and print the resolved routing summary.
    CheckConfig {
        #[arg(long, default_value = "shards.toml")]
        config: PathBuf,
    },
    /// List or change the router-config table (`shard_map`) on the config group.
    ShardMap {
        #[arg(long, default_value = "shards.toml")]
        config: PathBuf,
        #[command(subcommand)]
        action: ShardMapAction,
    },
    /// List or change the blocklist (users and IPs refused at the front door on every node).
    Blocklist {
        #[arg(long, default_value = "shards.toml")]
        config: PathBuf,
        #[command(subcommand)]
        action: BlocklistAction,
    },
    /// Match reservations against orders, repair mismatches, check conservation.
    /// Exits 1 when an item breaks conservation or a group could not be checked.
    Reconcile {
        #[arg(long, default_value = "shards.toml")]
        config: PathBuf,
        /// Only reservations older than this many seconds are considered abandoned.
        #[arg(long)]
        grace_secs: Option<u32>,
        /// Instead: compare the payment provider's settlement file (CSV:
        /// payment_ref,order_id,amount_cents) with the recorded payments; exit 1 on any mismatch.
        #[arg(long, conflicts_with = "grace_secs")]
        payments: Option<PathBuf>,
    },
    /// Change a running sale: pause, resume, end or extend it, restock an item; list sales.
    /// Every node sees a change at once; each is recorded in the sale's audit.
    Sale {
        #[arg(long, default_value = "shards.toml")]
        config: PathBuf,
        #[command(subcommand)]
        action: sale::SaleAction,
    },
    /// Shard group administration.
    Group {
        #[arg(long, default_value = "shards.toml")]
        config: PathBuf,
        #[command(subcommand)]
        action: GroupAction,
    },
}

#[derive(Debug, Subcommand)]
pub enum BlocklistAction {
    /// Print the entries in force.
    List,
    /// Block a user id, or an IP address or CIDR.
    Add {
        /// `user` or `ip`.
        kind: String,
        value: String,
        #[arg(long, default_value = "")]
        reason: String,
        /// The entry expires after this many seconds (default: never).
        #[arg(long)]
        ttl_secs: Option<u32>,
    },
    /// Remove an entry by its id.
    Remove { id: u64 },
}

#[derive(Debug, Subcommand)]
pub enum GroupAction {
    /// Every member's role, timeline, health and replication lag.
    Status,
    /// Planned, lossless role swap: fence the master, let the shadow catch up, promote it.
    Switchover { group: String },
    /// Make a fenced old master the shadow of the current master (pg_rewind, or a fresh base
    /// backup). Runs on the old master's machine: give its data directory.
    Rejoin {
        group: String,
        /// Data directory of the old master.
        #[arg(long)]
        data_dir: PathBuf,
        /// Its port (default: from its DSN).
        #[arg(long)]
        port: Option<u16>,
    },
}

pub fn init_tracing(format: LogFormat) {
    crate::telemetry::init_tracing(format == LogFormat::Json);
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {msg}");
    ExitCode::FAILURE
}

pub async fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Dev {
            dir,
            base_port,
            groups,
            listen,
            no_coalesce,
            accept_layout_change,
        } => {
            let options = dev::DevOptions {
                no_coalesce,
                accept_layout_change,
            };
            dev::dev(&dir, base_port, groups.into(), &listen, options).await
        }
        Command::Serve {
            config,
            listen,
            no_coalesce,
            accept_layout_change,
        } => serve(&config, listen, no_coalesce, accept_layout_change).await,
        Command::Token {
            config,
            user,
            ttl_secs,
        } => token(&config, user, ttl_secs),
        Command::SignPayment { config } => sign_payment(&config),
        Command::Openapi => openapi(),
        Command::Migrate { config, baseline } => migrate(&config, baseline).await,
        Command::CheckConfig { config } => check_config(&config),
        Command::ShardMap { config, action } => shard_map::run(&config, action).await,
        Command::Blocklist { config, action } => blocklist(&config, action).await,
        Command::Reconcile {
            config,
            payments: Some(file),
            ..
        } => return settle(&config, &file).await,
        Command::Reconcile {
            config, grace_secs, ..
        } => return reconcile(&config, grace_secs).await,
        Command::Group { config, action } => group::run(&config, action).await,
        Command::Sale { config, action } => sale::run(&config, action).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

pub(crate) type CliResult = Result<(), Box<dyn std::error::Error>>;

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

pub(crate) async fn serve_until_signal(app: Application) -> CliResult {
    let token = app.shutdown_token();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        token.cancel();
    });
    app.run().await?;
    Ok(())
}

async fn serve(
    path: &Path,
    listen: Option<std::net::SocketAddr>,
    no_coalesce: bool,
    accept_layout_change: bool,
) -> CliResult {
    let mut config = Config::load(path)?;
    config.server.accept_layout_change = accept_layout_change;
    if let Some(addr) = listen {
        config.server.listen = addr;
    }
    if no_coalesce {
        config.coalesce.enabled = false;
    }
    let app = Application::build(config).await?;
    tracing::info!(addr = %app.local_addr(), "seckill serving");
    serve_until_signal(app).await
}

fn token(path: &Path, user: u64, ttl_secs: u64) -> CliResult {
    let config = Config::load(path)?;
    let secret = config.auth.hs256_secret.as_ref().ok_or(
        "no HS256 secret to sign with: set auth.hs256_secret or SECKILL_USER_TOKEN_SECRET",
    )?;
    crate::domain::UserId::parse(user.into())?;
    println!("{}", crate::auth::users::mint(secret, user, ttl_secs)?);
    Ok(())
}

fn sign_payment(path: &Path) -> CliResult {
    use std::io::Read;
    let config = Config::load(path)?;
    let secret = config
        .payments
        .secret
        .as_ref()
        .ok_or("no payment secret: set payments.secret or SECKILL_PAYMENT_SECRET")?;
    let mut body = Vec::new();
    std::io::stdin().read_to_end(&mut body)?;
    let t = chrono::Utc::now().timestamp();
    println!("{}", crate::auth::signature::sign(secret, t, &body));
    Ok(())
}

fn openapi() -> CliResult {
    println!("{}", serde_json::to_string_pretty(&crate::api::openapi())?);
    Ok(())
}

async fn migrate(path: &Path, baseline: Option<u32>) -> CliResult {
    let config = Config::load(path)?;
    let cluster = crate::shard::Cluster::new(&config)?;
    cluster.discover().await;
    if let Some(upto) = baseline {
        for (group, n) in crate::migrate::baseline(&cluster, upto).await? {
            println!("{group}: {n} migration(s) recorded as applied");
        }
        return Ok(());
    }
    for (group, n) in crate::migrate::run(&cluster).await? {
        println!("{group}: {n} migration(s) applied");
    }
    Ok(())
}

fn check_config(path: &Path) -> CliResult {
    let config = Config::load(path)?;
    println!(
        "ok: {} group(s), {} slots, items by {:?}, users by {:?}, config group {}",
        config.groups.len(),
        config.routing.slots,
        config.routing.items.strategy,
        config.routing.users.strategy,
        config.config_group()
    );
    Ok(())
}

async fn config_group_client(
    config: &Config,
) -> Result<deadpool_postgres::Object, Box<dyn std::error::Error>> {
    let cluster = crate::shard::Cluster::new(config)?;
    let (idx, _) = cluster
        .by_name(config.config_group())
        .ok_or("config group missing")?;
    cluster.discover().await;
    Ok(cluster.group(idx).writer().await?)
}

async fn blocklist(path: &Path, action: BlocklistAction) -> CliResult {
    use crate::frontdoor::blocklist::{self, Kind, NewEntry};
    let config = Config::load(path)?;
    let client = config_group_client(&config).await?;
    match action {
        BlocklistAction::List => {
            let entries = blocklist::list(&client).await?;
            println!(
                "{:>20} {:<5} {:<24} {:<26} reason",
                "id", "kind", "value", "expires_at"
            );
            for e in entries {
                println!(
                    "{:>20} {:<5} {:<24} {:<26} {}",
                    e.id,
                    e.kind.as_str(),
                    e.value,
                    e.expires_at.map_or("never".into(), |t| t.to_rfc3339()),
                    e.reason
                );
            }
        }
        BlocklistAction::Add {
            kind,
            value,
            reason,
            ttl_secs,
        } => {
            let kind = match kind.as_str() {
                "user" => Kind::User,
                "ip" => Kind::Ip,
                other => return Err(format!("kind must be `user` or `ip`, got {other:?}").into()),
            };
            let new = NewEntry {
                kind,
                value: serde_json::Value::String(value),
                reason,
                ttl_secs,
            };
            let value = new
                .canonical()
                .map_err(|(field, why)| format!("{field}: {why}"))?;
            let e = blocklist::add(&client, kind, &value, &new.reason, ttl_secs).await?;
            println!(
                "blocked {} {} (id {}); every engine node refuses it within frontdoor.blocklist_refresh_ms",
                e.kind.as_str(),
                e.value,
                e.id
            );
        }
        BlocklistAction::Remove { id } => {
            if !blocklist::remove(&client, id).await? {
                return Err(format!("no blocklist entry {id}").into());
            }
            println!("entry {id} removed");
        }
    }
    Ok(())
}

/// `seckill reconcile --payments FILE` ([`crate::settlement`]).
async fn settle(path: &Path, file: &Path) -> ExitCode {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => return fail(format!("{}: {e}", file.display())),
    };
    let settled = match crate::settlement::parse(&text) {
        Ok(s) => s,
        Err(e) => return fail(format!("{}: {e}", file.display())),
    };
    let mut config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    config.server.migrate_on_start = false;
    config.server.start_wait_ms = 0;
    let tasks = tokio_util::task::TaskTracker::new();
    let state = match crate::state::AppState::connect(config, &tasks).await {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let recorded = match crate::settlement::recorded(&state.orders).await {
        Ok(r) => r,
        Err(e) => return fail(format!("cannot read the recorded payments: {e}")),
    };
    let mismatches = crate::settlement::compare(&settled, &recorded);
    let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
    for m in &mismatches {
        *counts.entry(m.kind).or_default() += 1;
        println!(
            "{:<17} {:<24} order {} settled {} recorded {}: {}",
            m.kind,
            m.payment_ref,
            m.order_id,
            m.settled_cents.map_or("-".into(), |c| c.to_string()),
            m.recorded_cents.map_or("-".into(), |c| c.to_string()),
            m.detail
        );
    }
    println!(
        "{} settled, {} recorded, {} mismatch(es) {:?}",
        settled.len(),
        recorded.len(),
        mismatches.len(),
        counts
    );
    if mismatches.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn reconcile(path: &Path, grace_secs: Option<u32>) -> ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let grace_secs = grace_secs.unwrap_or(config.orders.reconcile_grace_secs);
    // A purchase may be between its two transactions for up to a request's budget: a shorter
    // grace would tombstone purchases still in flight (their buyers would get 201 for an order
    // whose stock was just released). The same floor as `orders.reconcile_grace_secs`.
    let floor_ms = 2 * config.server.request_timeout_ms;
    if u64::from(grace_secs) * 1000 < floor_ms {
        return fail(format!(
            "--grace-secs {grace_secs}: must be at least {} (twice server.request_timeout_ms): \
             a shorter grace would release the stock of purchases still in flight",
            floor_ms.div_ceil(1000)
        ));
    }
    let grace = std::time::Duration::from_secs(grace_secs.into());
    let mut config = config;
    config.server.migrate_on_start = false;
    config.server.start_wait_ms = 0;
    let tasks = tokio_util::task::TaskTracker::new();
    let state = match crate::state::AppState::connect(config, &tasks).await {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let report = crate::reconcile::reconcile(&state.orders, grace).await;
    println!(
        "{}",
        serde_json::to_string_pretty(&report).unwrap_or_default()
    );
    if report.violations.is_empty() && report.unreachable_groups.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
