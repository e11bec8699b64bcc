//! Without a streaming shadow nothing is acknowledged; a frozen or dead shadow is healed; a group
//! heals through faults in sequence and a restart.

use super::*;

/// Without a healer, under `shadow_loss = "block"`: a dead shadow stops acknowledgements (503
/// `shadow_unavailable` with Retry-After, no stock taken, nothing half-done) until a shadow streams
/// again; a promoted master acknowledges nothing either until its old master, fenced when it comes
/// back, is rejoined by hand (`seckill group rejoin`); then a second failover works.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
// Long on purpose: one scenario, its steps in the order they happen; split, it would no longer
// read as one story.
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
        sale_under_storm(vec![app.clone()], 16, Duration::from_secs(13)).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    shadow.freeze().expect("SIGSTOP the shadow");
    let frozen_at = Instant::now();
    // The master's walsender notices after `wal_sender_timeout` (3 s here), the monitor a probe
    // later; from then on buyers are told why. A request already waiting on a commit ends at its
    // deadline (`unavailable`); its buyer's next one waits half a deadline for a shadow, then is
    // refused. So the shadow stays frozen a whole deadline and a half past the judgement, and
    // every buyer meets the refusal whatever the machine's speed.
    let group = app.state.cluster.group(0);
    assert!(
        wait_for(Duration::from_secs(10), || group.durability()
            == seckill::shard::Durability::NotDurable)
        .await,
        "the monitor saw that no shadow streams"
    );
    let deadline = Duration::from_millis(app.state.config.server.request_timeout_ms);
    tokio::time::sleep(deadline + deadline / 2 + Duration::from_secs(1)).await;
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

/// Faults in sequence, as they come on a sale day: the master killed, the new shadow killed, the
/// master frozen, everything stopped and started again (servers crashed, the engine too), the
/// master killed again, then a DBA move. After each, the group is whole again within seconds and
/// nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
// Long on purpose: one scenario, its steps in the order they happen; split, it would no longer
// read as one story.
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
