//! Reconciliation against real groups. The reconciler and the sweeper work on whole groups, so
//! these tests have a cluster of their own (this test binary) and run one at a time.

#[path = "api/helpers.rs"]
mod helpers;

use helpers::*;
use reqwest::StatusCode;
use seckill::domain::{ItemId, Quantity, SaleId, UserId};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// An engine whose sweeper and reconciler only run when a test calls them.
async fn quiet_app() -> TestApp {
    let config = base_config(cluster());
    spawn_config(config, quiet()).await
}

/// Transaction 1 committed, then the engine "crashed" before transaction 2: the reservation has no
/// order. The reconciler tombstones and releases it; a late transaction 2 cannot resurrect it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciler_repairs_a_crash_between_the_two_transactions() {
    let _serial = SERIAL.lock().await;
    let app = quiet_app().await;
    let item = fresh_item();
    let sale = app
        .create_sale(json!([{"item_id": item, "stock": 10, "price_cents": 7, "per_user_limit": 5}]))
        .await;
    let (s, i) = (
        SaleId::parse(sale.into()).unwrap(),
        ItemId::parse(item.into()).unwrap(),
    );
    let user = UserId::parse(fresh_item().into()).unwrap();
    let txn = uuid::Uuid::new_v4();
    let group = app.state.router.item_group(i);
    {
        let mut client = app.state.cluster.group(group).writer().await.unwrap();
        let (outcome, _) = seckill::order::reservations::reserve_one(
            &mut client,
            s,
            i,
            user,
            Quantity::parse(3).unwrap(),
            txn,
            false,
        )
        .await
        .unwrap();
        assert!(outcome.is_ok());
    }
    // A normal order next to it must not be touched.
    let ok = app.buy(sale, item, user.key(), 1, None).await;
    assert_eq!(ok.status, StatusCode::CREATED);
    assert_eq!(app.remaining(sale, item).await, 6);

    // Within the grace period nothing happens.
    let report = seckill::reconcile::reconcile(&app.state.orders, Duration::from_secs(3600)).await;
    assert_eq!(report.orphans_released, 0);
    assert_eq!(app.remaining(sale, item).await, 6);

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let report = seckill::reconcile::reconcile(&app.state.orders, Duration::from_secs(1)).await;
    assert_eq!(report.orphans_released, 1, "{report:?}");
    assert!(report.violations.is_empty(), "{report:?}");
    assert_eq!(
        app.remaining(sale, item).await,
        9,
        "the orphan's 3 units are back"
    );
    let tomb = app
        .get(&format!("/v1/users/{}/orders/{txn}", user.key()))
        .await;
    assert_eq!(tomb.body["status"], "cancelled");

    // A late transaction 2 for the same txn finds the tombstone and inserts nothing.
    let ug = app.state.router.user_group(user);
    let client = app.state.cluster.group(ug).writer().await.unwrap();
    let late = seckill::order::store::NewOrder {
        order_id: txn,
        user,
        sale: s,
        item: i,
        quantity: 3,
        amount_cents: 21,
        payment_window_secs: 900,
        status: seckill::order::store::OrderStatus::PendingPayment,
    };
    let slots = app
        .state
        .router
        .kind(seckill::router::KeyKind::Users)
        .slot_count();
    let inserted = seckill::order::store::insert_orders(&client, &[late], slots)
        .await
        .unwrap();
    assert!(inserted.orders.is_empty() && inserted.moving.is_empty());
    // A second pass has nothing left to do.
    let report = seckill::reconcile::reconcile(&app.state.orders, Duration::from_secs(1)).await;
    assert_eq!(report.orphans_released, 0);
    assert_eq!(app.audit(sale).await["conserved"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
// Long on purpose: one scenario, its steps in the order they happen; split, it would no longer
// read as one story.
async fn concurrent_reconcilers_and_sweepers_never_double_release() {
    let _serial = SERIAL.lock().await;
    let app = Arc::new(quiet_app().await);
    let item = fresh_item();
    let now = chrono::Utc::now();
    let sale = app
        .create_sale_at(
            json!([{"item_id": item, "stock": 100, "price_cents": 1, "per_user_limit": 100}]),
            now - chrono::Duration::minutes(1),
            now + chrono::Duration::hours(1),
            Some(1),
        )
        .await;
    let (s, i) = (
        SaleId::parse(sale.into()).unwrap(),
        ItemId::parse(item.into()).unwrap(),
    );
    // 20 orphan reservations and 20 orders that will expire.
    {
        let mut client = app
            .state
            .cluster
            .group(app.state.router.item_group(i))
            .writer()
            .await
            .unwrap();
        for n in 0..20u64 {
            let user = UserId::parse((fresh_item() + n).into()).unwrap();
            let (o, _) = seckill::order::reservations::reserve_one(
                &mut client,
                s,
                i,
                user,
                Quantity::parse(1).unwrap(),
                uuid::Uuid::new_v4(),
                false,
            )
            .await
            .unwrap();
            assert!(o.is_ok());
        }
    }
    for _ in 0..20 {
        assert_eq!(
            app.buy(sale, item, fresh_item(), 2, None).await.status,
            StatusCode::CREATED
        );
    }
    assert_eq!(app.remaining(sale, item).await, 40);
    tokio::time::sleep(Duration::from_millis(1200)).await;

    // Four reconcilers and four sweepers at once (as on four engine nodes).
    let mut handles = Vec::new();
    for _ in 0..4 {
        let a = app.clone();
        handles.push(tokio::spawn(async move {
            seckill::reconcile::reconcile(&a.state.orders, Duration::from_secs(1))
                .await
                .orphans_released as usize
        }));
        let a = app.clone();
        handles.push(tokio::spawn(async move {
            1000 + seckill::reconcile::sweep(&a.state.orders, 3).await
        }));
    }
    let (mut orphans, mut expired) = (0, 0);
    for h in handles {
        let n = h.await.unwrap();
        if n >= 1000 {
            expired += n - 1000
        } else {
            orphans += n
        }
    }
    // Every orphan released by exactly one reconciler, every order expired exactly once.
    assert_eq!(orphans, 20);
    assert_eq!(expired, 20, "each order expired exactly once");
    let audit = app.audit(sale).await;
    assert_eq!(audit["conserved"], true, "{audit}");
    let pending = app
        .sql_i64(0, &format!("SELECT count(*) FROM orders WHERE item_id = {item} AND status = 'pending_payment'"))
        .await
        + app
            .sql_i64(1, &format!("SELECT count(*) FROM orders WHERE item_id = {item} AND status = 'pending_payment'"))
            .await;
    assert_eq!(pending, 0);
    assert_eq!(
        app.remaining(sale, item).await,
        100,
        "all stock back, none twice"
    );
}

/// The background pass is bounded but still finds what matters: an `ordered` reservation whose
/// order was cancelled behind its back is released, and an item whose stock moved out of balance is
/// reported on every pass until repaired, while unchanged conserved items are not audited again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// Long on purpose: one scenario, its steps in the order they happen; split, it would no longer
// read as one story.
async fn background_pass_repairs_dead_orders_and_keeps_reporting_violations() {
    let _serial = SERIAL.lock().await;
    let app = quiet_app().await;
    let item = fresh_item();
    let sale = app
        .create_sale(json!([{"item_id": item, "stock": 10, "price_cents": 7, "per_user_limit": 5}]))
        .await;
    let i = ItemId::parse(item.into()).unwrap();
    let user = UserId::parse(fresh_item().into()).unwrap();
    let bought = app.buy(sale, item, user.key(), 2, None).await;
    assert_eq!(bought.status, StatusCode::CREATED);
    let order_id: uuid::Uuid = bought.body["order_id"].as_str().unwrap().parse().unwrap();
    // The confirmation runs off the request path: wait until the reservation says `ordered`.
    let item_group = app.state.cluster.group(app.state.router.item_group(i));
    let state = || async {
        let c = item_group.writer().await.unwrap();
        c.query_one(
            "SELECT CASE WHEN state = 'reserved' AND ordered_at IS NOT NULL THEN 'ordered'
                         ELSE state END
             FROM reservations WHERE txn_id = $1",
            &[&order_id],
        )
        .await
        .unwrap()
        .get::<_, String>(0)
    };
    let waited = std::time::Instant::now();
    while state().await != "ordered" {
        assert!(waited.elapsed() < Duration::from_secs(5), "never confirmed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Cancel the order on the user's side only, as a cancel whose release failed would leave it.
    let user_group = app.state.cluster.group(app.state.router.user_group(user));
    user_group
        .writer()
        .await
        .unwrap()
        .execute(
            "UPDATE orders SET status = 'cancelled' WHERE order_id = $1",
            &[&order_id],
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let mut reconciler = seckill::reconcile::Reconciler::default();
    let report = reconciler
        .pass(&app.state.orders, Duration::from_secs(1))
        .await;
    assert_eq!(report.dead_orders_released, 1, "{report:?}");
    assert_eq!(state().await, "released");
    assert_eq!(app.remaining(sale, item).await, 10);
    assert!(report.violations.is_empty(), "{report:?}");

    // Stock lost without a trace in the ledger: reported now and on the next pass too.
    item_group
        .writer()
        .await
        .unwrap()
        .execute(
            "UPDATE sale_items SET remaining = remaining - 1, version = version + 1
             WHERE sale_id = $1 AND item_id = $2",
            &[&i64::try_from(sale).unwrap(), &i64::try_from(item).unwrap()],
        )
        .await
        .unwrap();
    for _ in 0..2 {
        let report = reconciler
            .pass(&app.state.orders, Duration::from_secs(1))
            .await;
        let bad: Vec<u64> = report.violations.iter().map(|v| v.item_id).collect();
        assert!(bad.contains(&item), "{report:?}");
    }
    // Repaired: the next pass finds the item conserved again.
    item_group
        .writer()
        .await
        .unwrap()
        .execute(
            "UPDATE sale_items SET remaining = remaining + 1, version = version + 1
             WHERE sale_id = $1 AND item_id = $2",
            &[&i64::try_from(sale).unwrap(), &i64::try_from(item).unwrap()],
        )
        .await
        .unwrap();
    let report = reconciler
        .pass(&app.state.orders, Duration::from_secs(1))
        .await;
    assert!(
        !report.violations.iter().any(|v| v.item_id == item),
        "{report:?}"
    );
}

/// `seckill reconcile --grace-secs 0` would tombstone purchases between their two transactions:
/// a grace shorter than twice the request budget is refused, before anything is touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_refuses_a_grace_that_would_release_purchases_in_flight() {
    let _serial = SERIAL.lock().await;
    let dir = std::env::temp_dir().join(format!("seckill-reconcile-cli-{}", fresh_item()));
    std::fs::create_dir_all(&dir).expect("dir");
    let config = dir.join("shards.toml");
    std::fs::write(&config, cluster().shards_toml("127.0.0.1:0", &secrets())).expect("toml");
    for grace in ["0", "9"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_seckill"))
            .args(["reconcile", "--grace-secs", grace, "--config"])
            .arg(&config)
            .output()
            .expect("the CLI runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "--grace-secs {grace} ran");
        assert!(err.contains("at least 10"), "{err}");
        assert!(out.stdout.is_empty(), "nothing reconciled: {out:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
