//! External mode (an outside manager promotes): the engine follows a promotion and never writes to
//! an old master, even one unfenced by hand; a start without a master waits, then says why.

use super::*;

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

/// A start that waits in vain says which group and why: in external mode the engine never
/// promotes, so a dead master is waited for `server.start_wait_ms` (the HA manager may promote
/// meanwhile), then the start fails; the shadow is left as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_without_a_master_in_external_mode_waits_then_says_why() {
    let cluster = own_cluster();
    cluster.0.groups[0]
        .master
        .kill9()
        .expect("kill -9 the master");
    let mut config = engine_config(&cluster.0);
    config.failover.mode = seckill::config::FailoverMode::External;
    config.server.start_wait_ms = 1_500;
    let started = Instant::now();
    let refused = seckill::app::Application::build_with(config, monitor_only())
        .await
        .err()
        .expect("no start without a master");
    let waited = started.elapsed();
    let text = refused.to_string();
    assert!(
        text.contains("group g0") && text.contains("external") && text.contains("1500 ms"),
        "{text}"
    );
    assert!(waited >= Duration::from_millis(1_500), "{waited:?}");
    assert_eq!(
        cluster.0.groups[0]
            .shadow
            .psql("seckill", "SELECT pg_is_in_recovery()")
            .unwrap(),
        "t",
        "the engine promoted nothing"
    );
}
