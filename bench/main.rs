//! seckill-bench: the load bench for testers.
//!
//! It creates its own sale through the API, drives N concurrent virtual users over keep-alive HTTP
//! connections, reports attempts/s, successful orders/s, HDR latency percentiles and the breakdown by
//! status/code, then verifies the outcome through the API (and directly in the shards when given
//! DSNs): no oversell, sold == stock when demand exceeds stock, nobody above the per-user limit,
//! every acknowledged order present. `--against URL` runs the same scenario against a second engine
//! and prints the ratio; `--baseline` measures the engine's `GET /v1/time` and a bare axum
//! server's GET and JSON POST answered 409 (bench/bare.rs) at the same concurrency, in server CPU
//! per answer; `--kill-master GROUP@SECONDS` SIGKILLs a local master mid-run (`--freeze-master`
//! SIGSTOPs it) and reports the outage; `--request-ids` sends a request_id with every purchase.

mod bare;
mod bots;
mod chaos;
mod conn;
mod cpu;
mod fair;
mod nemesis;
mod pageflood;
mod run;
mod sale;
mod verify;

use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;
use std::path::PathBuf;

/// mimalloc instead of the system allocator, as in the engine: the load generator shares the CPUs
/// with what it measures.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Clone, Copy, ValueEnum, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// One item, demand far above stock (every attempt a new buyer).
    Hot,
    /// Many items across the groups.
    Spread,
    /// Sell one item out, then a storm of buyers after the sell-out.
    Soldout,
    /// Hot item, spread items and sale reads together.
    Mixed,
    /// A protected item: honest buyers (challenge, token, order URL) with and without bots that
    /// skip the challenge, forge or replay tokens, flood, or are blocked (see bench/bots.rs).
    Bots,
    /// A sale with a fair start: a crowd in waves across its window and bots at its first
    /// millisecond (`--honest`, `--bots`, `--window-ms`, `--stock`); how the winners spread over
    /// arrival, the engine's memory while holding the waiting requests, the draw verified.
    Fair,
    /// A started protected sale: 50 buyers asking for order tokens every 300 ms, alone and then
    /// under a flood of `GET /v1/sales/{id}` over `--concurrency` connections (see
    /// bench/pageflood.rs); passes when the order tokens do not suffer.
    #[value(name = "page-flood")]
    PageFlood,
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "seckill-bench",
    about = "Load bench for the seckill engine",
    args_conflicts_with_subcommands = true
)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Scenario to run.
    #[arg(long, value_enum, default_value = "hot")]
    pub scenario: Scenario,
    /// Engine base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// A second engine: run the same scenario against it too and print the ratio (first / second
    /// is reported as "A vs B").
    #[arg(long)]
    pub against: Option<String>,
    /// Concurrent virtual users (one keep-alive connection each).
    #[arg(long, short = 'c', default_value_t = 256)]
    pub concurrency: usize,
    /// Longest run time in seconds (a hot run also ends when the stock is sold out).
    #[arg(long, short = 'd', default_value_t = 15.0)]
    pub duration: f64,
    /// Stock of the hot item (hot, mixed), or of each item (spread).
    #[arg(long, default_value_t = 20_000)]
    pub stock: i64,
    /// Items in the spread and mixed scenarios.
    #[arg(long, default_value_t = 64)]
    pub items: usize,
    /// Per-user limit of every item.
    #[arg(long, default_value_t = 1)]
    pub limit: i64,
    /// Potential buyers per unit of stock (demand = this x stock).
    #[arg(long, default_value_t = 100)]
    pub demand: u64,
    /// Also measure the engine's GET /v1/time and a bare axum server's GET and POST answered 409
    /// (started by the bench) at the same concurrency: server CPU per answer, and the ratios.
    #[arg(long)]
    pub baseline: bool,
    /// Admin token (default: $SECKILL_ADMIN_TOKEN, else the dev cluster's).
    #[arg(long)]
    pub token: Option<String>,
    /// HS256 secret the bench mints its buyers' tokens with (default: $SECKILL_USER_TOKEN_SECRET,
    /// else the dev cluster's).
    #[arg(long)]
    pub user_secret: Option<String>,
    /// DSNs of group masters to verify directly in the shards (repeatable); a DSN without a
    /// password takes PGPASSWORD.
    #[arg(long)]
    pub dsn: Vec<String>,
    /// Read back every acknowledged order through the API after the run.
    #[arg(long)]
    pub verify_orders: bool,
    /// SIGKILL the master of GROUP after SECONDS (local dev cluster), e.g. g0@5.
    #[arg(long, conflicts_with_all = ["freeze_master", "kill_shadow"])]
    pub kill_master: Option<String>,
    /// SIGSTOP every process of the master of GROUP after SECONDS (local dev cluster), e.g. g0@5:
    /// a master that stops answering with its sockets open. It is continued after the run (unless
    /// `seckill dev`'s healer killed it first).
    #[arg(long, conflicts_with = "kill_shadow")]
    pub freeze_master: Option<String>,
    /// SIGKILL the shadow of GROUP after SECONDS (local dev cluster), e.g. g0@5: under
    /// `shadow_loss = "block"` the group acknowledges nothing until a shadow streams again.
    #[arg(long)]
    pub kill_shadow: Option<String>,
    /// Move the hot item to GROUP after SECONDS, live (`POST /v1/admin/moves`), e.g. g1@5 or
    /// next@5 (the group after the item's own); the
    /// report gives the write outage buyers saw and the write pause the engine measured.
    #[arg(long, conflicts_with_all = ["kill_master", "freeze_master", "kill_shadow"])]
    pub move_to: Option<String>,
    /// Bot connections of the `bots` scenario (beside --concurrency honest ones).
    #[arg(long, default_value_t = 16)]
    pub bots: usize,
    /// Honest buyers of the `fair` scenario, in ten waves across the window.
    #[arg(long, default_value_t = 2000)]
    pub honest: usize,
    /// The fair window of the `fair` scenario, in ms.
    #[arg(long, default_value_t = 3000)]
    pub window_ms: u64,
    /// Send a request_id with every purchase (as the README recommends clients do).
    #[arg(long)]
    pub request_ids: bool,
    /// The local cluster folder (for --kill-master).
    #[arg(long, default_value = ".seckill-dev")]
    pub cluster_dir: PathBuf,
    /// Write the report(s) as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Faults dealt at random (seeded) to a `seckill dev` of its own under a steady workload, then
    /// a checker that reads the whole history back (bench/nemesis/).
    Nemesis(nemesis::NemesisArgs),
    /// The bare axum server `--baseline` measures against (bench/bare.rs); started by the bench
    /// itself as a child process.
    #[command(hide = true)]
    BareServer {
        #[arg(long)]
        listen: String,
    },
}

