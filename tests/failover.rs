//! Master/shadow failover against real servers: each test starts a cluster of its own (it kills
//! servers) and engines whose health monitors run for real, most with the healer `seckill dev`
//! runs (old masters and dead or frozen shadows come back as streaming shadows), some without it
//! to show what `shadow_loss = "block"` promises on its own: no shadow, no acknowledgement.

#[path = "api/helpers.rs"]
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_master_mid_sale_loses_no_acknowledged_order() {
    let cluster = own_cluster();
    let app = engine(&cluster.0).await;
    let (sale, item, storm) = sale_under_storm(vec![app.clone()], 32, Duration::from_secs(7)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let killed_at = Instant::now();
    cluster.0.groups[0]
        .master
        .kill9()
        .expect("kill -9 the master");
    let outcome = finished(storm).await;
    let outage = outage_after(killed_at, &outcome);
    let healed = until_whole(&app, 0, HEAL_BOUND).await;
    println!(
        "write outage after SIGKILL of the master: {:.2} s (promotion, then the old master rewound \
         as the new shadow; {} orders acknowledged, 503s: {:?})",
        outage.as_secs_f64(),
        outcome.acked.len(),
        outcome.codes
    );
    assert!(outage < OUTAGE_BOUND, "{outage:?}");
    let promoted = cluster.0.groups[0].shadow.port.to_string();
    assert!(
        writer_port(&app).is_some_and(|e| e.ends_with(&promoted)),
        "the shadow is the master"
    );
    assert_eq!(app.state.cluster.group(0).failovers(), 1);
    assert_eq!(
        cluster.0.groups[0]
            .master
            .psql("seckill", "SELECT pg_is_in_recovery()")
            .unwrap(),
        "t",
        "the old master is the shadow now (whole {healed:?} after the storm)"
    );
    let heal = app.state.cluster.group(0).last_heal().expect("a heal");
    assert_eq!(heal.outcome, "ok", "{heal:?}");
    assert_nothing_lost(&app, sale, item, STORM_STOCK, &outcome).await;
    assert_on_both_servers(&cluster.0.groups[0], &outcome).await;
    assert_eq!(app.get("/readyz").await.status, StatusCode::OK);
}

/// A master that stops answering with its sockets open (every process SIGSTOPped: a frozen host,
/// a partition that drops packets) is failed over like a dead one; the healer then kills it, as
/// a watchdog power-cycles a hung host, and rewinds it into the new shadow.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn freezing_the_master_mid_sale_fails_over_and_heals_it() {
    let cluster = own_cluster();
    let old = cluster.0.groups[0].master.clone();
    let app = engine(&cluster.0).await;
    let (sale, item, storm) = sale_under_storm(vec![app.clone()], 32, Duration::from_secs(9)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let frozen_at = Instant::now();
    old.freeze().expect("SIGSTOP the master");
    let outcome = finished(storm).await;
    let outage = outage_after(frozen_at, &outcome);
    until_whole(&app, 0, HEAL_BOUND).await;
    println!(
        "write outage after SIGSTOP of the master: {:.2} s ({} orders acknowledged, 503s: {:?})",
        outage.as_secs_f64(),
        outcome.acked.len(),
        outcome.codes
    );
    assert!(outage < OUTAGE_BOUND, "{outage:?}");
    let promoted = cluster.0.groups[0].shadow.port.to_string();
    assert!(writer_port(&app).is_some_and(|e| e.ends_with(&promoted)));
    assert_eq!(
        old.psql("seckill", "SELECT pg_is_in_recovery()").unwrap(),
        "t"
    );
    assert_nothing_lost(&app, sale, item, STORM_STOCK, &outcome).await;
    assert_on_both_servers(&cluster.0.groups[0], &outcome).await;
    assert_eq!(app.state.cluster.group(0).failovers(), 1);
}

/// Without a healer, under `shadow_loss = "block"`: a dead shadow stops acknowledgements (503
/// `shadow_unavailable` with Retry-After, no stock taken, nothing half-done) until a shadow streams
/// again; a promoted master acknowledges nothing either until its old master, fenced when it comes
/// back, is rejoined by hand (`seckill group rejoin`); then a second failover works.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_a_streaming_shadow_nothing_is_acknowledged() {
    let cluster = own_cluster();
    let (a, b) = (
        cluster.0.groups[0].master.clone(),
        cluster.0.groups[0].shadow.clone(),
    );
    let app = engine_without_healer(&cluster.0).await;
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
    let reservations = format!("SELECT count(*) FROM reservations WHERE item_id = {item}");
    let refused = |app: Arc<TestApp>, n: u32| async move {
        let r = app
            .buy(sale, item, user, 1, Some(&format!("refused{n}")))
            .await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::SERVICE_UNAVAILABLE, "shadow_unavailable"),
            "{:?}",
            r.body
        );
        assert!(r.headers.contains_key("retry-after"));
    };

    // The shadow dies: no acknowledgement, no stock held, until it is back.
    b.kill9().expect("kill the shadow");
    let state = app.state.clone();
    assert!(
        wait_for(Duration::from_secs(5), || state
            .cluster
            .group(0)
            .durability()
            == seckill::shard::Durability::NotDurable)
        .await
    );
    let before = (app.remaining(sale, item).await, count_on(&a, &reservations));
    for n in 0..3 {
        refused(app.clone(), n).await;
    }
    let groups = app.admin_get("/v1/admin/groups").await;
    assert_eq!(
        groups.body["groups"][0]["writes"], "not_durable",
        "{}",
        groups.body
    );
    assert_eq!(groups.body["groups"][0]["shadow_streaming"], false);
    assert_eq!(
        (app.remaining(sale, item).await, count_on(&a, &reservations)),
        before,
        "nothing was taken for the refused purchases"
    );
    b.start().expect("the shadow is back");
    until_whole(&app, 0, HEAL_BOUND).await;
    for n in 5..8 {
        acked.push(buy(app.clone(), n).await);
    }

    // The master dies: the shadow is promoted, and acknowledges nothing alone.
    a.kill9().expect("kill a");
    let b_port = b.port.to_string();
    assert!(
        wait_for(Duration::from_secs(10), || writer_of(&state)
            .is_some_and(|e| e.ends_with(&b_port)))
        .await,
        "b is the master"
    );
    assert_eq!(
        b.psql("seckill", "SHOW synchronous_standby_names").unwrap(),
        "\"shadow\"",
        "a promoted master commits synchronously from the start"
    );
    let on_b = count_on(&b, &reservations);
    for n in 3..6 {
        refused(app.clone(), n).await;
    }
    assert_eq!(
        count_on(&b, &reservations),
        on_b,
        "nothing acknowledged alone"
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
    // `seckill group rejoin` refuses the master's own data directory before touching anything.
    let refused_dir = seckill::local::rejoin::rejoin(&app.state.cluster, "g0", &b.data_dir, None)
        .await
        .expect_err("the master's data directory is refused");
    assert!(refused_dir.to_string().contains("master"), "{refused_dir}");
    seckill::local::rejoin::rejoin(&app.state.cluster, "g0", &a.data_dir, Some(a.port))
        .await
        .expect("rejoin");
    until_whole(&app, 0, HEAL_BOUND).await;
    for n in 8..12 {
        acked.push(buy(app.clone(), n).await);
    }

    // Second failover, back to a.
    b.kill9().expect("kill b");
    let a_port = a.port.to_string();
    assert!(
        wait_for(Duration::from_secs(10), || writer_of(&state)
            .is_some_and(|e| e.ends_with(&a_port)))
        .await,
        "a is the master again"
    );
    assert_eq!(app.state.cluster.group(0).failovers(), 2);
    b.start().expect("b comes back");
    assert!(
        wait_for(Duration::from_secs(10), || state.cluster.group(0).status()
            [1]
        .role
            == seckill::shard::Role::Fenced)
        .await
    );
    seckill::local::rejoin::rejoin(&app.state.cluster, "g0", &b.data_dir, Some(b.port))
        .await
        .expect("rejoin b");
    until_whole(&app, 0, HEAL_BOUND).await;
    acked.push(buy(app.clone(), 12).await);
    let outcome = Outcome {
        acked,
        ..Default::default()
    };
    assert_nothing_lost(&app, sale, item, stock, &outcome).await;
    assert_on_both_servers(&cluster.0.groups[0], &outcome).await;
    let listed = app.get(&format!("/v1/users/{user}/orders")).await;
    assert_eq!(
        listed.body["orders"].as_array().map(Vec::len),
        Some(13),
        "no duplicate, no loss"
    );
}

