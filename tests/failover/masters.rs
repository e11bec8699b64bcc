//! A master killed or frozen mid-sale, a planned switchover, a node started while its master is
//! dead, a node cut off from a live master, two engine nodes following one failover, the stock of
//! cancels and expiries across it, and a master whose stream to its shadow ended before it died.

use super::*;

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

/// A node started while its group's master is dead (it died while no node ran) waits for a
/// writable master instead of failing at its migrations: its health monitor runs during the wait,
/// and being the only node it promotes the shadow itself. Its healer then brings the old master
/// back as the shadow, and it sells; the order acknowledged before the fault is still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_started_while_its_master_is_dead_promotes_the_shadow_and_sells() {
    let cluster = own_cluster();
    let first = engine(&cluster.0).await;
    let item = fresh_item();
    let sale = first
        .create_sale(json!([{"item_id": item, "stock": 10, "price_cents": 1}]))
        .await;
    let buyer = fresh_item();
    let before = first.buy_retrying(sale, item, buyer, 1, None).await;
    assert_eq!(before.status, StatusCode::CREATED, "{:?}", before.body);
    let order = before.body["order_id"].as_str().unwrap().to_string();
    assert!(first.stop_and_wait(Duration::from_secs(20)).await);
    drop(first);
    cluster.0.groups[0]
        .master
        .kill9()
        .expect("kill -9 the master");
    // Before, the migrations found no writable master and the start failed.
    let started = Instant::now();
    let app = engine(&cluster.0).await;
    let came_up = started.elapsed();
    let promoted = cluster.0.groups[0].shadow.port.to_string();
    assert!(
        writer_port(&app).is_some_and(|e| e.ends_with(&promoted)),
        "the shadow is the master"
    );
    let healed = until_whole(&app, 0, HEAL_BOUND).await;
    println!(
        "a node started with its master dead came up in {:.1} s (the shadow promoted), whole {:.1} s later",
        came_up.as_secs_f64(),
        healed.as_secs_f64()
    );
    let after = app.buy_retrying(sale, item, fresh_item(), 1, None).await;
    assert_eq!(after.status, StatusCode::CREATED, "{:?}", after.body);
    let kept = app.get(&format!("/v1/users/{buyer}/orders/{order}")).await;
    assert_eq!(kept.status, StatusCode::OK, "the order acknowledged before");
    assert_eq!(app.remaining(sale, item).await, 8);
    assert_eq!(app.audit(sale).await["conserved"], true);
    assert_eq!(app.get("/readyz").await.status, StatusCode::OK);
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
// Long on purpose: one scenario, its steps in the order they happen; split, it would no longer
// read as one story.
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

/// A master whose shadow's stream had already ended when it died: the shadow frozen until the
/// master's walsender gave up on it (its last answers show no shadow streaming, but it still
/// named the shadow and its commits waited, so it acknowledged nothing alone), then the master
/// SIGKILLed and the shadow thawed. The shadow is promoted; a second node, started while the group
/// has no shadow, starts all the same and heals the old master into the shadow; the order
/// acknowledged before the faults is on both nodes.
/// (A killed master's orphaned session can answer one more probe after its walsender is gone:
/// the monitor once read that as "asynchronous" and refused the promotion for ever.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_master_whose_stream_ended_before_it_died_is_still_failed_over() {
    let cluster = own_cluster();
    let group = &cluster.0.groups[0];
    // No healer on this node: it would kill the frozen shadow after a second.
    let app = engine_without_healer(&cluster.0).await;
    let item = fresh_item();
    let sale = app
        .create_sale(json!([{"item_id": item, "stock": 10, "price_cents": 1}]))
        .await;
    let user = fresh_item();
    let r = app.buy(sale, item, user, 1, None).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let order = r.body["order_id"].as_str().unwrap().to_string();

    group.shadow.freeze().expect("SIGSTOP the shadow");
    let streaming = "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'";
    let stream_gone = eventually(Duration::from_secs(30), || {
        let master = group.master.clone();
        async move { master.psql("seckill", streaming).is_ok_and(|n| n == "0") }
    })
    .await;
    assert!(
        stream_gone,
        "the master's walsender gives up on a frozen shadow"
    );
    // Let the monitor see the master without its stream for a few probes (100 ms apart).
    tokio::time::sleep(Duration::from_millis(600)).await;
    group.master.kill9().expect("kill -9 the master");
    group.shadow.thaw().expect("SIGCONT the shadow");

    let promoted = group.shadow.port.to_string();
    let state = app.state.clone();
    assert!(
        wait_for(OUTAGE_BOUND, || writer_of(&state)
            .is_some_and(|e| e.ends_with(&promoted)))
        .await,
        "the shadow is promoted: {:?}",
        app.state.cluster.group(0).status()
    );
    assert_eq!(app.state.cluster.group(0).failovers(), 1);

    // A second node, with the healer, started while the group has no shadow: it starts (a start
    // that applies no migration writes nothing, so no commit waits for the missing shadow) and
    // brings the old master back as the shadow; both nodes see the group whole.
    let healer = tokio::time::timeout(HEAL_BOUND, engine(&cluster.0))
        .await
        .expect("a node starts while its group has no shadow");
    until_whole(&healer, 0, HEAL_BOUND).await;
    until_whole(&app, 0, HEAL_BOUND).await;
    assert_eq!(
        group
            .master
            .psql("seckill", "SELECT pg_is_in_recovery()")
            .unwrap(),
        "t",
        "the old master is the shadow now"
    );
    for node in [&app, &healer] {
        let r = node.get(&format!("/v1/users/{user}/orders/{order}")).await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "the order acknowledged before the faults"
        );
        let r = node.buy(sale, item, fresh_item(), 1, None).await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    }
    assert_eq!(app.remaining(sale, item).await, 7);
}