/// A secret: the option, else the environment variable, else the dev cluster's file.
fn secret(given: &Option<String>, env: &str, args: &Args, file: &str) -> Result<String, String> {
    if let Some(t) = given {
        return Ok(t.clone());
    }
    if let Ok(t) = std::env::var(env) {
        if !t.is_empty() {
            return Ok(t);
        }
    }
    let path = args.cluster_dir.join("secrets").join(file);
    std::fs::read_to_string(&path)
        .map(|t| t.trim().to_string())
        .map_err(|_| {
            format!(
                "no {file}: pass it as an option, set {env}, or run `seckill dev` (reads {})",
                path.display()
            )
        })
}

fn token(args: &Args) -> Result<String, String> {
    secret(&args.token, "SECKILL_ADMIN_TOKEN", args, "admin-token")
}

/// What the bench signs with: the admin token, and the buyers' token secret.
pub struct Keys {
    pub admin: String,
    pub users: Minter,
}

/// Mints the buyers' tokens.
#[derive(Clone)]
pub struct Minter(seckill::config::Secret);

impl Minter {
    pub fn token(&self, user: u64) -> String {
        seckill::auth::users::mint(&self.0, user, 3600).unwrap_or_default()
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match real_main(args).await {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("verification FAILED");
            std::process::ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

// Long on purpose: the dispatch of every bench subcommand, one short arm each.
async fn real_main(args: Args) -> Result<bool, String> {
    match args.command {
        Some(Command::Nemesis(n)) => return nemesis::run(n).await,
        Some(Command::BareServer { listen }) => return bare::serve(&listen).await.map(|()| true),
        None => {}
    }
    let keys = Keys {
        admin: token(&args)?,
        users: Minter(seckill::config::Secret::new(secret(
            &args.user_secret,
            "SECKILL_USER_TOKEN_SECRET",
            &args,
            "user-token-secret",
        )?)),
    };
    if args.scenario == Scenario::Fair {
        let plan = fair::Plan {
            honest: args.honest,
            bots: args.bots,
            waves: 10,
            window_ms: args.window_ms,
            stock: args.stock,
            lead: std::time::Duration::from_secs(3),
        };
        let report = fair::run(&args.url, &keys.admin, &keys.users, &plan).await?;
        report.print();
        if let Some(path) = &args.json {
            let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
            std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        return Ok(report.ok);
    }
    if args.scenario == Scenario::PageFlood {
        let report = pageflood::run(
            &args.url,
            &keys.admin,
            &keys.users,
            args.duration,
            args.concurrency,
        )
        .await?;
        report.print();
        if let Some(path) = &args.json {
            let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
            std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        return Ok(report.ok);
    }
    if args.scenario == Scenario::Bots {
        let mut all_ok = true;
        let mut reports = Vec::new();
        let mut urls = vec![args.url.clone()];
        urls.extend(args.against.clone());
        for url in &urls {
            let report = bots::run(&args, url, &keys).await?;
            report.print();
            all_ok &= report.ok;
            reports.push(report);
        }
        if let Some(path) = &args.json {
            let text = serde_json::to_string_pretty(&serde_json::json!({ "runs": reports }))
                .map_err(|e| e.to_string())?;
            std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        return Ok(all_ok);
    }
    let mut reports = Vec::new();
    let mut all_ok = true;
    let mut urls = vec![args.url.clone()];
    urls.extend(args.against.clone());
    for url in &urls {
        let report = run::run_scenario(&args, url, &keys).await?;
        report.print();
        all_ok &= report.verification.ok;
        reports.push(report);
    }
    let mut summary = serde_json::json!({ "runs": reports });
    if let [a, b] = &reports[..] {
        let ratio = |x: f64, y: f64| if y > 0.0 { x / y } else { f64::INFINITY };
        let orders = ratio(a.orders_per_s, b.orders_per_s);
        let rejections = ratio(a.rejections_per_s, b.rejections_per_s);
        println!("\n== {} vs {} ==", a.url, b.url);
        println!("successful orders/s ratio: {orders:.1}x");
        println!("rejections/s ratio:        {rejections:.2}x");
        summary["ratio"] =
            serde_json::json!({ "orders_per_s": orders, "rejections_per_s": rejections });
    }
    if args.baseline {
        let base = run::baseline(&args, &args.url).await?;
        let run = &reports[0];
        println!(
            "\n== baseline: server CPU per answer, {} connections ==",
            args.concurrency
        );
        let line = |what: &str, f: &run::Floor| {
            println!("{what:<34} {:>6.1} µs  ({:.0}/s)", f.us_each, f.per_s)
        };
        line("engine GET /v1/time", &base.engine_time);
        line("bare axum GET", &base.bare_time);
        line("bare axum JSON POST answered 409", &base.bare_post_409);
        let ratio = |x: f64, y: f64| if y > 0.0 { x / y } else { f64::INFINITY };
        let time_ratio = ratio(base.engine_time.us_each, base.bare_time.us_each);
        println!("engine GET /v1/time vs bare GET:   {time_ratio:.2}x");
        summary["baseline"] = serde_json::json!(base);
        summary["time_vs_bare"] = serde_json::json!(time_ratio);
        if run.rejections_per_s > 0.0 {
            // The engine alone: a sold-out answer touches no PostgreSQL server.
            let engine_us = run.cost.engine_s * 1e6 / run.cost.answers.max(1) as f64;
            let answer_ratio = ratio(engine_us, base.bare_post_409.us_each);
            println!(
                "engine answer of this run ({engine_us:.1} µs) vs bare POST 409: {answer_ratio:.2}x"
            );
            summary["answer_vs_bare_post"] = serde_json::json!(answer_ratio);
            summary["rejections_vs_time"] =
                serde_json::json!(run.rejections_per_s / base.engine_time.per_s);
        }
    }
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&summary).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        println!("\nJSON report written to {}", path.display());
    }
    Ok(all_ok)
}