/// Without a healer, under `shadow_loss = block`, a frozen shadow holds commits back (nothing is
/// acknowledged that only one server has), buyers are told why, and selling resumes when it wakes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_shadow_holds_writes_back_and_loses_nothing() {
    let cluster = own_cluster();
    let shadow = cluster.0.groups[0].shadow.clone();
    let app = engine_without_healer(&cluster.0).await;
    let (sale, item, storm) =
        sale_under_storm(vec![app.clone()], 16, Duration::from_secs(11)).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    shadow.freeze().expect("SIGSTOP the shadow");
    let frozen_at = Instant::now();
    // The master's walsender notices after `wal_sender_timeout` (3 s here); from then on buyers
    // are told why.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let thawed_at = Instant::now();
    shadow.thaw().expect("SIGCONT the shadow");
    let outcome = finished(storm).await;
    // Commits that were in flight at the freeze may be acknowledged a moment later; after that,
    // nothing until the shadow is back.
    let held = outcome
        .acked_at
        .iter()
        .filter(|t| **t > frozen_at + Duration::from_millis(500) && **t < thawed_at)
        .count();
    let after = outcome.acked_at.iter().filter(|t| **t > thawed_at).count();
    println!(
        "frozen shadow: {held} acknowledged while it was frozen, {after} after it woke, 503s: {:?}",
        outcome.codes
    );
    assert_eq!(
        held, 0,
        "no order acknowledged while only one server could hold it"
    );
    assert!(after > 0, "selling resumed after the shadow woke");
    assert!(
        outcome
            .codes
            .get("shadow_unavailable")
            .is_some_and(|n| *n > 0),
        "buyers were told why: {:?}",
        outcome.codes
    );
    assert_eq!(app.state.cluster.group(0).failovers(), 0, "no failover");
    assert_nothing_lost(&app, sale, item, STORM_STOCK, &outcome).await;
}

