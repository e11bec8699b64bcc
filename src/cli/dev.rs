//! `seckill dev`: the whole system on this machine (README.md "The two commands").

use super::{serve_until_signal, CliResult};
use crate::app::Application;
use crate::config::{secret, Config, Secret};
use crate::local::{write_private, EngineSecrets, LocalCluster, ServerTuning};
use std::path::Path;
use std::sync::Arc;

/// A secret of the engine: the environment variable when set, else the one kept in the cluster
/// folder (made on first use).
fn engine_secret(
    cluster: &LocalCluster,
    env: &str,
    file: &str,
) -> Result<Secret, crate::local::LocalError> {
    match secret::from_env(env) {
        Some(s) => Ok(s),
        None => cluster.secret(file),
    }
}

/// The switches of `seckill dev` beyond where it runs.
pub(crate) struct DevOptions {
    pub(crate) no_coalesce: bool,
    pub accept_layout_change: bool,
}

pub async fn dev(
    dir: &Path,
    base_port: u16,
    groups: usize,
    listen: &str,
    options: DevOptions,
) -> CliResult {
    let dir = std::env::current_dir()?.join(dir);
    let cluster = LocalCluster::open(&dir, base_port, groups)?;
    println!(
        "starting {groups} shard group(s) (master + shadow each) under {} ...",
        dir.display()
    );
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.ensure_running(&ServerTuning::default())).await??;
    let secrets = EngineSecrets {
        admin_token: engine_secret(&cluster, "SECKILL_ADMIN_TOKEN", "admin-token")?,
        user_token_secret: engine_secret(
            &cluster,
            "SECKILL_USER_TOKEN_SECRET",
            "user-token-secret",
        )?,
        payment_secret: engine_secret(&cluster, "SECKILL_PAYMENT_SECRET", "payment-secret")?,
        token_key: engine_secret(&cluster, "SECKILL_TOKEN_KEY", "token-key")?,
    };
    let toml = cluster.shards_toml(listen, &secrets);
    let toml_path = dir.join("shards.toml");
    write_private(&toml_path, &toml)?;
    let mut config = Config::from_toml(&toml, &toml_path.display().to_string())?;
    config.coalesce.enabled = !options.no_coalesce;
    config.server.accept_layout_change = options.accept_layout_change;
    config.server.dev_login = true;
    let result = async {
        let app = Application::build(config).await?;
        // The engine's health monitor fails over; the healer brings the old master (or a dead
        // or frozen shadow) back as the streaming shadow.
        app.spawn_healer(cluster.servers());
        let state = app.state();
        let sale = demo_sale(&state).await?;
        let protected = protected_demo_sale(&state).await?;
        let addr = app.local_addr();
        print_welcome(&addr.to_string(), [sale, protected], &toml_path);
        serve_until_signal(app).await
    }
    .await;
    println!("stopping the PostgreSQL servers ...");
    let c = cluster.clone();
    let _ = tokio::task::spawn_blocking(move || c.stop_all("fast")).await;
    result
}

fn print_welcome(addr: &str, [sale, protected]: [u64; 2], toml_path: &Path) {
    let me = std::env::current_exe()
        .ok()
        .and_then(|p| {
            let cwd = std::env::current_dir().ok()?;
            p.strip_prefix(&cwd).ok().map(|r| r.display().to_string())
        })
        .unwrap_or_else(|| "seckill".to_string());
    let cfg = toml_path.display();
    println!("\nseckill dev is up on http://{addr}");
    println!("  config:      {cfg} (mode 0600: it holds the cluster's secrets)");
    // The token itself never goes to the terminal (a service's stdout is a log): its file does.
    let token_file = toml_path.with_file_name("secrets").join("admin-token");
    let admin = format!("${{SECKILL_ADMIN_TOKEN:-$(cat {})}}", token_file.display());
    println!(
        "  admin token: in {} (or $SECKILL_ADMIN_TOKEN when set)",
        token_file.display()
    );
    println!("  demo sale:   {sale} (items 1001: 100 units, 1002: 1000 units, limit 2 per user)");
    println!("  user tokens: {me} token --config {cfg} --user 42 [--ttl-secs 3600]");
    println!("  sale page:   http://{addr}/sales/{sale} (sign in with any user id)");
    println!(
        "  protected:   http://{addr}/sales/{protected} (starts 2 min after this, proof of work)"
    );
    println!("\ntry:");
    println!("  TOKEN=$({me} token --config {cfg} --user 42)");
    println!("  curl -s -X POST http://{addr}/v1/sales/{sale}/items/1001/orders -H \"Authorization: Bearer $TOKEN\" -H 'Content-Type: application/json' -d '{{\"quantity\": 1, \"request_id\": \"try-1\"}}'");
    println!("  curl -s -H \"Authorization: Bearer $TOKEN\" http://{addr}/v1/users/42/orders");
    println!("  curl -s http://{addr}/v1/sales/{sale}");
    println!("  curl -s -H \"Authorization: Bearer {admin}\" http://{addr}/v1/admin/groups");
    println!("\nCtrl-C stops the engine and the servers.");
}

async fn demo_sale(state: &Arc<crate::state::AppState>) -> Result<u64, Box<dyn std::error::Error>> {
    let now = chrono::Utc::now();
    let sale: crate::sale::NewSale = serde_json::from_value(serde_json::json!({
        "name": "demo flash sale",
        "starts_at": now.to_rfc3339(),
        "ends_at": (now + chrono::Duration::hours(24)).to_rfc3339(),
        "items": [
            {"item_id": 1001, "stock": 100, "price_cents": 999, "per_user_limit": 2},
            {"item_id": 1002, "stock": 1000, "price_cents": 4999, "per_user_limit": 2}
        ]
    }))?;
    Ok(state.sales().create(&sale).await?.sale_id)
}

/// A sale behind order tokens and a proof of work, starting two minutes from now: the sale page
/// shows the countdown, solves the challenge during it, and buys through the order URL.
async fn protected_demo_sale(
    state: &Arc<crate::state::AppState>,
) -> Result<u64, Box<dyn std::error::Error>> {
    let starts = chrono::Utc::now() + chrono::Duration::minutes(2);
    let sale: crate::sale::NewSale = serde_json::from_value(serde_json::json!({
        "name": "protected demo sale",
        "starts_at": starts.to_rfc3339(),
        "ends_at": (starts + chrono::Duration::hours(24)).to_rfc3339(),
        "items": [
            {"item_id": 2001, "stock": 50, "price_cents": 1999, "per_user_limit": 1}
        ],
        "protection": {"order_token": true, "challenge": "pow", "challenge_lead_secs": 60}
    }))?;
    Ok(state.sales().create(&sale).await?.sale_id)
}
