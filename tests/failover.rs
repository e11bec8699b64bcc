//! Master/shadow failover against real servers: each test starts a cluster of its own (it kills
//! servers) and engines whose health monitors run for real.

#[path = "api/helpers.rs"]
mod helpers;

use helpers::*;
use reqwest::StatusCode;
use seckill::app::Background;
use seckill::local::LocalCluster;
use serde_json::json;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Stops a test's own cluster even when the test fails.
struct OwnCluster(LocalCluster);

impl Drop for OwnCluster {
    fn drop(&mut self) {
        self.0.stop_all("immediate");
        if std::env::var_os("SECKILL_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.0.root);
        }
    }
}

fn own_cluster() -> OwnCluster {
    OwnCluster(start_cluster(1))
}

async fn engine(cluster: &LocalCluster) -> Arc<TestApp> {
    let mut config = base_config(cluster);
    config.failover.probe_interval_ms = 100;
    config.failover.probe_timeout_ms = 300;
    config.failover.failures_before_promote = 3;
    config.server.request_timeout_ms = 3_000;
    config.orders.reconcile_grace_secs = 60;
    Arc::new(
        spawn_config(
            config,
            Background {
                monitor: true,
                sweeper: false,
                reconciler: false,
            },
        )
        .await,
    )
}

/// What the buyers saw.
#[derive(Default)]
struct Outcome {
    /// (user, order id, quantity) of every 201.
    acked: Vec<(u64, String, i64)>,
    /// When each 201 arrived.
    acked_at: Vec<Instant>,
    unavailable: usize,
}

