//! The compose deployment's failover role, against real servers: an engine whose admin DSNs name
//! `seckill_failover` (made with the rights of deploy/initdb/07-failover-grants.sql, no superuser)
//! manages synchronous replication, promotes a shadow, fences the old master when it comes back,
//! and moves a key between groups.

#[path = "api/helpers.rs"]
mod helpers;

use helpers::*;
use reqwest::StatusCode;
use seckill::app::Background;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

const FAILOVER_PASSWORD: &str = "failover-role-password-0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
// Long on purpose: one scenario, its steps in the order they happen; split, it would no longer
// read as one story.
async fn the_failover_role_fails_over_fences_and_moves_without_superuser() {
    let own = OwnCluster::start(2);
    let grants = include_str!("../deploy/initdb/07-failover-grants.sql");
    for g in &own.0.groups {
        g.master
            .psql(
                "seckill",
                &format!(
                    "CREATE ROLE seckill_failover LOGIN PASSWORD '{FAILOVER_PASSWORD}';\n{grants}"
                ),
            )
            .expect("the role and its grants, as the compose init scripts make them");
        assert_eq!(
            g.master
                .psql(
                    "seckill",
                    "SELECT rolsuper FROM pg_roles WHERE rolname = 'seckill_failover'"
                )
                .unwrap(),
            "f"
        );
    }
    // The schema, as compose's `migrate` service makes it: with the superuser.
    let migrated = spawn_config(base_config(&own.0), quiet()).await;
    assert!(migrated.stop_and_wait(Duration::from_secs(20)).await);
    drop(migrated);

    let mut config = base_config(&own.0);
    config.server.migrate_on_start = false;
    config.failover.probe_interval_ms = 100;
    config.failover.probe_timeout_ms = 300;
    config.server.request_timeout_ms = 3_000;
    let (a, b) = (&own.0.groups[0].master, &own.0.groups[0].shadow);
    for (i, group) in own.0.groups.iter().enumerate() {
        let dsn = |s: &seckill::local::LocalServer| {
            seckill::config::Dsn::new(format!(
                "host=127.0.0.1 port={} user=seckill_failover password={FAILOVER_PASSWORD} dbname=seckill",
                s.port
            ))
        };
        config.groups[i].master_admin = Some(dsn(&group.master));
        config.groups[i].shadow_admin = Some(dsn(&group.shadow));
    }
    let app = Arc::new(
        spawn_config(
            config,
            Background {
                monitor: true,
                sweeper: false,
                reconciler: false,
            },
        )
        .await,
    );
    let state = app.state.clone();
    let whole = |g: usize| {
        let group = state.cluster.group(g);
        group.durability() == seckill::shard::Durability::Durable
            && group.replication().shadow_streaming
    };
    assert!(
        eventually(Duration::from_secs(15), || async { whole(0) && whole(1) }).await,
        "synchronous replication set up by the failover role"
    );
    let item = fresh_item_in(&app, 0);
    let sale = app
        .create_sale(
            json!([{"item_id": item, "stock": 100, "price_cents": 1, "per_user_limit": 10}]),
        )
        .await;
    let r = app.buy_retrying(sale, item, fresh_item(), 1, None).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);

    // The master dies: the role promotes the shadow (which commits synchronously from then on).
    a.kill9().expect("kill the master");
    let b_port = b.port.to_string();
    assert!(
        eventually(Duration::from_secs(15), || async {
            let g = state.cluster.group(0);
            g.writer_index()
                .is_some_and(|w| g.members[w].endpoint.ends_with(&b_port))
        })
        .await,
        "promoted by the failover role"
    );
    assert_eq!(
        b.psql("seckill", "SHOW synchronous_standby_names").unwrap(),
        "\"shadow\""
    );
    // The old master comes back writable: the role fences it.
    a.start().expect("restart the old master");
    assert!(
        eventually(Duration::from_secs(15), || async {
            state.cluster.group(0).status()[0].role == seckill::shard::Role::Fenced
        })
        .await,
        "fenced by the failover role: {:?}",
        state.cluster.group(0).status()
    );
    assert_eq!(
        a.psql("seckill", "SHOW default_transaction_read_only")
            .unwrap(),
        "on"
    );
    // Rewinding it into the shadow is not the role's business (pg_rewind needs a superuser, on
    // the server's machine): as the dev cluster's healer does it.
    let (old, master_port) = (a.clone(), b.port);
    tokio::task::spawn_blocking(move || old.rejoin("127.0.0.1", master_port, "shadow", false))
        .await
        .unwrap()
        .expect("rejoin");
    assert!(
        eventually(Duration::from_secs(20), || async { whole(0) }).await,
        "whole again"
    );

    // A move: its pre-check reads refinery's history with the role.
    let r = app
        .admin(
            reqwest::Method::POST,
            "/v1/admin/moves",
            Some(json!({"kind": "items", "key": item, "to": "g1", "complete": true})),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    let id = r.body["move_id"].as_u64().unwrap();
    let moved = eventually(Duration::from_secs(30), || async {
        app.admin_get(&format!("/v1/admin/moves/{id}")).await.body["phase"] == "completed"
    })
    .await;
    assert!(
        moved,
        "{:?}",
        app.admin_get(&format!("/v1/admin/moves/{id}")).await.body
    );
    let r = app.buy_retrying(sale, item, fresh_item(), 1, None).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(app.remaining(sale, item).await, 98);
}
