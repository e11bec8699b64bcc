//! The trust boundary, black-box through the HTTP API: user tokens, whose orders a token may
//! touch, signed payment callbacks and what the engine records of them, and the settlement
//! reconciliation.

use crate::helpers::*;
use reqwest::StatusCode;
use seckill::config::Secret;
use serde_json::json;
use std::time::Duration;

fn expired_token(user: u64) -> String {
    #[derive(serde::Serialize)]
    struct C {
        sub: String,
        exp: u64,
    }
    let exp = chrono::Utc::now().timestamp() as u64 - 3600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &C {
            sub: user.to_string(),
            exp,
        },
        &jsonwebtoken::EncodingKey::from_secret(USER_SECRET.as_bytes()).unwrap(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// Long on purpose: one scenario, its steps in the order they happen; split, it would no longer
// read as one story.
async fn user_endpoints_need_a_valid_token_for_that_user() {
    let app = spawn_app().await;
    let item = fresh_item();
    let sale = app
        .create_sale(json!([{"item_id": item, "stock": 10, "price_cents": 5, "per_user_limit": 3}]))
        .await;
    let (alice, bob) = (fresh_item(), fresh_item() + 1);
    let bought = app.buy(sale, item, alice, 1, Some("a1")).await;
    assert_eq!(bought.status, StatusCode::CREATED);
    let order = bought.body["order_id"].as_str().unwrap().to_string();
    let buy_url = format!("{}/v1/sales/{sale}/items/{item}/orders", app.addr);
    let mine = format!("{}/v1/users/{alice}/orders", app.addr);
    let one = format!("{mine}/{order}");

    // No token, an expired one, a wrongly signed one, garbage: 401 with WWW-Authenticate.
    let wrong_key = seckill::auth::users::mint(
        &Secret::new("some-other-secret-some-other-secret"),
        alice,
        60,
    )
    .unwrap();
    for token in [
        None,
        Some(expired_token(alice)),
        Some(wrong_key),
        Some("x.y.z".into()),
    ] {
        for req in [
            app.http.post(&buy_url).json(&json!({"quantity": 1})),
            app.http.get(&mine),
            app.http.get(&one),
            app.http.post(format!("{one}/cancel")),
        ] {
            let req = match &token {
                Some(t) => req.bearer_auth(t),
                None => req,
            };
            let r = app.send(req).await;
            assert_eq!(
                (r.status, r.code()),
                (StatusCode::UNAUTHORIZED, "unauthorized"),
                "{token:?}: {:?}",
                r.body
            );
            assert_eq!(r.headers["www-authenticate"], "Bearer realm=\"seckill\"");
        }
    }
    let expired = app
        .send(app.http.get(&mine).bearer_auth(expired_token(alice)))
        .await;
    assert!(
        expired.body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("expired")),
        "{:?}",
        expired.body
    );

    // Bob's token on Alice's orders: 403, and nothing changes.
    for req in [
        app.http.get(&mine),
        app.http.get(&one),
        app.http.post(format!("{one}/cancel")),
    ] {
        let r = app.send(req.bearer_auth(user_token(bob))).await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::FORBIDDEN, "forbidden"),
            "{:?}",
            r.body
        );
    }
    let still = app.get(&format!("/v1/users/{alice}/orders/{order}")).await;
    assert_eq!(still.body["status"], "pending_payment");
    assert_eq!(app.remaining(sale, item).await, 9);

    // Buying as someone else: 403; the token's user buys without naming itself.
    let r = app
        .post_as(
            bob,
            &format!("/v1/sales/{sale}/items/{item}/orders"),
            json!({"user_id": alice}),
        )
        .await;
    assert_eq!((r.status, r.code()), (StatusCode::FORBIDDEN, "forbidden"));
    let r = app
        .post_as(
            bob,
            &format!("/v1/sales/{sale}/items/{item}/orders"),
            json!({"quantity": 2}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(r.body["user_id"], bob);
    assert_eq!(app.remaining(sale, item).await, 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// Long on purpose: one scenario, its steps in the order they happen; split, it would no longer
// read as one story.
async fn payments_must_be_signed_and_are_recorded_whatever_their_fate() {
    let app = spawn_app().await;
    let item = fresh_item();
    let now = chrono::Utc::now();
    let sale = app
        .create_sale_at(
            json!([{"item_id": item, "stock": 10, "price_cents": 250, "per_user_limit": 5}]),
            now - chrono::Duration::minutes(1),
            now + chrono::Duration::hours(1),
            Some(2),
        )
        .await;
    let user = fresh_item();
    let order = |r: &Resp| r.body["order_id"].as_str().unwrap().to_string();
    let a = order(&app.buy(sale, item, user, 1, Some("p-a")).await);
    let late = order(&app.buy(sale, item, user, 2, Some("p-late")).await);
    let url = format!("{}/v1/payments", app.addr);
    let body = json!({"order_id": a, "user_id": user, "amount_cents": 250, "payment_ref": "ref-a"})
        .to_string();

    // Unsigned, wrongly signed, stale: 401, nothing paid.
    let t = chrono::Utc::now().timestamp();
    let wrong =
        seckill::auth::signature::sign(&Secret::new("not-the-payment-secret"), t, body.as_bytes());
    let stale =
        seckill::auth::signature::sign(&Secret::new(PAYMENT_SECRET), t - 301, body.as_bytes());
    for sig in [
        None,
        Some(wrong),
        Some(stale),
        Some("t=1,v1=zz".to_string()),
    ] {
        let mut req = app
            .http
            .post(&url)
            .header("content-type", "application/json")
            .body(body.clone());
        if let Some(s) = sig {
            req = req.header("seckill-signature", s);
        }
        let r = app.send(req).await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::UNAUTHORIZED, "unauthorized"),
            "{:?}",
            r.body
        );
    }
    let o = app.get(&format!("/v1/users/{user}/orders/{a}")).await;
    assert_eq!(o.body["status"], "pending_payment");

    // A wrong amount: 409, the order untouched, the payment recorded as due for refund.
    let r = app.pay(user, &a, 249, "ref-short").await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::CONFLICT, "amount_mismatch")
    );
    assert_eq!(r.body["payment"]["state"], "refund_due");
    let o = app.get(&format!("/v1/users/{user}/orders/{a}")).await;
    assert_eq!(o.body["status"], "pending_payment");

    // Paid; the same payment_ref again: 200 and the same paid order; another ref: 409.
    let paid = app.pay(user, &a, 250, "ref-a").await;
    assert_eq!(paid.status, StatusCode::OK, "{:?}", paid.body);
    assert_eq!(paid.body["status"], "paid");
    let again = app.pay(user, &a, 250, "ref-a").await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.body["paid_at"], paid.body["paid_at"]);
    assert_eq!(again.headers["idempotent-replayed"], "true");
    let twice = app.pay(user, &a, 250, "ref-a-2").await;
    assert_eq!(
        (twice.status, twice.code()),
        (StatusCode::CONFLICT, "order_paid")
    );

    // After its window: 409 order_expired, recorded as refund due, the stock back.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let r = app.pay(user, &late, 500, "ref-late").await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::CONFLICT, "order_expired"),
        "{:?}",
        r.body
    );
    let o = app.get(&format!("/v1/users/{user}/orders/{late}")).await;
    assert_eq!(o.body["status"], "expired");

    // The admin view of refunds due for this sale.
    let due = app
        .admin_get(&format!(
            "/v1/admin/payments?sale_id={sale}&state=refund_due"
        ))
        .await;
    assert_eq!(due.status, StatusCode::OK, "{:?}", due.body);
    let refs: Vec<&str> = due.body["payments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["payment_ref"].as_str().unwrap())
        .collect();
    assert_eq!(refs.len(), 3, "{refs:?}");
    for r in ["ref-short", "ref-a-2", "ref-late"] {
        assert!(refs.contains(&r), "{r} in {refs:?}");
    }
    let bad = app.admin_get("/v1/admin/payments?state=bogus").await;
    assert_eq!(bad.code(), "invalid_request");
    let eventually_back = eventually(Duration::from_secs(5), || async {
        app.remaining(sale, item).await == 9
    })
    .await;
    assert!(eventually_back, "the expired order's stock is back");
    assert_eq!(app.audit(sale).await["conserved"], true);

    // The settlement file against what was recorded: one of each kind.
    let ghost = uuid::Uuid::new_v4();
    let file = format!(
        "payment_ref,order_id,amount_cents\nref-a,{a},250\nref-a-2,{a},250\nref-late,{late},500\nref-short,{a},250\nghost-{ghost},{ghost},100\n"
    );
    let settled = seckill::settlement::parse(&file).unwrap();
    let recorded: Vec<_> = seckill::settlement::recorded(&app.state.orders)
        .await
        .unwrap()
        .into_iter()
        .filter(|p| p.sale_id == Some(sale))
        .collect();
    let mut kinds: Vec<&str> = seckill::settlement::compare(&settled, &recorded)
        .iter()
        .map(|m| m.kind)
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        vec![
            "amount_differs",
            "paid_twice",
            "refund_due",
            "settled_unknown"
        ],
    );
    // Without the settled line for ref-a, the applied payment is "paid, not settled".
    let kinds: Vec<&str> = seckill::settlement::compare(&settled[1..], &recorded)
        .iter()
        .map(|m| m.kind)
        .collect();
    assert!(kinds.contains(&"paid_not_settled"), "{kinds:?}");
}
