//! Slots move as a whole: the users of a slot while they buy, pay and cancel, the items of a slot
//! with their sales, the slot fence on cancels and payments, and a rebalance onto an empty group.

use super::*;

/// Users of one hash slot, `n` of them.
pub(super) fn users_in_slot(app: &TestApp, slot: u32, n: usize) -> Vec<u64> {
    let slots = app.state.router.kind(KeyKind::Users).slot_count();
    let mut users = Vec::new();
    while users.len() < n {
        let u = fresh_item();
        if seckill::router::slot_of(u, slots) == slot {
            users.push(u);
        }
    }
    users
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
// Long on purpose: one scenario, its steps in the order they happen; split, it would no longer
// read as one story.
async fn a_slot_of_users_moves_while_they_buy_pay_and_cancel() {
    // Its own cluster: a slot move carries every key of the slot, other tests' keys too.
    let own = OwnCluster::start(2);
    let app = Arc::new(own_app(&own).await);
    let slots = app.state.router.kind(KeyKind::Users).slot_count();
    let slot = seckill::router::slot_of(fresh_item(), slots);
    let home = app
        .state
        .router
        .route(KeyKind::Users, users_in_slot(&app, slot, 1)[0]);
    let other = format!("g{}", 1 - home);
    let users = Arc::new(users_in_slot(&app, slot, 24));
    let item = fresh_item();
    let stock = 5_000;
    let sale = app
        .create_sale(
            json!([{"item_id": item, "stock": stock, "price_cents": 7, "per_user_limit": 1000}]),
        )
        .await;
    // Orders made before the move: a third to be paid after it, a third cancelled.
    let mut before = Vec::new();
    for (i, &u) in users.iter().enumerate() {
        let r = app.buy_retrying(sale, item, u, 1, None).await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
        before.push((u, r.body["order_id"].as_str().unwrap().to_string(), i % 3));
    }

    let stop = Arc::new(AtomicBool::new(false));
    let buyers: Vec<_> = (0..8)
        .map(|b| {
            let (app, stop, users) = (app.clone(), stop.clone(), users.clone());
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut i = b;
                while !stop.load(Ordering::SeqCst) {
                    let u = users[i % users.len()];
                    i += 8;
                    let r = app.buy_retrying(sale, item, u, 1, None).await;
                    match r.status {
                        StatusCode::CREATED => {
                            got.push((u, r.body["order_id"].as_str().unwrap().to_string()))
                        }
                        s => panic!("unexpected answer {s}: {:?}", r.body),
                    }
                }
                got
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let moved = move_and_wait(
        &app,
        json!({"kind": "users", "slot": slot, "to": other, "complete": true}),
    )
    .await;
    assert_eq!(moved["phase"], "completed", "{moved}");
    eprintln!(
        "slot {slot} of users {} -> {other} under load: write pause {} ms, {} rows copied",
        moved["from"], moved["write_pause_ms"], moved["rows_copied"]
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let mut during = Vec::new();
    for b in buyers {
        during.extend(b.await.expect("buyer"));
    }
    assert!(!during.is_empty());

    // The slot routes to its new group, through the table.
    let route = app
        .admin_get(&format!("/v1/admin/route/users/{}", users[0]))
        .await;
    assert_eq!(
        (route.body["group"].as_str(), route.body["source"].as_str()),
        (Some(other.as_str()), Some("table"))
    );
    // Every order is found, on the new group only (the source's copy was completed away).
    let all: Vec<(u64, String)> = before
        .iter()
        .map(|(u, o, _)| (*u, o.clone()))
        .chain(during.iter().cloned())
        .collect();
    for (u, o) in &all {
        let r = app.get(&format!("/v1/users/{u}/orders/{o}")).await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "order {o} of user {u}: {:?}",
            r.body
        );
    }
    let ids = all
        .iter()
        .map(|(_, o)| format!("'{o}'"))
        .collect::<Vec<_>>()
        .join(",");
    let count = format!("SELECT count(*) FROM orders WHERE order_id IN ({ids})");
    assert_eq!(app.sql_i64(1 - home, &count).await, all.len() as i64);
    assert_eq!(app.sql_i64(home, &count).await, 0);
    // They can still be paid and cancelled, on the new group.
    for (u, o, what) in &before {
        let r = match what {
            0 => app.pay(*u, o, 7, &format!("pay-{o}")).await,
            1 => {
                app.post_as(*u, &format!("/v1/users/{u}/orders/{o}/cancel"), json!({}))
                    .await
            }
            _ => continue,
        };
        assert_eq!(r.status, StatusCode::OK, "{what} {o}: {:?}", r.body);
    }
    // A node still routing the slot to its old group could not start a first order of a new user
    // of the slot there: the slot stays fenced on the old group.
    let newcomer = users_in_slot(&app, slot, 1)[0];
    let stale = app
        .state
        .cluster
        .group(home)
        .writer()
        .await
        .expect("old group");
    let late = seckill::order::store::NewOrder {
        order_id: uuid::Uuid::new_v4(),
        user: seckill::domain::UserId::parse(newcomer.into()).unwrap(),
        sale: seckill::domain::SaleId::parse(sale.into()).unwrap(),
        item: seckill::domain::ItemId::parse(item.into()).unwrap(),
        quantity: 1,
        amount_cents: 7,
        payment_window_secs: 60,
        status: seckill::order::store::OrderStatus::PendingPayment,
    };
    let inserted = seckill::order::store::insert_orders(&stale, &[late], slots)
        .await
        .expect("insert");
    assert!(inserted.orders.is_empty(), "{inserted:?}");
    assert_eq!(inserted.moving.len(), 1);
    drop(stale);
    let cancelled = before.iter().filter(|b| b.2 == 1).count() as i64;
    assert_eq!(
        app.remaining(sale, item).await,
        stock - all.len() as i64 + cancelled
    );
    let audit = app.audit(sale).await;
    assert_eq!(audit["conserved"], true, "{audit}");
    assert_eq!(
        audit["items"][0]["paid"],
        before.iter().filter(|b| b.2 == 0).count()
    );
}

#[tokio::test]
// Long on purpose: one scenario, its steps in the order they happen; split, it would no longer
// read as one story.
async fn a_slot_of_items_moves_with_its_sales() {
    let own = OwnCluster::start(2);
    let app = own_app(&own).await;
    let slots = app.state.router.kind(KeyKind::Items).slot_count();
    let first = fresh_item_in(&app, 0);
    let slot = seckill::router::slot_of(first, slots);
    let mut items = vec![first];
    while items.len() < 3 {
        let k = fresh_item();
        if seckill::router::slot_of(k, slots) == slot {
            items.push(k);
        }
    }
    let sale = app
        .create_sale(json!(items
            .iter()
            .map(|i| json!({"item_id": i, "stock": 5, "price_cents": 1}))
            .collect::<Vec<_>>()))
        .await;
    for i in &items {
        // A fresh cluster on a loaded machine may still be opening connections: retried as
        // clients do (the move, not the first connection, is what this test is about).
        let r = app.buy_retrying(sale, *i, fresh_item(), 1, None).await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    }
    // An operator's changes move with the items: a restock and a pause.
    let restocked = admin_post(
        &app,
        &format!("/v1/admin/sales/{sale}/items/{}/restock", items[0]),
        json!({"add": 2}),
    )
    .await;
    assert_eq!(restocked.status, StatusCode::OK, "{:?}", restocked.body);
    let paused = app
        .admin(
            reqwest::Method::PATCH,
            &format!("/v1/admin/sales/{sale}"),
            Some(json!({"paused": true})),
        )
        .await;
    assert_eq!(paused.status, StatusCode::OK, "{:?}", paused.body);
    let left = |i: u64| if i == items[0] { 6 } else { 4 };
    let plan = admin_post(
        &app,
        "/v1/admin/moves",
        json!({"kind": "items", "slot": slot, "to": "g1", "dry_run": true}),
    )
    .await;
    assert_eq!(plan.status, StatusCode::OK, "{:?}", plan.body);
    assert!(plan.body["keys"].as_u64().unwrap() >= 3, "{:?}", plan.body);
    let moved = move_and_wait(&app, json!({"kind": "items", "slot": slot, "to": "g1"})).await;
    assert_eq!(moved["phase"], "switched", "{moved}");
    for i in &items {
        assert_eq!(app.state.router.route(KeyKind::Items, *i), 1);
        assert_eq!(app.remaining(sale, *i).await, left(*i));
        let r = app.buy_retrying(sale, *i, fresh_item(), 1, None).await;
        assert_eq!(
            r.code(),
            "paused",
            "the pause moved with the item: {:?}",
            r.body
        );
    }
    let resumed = app
        .admin(
            reqwest::Method::PATCH,
            &format!("/v1/admin/sales/{sale}"),
            Some(json!({"paused": false})),
        )
        .await;
    assert_eq!(resumed.status, StatusCode::OK, "{:?}", resumed.body);
    for i in &items {
        let r = app.buy_retrying(sale, *i, fresh_item(), 1, None).await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    }
    let audit = app.audit(sale).await;
    assert_eq!(audit["conserved"], true, "{audit}");
    let changes = change_kinds(&audit);
    assert_eq!(
        changes,
        ["restock", "paused", "resumed"],
        "each once: {audit}"
    );
    let listed = app.admin_get("/v1/admin/shard-map").await;
    assert!(listed.body["slots"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["slot"] == slot && s["group"] == "g1" && s["kind"] == "items"));
    // And back.
    let r = admin_post(
        &app,
        &format!("/v1/admin/moves/{}/reverse", moved["move_id"]),
        json!({}),
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    let back = wait_for_rest(&app, r.body["move_id"].as_u64().unwrap()).await;
    assert_eq!(back["phase"], "switched", "{back}");
    for i in &items {
        assert_eq!(app.state.router.route(KeyKind::Items, *i), 0);
        assert_eq!(app.remaining(sale, *i).await, left(*i) - 1);
    }
    assert_eq!(app.audit(sale).await["conserved"], true);
    // Completed, the slot has no open move left (other tests' keys may share it).
    let r = admin_post(
        &app,
        &format!("/v1/admin/moves/{}/complete", back["move_id"]),
        json!({}),
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    let done = wait_for_rest(&app, back["move_id"].as_u64().unwrap()).await;
    assert_eq!(done["phase"], "completed", "{done}");
}

/// After a users-slot switch the source keeps the slot fenced for a while (`slot_fences`, for
/// nodes that still route the slot there): a cancel or a payment that reaches it then is refused
/// like one under a user's own fence, never applied to the copy left behind.
#[tokio::test]
async fn cancels_and_payments_respect_a_users_slot_fence() {
    let own = OwnCluster::start(2);
    let app = own_app(&own).await;
    let item = fresh_item();
    let sale = app
        .create_sale(json!([{"item_id": item, "stock": 5, "price_cents": 100}]))
        .await;
    let user = fresh_item();
    let r = app.buy_retrying(sale, item, user, 1, None).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let order = r.body["order_id"].as_str().unwrap().to_string();
    let group = app.state.router.route(KeyKind::Users, user);
    let slot = seckill::router::slot_of(user, app.state.router.kind(KeyKind::Users).slot_count());
    let fence = format!(
        "WITH f AS (INSERT INTO slot_fences (kind, slot, move_id, until)
                    VALUES ('users', {slot}, 999999, now() + interval '1 minute') RETURNING 1)
         SELECT count(*) FROM f"
    );
    assert_eq!(app.sql_i64(group, &fence).await, 1);
    let cancel = format!("/v1/users/{user}/orders/{order}/cancel");
    let r = app.post(&cancel, json!({})).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{:?}", r.body);
    let r = app.pay(user, &order, 100, &format!("psp-{user}")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{:?}", r.body);
    let lift = format!(
        "WITH f AS (DELETE FROM slot_fences WHERE kind = 'users' AND slot = {slot} RETURNING 1)
         SELECT count(*) FROM f"
    );
    assert_eq!(app.sql_i64(group, &lift).await, 1);
    let r = app.post(&cancel, json!({})).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["status"], "cancelled");
}

/// The situation after adding a group: every slot on g0, none on g1 (its own cluster: the moves
/// write slot entries every engine on the cluster reads).
#[tokio::test]
async fn rebalance_gives_an_empty_group_its_share_of_the_slots() {
    let own = OwnCluster::start(2);
    let mut config = base_config(&own.0);
    config.routing.slots = 16;
    for kind in [&mut config.routing.items, &mut config.routing.users] {
        kind.slot_map = vec![seckill::config::SlotAssignment {
            slots: "0-15".into(),
            group: "g0".into(),
        }];
    }
    let app = spawn_config(
        config,
        seckill::app::Background {
            monitor: false,
            ..Default::default()
        },
    )
    .await;
    let items: Vec<u64> = (0..6).map(|_| fresh_item()).collect();
    let sale = app
        .create_sale(json!(items
            .iter()
            .map(|i| json!({"item_id": i, "stock": 10, "price_cents": 1}))
            .collect::<Vec<_>>()))
        .await;
    let mut orders = Vec::new();
    for i in &items {
        let user = fresh_item();
        let r = app.buy(sale, *i, user, 1, None).await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
        orders.push((user, r.body["order_id"].as_str().unwrap().to_string()));
    }

    let mover = app.state.moves.clone();
    for kind in [KeyKind::Items, KeyKind::Users] {
        let plan = mover.rebalance_plan(kind).await.expect("plan");
        assert_eq!(plan.len(), 8, "{plan:?}");
        assert!(plan.iter().all(|(_, from, to)| from == "g0" && to == "g1"));
        for (slot, _, to) in plan {
            let m = mover
                .start(kind, seckill::moves::Unit::Slot(slot), &to, true)
                .await
                .expect("start");
            let done = wait_for_rest(&app, m.move_id).await;
            assert_eq!(done["phase"], "completed", "{done}");
        }
        assert!(mover.rebalance_plan(kind).await.expect("plan").is_empty());
        let on_g1 = (0..16u32)
            .filter(|&s| app.state.router.table().slot(kind, s) == Some(1))
            .count();
        assert_eq!(on_g1, 8);
    }
    // Everything is where the routes say, and still sells, pays and reads.
    for (i, (user, order)) in items.iter().zip(&orders) {
        assert_eq!(app.remaining(sale, *i).await, 9);
        let r = app.get(&format!("/v1/users/{user}/orders/{order}")).await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        // A fresh cluster on a loaded machine may still be opening connections: retried as
        // clients do (the move, not the first connection, is what this test is about).
        let r = app.buy_retrying(sale, *i, fresh_item(), 1, None).await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    }
    let audit = app.audit(sale).await;
    assert_eq!(audit["conserved"], true, "{audit}");
}
