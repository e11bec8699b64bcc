//! One migration path for every deployment: a cluster whose schema was applied by hand (as the
//! compose deployment's first start used to, from the retired schema/seckill.sql: the migrations
//! concatenated) is adopted with `seckill migrate --baseline 8`, migrated, and then moves keys
//! like any other.

#[path = "api/helpers.rs"]
mod helpers;

use helpers::*;
use reqwest::StatusCode;
use seckill::app::Background;
use serde_json::json;
use std::process::Command;
use std::time::Duration;

/// What schema/seckill.sql held when it was retired: migrations 1 to 8, verbatim, in order (the
/// later ones are applied by `seckill migrate` after the baseline).
fn hand_schema() -> String {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    let version = |n: &str| n[1..].split("__").next().unwrap().parse::<u32>().unwrap();
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| version(n) <= 8)
        .collect();
    names.sort_by_key(|n| version(n));
    names
        .iter()
        .map(|n| std::fs::read_to_string(dir.join(n)).unwrap())
        .collect::<Vec<_>>()
        .join("\n")
}

fn seckill(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_seckill"))
        .args(args)
        .output()
        .expect("seckill runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hand_applied_schema_is_adopted_and_moves_work() {
    let own = OwnCluster::start(2);
    let cluster = &own.0;
    let schema = hand_schema();
    for g in &cluster.groups {
        g.master
            .psql("seckill", &schema)
            .expect("hand schema applies");
    }
    let dir = cluster.root.join("cfg");
    std::fs::create_dir_all(&dir).unwrap();
    let toml = dir.join("shards.toml");
    seckill::local::write_private(&toml, &cluster.shards_toml("127.0.0.1:0", &secrets())).unwrap();
    let config = toml.to_str().unwrap();

    // Without the baseline, migrating fails on the existing tables and changes nothing.
    let (ok, out) = seckill(&["migrate", "--config", config]);
    assert!(!ok, "{out}");
    let (ok, out) = seckill(&["migrate", "--config", config, "--baseline", "8"]);
    assert!(ok, "{out}");
    assert!(out.contains("g0: 8 migration(s) recorded"), "{out}");
    let (ok, out) = seckill(&["migrate", "--config", config, "--baseline", "8"]);
    assert!(
        !ok && out.contains("no baseline needed"),
        "refused twice: {out}"
    );
    let (ok, out) = seckill(&["migrate", "--config", config]);
    assert!(ok, "{out}");

    let mut config = base_config(cluster);
    config.server.migrate_on_start = false;
    let app = spawn_config(
        config,
        Background {
            monitor: true,
            sweeper: false,
            reconciler: false,
        },
    )
    .await;
    let item = fresh_item_in(&app, 0);
    let sale = app
        .create_sale(json!([{"item_id": item, "stock": 10, "price_cents": 1}]))
        .await;
    let first = app.buy_retrying(sale, item, fresh_item(), 1, None).await;
    assert_eq!(first.status, StatusCode::CREATED, "{:?}", first.body);
    let r = app
        .admin(
            reqwest::Method::POST,
            "/v1/admin/moves",
            Some(json!({"kind": "items", "key": item, "to": "g1", "complete": true})),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    let id = r.body["move_id"].as_u64().unwrap();
    let app = std::sync::Arc::new(app);
    let done = eventually(Duration::from_secs(30), || {
        let app = app.clone();
        async move {
            let m = app.admin_get(&format!("/v1/admin/moves/{id}")).await;
            m.body["phase"] == "completed"
        }
    })
    .await;
    assert!(
        done,
        "{:?}",
        app.admin_get(&format!("/v1/admin/moves/{id}")).await.body
    );
    let second = app.buy_retrying(sale, item, fresh_item(), 1, None).await;
    assert_eq!(second.status, StatusCode::CREATED, "{:?}", second.body);
    assert_eq!(app.remaining(sale, item).await, 8);
}