/// A shadow that dies mid-sale is brought back by the healer within seconds; selling resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_shadow_is_healed_and_selling_resumes() {
    let cluster = own_cluster();
    let app = engine(&cluster.0).await;
    let (sale, item, storm) = sale_under_storm(vec![app.clone()], 16, Duration::from_secs(7)).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let killed_at = Instant::now();
    cluster.0.groups[0].shadow.kill9().expect("kill the shadow");
    let outcome = finished(storm).await;
    let outage = outage_after(killed_at, &outcome);
    until_whole(&app, 0, HEAL_BOUND).await;
    println!(
        "write outage after SIGKILL of the shadow: {:.2} s (503s: {:?})",
        outage.as_secs_f64(),
        outcome.codes
    );
    assert!(outage < OUTAGE_BOUND, "{outage:?}");
    assert_eq!(app.state.cluster.group(0).failovers(), 0, "no failover");
    assert_nothing_lost(&app, sale, item, STORM_STOCK, &outcome).await;
    assert_on_both_servers(&cluster.0.groups[0], &outcome).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_engine_nodes_both_follow_a_failover() {
    let cluster = own_cluster();
    // One healer per server: the first node heals, the second only follows.
    let (n1, n2) = (
        engine(&cluster.0).await,
        engine_without_healer(&cluster.0).await,
    );
    let (sale, item, storm) =
        sale_under_storm(vec![n1.clone(), n2.clone()], 16, Duration::from_secs(6)).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    cluster.0.groups[0].master.kill9().expect("kill");
    let outcome = finished(storm).await;
    let promoted = cluster.0.groups[0].shadow.port.to_string();
    for node in [&n1, &n2] {
        until_whole(node, 0, HEAL_BOUND).await;
        assert!(
            writer_port(node).is_some_and(|e| e.ends_with(&promoted)),
            "both nodes write to the promoted shadow"
        );
    }
    assert_nothing_lost(&n2, sale, item, STORM_STOCK, &outcome).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn planned_switchover_loses_nothing() {
    let cluster = own_cluster();
    let app = engine(&cluster.0).await;
    let (sale, item, storm) = sale_under_storm(vec![app.clone()], 16, Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    seckill::cli::group::switchover(&app.state.cluster, "g0")
        .await
        .expect("switchover");
    let outcome = finished(storm).await;
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
    // The fenced old master is rewound into the new shadow.
    until_whole(&app, 0, HEAL_BOUND).await;
    println!(
        "switchover under load: {} acknowledged, 503s: {:?}",
        outcome.acked.len(),
        outcome.codes
    );
    assert_nothing_lost(&app, sale, item, STORM_STOCK, &outcome).await;
    assert_on_both_servers(&cluster.0.groups[0], &outcome).await;
}

/// A transaction open on the master before the switchover's fence, that has not written yet
/// (no transaction id), writes and commits after it: the switchover waits for it, so its commit
/// is on the promoted shadow, not left alone on the fenced old master.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_switchover_waits_for_transactions_that_have_not_written_yet() {
    let cluster = own_cluster();
    let app = engine(&cluster.0).await;
    let marker = rand_u64() as i64 & i64::MAX;
    let mut writer = app.state.cluster.group(0).writer().await.expect("writer");
    let tx = writer.transaction().await.expect("begin");
    tx.query_one("SELECT 1", &[]).await.expect("a read: no xid");
    let switching = {
        let state = app.state.clone();
        tokio::spawn(async move {
            seckill::cli::group::switchover(&state.cluster, "g0")
                .await
                .map_err(|e| e.to_string())
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    tx.execute(
        "INSERT INTO sale_changes (sale_id, change, detail) VALUES ($1, 'restock', '{}')",
        &[&marker],
    )
    .await
    .expect("the open transaction may still write");
    let committed = tokio::time::timeout(Duration::from_secs(10), tx.commit()).await;
    assert!(
        matches!(committed, Ok(Ok(()))),
        "the commit hung or failed (the shadow was promoted under it): {committed:?}"
    );
    switching.await.expect("task").expect("switchover");
    let on_new_master = cluster.0.groups[0]
        .shadow
        .psql(
            "seckill",
            &format!("SELECT count(*) FROM sale_changes WHERE sale_id = {marker}"),
        )
        .expect("psql");
    assert_eq!(on_new_master, "1", "the commit is on the promoted shadow");
}

/// A node cut off from a live master (here: it has a wrong address for it) must not promote the
/// shadow: the shadow still streams from the master, so promoting would make two masters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_a_live_master_does_not_promote() {
    let cluster = own_cluster();
    let group = &cluster.0.groups[0];
    let unreachable = free_port_block(1);
    let mut config = base_config(&cluster.0);
    let unreachable = seckill::config::Dsn::new(format!(
        "host=127.0.0.1 port={unreachable} user=seckill dbname=seckill connect_timeout=1"
    ));
    config.groups[0].master = unreachable.clone();
    config.groups[0].master_admin = Some(unreachable);
    config.server.migrate_on_start = false;
    config.failover.probe_interval_ms = 100;
    config.failover.probe_timeout_ms = 300;
    let app = spawn_config(config, monitor_only()).await;
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

/// The stock of a cancel, and of an expiry, whose item lives on a group that is failing over at
/// that moment comes back within seconds: the release waits in the outbox, not for the reconciler.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stock_of_cancels_and_expiries_during_a_failover_comes_back() {
    let cluster = OwnCluster::start(2);
    let mut config = engine_config(&cluster.0);
    config.orders.sweep_interval_ms = 200;
    let app = Arc::new(
        spawn_healing(
            config,
            Background {
                monitor: true,
                sweeper: true,
                reconciler: false,
            },
            &cluster.0,
        )
        .await,
    );
    let item = fresh_item_in(&app, 0);
    let user = loop {
        let u = fresh_item();
        if app.state.router.route(seckill::router::KeyKind::Users, u) == 1 {
            break u;
        }
    };
    let now = chrono::Utc::now();
    let sale = app
        .create_sale_at(
            json!([{"item_id": item, "stock": 10, "price_cents": 5, "per_user_limit": 10}]),
            now - chrono::Duration::minutes(1),
            now + chrono::Duration::hours(1),
            Some(3),
        )
        .await;
    let mut ids = Vec::new();
    for n in 0..2 {
        let r = app.buy(sale, item, user, 2, Some(&format!("c{n}"))).await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
        ids.push(r.body["order_id"].as_str().unwrap().to_string());
    }
    assert_eq!(app.remaining(sale, item).await, 6);

    // The item's group loses its master; the user's group is fine.
    cluster.0.groups[0]
        .master
        .freeze()
        .expect("freeze g0's master");
    let c = app
        .post(
            &format!("/v1/users/{user}/orders/{}/cancel", ids[0]),
            json!({}),
        )
        .await;
    assert_eq!(
        c.status,
        StatusCode::OK,
        "the cancel itself succeeds: {:?}",
        c.body
    );
    // The other order's 3 s payment window runs out meanwhile; the sweeper expires it.
    let state = app.state.clone();
    assert!(
        wait_for(Duration::from_secs(15), || state
            .cluster
            .group(0)
            .failovers()
            == 1)
        .await,
        "g0 failed over"
    );
    let back = eventually(Duration::from_secs(20), || {
        let app = app.clone();
        async move {
            let r = app.get(&format!("/v1/sales/{sale}")).await;
            r.status == StatusCode::OK && r.body["items"][0]["remaining"] == 10
        }
    })
    .await;
    let audit = app.audit(sale).await;
    assert!(back, "all stock is back after the failover: {audit}");
    assert_eq!(audit["conserved"], true, "{audit}");
    let expired = app
        .get(&format!("/v1/users/{user}/orders/{}", ids[1]))
        .await;
    assert_eq!(expired.body["status"], "expired");
}

/// `failover.mode = "external"`: an HA manager owns promotion. The engine never promotes, fences
/// or changes a server setting; it follows the master the manager promotes, and answers 503 in
/// between. The old master, back writable on an older timeline, is never written to, not even in
/// a round where the new master's probe goes unanswered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn external_mode_follows_a_promotion_and_never_writes_to_an_old_master() {
    let cluster = own_cluster();
    let (a, b) = (
        cluster.0.groups[0].master.clone(),
        cluster.0.groups[0].shadow.clone(),
    );
    // What the HA manager left: asynchronous replication (the engine must not change it), and
    // declared as such: the engine then does not wait for a synchronous shadow.
    a.psql("seckill", "ALTER SYSTEM SET synchronous_standby_names = ''")
        .unwrap();
    a.psql("seckill", "SELECT pg_reload_conf()").unwrap();
    let mut config = engine_config(&cluster.0);
    config.failover.mode = seckill::config::FailoverMode::External;
    config.failover.synchronous = false;
    let app = Arc::new(spawn_config(config, monitor_only()).await);
    let item = fresh_item();
    let sale = app
        .create_sale(
            json!([{"item_id": item, "stock": 100, "price_cents": 1, "per_user_limit": 100}]),
        )
        .await;
    let user = fresh_item();
    assert_eq!(
        app.buy(sale, item, user, 1, Some("e1")).await.status,
        StatusCode::CREATED
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        a.psql("seckill", "SHOW synchronous_standby_names").unwrap(),
        "",
        "the engine left replication settings alone"
    );

    a.kill9().expect("kill the master");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        b.psql("seckill", "SELECT pg_is_in_recovery()").unwrap(),
        "t",
        "the engine did not promote"
    );
    assert_eq!(
        app.get("/readyz").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let r = app.buy(sale, item, user, 1, Some("e2")).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
    );

    // The HA manager promotes the shadow; the engine follows.
    b.psql("seckill", "SELECT pg_promote()").unwrap();
    let state = app.state.clone();
    let b_port = b.port.to_string();
    assert!(
        wait_for(Duration::from_secs(5), || writer_of(&state)
            .is_some_and(|e| e.ends_with(&b_port)))
        .await,
        "the engine follows the new master"
    );
    let r = app.buy_retrying(sale, item, user, 1, Some("e2")).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    // The old master comes back writable (the manager's business): never fenced by the engine,
    // never written to (its timeline is older).
    a.start().expect("restart a");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        a.psql("seckill", "SHOW default_transaction_read_only")
            .unwrap(),
        "off",
        "the engine does not fence in external mode"
    );
    assert!(writer_of(&state).is_some_and(|e| e.ends_with(&b_port)));
    assert_eq!(
        app.buy(sale, item, user, 1, Some("e3")).await.status,
        StatusCode::CREATED
    );
    assert_old_master_never_written(&app, &a, &b, sale, item, user).await;
}

