//! Live moves of item keys between groups, under load: every acknowledged order survives, stock is
//! conserved, replays keep their order, the route follows; refusals carry codes; a move whose
//! runner died is resumed, and a cancelled one rolls back.

use crate::helpers::*;
use reqwest::StatusCode;
use seckill::router::KeyKind;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

async fn admin_post(app: &TestApp, path: &str, body: Value) -> Resp {
    app.admin(reqwest::Method::POST, path, Some(body)).await
}

/// Start a move and wait until it rests; the move as shown at the end.
async fn move_and_wait(app: &TestApp, body: Value) -> Value {
    let r = admin_post(app, "/v1/admin/moves", body.clone()).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{body}: {:?}", r.body);
    wait_for_rest(app, r.body["move_id"].as_u64().expect("move_id")).await
}

async fn wait_for_rest(app: &TestApp, id: u64) -> Value {
    let path = format!("/v1/admin/moves/{id}");
    let started = std::time::Instant::now();
    loop {
        let r = app.admin_get(&path).await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        let b = r.body;
        let rest = match b["phase"].as_str() {
            Some("switched") => b["dest_live"] == true && b["complete_requested"] == false,
            Some("completed" | "failed" | "cancelled") => b["cleanup_pending"] == false,
            _ => false,
        };
        if rest {
            return b;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "move {id} did not come to rest: {b}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What one buyer saw.
#[derive(Default)]
struct Seen {
    /// (user, request_id, order_id) of every purchase answered 201 (or 200: a replay).
    orders: Vec<(u64, String, String)>,
    unavailable: usize,
    greedy: u64,
}

/// A buyer hammering one item until `stop`: fresh users, and every fifth purchase by one greedy
/// user (limit 2). Every 503 must carry Retry-After and is retried with its request_id until it
/// settles; anything but an order or a refusal with a code fails the test.
async fn buyer(app: Arc<TestApp>, sale: u64, item: u64, stop: Arc<AtomicBool>) -> Seen {
    let mut seen = Seen {
        greedy: fresh_item(),
        ..Default::default()
    };
    let mut i = 0u64;
    while !stop.load(Ordering::SeqCst) {
        i += 1;
        let user = if i.is_multiple_of(5) {
            seen.greedy
        } else {
            fresh_item()
        };
        let rid = uuid::Uuid::new_v4().to_string();
        let mut r = app.buy(sale, item, user, 1, Some(&rid)).await;
        if r.status == StatusCode::SERVICE_UNAVAILABLE {
            assert!(
                r.headers.contains_key("retry-after"),
                "503 without Retry-After: {:?}",
                r.body
            );
            seen.unavailable += 1;
            r = app.buy_retrying(sale, item, user, 1, Some(&rid)).await;
        }
        match r.status {
            StatusCode::CREATED | StatusCode::OK => {
                let id = r.body["order_id"].as_str().expect("order_id").to_string();
                seen.orders.push((user, rid, id));
            }
            StatusCode::CONFLICT if ["limit_exceeded", "sold_out"].contains(&r.code()) => {}
            // The greedy user asks faster than the per-user rate limit allows.
            StatusCode::TOO_MANY_REQUESTS if user == seen.greedy => {}
            s => panic!("unexpected answer {s}: {:?}", r.body),
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_item_moves_and_back_while_it_sells() {
    let app = Arc::new(spawn_app().await);
    let item = fresh_item_in(&app, 0);
    let stock = 20_000;
    let sale = app
        .create_sale(
            json!([{"item_id": item, "stock": stock, "price_cents": 5, "per_user_limit": 2}]),
        )
        .await;
    let stop = Arc::new(AtomicBool::new(false));
    let buyers: Vec<_> = (0..16)
        .map(|_| tokio::spawn(buyer(app.clone(), sale, item, stop.clone())))
        .collect();

    tokio::time::sleep(Duration::from_millis(500)).await;
    let there = move_and_wait(&app, json!({"kind": "items", "key": item, "to": "g1"})).await;
    assert_eq!(there["phase"], "switched", "{there}");
    eprintln!(
        "move g0 -> g1 under load: write pause {} ms, {} rows copied",
        there["write_pause_ms"], there["rows_copied"]
    );
    assert!(there["write_pause_ms"].as_i64().is_some(), "{there}");
    let route = app
        .admin_get(&format!("/v1/admin/route/items/{item}"))
        .await;
    assert_eq!(
        (route.body["group"].as_str(), route.body["source"].as_str()),
        (Some("g1"), Some("table"))
    );
    // The source keeps an inactive (fenced) copy: the way back.
    let fenced_on_g0 =
        format!("SELECT count(*) FROM sale_items WHERE item_id = {item} AND fenced_by IS NOT NULL");
    assert_eq!(app.sql_i64(0, &fenced_on_g0).await, 1);
    let listed = app.admin_get("/v1/admin/shard-map").await;
    assert!(listed.body["moves"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["move_id"] == there["move_id"]));

    tokio::time::sleep(Duration::from_millis(500)).await;
    let first = there["move_id"].as_u64().unwrap();
    let r = admin_post(&app, &format!("/v1/admin/moves/{first}/reverse"), json!({})).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    let back = wait_for_rest(&app, r.body["move_id"].as_u64().unwrap()).await;
    assert_eq!(
        (
            back["phase"].as_str(),
            back["from"].as_str(),
            back["to"].as_str()
        ),
        (Some("switched"), Some("g1"), Some("g0")),
        "{back}"
    );
    eprintln!(
        "move g1 -> g0 (reverse) under load: write pause {} ms, {} rows copied",
        back["write_pause_ms"], back["rows_copied"]
    );
    let old = app.admin_get(&format!("/v1/admin/moves/{first}")).await;
    assert_eq!(old.body["reversed_by"], back["move_id"]);
    assert_eq!(old.body["phase"], "cancelled");
    assert_eq!(app.state.router.route(KeyKind::Items, item), 0);

    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let mut seen = Vec::new();
    for b in buyers {
        seen.push(b.await.expect("buyer"));
    }
    let orders: Vec<&(u64, String, String)> = seen.iter().flat_map(|s| &s.orders).collect();
    let unavailable: usize = seen.iter().map(|s| s.unavailable).sum();
    eprintln!(
        "{} orders, {unavailable} answers 503 (each retried to an outcome)",
        orders.len()
    );
    assert!(orders.len() > 50, "the buyers bought: {}", orders.len());
    let ids: HashSet<&String> = orders.iter().map(|o| &o.2).collect();
    assert_eq!(ids.len(), orders.len(), "no order acknowledged twice");

    // Stock: sold == acknowledged orders, conserved, on the item's group.
    let audit = app.audit(sale).await;
    assert_eq!(audit["conserved"], true, "{audit}");
    let a = &audit["items"][0];
    let sold = a["reserved"].as_i64().unwrap()
        + a["ordered"].as_i64().unwrap()
        + a["paid"].as_i64().unwrap();
    assert_eq!(sold, orders.len() as i64, "{audit}");
    assert_eq!(app.remaining(sale, item).await, stock - sold);
    // Nobody over the limit.
    for s in &seen {
        let greedy = orders.iter().filter(|o| o.0 == s.greedy).count();
        assert!(greedy <= 2, "user {} bought {greedy}", s.greedy);
    }
    // Every acknowledged order exists (on its user's group), each is readable through the API,
    // and a replay of its request returns it.
    let list = orders
        .iter()
        .map(|o| format!("'{}'", o.2))
        .collect::<Vec<_>>()
        .join(",");
    let mut stored = 0;
    for g in 0..2 {
        stored += app
            .sql_i64(
                g,
                &format!("SELECT count(*) FROM orders WHERE order_id IN ({list})"),
            )
            .await;
    }
    assert_eq!(stored, orders.len() as i64, "every 201 order is stored");
    for (user, rid, id) in orders.iter().step_by(7) {
        let r = app.get(&format!("/v1/users/{user}/orders/{id}")).await;
        assert_eq!(r.status, StatusCode::OK, "order {id}: {:?}", r.body);
        let again = app.buy(sale, item, *user, 1, Some(rid)).await;
        if again.status == StatusCode::TOO_MANY_REQUESTS {
            continue; // a greedy user's replays count against its rate limit too
        }
        assert_eq!(
            again.status,
            StatusCode::CREATED,
            "replay {rid}: {:?}",
            again.body
        );
        assert_eq!(again.headers["idempotent-replayed"], "true");
        assert_eq!(again.body["order_id"].as_str(), Some(id.as_str()));
    }
    // A cancel after the moves returns the stock on the item's group.
    let (user, _, id) = orders[0];
    let r = app
        .post_as(
            *user,
            &format!("/v1/users/{user}/orders/{id}/cancel"),
            json!({}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(app.remaining(sale, item).await, stock - sold + 1);
    assert_eq!(app.audit(sale).await["conserved"], true);

    // Completing drops the copy on g1 (its sale_items row stays, fenced, as a tombstone).
    let second = back["move_id"].as_u64().unwrap();
    let r = admin_post(
        &app,
        &format!("/v1/admin/moves/{second}/complete"),
        json!({}),
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    let done = wait_for_rest(&app, second).await;
    assert_eq!(done["phase"], "completed", "{done}");
    let on_g1 = |table: &str| format!("SELECT count(*) FROM {table} WHERE item_id = {item}");
    assert_eq!(app.sql_i64(1, &on_g1("reservations")).await, 0);
    assert_eq!(
        app.sql_i64(
            1,
            &format!(
                "SELECT count(*) FROM sale_items WHERE item_id = {item} AND fenced_by IS NOT NULL"
            )
        )
        .await,
        1
    );
    assert_eq!(app.audit(sale).await["conserved"], true);
}

#[tokio::test]
async fn moves_that_cannot_be_are_refused_with_a_code() {
    let app = spawn_app().await;
    let item = fresh_item_in(&app, 0);
    let sale = app
        .create_sale(json!([{"item_id": item, "stock": 10, "price_cents": 1, "per_user_limit": 2}]))
        .await;
    assert_eq!(
        app.buy(sale, item, fresh_item(), 2, None).await.status,
        StatusCode::CREATED
    );
    let listed = app.admin_get("/v1/admin/moves").await;
    assert_eq!(listed.status, StatusCode::OK, "{:?}", listed.body);

    // A dry run says what would be copied and changes nothing.
    let r = admin_post(
        &app,
        "/v1/admin/moves",
        json!({"kind": "items", "key": item, "to": "g1", "dry_run": true}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["from"], "g0");
    assert_eq!(r.body["source"]["keys"], 1);
    assert_eq!(r.body["destination"]["live"], 0);
    assert_eq!(r.body["rows_to_copy"], 2);
    assert!(!r.body["checks"].as_array().unwrap().is_empty());
    let after = app.admin_get("/v1/admin/moves").await;
    assert!(
        after.body["moves"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["key"] != item),
        "a dry run records no move"
    );
    assert_eq!(app.state.router.route(KeyKind::Items, item), 0);
    assert_eq!(
        app.sql_i64(
            1,
            &format!("SELECT count(*) FROM sale_items WHERE item_id = {item}")
        )
        .await,
        0
    );

    for (body, status, code) in [
        (
            json!({"kind": "items", "key": item, "to": "g9"}),
            422,
            "invalid_request",
        ),
        (
            json!({"kind": "items", "key": item, "to": "g0"}),
            422,
            "invalid_request",
        ),
        (
            json!({"kind": "items", "key": item, "slot": 3, "to": "g1"}),
            422,
            "invalid_request",
        ),
        (json!({"kind": "items", "to": "g1"}), 422, "invalid_request"),
        (
            json!({"kind": "items", "slot": 99_999, "to": "g1"}),
            422,
            "invalid_request",
        ),
        (
            json!({"kind": "orders", "key": 7, "to": "g1"}),
            422,
            "invalid_request",
        ),
        (
            json!({"kind": "items", "key": 0, "to": "g1"}),
            422,
            "invalid_request",
        ),
        (
            json!({"kind": "items", "key": item, "to": "g1", "extra": 1}),
            422,
            "invalid_request",
        ),
    ] {
        let r = admin_post(&app, "/v1/admin/moves", body.clone()).await;
        assert_eq!(
            (r.status.as_u16(), r.code()),
            (status, code),
            "{body}: {:?}",
            r.body
        );
    }

    // Live rows for the key on the destination: refused before any copy.
    let other = fresh_item_in(&app, 0);
    let other_sale = app
        .create_sale(json!([{"item_id": other, "stock": 5, "price_cents": 1}]))
        .await;
    let g1 = app.state.cluster.group(1).writer().await.expect("g1");
    g1.execute(
        &format!(
            "INSERT INTO sale_items (sale_id, item_id, stock, remaining, price_cents, per_user_limit,
                 starts_at, ends_at, payment_window_secs)
             VALUES ({}, {other}, 1, 1, 1, 1, now(), now() + interval '1 hour', 60)",
            other_sale + 1
        ),
        &[],
    )
    .await
    .expect("stray row");
    let r = admin_post(
        &app,
        "/v1/admin/moves",
        json!({"kind": "items", "key": other, "to": "g1"}),
    )
    .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::CONFLICT, "has_data"),
        "{:?}",
        r.body
    );
    g1.execute(
        &format!("DELETE FROM sale_items WHERE item_id = {other}"),
        &[],
    )
    .await
    .expect("cleanup");

    // A second move of a key with an open move; cancel of a switched move; a set on a key with
    // rows (it must be moved).
    let moved = move_and_wait(&app, json!({"kind": "items", "key": item, "to": "g1"})).await;
    let id = moved["move_id"].as_u64().unwrap();
    let r = admin_post(
        &app,
        "/v1/admin/moves",
        json!({"kind": "items", "key": item, "to": "g0"}),
    )
    .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::CONFLICT, "move_conflict"),
        "{:?}",
        r.body
    );
    let r = admin_post(&app, &format!("/v1/admin/moves/{id}/cancel"), json!({})).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::CONFLICT, "move_conflict"),
        "{:?}",
        r.body
    );
    let r = admin_post(&app, &format!("/v1/admin/moves/{id}/jump"), json!({})).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = admin_post(&app, "/v1/admin/moves/999999999/cancel", json!({})).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = app
        .send(
            app.http
                .put(format!("{}/v1/admin/shard-map/items/{item}", app.addr))
                .bearer_auth(TOKEN)
                .json(&json!({"group": "g0"})),
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::CONFLICT, "has_data"),
        "{:?}",
        r.body
    );
    // The item sells on its new group.
    assert_eq!(app.remaining(sale, item).await, 8);
    assert_eq!(
        app.buy(sale, item, fresh_item(), 1, None).await.status,
        StatusCode::CREATED
    );
    assert_eq!(app.remaining(sale, item).await, 7);
    let anonymous = app
        .send(
            app.http
                .post(format!("{}/v1/admin/moves", app.addr))
                .json(&json!({"kind": "items", "key": item, "to": "g0"})),
        )
        .await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
}

/// Insert a move as a runner that died would leave it: claimed by a gone owner whose lease ran
/// out.
async fn orphan_move(app: &TestApp, item: u64, phase: &str, extra: &str) -> u64 {
    let config = app
        .state
        .cluster
        .group(0)
        .writer()
        .await
        .expect("config group");
    let id: i64 = config
        .query_one(
            &format!(
                "INSERT INTO moves (move_id, kind, key, from_group, to_group, phase, owner,
                     lease_until, watermark {extra_cols})
                 SELECT coalesce(max(move_id), 0) + 1, 'items', {item}, 'g0', 'g1', '{phase}',
                        'gone-node', now() - interval '1 minute', now() - interval '1 hour'
                        {extra_vals}
                 FROM moves RETURNING move_id",
                extra_cols = if extra.is_empty() {
                    ""
                } else {
                    ", cancel_requested"
                },
                extra_vals = if extra.is_empty() {
                    "".to_string()
                } else {
                    format!(", {extra}")
                },
            ),
            &[],
        )
        .await
        .expect("orphan move")
        .get(0);
    id as u64
}

#[tokio::test]
async fn a_move_whose_runner_died_is_resumed_and_a_cancelled_one_rolls_back() {
    let app = spawn_app().await;
    // Died mid-copy: half a copy on g1 (a stale sale_items row, fenced), the route untouched.
    let item = fresh_item_in(&app, 0);
    let sale = app
        .create_sale(json!([{"item_id": item, "stock": 10, "price_cents": 1}]))
        .await;
    let mut bought = HashMap::new();
    for _ in 0..3 {
        let user = fresh_item();
        let r = app.buy(sale, item, user, 1, None).await;
        assert_eq!(r.status, StatusCode::CREATED);
        bought.insert(user, r.body["order_id"].as_str().unwrap().to_string());
    }
    let id = orphan_move(&app, item, "copying", "").await;
    let g1 = app.state.cluster.group(1).writer().await.expect("g1");
    g1.execute(
        &format!(
            "INSERT INTO sale_items (sale_id, item_id, stock, remaining, price_cents, per_user_limit,
                 starts_at, ends_at, payment_window_secs, fenced_by)
             SELECT {sale}, {item}, 10, 10, 1, 1, now(), now() + interval '1 hour', 60, {id}"
        ),
        &[],
    )
    .await
    .expect("half a copy");
    // While it is orphaned the item still sells on g0.
    let r = app.buy(sale, item, fresh_item(), 1, None).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let resumed = wait_for_rest(&app, id).await;
    assert_eq!(resumed["phase"], "switched", "{resumed}");
    // Any engine node on the cluster may have resumed it: this one sees the route within
    // routing.table_refresh_ms.
    assert!(
        eventually(Duration::from_secs(5), || async {
            app.state.router.route(KeyKind::Items, item) == 1
        })
        .await
    );
    assert_eq!(app.remaining(sale, item).await, 6);
    for (user, order) in &bought {
        let r = app.get(&format!("/v1/users/{user}/orders/{order}")).await;
        assert_eq!(r.status, StatusCode::OK);
    }
    let r = app.buy(sale, item, fresh_item(), 1, None).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let audit = app.audit(sale).await;
    assert_eq!(audit["conserved"], true, "{audit}");
    assert_eq!(audit["items"][0]["remaining"], 5);

    // A reverse of it that fails (here: cancelled while its runner is gone) leaves the move it
    // would have reversed as it was: switched, and completable.
    let config = app
        .state
        .cluster
        .group(0)
        .writer()
        .await
        .expect("config group");
    let rev: i64 = config
        .query_one(
            &format!(
                "INSERT INTO moves (move_id, kind, key, from_group, to_group, phase, owner,
                     lease_until, reverse_of, cancel_requested)
                 SELECT coalesce(max(move_id), 0) + 1, 'items', {item}, 'g1', 'g0', 'copying',
                        'gone-node', now() - interval '1 minute', {id}, true
                 FROM moves RETURNING move_id"
            ),
            &[],
        )
        .await
        .expect("orphan reverse")
        .get(0);
    config
        .execute(
            &format!("UPDATE moves SET reversed_by = {rev} WHERE move_id = {id}"),
            &[],
        )
        .await
        .expect("reversed_by");
    drop(config);
    let r = admin_post(&app, &format!("/v1/admin/moves/{id}/complete"), json!({})).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::CONFLICT, "move_conflict"),
        "a move being reversed is not completed: {:?}",
        r.body
    );
    let rev_done = wait_for_rest(&app, rev as u64).await;
    assert_eq!(rev_done["phase"], "cancelled", "{rev_done}");
    let original = app.admin_get(&format!("/v1/admin/moves/{id}")).await.body;
    assert_eq!(
        (original["phase"].as_str(), original["reversed_by"].as_u64()),
        (Some("switched"), None),
        "{original}"
    );
    assert_eq!(app.state.router.route(KeyKind::Items, item), 1);
    let r = admin_post(&app, &format!("/v1/admin/moves/{id}/complete"), json!({})).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    assert_eq!(wait_for_rest(&app, id).await["phase"], "completed");
    assert_eq!(app.remaining(sale, item).await, 5);

    // Cancelled while its runner is gone: the source is unfenced, the copy dropped.
    let item = fresh_item_in(&app, 0);
    let sale = app
        .create_sale(json!([{"item_id": item, "stock": 4, "price_cents": 1}]))
        .await;
    let id = orphan_move(&app, item, "fenced", "true").await;
    let g0 = app.state.cluster.group(0).writer().await.expect("g0");
    g0.execute(
        &format!("UPDATE sale_items SET fenced_by = {id} WHERE item_id = {item}"),
        &[],
    )
    .await
    .expect("fence");
    g1.execute(
        &format!(
            "INSERT INTO sale_items (sale_id, item_id, stock, remaining, price_cents, per_user_limit,
                 starts_at, ends_at, payment_window_secs, fenced_by)
             SELECT {sale}, {item}, 4, 4, 1, 1, now(), now() + interval '1 hour', 60, {id}"
        ),
        &[],
    )
    .await
    .expect("copy");
    let cancelled = wait_for_rest(&app, id).await;
    assert_eq!(cancelled["phase"], "cancelled", "{cancelled}");
    assert_eq!(app.state.router.route(KeyKind::Items, item), 0);
    assert_eq!(
        app.sql_i64(
            1,
            &format!("SELECT count(*) FROM sale_items WHERE item_id = {item}")
        )
        .await,
        0
    );
    let r = app.buy(sale, item, fresh_item(), 1, None).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(app.remaining(sale, item).await, 3);
}

