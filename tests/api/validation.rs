//! Bad input gets a clear 4xx with a machine-readable code: never a 500, never a panic.

use crate::helpers::*;
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// Long on purpose: a table of bad requests and the answer each must get, read top to bottom.
async fn bad_buy_requests_get_clear_4xx() {
    let app = spawn_app().await;
    let item = fresh_item();
    let sale = app
        .create_sale(json!([{"item_id": item, "stock": 10, "price_cents": 1, "per_user_limit": 2}]))
        .await;
    let path = format!("/v1/sales/{sale}/items/{item}/orders");
    let url = format!("{}{path}", app.addr);

    let cases: Vec<(serde_json::Value, StatusCode, &str)> = vec![
        (
            json!({"user_id": "abc", "quantity": 1}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            json!({"user_id": 2, "quantity": 1}),
            StatusCode::FORBIDDEN,
            "forbidden",
        ),
        (
            json!({"user_id": 1, "quantity": 0}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            json!({"user_id": 1, "quantity": -3}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            json!({"user_id": 1, "quantity": 1.5}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            json!({"user_id": 1, "quantity": 1_000_000_000_000u64}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            json!({"user_id": 1, "quantity": 1001}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            json!({"user_id": 0, "quantity": 1}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            json!({"user_id": -1, "quantity": 1}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            json!({"user_id": 9_223_372_036_854_775_808u64, "quantity": 1}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            json!({"user_id": 1, "qty": 1}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            json!({"user_id": 1, "request_id": ""}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            json!({"user_id": 1, "request_id": "x".repeat(500)}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            json!([1, 2]),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            json!({"user_id": 1, "quantity": 3}),
            StatusCode::CONFLICT,
            "limit_exceeded",
        ),
    ];
    for (body, status, code) in cases {
        let r = app.post_as(1, &path, body.clone()).await;
        assert_eq!(
            (r.status, r.code()),
            (status, code),
            "{body} -> {:?}",
            r.body
        );
        assert_eq!(
            r.headers.get("content-type").and_then(|v| v.to_str().ok()),
            Some("application/problem+json"),
            "{body}"
        );
        assert!(r.body["detail"].is_string() && r.body["title"].is_string());
        assert_eq!(r.body["status"].as_u64(), Some(u64::from(status.as_u16())));
    }

    // Malformed JSON, no JSON content type, an oversized body.
    let r = app
        .send(
            app.http
                .post(&url)
                .bearer_auth(user_token(1))
                .header("content-type", "application/json")
                .body("{\"user_id\": 1,"),
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::BAD_REQUEST, "invalid_request"),
        "{:?}",
        r.body
    );
    let r = app
        .send(
            app.http
                .post(&url)
                .bearer_auth(user_token(1))
                .body("{\"user_id\": 1}"),
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::BAD_REQUEST, "invalid_request"),
        "{:?}",
        r.body
    );
    let huge = format!(
        "{{\"user_id\": 1, \"request_id\": \"{}\"}}",
        "a".repeat(100_000)
    );
    let r = app
        .send(
            app.http
                .post(&url)
                .bearer_auth(user_token(1))
                .header("content-type", "application/json")
                .body(huge),
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
        "{:?}",
        r.body
    );

    // Unknown sale, unknown item, ids that are not ids.
    let r = app.buy(sale + 1, item, 1, 1, None).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::NOT_FOUND, "not_found"),
        "{:?}",
        r.body
    );
    let r = app.buy(sale, item + 1, 1, 1, None).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::NOT_FOUND, "not_found"),
        "{:?}",
        r.body
    );
    let r = app
        .post_as(
            1,
            &format!("/v1/sales/abc/items/{item}/orders"),
            json!({"user_id": 1}),
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
        "{:?}",
        r.body
    );
    let r = app
        .post_as(
            1,
            &format!("/v1/sales/{sale}/items/0/orders"),
            json!({"user_id": 1}),
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request")
    );
    let r = app.get("/v1/sales/99999999999999999999999").await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request")
    );
    let r = app.get(&format!("/v1/sales/{}", sale + 1)).await;
    assert_eq!((r.status, r.code()), (StatusCode::NOT_FOUND, "not_found"));
    let r = app.get("/v1/users/5/orders/not-a-uuid").await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request")
    );
    let r = app
        .get("/v1/users/5/orders/6c1f3c52-8d5e-4a37-9a43-3e8d1f2b9a10")
        .await;
    assert_eq!((r.status, r.code()), (StatusCode::NOT_FOUND, "not_found"));
    let r = app.get("/v1/users/5/orders?limit=0").await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request")
    );
    let r = app.get("/v1/nowhere").await;
    assert_eq!((r.status, r.code()), (StatusCode::NOT_FOUND, "not_found"));
    let r = app
        .send(app.http.delete(format!("{}/v1/time", app.addr)))
        .await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);

    // Nothing above was sold.
    assert_eq!(app.remaining(sale, item).await, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// Long on purpose: a table of admin requests and the answer each must get, read top to bottom.
async fn admin_endpoints_need_the_token_and_valid_sales() {
    let app = spawn_app().await;
    let url = format!("{}/v1/admin/sales", app.addr);
    let now = chrono::Utc::now();
    let good = json!({"name": "x", "starts_at": now.to_rfc3339(), "ends_at": (now + chrono::Duration::hours(1)).to_rfc3339(),
                      "items": [{"item_id": fresh_item(), "stock": 1, "price_cents": 1}]});
    let r = app.send(app.http.post(&url).json(&good)).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNAUTHORIZED, "unauthorized")
    );
    let r = app
        .send(
            app.http
                .post(&url)
                .bearer_auth("wrong-token-wrong-token")
                .json(&good),
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNAUTHORIZED, "unauthorized")
    );
    let r = app
        .send(app.http.get(format!("{}/v1/admin/groups", app.addr)))
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNAUTHORIZED, "unauthorized")
    );

    let item = fresh_item();
    let bad_sales = vec![
        json!({"name": "x", "starts_at": "yesterday", "ends_at": now.to_rfc3339(), "items": []}),
        json!({"name": "x", "starts_at": now.to_rfc3339(), "ends_at": (now - chrono::Duration::hours(1)).to_rfc3339(),
               "items": [{"item_id": item, "stock": 1, "price_cents": 1}]}),
        json!({"name": "x", "starts_at": now.to_rfc3339(), "ends_at": (now + chrono::Duration::hours(1)).to_rfc3339(), "items": []}),
        json!({"name": "x", "starts_at": now.to_rfc3339(), "ends_at": (now + chrono::Duration::hours(1)).to_rfc3339(),
               "items": [{"item_id": item, "stock": -1, "price_cents": 1}]}),
        json!({"name": "x", "starts_at": now.to_rfc3339(), "ends_at": (now + chrono::Duration::hours(1)).to_rfc3339(),
               "items": [{"item_id": item, "stock": 1, "price_cents": 1}, {"item_id": item, "stock": 1, "price_cents": 1}]}),
        json!({"name": "x", "starts_at": now.to_rfc3339(), "ends_at": (now + chrono::Duration::hours(1)).to_rfc3339(),
               "items": [{"item_id": item, "stock": 1, "price_cents": 1, "per_user_limit": 0}]}),
        json!({"name": "", "starts_at": now.to_rfc3339(), "ends_at": (now + chrono::Duration::hours(1)).to_rfc3339(),
               "items": [{"item_id": item, "stock": 1, "price_cents": 1}]}),
        // PostgreSQL text cannot hold NUL: refused at the edge, not a 500 from the database.
        json!({"name": "a\u{0}b", "starts_at": now.to_rfc3339(), "ends_at": (now + chrono::Duration::hours(1)).to_rfc3339(),
               "items": [{"item_id": item, "stock": 1, "price_cents": 1}]}),
        json!({"name": "x", "starts_at": now.to_rfc3339(), "ends_at": (now + chrono::Duration::hours(1)).to_rfc3339(),
               "payment_window_secs": 4_294_967_295u64,
               "items": [{"item_id": item, "stock": 1, "price_cents": 1}]}),
    ];
    for body in bad_sales {
        let r = app
            .send(app.http.post(&url).bearer_auth(TOKEN).json(&body))
            .await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
            "{body} -> {:?}",
            r.body
        );
    }
    let r = app
        .send(
            app.http
                .post(&url)
                .bearer_auth(TOKEN)
                .header("content-type", "application/json")
                .body("{"),
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::BAD_REQUEST, "invalid_request")
    );

    let groups = app.admin_get("/v1/admin/groups").await;
    assert_eq!(groups.status, StatusCode::OK);
    assert_eq!(groups.body["groups"].as_array().map(Vec::len), Some(2));
    let r = app.get("/v1/time").await;
    assert!(r.body["now_ms"]
        .as_i64()
        .is_some_and(|ms| (ms - chrono::Utc::now().timestamp_millis()).abs() < 5_000));
    assert_eq!(app.get("/healthz").await.status, StatusCode::OK);
    assert_eq!(app.get("/readyz").await.status, StatusCode::OK);
}