/// `buyers` concurrent buyers, each buying once per loop with its own request_id and retrying
/// that same id on 503, until `run_for` passes or the item sells out.
async fn buy_storm(
    apps: Vec<Arc<TestApp>>,
    sale: u64,
    item: u64,
    buyers: u64,
    run_for: Duration,
) -> Arc<Mutex<Outcome>> {
    let outcome = Arc::new(Mutex::new(Outcome::default()));
    let start = Instant::now();
    let base = fresh_item();
    let handles: Vec<_> = (0..buyers)
        .map(|b| {
            let (app, outcome) = (apps[b as usize % apps.len()].clone(), outcome.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while start.elapsed() < run_for {
                    n += 1;
                    let user = base + b * 100_000 + n;
                    let request_id = format!("b{b}-{n}");
                    loop {
                        let r = app.buy(sale, item, user, 1, Some(&request_id)).await;
                        match r.status {
                            StatusCode::CREATED => {
                                let mut o = outcome.lock().unwrap();
                                o.acked.push((
                                    user,
                                    r.body["order_id"].as_str().unwrap().to_string(),
                                    1,
                                ));
                                o.acked_at.push(Instant::now());
                                break;
                            }
                            StatusCode::SERVICE_UNAVAILABLE => {
                                outcome.lock().unwrap().unavailable += 1;
                                if start.elapsed() > run_for + Duration::from_secs(30) {
                                    panic!("still unavailable 30 s after the run: {:?}", r.body);
                                }
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                            _ if r.code() == "sold_out" => return,
                            _ => panic!("unexpected answer {} {:?}", r.status, r.body),
                        }
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.await.expect("buyer");
    }
    outcome
}

/// Stock far above what the buyers can take in a test: every purchase should succeed.
const STORM_STOCK: i64 = 100_000;

/// A sale of one item with `STORM_STOCK` units on `apps[0]`, and `buyers` buying it through
/// `apps` for `run_for` in the background. Returns (sale, item, the storm's handle).
async fn sale_under_storm(
    apps: Vec<Arc<TestApp>>,
    buyers: u64,
    run_for: Duration,
) -> (u64, u64, tokio::task::JoinHandle<Arc<Mutex<Outcome>>>) {
    let item = fresh_item();
    let sale = apps[0]
        .create_sale(json!([{"item_id": item, "stock": STORM_STOCK, "price_cents": 1}]))
        .await;
    let storm = tokio::spawn(buy_storm(apps, sale, item, buyers, run_for));
    (sale, item, storm)
}

/// Every acknowledged order is readable, nothing is sold twice, and stock is conserved.
async fn assert_nothing_lost(app: &TestApp, sale: u64, item: u64, stock: i64, outcome: &Outcome) {
    for (user, id, _) in &outcome.acked {
        let r = app.get(&format!("/v1/users/{user}/orders/{id}")).await;
        assert_eq!(r.status, StatusCode::OK, "acknowledged order {id} survived");
    }
    let acked: i64 = outcome.acked.iter().map(|(_, _, q)| q).sum();
    let remaining = app.remaining(sale, item).await;
    assert_eq!(
        acked + remaining,
        stock,
        "sold + remaining == stock (every sale acknowledged once)"
    );
    let audit = app.audit(sale).await;
    assert_eq!(audit["conserved"], true, "{audit}");
}

fn writer_port(app: &TestApp) -> Option<String> {
    writer_of(&app.state)
}

/// The endpoint group 0 writes to. A probe that times out on the loaded test machine can leave a
/// node briefly without a writer, so tests wait (bounded) for it rather than read one instant.
fn writer_of(state: &seckill::AppState) -> Option<String> {
    let g = state.cluster.group(0);
    g.writer_index().map(|i| g.members[i].endpoint.clone())
}

async fn wait_for<F: Fn() -> bool>(limit: Duration, f: F) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_master_mid_sale_loses_no_acknowledged_order() {
    let cluster = own_cluster();
    let app = engine(&cluster.0).await;
    let (sale, item, storm) = sale_under_storm(vec![app.clone()], 32, Duration::from_secs(6)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let killed_at = Instant::now();
    cluster.0.groups[0]
        .master
        .kill9()
        .expect("kill -9 the master");
    let outcome = storm.await.expect("storm");
    let outcome = std::mem::take(&mut *outcome.lock().unwrap());

    // The outage: the longest time without an acknowledged order from the kill on.
    let mut after: Vec<Instant> = outcome
        .acked_at
        .iter()
        .filter(|t| **t > killed_at)
        .copied()
        .collect();
    after.sort();
    assert!(!after.is_empty(), "selling resumed after the kill");
    let mut last = killed_at;
    let mut outage = Duration::ZERO;
    for t in after {
        outage = outage.max(t.duration_since(last));
        last = t;
    }
    println!(
        "write outage after SIGKILL of the master: {:.2} s ({} orders acknowledged, {} answers 503 retried)",
        outage.as_secs_f64(),
        outcome.acked.len(),
        outcome.unavailable
    );
    let promoted = cluster.0.groups[0].shadow.port.to_string();
    assert!(
        writer_port(&app).is_some_and(|e| e.ends_with(&promoted)),
        "the shadow is the master"
    );
    assert_eq!(app.state.cluster.group(0).failovers(), 1);
    assert_nothing_lost(&app, sale, item, STORM_STOCK, &outcome).await;
    assert_eq!(app.get("/readyz").await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn old_master_is_fenced_then_rejoins_and_a_second_failover_works() {
    let cluster = own_cluster();
    let (a, b) = (
        cluster.0.groups[0].master.clone(),
        cluster.0.groups[0].shadow.clone(),
    );
    let app = engine(&cluster.0).await;
    let item = fresh_item();
    let stock = 1_000;
    let sale = app
        .create_sale(
            json!([{"item_id": item, "stock": stock, "price_cents": 1, "per_user_limit": 1000}]),
        )
        .await;
    let user = fresh_item();
    let mut acked = Vec::new();
    let buy = |app: Arc<TestApp>, n: u32| {
        let id = format!("r{n}");
        async move {
            let r = app.buy_retrying(sale, item, user, 1, Some(&id)).await;
            assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
            (user, r.body["order_id"].as_str().unwrap().to_string(), 1i64)
        }
    };
    for n in 0..5 {
        acked.push(buy(app.clone(), n).await);
    }

    // First failover: a dies, b takes over.
    a.kill9().expect("kill a");
    for n in 5..10 {
        acked.push(buy(app.clone(), n).await);
    }
    let state = app.state.clone();
    let b_port = b.port.to_string();
    assert!(
        wait_for(Duration::from_secs(5), || writer_of(&state)
            .is_some_and(|e| e.ends_with(&b_port)))
        .await,
        "b is the master"
    );

    // a comes back as a stale master on the old timeline: it is fenced, never written to.
    a.start().expect("restart a");
    assert!(
        wait_for(Duration::from_secs(10), || state.cluster.group(0).status()
            [0]
        .role
            == seckill::shard::Role::Fenced)
        .await,
        "the old master is fenced: {:?}",
        app.state.cluster.group(0).status()
    );
    assert_eq!(
        a.psql("seckill", "SHOW default_transaction_read_only")
            .unwrap(),
        "on"
    );
    let on_a_before = a
        .psql(
            "seckill",
            &format!("SELECT count(*) FROM reservations WHERE item_id = {item}"),
        )
        .unwrap();
    for n in 10..15 {
        acked.push(buy(app.clone(), n).await);
    }
    let on_a_after = a
        .psql(
            "seckill",
            &format!("SELECT count(*) FROM reservations WHERE item_id = {item}"),
        )
        .unwrap();
    assert_eq!(
        on_a_before, on_a_after,
        "the fenced old master received no writes"
    );
    let groups = app.admin_get("/v1/admin/groups").await;
    assert_eq!(
        groups.body["groups"][0]["members"][0]["role"], "fenced",
        "{}",
        groups.body
    );

    // Rejoin a as b's shadow; the engine sees it stream and turns synchronous replication on.
    let a2 = a.clone();
    let port = b.port;
    tokio::task::spawn_blocking(move || a2.rejoin("127.0.0.1", port))
        .await
        .unwrap()
        .expect("rejoin");
    assert!(
        wait_for(Duration::from_secs(15), || state.cluster.group(0).status()
            [0]
        .role
            == seckill::shard::Role::Shadow)
        .await,
        "a is a shadow again: {:?}",
        app.state.cluster.group(0).status()
    );
    let b2 = b.clone();
    assert!(
        eventually(Duration::from_secs(10), || {
            let b2 = b2.clone();
            async move {
                b2.psql("seckill", "SHOW synchronous_standby_names")
                    .map(|v| v == "\"shadow\"")
                    .unwrap_or(false)
            }
        })
        .await,
        "synchronous replication resumes once the shadow streams"
    );

    // Second failover, back to a.
    b.kill9().expect("kill b");
    for n in 15..20 {
        acked.push(buy(app.clone(), n).await);
    }
    let a_port = a.port.to_string();
    assert!(
        wait_for(Duration::from_secs(5), || writer_of(&state)
            .is_some_and(|e| e.ends_with(&a_port)))
        .await,
        "a is the master again"
    );
    assert_eq!(app.state.cluster.group(0).failovers(), 2);
    let outcome = Outcome {
        acked,
        ..Default::default()
    };
    assert_nothing_lost(&app, sale, item, stock, &outcome).await;
    let listed = app.get(&format!("/v1/users/{user}/orders")).await;
    assert_eq!(
        listed.body["orders"].as_array().map(Vec::len),
        Some(20),
        "no duplicate, no loss"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_engine_nodes_both_follow_a_failover() {
    let cluster = own_cluster();
    let (n1, n2) = (engine(&cluster.0).await, engine(&cluster.0).await);
    let (sale, item, storm) =
        sale_under_storm(vec![n1.clone(), n2.clone()], 16, Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    cluster.0.groups[0].master.kill9().expect("kill");
    let outcome = storm.await.unwrap();
    let promoted = cluster.0.groups[0].shadow.port.to_string();
    for node in [&n1, &n2] {
        assert!(
            writer_port(node).is_some_and(|e| e.ends_with(&promoted)),
            "both nodes write to the promoted shadow"
        );
    }
    let outcome = std::mem::take(&mut *outcome.lock().unwrap());
    assert_nothing_lost(&n2, sale, item, STORM_STOCK, &outcome).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn planned_switchover_loses_nothing() {
    let cluster = own_cluster();
    let app = engine(&cluster.0).await;
    let (sale, item, storm) = sale_under_storm(vec![app.clone()], 16, Duration::from_secs(4)).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    seckill::shard::admin::switchover(&app.state.cluster, "g0")
        .await
        .expect("switchover");
    let outcome = storm.await.unwrap();
    let promoted = cluster.0.groups[0].shadow.port.to_string();
    let state = app.state.clone();
    assert!(
        wait_for(Duration::from_secs(5), || state
            .cluster
            .group(0)
            .writer_index()
            == Some(1))
        .await
    );
    assert!(writer_port(&app).is_some_and(|e| e.ends_with(&promoted)));
    let outcome = std::mem::take(&mut *outcome.lock().unwrap());
    let counts: HashMap<&str, usize> =
        HashMap::from([("acked", outcome.acked.len()), ("503", outcome.unavailable)]);
    println!("switchover under load: {counts:?}");
    assert_nothing_lost(&app, sale, item, STORM_STOCK, &outcome).await;
}

/// A node cut off from a live master (here: it has a wrong address for it) must not promote the
/// shadow: the shadow still streams from the master, so promoting would make two masters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_a_live_master_does_not_promote() {
    let cluster = own_cluster();
    let group = &cluster.0.groups[0];
    let unreachable = free_port_block(1);
    let mut config = base_config(&cluster.0);
    config.groups[0].master =
        format!("host=127.0.0.1 port={unreachable} user=seckill dbname=seckill connect_timeout=1");
    config.server.migrate_on_start = false;
    config.failover.probe_interval_ms = 100;
    config.failover.probe_timeout_ms = 300;
    let app = spawn_config(
        config,
        Background {
            monitor: true,
            sweeper: false,
            reconciler: false,
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        group
            .shadow
            .psql("seckill", "SELECT pg_is_in_recovery()")
            .unwrap(),
        "t",
        "the shadow was not promoted"
    );
    assert_eq!(app.state.cluster.group(0).failovers(), 0);
    let ready = app.get("/readyz").await;
    assert_eq!(
        (ready.status, ready.code()),
        (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
    );
    // The real master is untouched and still the master.
    assert_eq!(
        group
            .master
            .psql("seckill", "SELECT pg_is_in_recovery()")
            .unwrap(),
        "f"
    );
}