/// Users of one hash slot, `n` of them.
fn users_in_slot(app: &TestApp, slot: u32, n: usize) -> Vec<u64> {
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

/// A key move fences the item itself, not only its rows: a sale created for an item that has no
/// rows yet while it moves is refused on the source (it would be left behind by the move).
#[tokio::test]
async fn a_key_fence_turns_away_a_new_sale_of_an_item_without_rows() {
    let own = OwnCluster::start(2);
    let app = own_app(&own).await;
    let item = fresh_item_in(&app, 0);
    let mut c = app.state.cluster.group(0).writer().await.expect("writer");
    let move_id = (rand_u64() % 1_000_000 + 1) as i64;
    seckill::moves::items::fence(&mut c, move_id, &[item as i64])
        .await
        .expect("fence");
    let body = json!([{"item_id": item, "stock": 5, "price_cents": 1}]);
    let now = chrono::Utc::now();
    let r = app
        .admin(
            reqwest::Method::POST,
            "/v1/admin/sales",
            Some(
                json!({"name": "during a move", "starts_at": now.to_rfc3339(),
                        "ends_at": (now + chrono::Duration::hours(1)).to_rfc3339(),
                        "items": body.clone()}),
            ),
        )
        .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{:?}", r.body);
    let rows = format!("SELECT count(*) FROM sale_items WHERE item_id = {item}");
    assert_eq!(
        app.sql_i64(0, &rows).await,
        0,
        "nothing left behind on the source"
    );
    seckill::moves::items::unfence(&**c, move_id)
        .await
        .expect("unfence");
    let sale = app.create_sale(body).await;
    assert_eq!(app.remaining(sale, item).await, 5);
}

/// A runner that lost its claim fences after the new runner rolled the move back: the fence is
/// refused, so the source is not left fenced by a move that no longer exists.
#[tokio::test]
async fn a_fence_that_comes_after_the_roll_back_is_refused() {
    let own = OwnCluster::start(2);
    let app = own_app(&own).await;
    let item = fresh_item_in(&app, 0);
    let sale = app
        .create_sale(json!([{"item_id": item, "stock": 5, "price_cents": 1}]))
        .await;
    let mut c = app.state.cluster.group(0).writer().await.expect("writer");
    let move_id = (rand_u64() % 1_000_000 + 1) as i64;
    seckill::moves::end_on_source(KeyKind::Items, &mut c, move_id)
        .await
        .expect("roll back");
    let late = seckill::moves::items::fence(&mut c, move_id, &[item as i64]).await;
    assert!(late.is_err(), "a fence for an ended move: {late:?}");
    let fenced =
        format!("SELECT count(*) FROM sale_items WHERE item_id = {item} AND fenced_by IS NOT NULL");
    assert_eq!(app.sql_i64(0, &fenced).await, 0);
    let r = app.buy_retrying(sale, item, fresh_item(), 1, None).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
}

/// An engine on a cluster of the test's own.
async fn own_app(own: &OwnCluster) -> TestApp {
    spawn_config(
        base_config(&own.0),
        seckill::app::Background {
            monitor: false,
            ..Default::default()
        },
    )
    .await
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

/// A real mover process (the CLI) SIGKILLed while it copies a big item: an engine node resumes the
/// move once the dead runner's lease runs out, and it switches with nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mover_killed_mid_copy_is_resumed_by_an_engine() {
    use std::io::BufRead;
    let app = spawn_app().await;
    let item = fresh_item_in(&app, 0);
    let held = 200_000i64;
    let stock = held + 100;
    let sale = app
        .create_sale(json!([{"item_id": item, "stock": stock, "price_cents": 1}]))
        .await;
    // A big item: 200,000 reservations (as if sold), written directly.
    let g0 = app.state.cluster.group(0).writer().await.expect("g0");
    g0.batch_execute(&format!(
        "INSERT INTO reservations (txn_id, sale_id, item_id, user_id, quantity, state)
         SELECT gen_random_uuid(), {sale}, {item}, n, 1, 'ordered' FROM generate_series(1, {held}) n;
         UPDATE sale_items SET remaining = remaining - {held} WHERE sale_id = {sale} AND item_id = {item};"
    ))
    .await
    .expect("bulk reservations");
    drop(g0);

    let dir = std::env::temp_dir().join(format!("seckill-moves-{}", fresh_item()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("shards.toml");
    std::fs::write(&config, cluster().shards_toml("127.0.0.1:0", &secrets())).unwrap();
    // The CLI's dry run plans and changes nothing.
    let dry = std::process::Command::new(env!("CARGO_BIN_EXE_seckill"))
        .args(["shard-map", "--config"])
        .arg(&config)
        .args([
            "move",
            "items",
            &item.to_string(),
            "--to",
            "g1",
            "--dry-run",
        ])
        .output()
        .expect("the CLI runs");
    assert!(
        dry.status.success(),
        "{}",
        String::from_utf8_lossy(&dry.stderr)
    );
    let plan: Value = serde_json::from_slice(&dry.stdout).expect("the plan as JSON");
    assert_eq!(plan["rows_to_copy"], held + 1, "{plan}");
    let listed = app.admin_get("/v1/admin/moves").await;
    assert!(listed.body["moves"]
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["key"] != item));
    let mut mover = std::process::Command::new(env!("CARGO_BIN_EXE_seckill"))
        .args(["shard-map", "--config"])
        .arg(&config)
        .args(["move", "items", &item.to_string(), "--to", "g1"])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("the CLI runs");
    let stderr = mover.stderr.take().expect("stderr");
    let mut lines = std::io::BufReader::new(stderr).lines();
    let started = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| {
            l.strip_prefix("move ")
                .and_then(|rest| rest.split(':').next())
                .and_then(|id| id.parse::<u64>().ok())
        })
        .expect("the move started");
    tokio::time::sleep(Duration::from_millis(300)).await;
    mover.kill().expect("SIGKILL the mover");
    let _ = mover.wait();
    let at_kill = app
        .admin_get(&format!("/v1/admin/moves/{started}"))
        .await
        .body;
    assert!(
        ["copying", "catching_up"].contains(&at_kill["phase"].as_str().unwrap_or("")),
        "killed mid-copy: {at_kill}"
    );
    // Meanwhile the item sells on g0.
    let r = app.buy(sale, item, fresh_item(), 1, None).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);

    let done = wait_for_rest(&app, started).await;
    assert_eq!(done["phase"], "switched", "{done}");
    assert!(
        eventually(Duration::from_secs(5), || async {
            app.state.router.route(KeyKind::Items, item) == 1
        })
        .await
    );
    assert_eq!(
        app.sql_i64(
            1,
            &format!(
                "SELECT count(*) FROM reservations WHERE sale_id = {sale} AND item_id = {item}"
            )
        )
        .await,
        held + 1
    );
    assert_eq!(app.remaining(sale, item).await, 99);
    let r = app.buy(sale, item, fresh_item(), 1, None).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(app.audit(sale).await["conserved"], true);
    let _ = std::fs::remove_dir_all(&dir);
}