/// README promises sales of up to 1,000 items; such a body is ~100 KB. Bodies beyond the admin
/// limit get a problem+json 413 like every other error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_sale_fits_and_a_larger_body_is_a_problem_413() {
    let app = spawn_app().await;
    let url = format!("{}/v1/admin/sales", app.addr);
    let now = chrono::Utc::now();
    let base = fresh_item() * 1000;
    let items: Vec<_> = (0..1000u64)
        .map(|i| json!({"item_id": base + i, "stock": 1_000_000_000, "price_cents": 9_223_372_036_854i64, "per_user_limit": 1_000_000}))
        .collect();
    let body = json!({"name": "n".repeat(200), "starts_at": now.to_rfc3339(),
                      "ends_at": (now + chrono::Duration::hours(1)).to_rfc3339(), "items": items});
    let pretty = serde_json::to_string_pretty(&body).unwrap();
    assert!(pretty.len() > 100_000, "{}", pretty.len());
    let r = app
        .send(
            app.http
                .post(&url)
                .bearer_auth(TOKEN)
                .header("content-type", "application/json")
                .body(pretty),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(r.body["items"].as_array().map(Vec::len), Some(1000));

    let huge = format!("{{\"name\": \"{}\"}}", "x".repeat(2 * 1024 * 1024));
    let r = app
        .send(
            app.http
                .post(&url)
                .bearer_auth(TOKEN)
                .header("content-type", "application/json")
                .body(huge),
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
    );
    assert_eq!(r.headers["content-type"], "application/problem+json");
    // The buy endpoint keeps its small limit, `server.body_limit_bytes` (16 KiB), to the byte: a
    // body of exactly that size is read (and refused for its contents), one byte more is not read
    // at all, and its 413 is a problem like every other.
    for (size, too_large) in [(16 * 1024, false), (16 * 1024 + 1, true)] {
        let frame = "{\"quantity\": 1, \"request_id\": \"\"}".len();
        let body = format!(
            "{{\"quantity\": 1, \"request_id\": \"{}\"}}",
            "x".repeat(size - frame)
        );
        assert_eq!(body.len(), size);
        let r = app
            .send(
                app.http
                    .post(format!("{}/v1/sales/1/items/1/orders", app.addr))
                    .bearer_auth(user_token(1))
                    .header("content-type", "application/json")
                    .body(body),
            )
            .await;
        assert_eq!(
            r.status == StatusCode::PAYLOAD_TOO_LARGE,
            too_large,
            "{size} bytes: {} {:?}",
            r.status,
            r.body
        );
        if too_large {
            assert_eq!(r.code(), "payload_too_large");
        }
    }
}