/// The new master `b` stops answering for a while (frozen), while the old master `a` answers,
/// writable on the older timeline: no purchase may land on `a` (before the term, one missed probe
/// of `b` was enough to send writes back to it).
async fn assert_old_master_never_written(
    app: &Arc<TestApp>,
    a: &seckill::local::LocalServer,
    b: &seckill::local::LocalServer,
    sale: u64,
    item: u64,
    user: u64,
) {
    let reservations = format!("SELECT count(*) FROM reservations WHERE item_id = {item}");
    let on_a = count_on(a, &reservations);
    b.freeze().expect("freeze b");
    let frozen = Instant::now();
    let mut n = 0;
    while frozen.elapsed() < Duration::from_millis(1500) {
        n += 1;
        let r = app
            .buy(sale, item, user, 1, Some(&format!("stale{n}")))
            .await;
        assert_ne!(
            r.status,
            StatusCode::CREATED,
            "a purchase landed somewhere: {:?}",
            r.body
        );
    }
    b.thaw().expect("thaw b");
    assert_eq!(
        count_on(a, &reservations),
        on_a,
        "nothing was written to the old master"
    );
    let b_port = b.port.to_string();
    let state = app.state.clone();
    assert!(
        wait_for(Duration::from_secs(10), || writer_of(&state)
            .is_some_and(|e| e.ends_with(&b_port)))
        .await,
        "back to the new master"
    );
    let r = app
        .buy_retrying(sale, item, user, 1, Some("after-thaw"))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
}

