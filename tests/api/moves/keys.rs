//! A key moves and back while it sells; the moves that cannot be are refused with a code; the
//! fences a key move puts up turn away what would write behind them.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
// Long on purpose: one scenario, its steps in the order they happen; split, it would no longer
// read as one story.
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
// Long on purpose: one scenario, its steps in the order they happen; split, it would no longer
// read as one story.
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
