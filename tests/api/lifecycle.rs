//! Order lifecycle and reconciliation: pay, cancel, expiry, crash repair, concurrent repairers.

use crate::helpers::*;
use reqwest::StatusCode;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pay_cancel_and_their_refusals() {
    let app = spawn_app().await;
    let item = fresh_item();
    let sale = app
        .create_sale(
            json!([{"item_id": item, "stock": 5, "price_cents": 250, "per_user_limit": 5}]),
        )
        .await;
    let user = fresh_item();
    let a = app.buy(sale, item, user, 1, None).await;
    let b = app.buy(sale, item, user, 2, None).await;
    assert_eq!(
        (a.status, b.status),
        (StatusCode::CREATED, StatusCode::CREATED)
    );
    let (a, b) = (
        a.body["order_id"].as_str().unwrap().to_string(),
        b.body["order_id"].as_str().unwrap().to_string(),
    );
    assert_eq!(app.remaining(sale, item).await, 2);

    // Pay, and the same payment again: the same answer.
    let paid = app.pay(user, &a, 250, &format!("pay-{a}")).await;
    assert_eq!(paid.status, StatusCode::OK, "{:?}", paid.body);
    assert_eq!(paid.body["status"], "paid");
    let again = app.pay(user, &a, 250, &format!("pay-{a}")).await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(
        again.body["paid_at"], paid.body["paid_at"],
        "a repeated callback changes nothing"
    );
    // A paid order cannot be cancelled.
    let r = app
        .post(&format!("/v1/users/{user}/orders/{a}/cancel"), json!({}))
        .await;
    assert_eq!((r.status, r.code()), (StatusCode::CONFLICT, "order_paid"));

    // Cancel returns the stock; paying it afterwards is refused.
    let c = app
        .post(&format!("/v1/users/{user}/orders/{b}/cancel"), json!({}))
        .await;
    assert_eq!(c.status, StatusCode::OK, "{:?}", c.body);
    assert_eq!(c.body["status"], "cancelled");
    assert_eq!(app.remaining(sale, item).await, 4);
    let c2 = app
        .post(&format!("/v1/users/{user}/orders/{b}/cancel"), json!({}))
        .await;
    assert_eq!(c2.status, StatusCode::OK, "cancelling twice is a no-op");
    assert_eq!(app.remaining(sale, item).await, 4, "stock returned once");
    let r = app.pay(user, &b, 500, &format!("pay-{b}")).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::CONFLICT, "order_cancelled")
    );
    // A payment naming another user's order finds nothing.
    let r = app.pay(user + 1, &a, 250, "pay-wrong-user").await;
    assert_eq!((r.status, r.code()), (StatusCode::NOT_FOUND, "not_found"));

    // The reservation followed the order states.
    let audit = app.audit(sale).await;
    let row = &audit["items"][0];
    assert_eq!(
        (
            row["paid"].as_i64(),
            row["released"].as_i64(),
            row["remaining"].as_i64()
        ),
        (Some(1), Some(2), Some(4))
    );
    assert_eq!(audit["conserved"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpaid_orders_expire_and_return_their_stock() {
    let app = spawn_app().await;
    let item = fresh_item();
    let now = chrono::Utc::now();
    let sale = app
        .create_sale_at(
            json!([{"item_id": item, "stock": 3, "price_cents": 1, "per_user_limit": 3}]),
            now - chrono::Duration::minutes(1),
            now + chrono::Duration::hours(1),
            Some(1),
        )
        .await;
    let user = fresh_item();
    let r = app.buy(sale, item, user, 3, None).await;
    assert_eq!(r.status, StatusCode::CREATED);
    let id = r.body["order_id"].as_str().unwrap().to_string();
    assert_eq!(
        app.buy(sale, item, user + 1, 1, None).await.code(),
        "sold_out"
    );

    let app = Arc::new(app);
    let a = app.clone();
    let back = eventually(Duration::from_secs(10), || {
        let a = a.clone();
        async move { a.remaining(sale, item).await == 3 }
    })
    .await;
    assert!(back, "the sweeper returned the stock");
    let o = app.get(&format!("/v1/users/{user}/orders/{id}")).await;
    assert_eq!(o.body["status"], "expired");
    let r = app.pay(user, &id, 3, &format!("late-{id}")).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::CONFLICT, "order_expired")
    );
    // The sold-out fast path turns off again (whichever node's sweeper returned the stock, this
    // node learns within its refresh interval): the item sells.
    let a = app.clone();
    let sold = eventually(Duration::from_millis(1500), || {
        let a = a.clone();
        async move {
            a.buy(sale, item, user + 1, 1, Some("after-expiry"))
                .await
                .status
                == StatusCode::CREATED
        }
    })
    .await;
    assert!(sold, "the item sells again after expiry");
    assert_eq!(app.audit(sale).await["conserved"], true);
}