/// Built-in mode: an old master fenced by the engine and then unfenced by hand (a restore, a
/// mistaken DBA), asynchronous too, is never written to either.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_old_master_unfenced_by_hand_is_never_written() {
    let cluster = own_cluster();
    let (a, b) = (
        cluster.0.groups[0].master.clone(),
        cluster.0.groups[0].shadow.clone(),
    );
    let mut config = engine_config(&cluster.0);
    // Asynchronous, so that a write on the old master would be acknowledged at once.
    config.failover.synchronous = false;
    let app = Arc::new(spawn_config(config, monitor_only()).await);
    let item = fresh_item();
    let sale = app
        .create_sale(
            json!([{"item_id": item, "stock": 100, "price_cents": 1, "per_user_limit": 100}]),
        )
        .await;
    let user = fresh_item();
    assert_eq!(
        app.buy_retrying(sale, item, user, 1, Some("u1"))
            .await
            .status,
        StatusCode::CREATED
    );
    a.kill9().expect("kill a");
    let state = app.state.clone();
    let b_port = b.port.to_string();
    assert!(
        wait_for(Duration::from_secs(10), || writer_of(&state)
            .is_some_and(|e| e.ends_with(&b_port)))
        .await
    );
    a.start().expect("restart a");
    assert!(
        wait_for(Duration::from_secs(10), || state.cluster.group(0).status()
            [0]
        .role
            == seckill::shard::Role::Fenced)
        .await
    );
    a.psql(
        "seckill",
        "ALTER SYSTEM RESET default_transaction_read_only",
    )
    .unwrap();
    a.psql("seckill", "ALTER SYSTEM SET synchronous_standby_names = ''")
        .unwrap();
    a.psql("seckill", "SELECT pg_reload_conf()").unwrap();
    assert_old_master_never_written(&app, &a, &b, sale, item, user).await;
}

