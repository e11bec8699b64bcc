//! The order path under real concurrency: exact stock, per-user limits, windows, compensation,
//! idempotency.

use crate::helpers::*;
use reqwest::StatusCode;
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// 2,000 concurrent requests from 1,500 users (some repeating) for 200 units, limit 1.
async fn race_limit_one(app: Arc<TestApp>) {
    let item = fresh_item();
    let sale = app
        .create_sale(
            json!([{"item_id": item, "stock": 200, "price_cents": 500, "per_user_limit": 1}]),
        )
        .await;
    let base = fresh_item() * 10;
    let mut asks: Vec<(u64, u32)> = (0..1500).map(|u| (base + u, 1)).collect();
    asks.extend((0..500).map(|i| (base + (i * 7) % 1500, 1)));
    let results = buy_all(&app, sale, item, asks).await;

    let created: Vec<&(u64, u32, Resp)> = results
        .iter()
        .filter(|(_, _, r)| r.status == StatusCode::CREATED)
        .collect();
    let mut codes: HashMap<String, usize> = HashMap::new();
    for (_, _, r) in &results {
        *codes
            .entry(format!("{} {}", r.status, r.code()))
            .or_default() += 1;
    }
    assert_eq!(
        created.len(),
        200,
        "exactly the stock is sold: {codes:?}, remaining {}",
        app.remaining(sale, item).await
    );
    for (_, _, r) in &results {
        assert!(
            r.status == StatusCode::CREATED || ["sold_out", "limit_exceeded"].contains(&r.code()),
            "unexpected answer {} {:?}",
            r.status,
            r.body
        );
    }
    let mut per_user: HashMap<u64, usize> = HashMap::new();
    for (u, _, _) in &created {
        *per_user.entry(*u).or_default() += 1;
    }
    assert!(
        per_user.values().all(|&n| n == 1),
        "nobody above the limit of 1"
    );
    assert_eq!(app.remaining(sale, item).await, 0);

    // Every acknowledged order is readable, and the orders live on both user groups.
    let mut groups = HashSet::new();
    for (u, _, r) in &created {
        let id = r.body["order_id"].as_str().expect("order_id");
        let got = app.get(&format!("/v1/users/{u}/orders/{id}")).await;
        assert_eq!(got.status, StatusCode::OK, "order {id} readable");
        assert_eq!(got.body["status"], "pending_payment");
        groups.insert(app.state.router.route(seckill::router::KeyKind::Users, *u));
    }
    assert_eq!(groups.len(), 2, "orders spread over both user groups");
    let audit = app.audit(sale).await;
    assert_eq!(audit["conserved"], true, "{audit}");
    assert_eq!(audit["items"][0]["remaining"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn race_sells_exactly_the_stock_coalesced() {
    race_limit_one(Arc::new(spawn_app().await)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn race_sells_exactly_the_stock_plain() {
    race_limit_one(Arc::new(
        spawn_app_with(|c| c.coalesce.enabled = false).await,
    ))
    .await;
}

/// Quantities 1..=3 with a limit of 3, for a stock that is not a multiple of 3.
async fn race_multi_quantity(app: Arc<TestApp>) {
    let item = fresh_item();
    let stock = 301;
    let sale = app
        .create_sale(
            json!([{"item_id": item, "stock": stock, "price_cents": 100, "per_user_limit": 3}]),
        )
        .await;
    let base = fresh_item() * 10;
    let asks: Vec<(u64, u32)> = (0..900u64)
        .map(|i| (base + i % 400, (i % 3) as u32 + 1))
        .collect();
    let results = buy_all(&app, sale, item, asks).await;
    let mut sold = 0u64;
    let mut per_user: HashMap<u64, u64> = HashMap::new();
    for (u, q, r) in &results {
        if r.status == StatusCode::CREATED {
            assert_eq!(r.body["quantity"].as_u64(), Some(u64::from(*q)));
            assert_eq!(r.body["amount_cents"].as_u64(), Some(100 * u64::from(*q)));
            sold += u64::from(*q);
            *per_user.entry(*u).or_default() += u64::from(*q);
        } else {
            assert!(
                ["sold_out", "limit_exceeded"].contains(&r.code()),
                "{:?}",
                r.body
            );
        }
    }
    assert!(
        per_user.values().all(|&n| n <= 3),
        "nobody above the limit of 3"
    );
    let remaining = app.remaining(sale, item).await;
    assert_eq!(sold as i64 + remaining, stock, "sold + remaining == stock");
    // Demand (1,800 units from 400 users x 3) far exceeds the stock: whatever is left is smaller
    // than every request that was refused for stock.
    let smallest_refused = results
        .iter()
        .filter(|(_, _, r)| r.code() == "sold_out")
        .map(|(_, q, _)| i64::from(*q))
        .min()
        .unwrap_or(1);
    assert!(
        remaining < smallest_refused,
        "remaining {remaining} would have served a refused request"
    );
    assert_eq!(app.audit(sale).await["conserved"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn race_with_quantities_coalesced() {
    race_multi_quantity(Arc::new(spawn_app().await)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn race_with_quantities_plain() {
    race_multi_quantity(Arc::new(
        spawn_app_with(|c| c.coalesce.enabled = false).await,
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buying_outside_the_window_is_refused_and_leaves_stock() {
    let app = spawn_app().await;
    let now = chrono::Utc::now();
    let early = fresh_item();
    let late = fresh_item();
    let future = app
        .create_sale_at(
            json!([{"item_id": early, "stock": 10, "price_cents": 1}]),
            now + chrono::Duration::hours(1),
            now + chrono::Duration::hours(2),
            None,
        )
        .await;
    let past = app
        .create_sale_at(
            json!([{"item_id": late, "stock": 10, "price_cents": 1}]),
            now - chrono::Duration::hours(2),
            now - chrono::Duration::hours(1),
            None,
        )
        .await;
    for coalesce in [true, false] {
        let app = if coalesce {
            spawn_app().await
        } else {
            spawn_app_with(|c| c.coalesce.enabled = false).await
        };
        let r = app.buy(future, early, 1, 1, None).await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::CONFLICT, "not_started"),
            "{:?}",
            r.body
        );
        let r = app.buy(past, late, 1, 1, None).await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::CONFLICT, "ended"),
            "{:?}",
            r.body
        );
    }
    assert_eq!(app.remaining(future, early).await, 10);
    assert_eq!(app.remaining(past, late).await, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_request_id_never_makes_a_second_order() {
    let app = Arc::new(spawn_app().await);
    let item = fresh_item();
    let sale = app
        .create_sale(
            json!([{"item_id": item, "stock": 50, "price_cents": 10, "per_user_limit": 5}]),
        )
        .await;
    let user = fresh_item();
    let handles: Vec<_> = (0..30)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move {
                app.buy_retrying(sale, item, user, 2, Some("checkout-1"))
                    .await
            })
        })
        .collect();
    let mut ids = HashSet::new();
    for h in handles {
        let r = h.await.expect("task");
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
        ids.insert(r.body["order_id"].as_str().expect("id").to_string());
    }
    assert_eq!(ids.len(), 1, "one order for one request_id");
    assert_eq!(app.remaining(sale, item).await, 48, "stock taken once");
    let list = app.get(&format!("/v1/users/{user}/orders")).await;
    assert_eq!(list.body["orders"].as_array().map(Vec::len), Some(1));
    // A different request_id is a different purchase.
    let r = app
        .buy_retrying(sale, item, user, 1, Some("checkout-2"))
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert!(!ids.contains(r.body["order_id"].as_str().unwrap_or_default()));
    assert_eq!(app.remaining(sale, item).await, 47);
}

/// Transaction 2 cannot reach the user's group: the stock returns, the client gets 503, and a
/// retry with the same request_id (once the group is back) creates exactly one order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_order_insert_returns_the_stock() {
    let healthy = spawn_app().await; // also applies migrations
    let item = fresh_item_in(&healthy, 0);
    let sale = healthy
        .create_sale(json!([{"item_id": item, "stock": 5, "price_cents": 10, "per_user_limit": 2}]))
        .await;
    let user = fresh_item();
    for coalesce in [true, false] {
        // The same cluster, except that every user routes to a group whose server is gone.
        let broken = spawn_with_dead_users(0, coalesce).await;
        let r = broken.buy(sale, item, user, 2, Some("retry-me")).await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            "{:?}",
            r.body
        );
        assert!(r.headers.contains_key("retry-after"));
        assert_eq!(
            healthy.remaining(sale, item).await,
            5,
            "stock returned by compensation"
        );
    }
    let state = healthy
        .sql_i64(
            0,
            &format!(
                "SELECT count(*) FROM reservations WHERE item_id = {item} AND state = 'released'"
            ),
        )
        .await;
    assert_eq!(
        state, 1,
        "the reservation is released, and a retry reuses it"
    );

    // The user's group is reachable again: the retry succeeds once, then replays.
    let first = healthy.buy(sale, item, user, 2, Some("retry-me")).await;
    assert_eq!(first.status, StatusCode::CREATED, "{:?}", first.body);
    let again = healthy.buy(sale, item, user, 2, Some("retry-me")).await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert_eq!(again.body["order_id"], first.body["order_id"]);
    assert_eq!(
        again
            .headers
            .get("idempotent-replayed")
            .map(|v| v.to_str().unwrap_or("")),
        Some("true")
    );
    assert_eq!(healthy.remaining(sale, item).await, 3);
    let order_id = first.body["order_id"].as_str().expect("id");
    let mut copies = 0;
    for g in 0..2 {
        copies += healthy
            .sql_i64(
                g,
                &format!("SELECT count(*) FROM orders WHERE order_id = '{order_id}'"),
            )
            .await;
    }
    assert_eq!(copies, 1, "exactly one order row across all groups");
    assert_eq!(healthy.audit(sale).await["conserved"], true);
}

/// Attempt A made the reservation, a retry B of the same request resumed it; A then gives up and
/// compensates. A's release must not touch B's reservation (B's order may be committing), and B's
/// retry of a sold-out item resumes its reservation instead of hearing "sold out".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_attempt_never_releases_a_reservation_a_retry_resumed() {
    use seckill::domain::{txn_id_for, ItemId, Quantity, RequestId, SaleId, UserId};
    use seckill::order::reservations;
    let app = spawn_app().await;
    let item = fresh_item();
    let sale = app
        .create_sale(json!([{"item_id": item, "stock": 1, "price_cents": 5}]))
        .await;
    let (s, i) = (
        SaleId::parse(sale.into()).unwrap(),
        ItemId::parse(item.into()).unwrap(),
    );
    let user = UserId::parse(fresh_item().into()).unwrap();
    let request = RequestId::parse("checkout-7".into()).unwrap();
    let txn = txn_id_for(s, i, user, Some(&request));
    let group = app.state.router.item_group(i);
    let mut client = app.state.cluster.group(group).writer().await.unwrap();
    let q = Quantity::parse(1).unwrap();

    let (a, _) = reservations::reserve_one(&mut client, s, i, user, q, txn, true)
        .await
        .unwrap();
    let a = a.expect("attempt A reserves");
    assert!(!a.existing);
    let (b, _) = reservations::reserve_one(&mut client, s, i, user, q, txn, true)
        .await
        .unwrap();
    let b = b.expect("attempt B resumes");
    assert!(b.existing && b.attempt > a.attempt, "{a:?} {b:?}");
    assert_eq!(app.remaining(sale, item).await, 0, "stock taken once");

    // A's compensation comes too late: nothing is released.
    let back = reservations::release(&mut client, &[txn], &[Some(a.attempt)])
        .await
        .unwrap();
    assert!(
        back.back.is_empty(),
        "a stale attempt released stock: {back:?}"
    );
    assert_eq!(app.remaining(sale, item).await, 0);
    drop(client);

    // The node has seen the item sold out; the same request still gets its order.
    let other = app.buy(sale, item, fresh_item(), 1, None).await;
    assert_eq!(other.code(), "sold_out");
    let r = app.buy(sale, item, user.key(), 1, Some("checkout-7")).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(r.body["order_id"], txn.to_string());
    assert_eq!(app.remaining(sale, item).await, 0);
    assert_eq!(app.audit(sale).await["conserved"], true);
}

/// Transaction 2 skips an existing order id by a probe; two inserts of one new id racing each
/// other (two attempts of one request, or the same id twice in a batch) make the probe miss, and
/// the loser must fall back to `ON CONFLICT` instead of failing: each id is inserted exactly once,
/// and every call answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_inserts_of_one_order_insert_it_once_and_never_fail() {
    use seckill::domain::{ItemId, SaleId, UserId};
    use seckill::order::store::{insert_orders, NewOrder, OrderStatus};
    let app = spawn_app().await;
    let slots = app
        .state
        .router
        .kind(seckill::router::KeyKind::Users)
        .slot_count();
    let user = UserId::parse(fresh_item().into()).unwrap();
    let group = app.state.router.user_group(user);
    let order = |id| NewOrder {
        order_id: id,
        user,
        sale: SaleId::parse(fresh_item().into()).unwrap(),
        item: ItemId::parse(fresh_item().into()).unwrap(),
        quantity: 1,
        amount_cents: 5,
        payment_window_secs: 900,
        status: OrderStatus::PendingPayment,
    };

    // The same id twice in one batch, beside a plain one.
    let (twice, plain) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    let client = app.state.cluster.group(group).writer().await.unwrap();
    let batch = [order(twice), order(plain), order(twice)];
    let inserted = insert_orders(&client, &batch, slots).await.unwrap();
    let mut ids: Vec<uuid::Uuid> = inserted.orders.iter().map(|o| o.order_id).collect();
    ids.sort();
    let mut expected = vec![twice, plain];
    expected.sort();
    assert_eq!(ids, expected, "each id once");

    // Two connections inserting the same new ids at the same moment.
    let racing: Vec<NewOrder> = (0..30).map(|_| order(uuid::Uuid::now_v7())).collect();
    let racers = (0..2).map(|_| {
        let (state, racing) = (app.state.clone(), racing.clone());
        tokio::spawn(async move {
            let mut won = Vec::new();
            for o in racing {
                let client = state.cluster.group(group).writer().await.unwrap();
                let inserted = insert_orders(&client, std::slice::from_ref(&o), slots)
                    .await
                    .expect("a racing insert answers");
                won.extend(inserted.orders.into_iter().map(|o| o.order_id));
            }
            won
        })
    });
    let mut won: Vec<uuid::Uuid> = Vec::new();
    for r in futures::future::join_all(racers).await {
        won.extend(r.unwrap());
    }
    won.sort();
    let mut all: Vec<uuid::Uuid> = racing.iter().map(|o| o.order_id).collect();
    all.sort();
    assert_eq!(won, all, "every racing id inserted by exactly one caller");
    for id in all.iter().chain([&twice, &plain]) {
        let found = app
            .get(&format!("/v1/users/{}/orders/{id}", user.key()))
            .await;
        assert_eq!(found.status, StatusCode::OK, "order {id} is stored");
    }
}