/// A concurrent sale with random cancels, payments and expiries: at the end conservation holds and
/// sold == paid + pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
// Long on purpose: one scenario, its steps in the order they happen; split, it would no longer
// read as one story.
async fn a_sale_with_cancels_payments_and_expiries_stays_conserved() {
    let app = Arc::new(spawn_app().await);
    let item = fresh_item();
    let now = chrono::Utc::now();
    let stock = 60;
    let sale = app
        .create_sale_at(
            json!([{"item_id": item, "stock": stock, "price_cents": 3, "per_user_limit": 2}]),
            now - chrono::Duration::minutes(1),
            now + chrono::Duration::hours(1),
            Some(2),
        )
        .await;
    let base = fresh_item();
    let handles: Vec<_> = (0..300u64)
        .map(|n| {
            let app = app.clone();
            tokio::spawn(async move {
                let user = base + n % 150;
                let r = app
                    .buy_retrying(sale, item, user, 1 + (n % 2) as u32, None)
                    .await;
                if r.status != StatusCode::CREATED {
                    return;
                }
                let id = r.body["order_id"].as_str().unwrap().to_string();
                match n % 3 {
                    0 => {
                        let c = app
                            .post(&format!("/v1/users/{user}/orders/{id}/cancel"), json!({}))
                            .await;
                        assert_eq!(c.status, StatusCode::OK);
                    }
                    1 => {
                        let amount = r.body["amount_cents"].as_i64().unwrap();
                        let p = app.pay(user, &id, amount, &format!("p-{id}")).await;
                        assert!(
                            p.status == StatusCode::OK || p.code() == "order_expired",
                            "{:?}",
                            p.body
                        );
                    }
                    _ => {} // left to expire
                }
            })
        })
        .collect();
    for h in handles {
        h.await.unwrap();
    }
    // Wait for every unpaid order to expire and its stock to be back: an expiry is done when its
    // release_outbox entry is gone (the release follows the status change, after its commit).
    let a = app.clone();
    let settled = eventually(Duration::from_secs(15), || {
        let a = a.clone();
        async move {
            let mut left = 0;
            for g in 0..2 {
                left += a
                    .sql_i64(g, &format!("SELECT count(*) FROM orders WHERE item_id = {item} AND status = 'pending_payment'"))
                    .await;
                left += a
                    .sql_i64(g, &format!("SELECT count(*) FROM release_outbox WHERE item_id = {item}"))
                    .await;
            }
            left == 0
        }
    })
    .await;
    assert!(
        settled,
        "all unpaid orders expired and their stock released"
    );
    let mut paid = 0;
    for g in 0..2 {
        paid += app
            .sql_i64(g, &format!("SELECT coalesce(sum(quantity), 0)::bigint FROM orders WHERE item_id = {item} AND status = 'paid'"))
            .await;
    }
    let remaining = app.remaining(sale, item).await;
    assert_eq!(
        stock - remaining,
        paid,
        "sold == paid + pending (pending is 0 now)"
    );
    let audit = app.audit(sale).await;
    assert_eq!(audit["conserved"], true, "{audit}");
    assert_eq!(audit["items"][0]["paid"].as_i64(), Some(paid));
}