/// Faults in sequence, as they come on a sale day: the master killed, the new shadow killed, the
/// master frozen, everything stopped and started again (servers crashed, the engine too), the
/// master killed again, then a DBA move. After each, the group is whole again within seconds and
/// nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_group_heals_through_faults_in_sequence_and_a_restart() {
    let cluster = OwnCluster::start(2);
    let g0 = cluster.0.groups[0].clone();
    let mut all = Outcome::default();
    let app = engine(&cluster.0).await;
    let item = fresh_item_in(&app, 0);
    let sale = app
        .create_sale(json!([{"item_id": item, "stock": STORM_STOCK, "price_cents": 1}]))
        .await;
    type Fault = Box<dyn Fn(&LocalGroup, usize)>;
    // (what, fault on (group, index of the member written to))
    let faults: Vec<(&str, Fault)> = vec![
        (
            "SIGKILL of the master",
            Box::new(|g, w| member(g, w).kill9().unwrap()),
        ),
        (
            "SIGKILL of the shadow",
            Box::new(|g, w| member(g, 1 - w).kill9().unwrap()),
        ),
        (
            "SIGSTOP of the master",
            Box::new(|g, w| member(g, w).freeze().unwrap()),
        ),
    ];
    for (what, fault) in &faults {
        let storm = tokio::spawn(buy_storm(
            vec![app.clone()],
            sale,
            item,
            8,
            Duration::from_secs(6),
        ));
        tokio::time::sleep(Duration::from_millis(800)).await;
        let w = app.state.cluster.group(0).writer_index().expect("a writer");
        fault(&g0, w);
        let outcome = finished(storm).await;
        let healed = until_whole(&app, 0, HEAL_BOUND).await;
        println!(
            "{what}: {} acknowledged, whole {healed:?} after the storm",
            outcome.acked.len()
        );
        all.acked.extend(outcome.acked);
    }

    // The engine stops with g0's master frozen and its shadow killed (g1 runs on); then the
    // cluster is started again as `seckill dev` does at its start, whatever it finds.
    assert!(app.stop_and_wait(Duration::from_secs(20)).await);
    drop(app);
    let primary = |s: &seckill::local::LocalServer| {
        s.psql("seckill", "SELECT pg_is_in_recovery()")
            .is_ok_and(|r| r == "f")
    };
    let w = if primary(&g0.master) { 0 } else { 1 };
    member(&g0, w).freeze().expect("freeze g0's master");
    member(&g0, 1 - w).kill9().expect("kill g0's shadow");
    let restarted = cluster.0.clone();
    tokio::task::spawn_blocking(move || restarted.ensure_running(&tuning()))
        .await
        .unwrap()
        .expect("the cluster starts again, whatever happened before");
    let app = engine(&cluster.0).await;
    for g in 0..2 {
        until_whole(&app, g, HEAL_BOUND).await;
    }
    let storm = tokio::spawn(buy_storm(
        vec![app.clone()],
        sale,
        item,
        8,
        Duration::from_secs(6),
    ));
    tokio::time::sleep(Duration::from_millis(800)).await;
    let w = app.state.cluster.group(0).writer_index().expect("a writer");
    member(&g0, w).kill9().expect("kill the master again");
    let outcome = finished(storm).await;
    until_whole(&app, 0, HEAL_BOUND).await;
    all.acked.extend(outcome.acked);

    // A DBA moves the item to the other group: the pre-checks find healthy shadows everywhere.
    let r = app
        .admin(
            reqwest::Method::POST,
            "/v1/admin/moves",
            Some(json!({"kind": "items", "key": item, "to": "g1", "complete": true})),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    let id = r.body["move_id"].as_u64().unwrap();
    let moved = eventually(Duration::from_secs(30), || {
        let app = app.clone();
        async move {
            let m = app.admin_get(&format!("/v1/admin/moves/{id}")).await;
            m.body["phase"] == "completed" && m.body["cleanup_pending"] == false
        }
    })
    .await;
    assert!(
        moved,
        "{:?}",
        app.admin_get(&format!("/v1/admin/moves/{id}")).await.body
    );
    let r = app.buy_retrying(sale, item, fresh_item(), 1, None).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    all.acked.push((
        r.body["user_id"].as_u64().unwrap(),
        r.body["order_id"].as_str().unwrap().to_string(),
        1,
    ));
    assert_nothing_lost(&app, sale, item, STORM_STOCK, &all).await;
}

fn member(g: &LocalGroup, i: usize) -> &seckill::local::LocalServer {
    if i == 0 {
        &g.master
    } else {
        &g.shadow
    }
}
