//! Coalescing under real concurrency: batch boundaries, partial fill, duplicates in one batch,
//! a failing transaction 2 inside a batch, the sold-out cache across nodes, admission control.

use crate::helpers::*;
use reqwest::StatusCode;
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn small_batches_partial_fill_and_duplicates_stay_exact() {
    // Batches of at most 4: hundreds of requests cross many batch boundaries.
    let app = Arc::new(spawn_app_with(|c| c.coalesce.max_batch = 4).await);
    let item = fresh_item();
    let stock = 97;
    let sale = app
        .create_sale(
            json!([{"item_id": item, "stock": stock, "price_cents": 1, "per_user_limit": 2}]),
        )
        .await;
    let base = fresh_item();
    // 40 users each send 6 requests at once (duplicates land in the same batches), quantities 1-2.
    let asks: Vec<(u64, u32)> = (0..240u64)
        .map(|n| (base + n % 40, 1 + (n % 2) as u32))
        .collect();
    let results = buy_all(&app, sale, item, asks).await;
    let mut per_user: HashMap<u64, u64> = HashMap::new();
    let mut sold = 0;
    for (u, q, r) in &results {
        match r.status {
            StatusCode::CREATED => {
                sold += u64::from(*q);
                *per_user.entry(*u).or_default() += u64::from(*q);
            }
            _ => assert!(
                ["sold_out", "limit_exceeded"].contains(&r.code()),
                "{:?}",
                r.body
            ),
        }
    }
    assert!(
        per_user.values().all(|&n| n <= 2),
        "limit 2 held with duplicates in batches: {per_user:?}"
    );
    // 40 users x 2 = 80 units of demand at most: all of it is served, nothing more.
    assert_eq!(sold, 80);
    assert_eq!(app.remaining(sale, item).await, stock - 80);
    assert_eq!(app.audit(sale).await["conserved"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partial_fill_when_stock_runs_out_mid_batch() {
    let app = Arc::new(spawn_app().await);
    let item = fresh_item();
    let sale = app
        .create_sale(json!([{"item_id": item, "stock": 10, "price_cents": 1, "per_user_limit": 3}]))
        .await;
    let base = fresh_item();
    let asks: Vec<(u64, u32)> = (0..60u64)
        .map(|n| (base + n, 3))
        .chain((60..80).map(|n| (base + n, 1)))
        .collect();
    let results = buy_all(&app, sale, item, asks).await;
    let sold: u64 = results
        .iter()
        .filter(|(_, _, r)| r.status == StatusCode::CREATED)
        .map(|(_, q, _)| u64::from(*q))
        .sum();
    assert_eq!(sold, 10, "every unit sold, none twice");
    assert_eq!(app.remaining(sale, item).await, 0);
    assert_eq!(app.audit(sale).await["conserved"], true);
}

/// Users on a dead group share batches with users on a live one: only the dead group's requests
/// fail (503) and only their stock comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_order_insert_compensates_only_its_own_requests() {
    let healthy = spawn_app().await;
    let item = fresh_item_in(&healthy, 0);
    let stock = 100;
    let sale = healthy
        .create_sale(
            json!([{"item_id": item, "stock": stock, "price_cents": 1, "per_user_limit": 1}]),
        )
        .await;
    let boundary = 1_000_000u64;
    let app = Arc::new(spawn_with_dead_users(boundary, true).await);
    let base = fresh_item() % 1000;
    let handles: Vec<_> = (0..80u64)
        .map(|n| {
            let app = app.clone();
            // Even requests: users on g0; odd: users on the dead group.
            let user = if n % 2 == 0 {
                base * 1000 % boundary + n
            } else {
                boundary + base * 1000 + n
            };
            tokio::spawn(async move { (n, app.buy(sale, item, user, 1, None).await) })
        })
        .collect();
    let mut ok = 0;
    for h in handles {
        let (n, r) = h.await.unwrap();
        if n % 2 == 0 {
            assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
            ok += 1;
        } else {
            assert_eq!(
                (r.status, r.code()),
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
                "{:?}",
                r.body
            );
        }
    }
    assert_eq!(ok, 40);
    assert_eq!(
        healthy.remaining(sale, item).await,
        stock - 40,
        "only the failed requests' stock came back"
    );
    let audit = healthy.audit(sale).await;
    assert_eq!(audit["conserved"], true, "{audit}");
    assert_eq!(audit["items"][0]["released"].as_i64(), Some(40));
}

/// Node B holds the item sold out; a cancel through node A brings it back, and B learns it within
/// a second without being told.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sold_out_cache_turns_off_after_a_cancel_on_another_node() {
    let a = spawn_app().await;
    let b = spawn_app().await;
    let item = fresh_item();
    let sale = a
        .create_sale(json!([{"item_id": item, "stock": 2, "price_cents": 1}]))
        .await;
    let user = fresh_item();
    let first = b.buy(sale, item, user, 1, None).await;
    assert_eq!(
        b.buy(sale, item, user + 1, 1, None).await.status,
        StatusCode::CREATED
    );
    assert_eq!(
        b.buy(sale, item, user + 2, 1, None).await.code(),
        "sold_out"
    );
    let s = seckill::domain::SaleId::parse(sale.into()).unwrap();
    let i = seckill::domain::ItemId::parse(item.into()).unwrap();
    assert!(
        b.state.orders.hot.soldout.is_sold_out(s, i),
        "node B caches sold-out"
    );
    // Storm on node B: answered from the cache.
    for n in 0..50 {
        assert_eq!(
            b.buy(sale, item, user + 10 + n, 1, None).await.code(),
            "sold_out"
        );
    }
    let id = first.body["order_id"].as_str().unwrap();
    let c = a
        .post(&format!("/v1/users/{user}/orders/{id}/cancel"), json!({}))
        .await;
    assert_eq!(c.status, StatusCode::OK);
    let b = Arc::new(b);
    let bb = b.clone();
    assert!(
        eventually(Duration::from_millis(1500), || {
            let b = bb.clone();
            async move { !b.state.orders.hot.soldout.is_sold_out(s, i) }
        })
        .await,
        "node B learned within the refresh interval that stock is back"
    );
    let r = b.buy(sale, item, user + 3, 1, None).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(a.remaining(sale, item).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admission_answers_overloaded_instead_of_queueing_without_bound() {
    // At most 1 x remaining in flight and a queue of 8: a burst of 300 must see 503 overloaded.
    let app = Arc::new(
        spawn_app_with(|c| {
            c.coalesce.inflight_per_stock = 1;
            c.coalesce.max_queue = 8;
        })
        .await,
    );
    let item = fresh_item();
    let sale = app
        .create_sale(json!([{"item_id": item, "stock": 1000, "price_cents": 1}]))
        .await;
    let base = fresh_item();
    let handles: Vec<_> = (0..300u64)
        .map(|n| {
            let app = app.clone();
            tokio::spawn(async move { app.buy(sale, item, base + n, 1, None).await })
        })
        .collect();
    let (mut created, mut overloaded) = (0, 0);
    for h in handles {
        let r = h.await.unwrap();
        match (r.status, r.code()) {
            (StatusCode::CREATED, _) => created += 1,
            (StatusCode::SERVICE_UNAVAILABLE, "overloaded") => {
                assert!(r.headers.contains_key("retry-after"));
                overloaded += 1
            }
            other => panic!("unexpected {other:?} {:?}", r.body),
        }
    }
    assert!(overloaded > 0, "the burst was shed");
    assert_eq!(created + overloaded, 300);
    assert_eq!(app.remaining(sale, item).await, 1000 - created);
}
