//! Master/shadow failover against real servers: each test starts a cluster of its own (it kills
//! servers) and engines whose health monitors run for real, most with the healer `seckill dev`
//! runs (old masters and dead or frozen shadows come back as streaming shadows), some without it
//! to show what `shadow_loss = "block"` promises on its own: no shadow, no acknowledgement.

mod external;
mod masters;
mod shadows;

#[path = "../api/helpers.rs"]
mod helpers;

use helpers::*;
use reqwest::StatusCode;
use seckill::app::Background;
use seckill::local::{LocalCluster, LocalGroup};
use serde_json::json;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn own_cluster() -> OwnCluster {
    OwnCluster::start(1)
}

fn engine_config(cluster: &LocalCluster) -> seckill::Config {
    let mut config = base_config(cluster);
    config.failover.probe_interval_ms = 100;
    config.failover.probe_timeout_ms = 300;
    config.failover.failures_before_promote = 3;
    config.server.request_timeout_ms = 3_000;
    config.orders.reconcile_grace_secs = 60;
    config
}

fn monitor_only() -> Background {
    Background {
        monitor: true,
        sweeper: false,
        reconciler: false,
    }
}

/// An engine with its health monitor and the healer, as `seckill dev` runs it.
async fn engine(cluster: &LocalCluster) -> Arc<TestApp> {
    Arc::new(spawn_healing(engine_config(cluster), monitor_only(), cluster).await)
}

/// An engine with its health monitor only: nothing heals the group but a person.
async fn engine_without_healer(cluster: &LocalCluster) -> Arc<TestApp> {
    Arc::new(spawn_config(engine_config(cluster), monitor_only()).await)
}

/// What the buyers saw.
#[derive(Default)]
struct Outcome {
    /// (user, order id, quantity) of every 201.
    acked: Vec<(u64, String, i64)>,
    /// When each 201 arrived.
    acked_at: Vec<Instant>,
    unavailable: usize,
    /// The codes of the 503 answers.
    codes: HashMap<String, usize>,
}

/// `buyers` concurrent buyers, each buying once per loop with its own request_id and retrying
/// that same id on 503 (every 503 must carry Retry-After), until `run_for` passes or the item
/// sells out.
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
                                assert!(r.headers.contains_key("retry-after"), "{:?}", r.body);
                                {
                                    let mut o = outcome.lock().unwrap();
                                    o.unavailable += 1;
                                    *o.codes.entry(r.code().to_string()).or_default() += 1;
                                }
                                if start.elapsed() > run_for + Duration::from_secs(30) {
                                    panic!("still unavailable 30 s after the run: {:?}", r.body);
                                }
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                            StatusCode::TOO_MANY_REQUESTS => {
                                // Retrying every 50 ms through an outage exceeds the per-user
                                // limit: wait as Retry-After says, as a client should.
                                let secs: u64 =
                                    r.headers["retry-after"].to_str().unwrap().parse().unwrap();
                                tokio::time::sleep(Duration::from_secs(secs)).await;
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

async fn finished(storm: tokio::task::JoinHandle<Arc<Mutex<Outcome>>>) -> Outcome {
    let outcome = storm.await.expect("storm");
    let mut o = outcome.lock().unwrap();
    std::mem::take(&mut *o)
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

/// Every acknowledged order is on both servers of the group (once the shadow has replayed).
async fn assert_on_both_servers(group: &LocalGroup, outcome: &Outcome) {
    if outcome.acked.is_empty() {
        return;
    }
    let ids: Vec<&str> = outcome.acked.iter().map(|(_, id, _)| id.as_str()).collect();
    let sql = format!(
        "SELECT count(*) FROM orders WHERE order_id = ANY('{{{}}}'::uuid[])",
        ids.join(",")
    );
    let want = ids.len().to_string();
    for server in [&group.master, &group.shadow] {
        let on_it = eventually(Duration::from_secs(10), || {
            let (server, sql, want) = (server.clone(), sql.clone(), want.clone());
            async move { server.psql("seckill", &sql).is_ok_and(|n| n == want) }
        })
        .await;
        assert!(
            on_it,
            "all {want} acknowledged orders on {}: {:?}",
            server.name,
            server.psql("seckill", &sql)
        );
    }
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

/// A master, and its other member a healthy shadow streaming from it synchronously: writes are
/// acknowledged.
fn whole(state: &seckill::AppState, group: usize) -> bool {
    let g = state.cluster.group(group);
    let Some(w) = g.writer_index() else {
        return false;
    };
    let r = g.replication();
    let status = g.status();
    r.shadow_streaming
        && r.synchronous
        && g.durability() == seckill::shard::Durability::Durable
        && status
            .iter()
            .enumerate()
            .all(|(i, m)| i == w || (m.healthy && m.role == seckill::shard::Role::Shadow))
}

/// How long until group `group` is whole again (fails the test beyond `limit`).
async fn until_whole(app: &TestApp, group: usize, limit: Duration) -> Duration {
    let start = Instant::now();
    let state = app.state.clone();
    assert!(
        wait_for(limit, || whole(&state, group)).await,
        "group {group} whole again within {limit:?}: {:?} {:?} {:?}",
        state.cluster.group(group).status(),
        state.cluster.group(group).replication(),
        state.cluster.group(group).last_heal(),
    );
    start.elapsed()
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

/// The longest time without an acknowledged order from `fault` on.
fn outage_after(fault: Instant, outcome: &Outcome) -> Duration {
    let mut after: Vec<Instant> = outcome
        .acked_at
        .iter()
        .filter(|t| **t > fault)
        .copied()
        .collect();
    after.sort();
    assert!(!after.is_empty(), "selling resumed after the fault");
    let mut last = fault;
    let mut outage = Duration::ZERO;
    for t in after {
        outage = outage.max(t.duration_since(last));
        last = t;
    }
    outage
}

/// Tests print the outage; the bench measures it (`--kill-master`, `--freeze-master`). The bound
/// asserted here only tells "fails over and heals in seconds" from "waits for a person".
const OUTAGE_BOUND: Duration = Duration::from_secs(15);
/// How long a group may take to be whole again after a fault.
const HEAL_BOUND: Duration = Duration::from_secs(30);

fn count_on(server: &seckill::local::LocalServer, sql: &str) -> i64 {
    server
        .psql("seckill", sql)
        .expect("query")
        .parse()
        .expect("a count")
}

fn member(g: &LocalGroup, i: usize) -> &seckill::local::LocalServer {
    if i == 0 {
        &g.master
    } else {
        &g.shadow
    }
}
