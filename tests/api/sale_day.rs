//! Sale day: operators changing a running sale (pause, its end, restock, the list), the cached
//! view of a sale, and made-up ids answered without database work.

use crate::helpers::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

async fn patch(app: &TestApp, sale: u64, body: Value) -> Resp {
    app.admin(
        Method::PATCH,
        &format!("/v1/admin/sales/{sale}"),
        Some(body),
    )
    .await
}

async fn restock(app: &TestApp, sale: u64, item: u64, body: Value) -> Resp {
    app.admin(
        Method::POST,
        &format!("/v1/admin/sales/{sale}/items/{item}/restock"),
        Some(body),
    )
    .await
}

fn in_minutes(m: i64) -> String {
    (chrono::Utc::now() + chrono::Duration::minutes(m)).to_rfc3339()
}

#[tokio::test]
// Long on purpose: one scenario, its steps in the order they happen; split, it would no longer
// read as one story.
async fn a_running_sale_is_paused_resumed_ended_and_extended_on_every_node() {
    let app = spawn_app().await;
    let other = spawn_app().await;
    let item = fresh_item();
    let sale = app
        .create_sale(
            json!([{"item_id": item, "stock": 10, "price_cents": 1, "per_user_limit": 10}]),
        )
        .await;
    let user = fresh_item();
    assert_eq!(
        app.buy(sale, item, user, 1, None).await.status,
        StatusCode::CREATED
    );

    let r = patch(&app, sale, json!({"paused": true})).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(
        (r.body["state"].as_str(), r.body["paused"].as_bool()),
        (Some("paused"), Some(true))
    );
    for node in [&app, &other] {
        let r = node.buy(sale, item, fresh_item(), 1, None).await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::CONFLICT, "paused"),
            "{:?}",
            r.body
        );
    }
    assert_eq!(
        app.remaining(sale, item).await,
        9,
        "a paused sale holds its stock"
    );

    let r = patch(&app, sale, json!({"paused": false})).await;
    assert_eq!(r.body["state"], "live", "{:?}", r.body);
    assert_eq!(
        other.buy(sale, item, user, 1, None).await.status,
        StatusCode::CREATED
    );

    // End it now: every node refuses at once (the end is in each item's row).
    let r = patch(&app, sale, json!({"ends_at": in_minutes(0)})).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    for node in [&app, &other] {
        let r = node.buy(sale, item, fresh_item(), 1, None).await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::CONFLICT, "ended"),
            "{:?}",
            r.body
        );
    }
    // And extend it again.
    let r = patch(&app, sale, json!({"ends_at": in_minutes(30)})).await;
    assert_eq!(r.body["state"], "live", "{:?}", r.body);
    assert_eq!(
        other.buy(sale, item, user, 1, None).await.status,
        StatusCode::CREATED
    );
    assert_eq!(app.remaining(sale, item).await, 7);

    let audit = app.audit(sale).await;
    assert_eq!(audit["conserved"], true, "{audit}");
    let changes = change_kinds(&audit);
    assert_eq!(
        changes,
        ["paused", "resumed", "ends_at", "ends_at"],
        "{audit}"
    );
    assert!(
        audit["changes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["request_id"].is_string()),
        "each change names the admin request that made it: {audit}"
    );

    // What cannot be changed says why.
    for (body, status) in [
        (json!({}), StatusCode::UNPROCESSABLE_ENTITY),
        (
            json!({"ends_at": in_minutes(-120)}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (json!({"paused": "yes"}), StatusCode::UNPROCESSABLE_ENTITY),
        (json!({"stock": 5}), StatusCode::UNPROCESSABLE_ENTITY),
    ] {
        let r = patch(&app, sale, body.clone()).await;
        assert_eq!(r.status, status, "{body}: {:?}", r.body);
        assert!(r.body["code"].is_string(), "{:?}", r.body);
    }
    let r = patch(&app, sale + 1_000_000, json!({"paused": true})).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{:?}", r.body);
    let r = app
        .send(
            app.http
                .patch(format!("{}/v1/admin/sales/{sale}", app.addr))
                .json(&json!({"paused": true})),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_restock_sells_at_once_on_every_node_never_oversells_and_stays_conserved() {
    let app = spawn_app().await;
    let other = Arc::new(spawn_app().await);
    let item = fresh_item();
    let sale = app
        .create_sale(json!([{"item_id": item, "stock": 3, "price_cents": 1}]))
        .await;
    for _ in 0..3 {
        let r = other.buy(sale, item, fresh_item(), 1, None).await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    }
    // The other node now holds the item sold out (its fast path answers without the database).
    let r = other.buy(sale, item, fresh_item(), 1, None).await;
    assert_eq!(r.code(), "sold_out", "{:?}", r.body);
    let key = (
        seckill::domain::SaleId::from_db(sale as i64),
        seckill::domain::ItemId::from_db(item as i64),
    );
    assert!(other.state.orders.hot.soldout.is_sold_out(key.0, key.1));

    let r = restock(&app, sale, item, json!({"add": 5})).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(
        (r.body["stock"].as_i64(), r.body["remaining"].as_i64()),
        (Some(8), Some(5))
    );
    // The node that held it sold out learns within its sold-out refresh (200 ms in tests).
    let learnt = eventually(Duration::from_secs(5), || async {
        !other.state.orders.hot.soldout.is_sold_out(key.0, key.1)
    })
    .await;
    assert!(learnt, "the other node still holds the item sold out");

    // A crowd on both nodes for the 5 new units: exactly 5 sold.
    let mut asks = Vec::new();
    for _ in 0..30 {
        asks.push((fresh_item(), 1));
    }
    let sold = buy_all(&other, sale, item, asks)
        .await
        .iter()
        .filter(|(_, _, r)| r.status == StatusCode::CREATED)
        .count();
    assert_eq!(sold, 5);
    let audit = app.audit(sale).await;
    assert_eq!(audit["conserved"], true, "{audit}");
    assert_eq!(audit["items"][0]["stock"], 8, "{audit}");
    assert_eq!(audit["items"][0]["remaining"], 0, "{audit}");
    assert_eq!(audit["changes"][0]["change"], "restock", "{audit}");
    assert_eq!(audit["changes"][0]["detail"]["add"], 5, "{audit}");

    for (body, status) in [
        (json!({"add": 0}), StatusCode::UNPROCESSABLE_ENTITY),
        (json!({"add": -1}), StatusCode::UNPROCESSABLE_ENTITY),
        (
            json!({"add": 1_000_000_000}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (json!({"add": 1.5}), StatusCode::UNPROCESSABLE_ENTITY),
        (json!({}), StatusCode::UNPROCESSABLE_ENTITY),
    ] {
        let r = restock(&app, sale, item, body.clone()).await;
        assert_eq!(r.status, status, "{body}: {:?}", r.body);
    }
    let r = restock(&app, sale, fresh_item(), json!({"add": 1})).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{:?}", r.body);
    assert_eq!(
        app.audit(sale).await["items"][0]["stock"],
        8,
        "refusals changed nothing"
    );
}

#[tokio::test]
async fn sales_are_listed_with_their_state() {
    let app = spawn_app().await;
    let now = chrono::Utc::now();
    let item = || json!([{"item_id": fresh_item(), "stock": 1, "price_cents": 1}]);
    let h = chrono::Duration::hours(1);
    let scheduled = app.create_sale_at(item(), now + h, now + h * 2, None).await;
    let live = app.create_sale(item()).await;
    let paused = app.create_sale(item()).await;
    assert_eq!(
        patch(&app, paused, json!({"paused": true})).await.status,
        StatusCode::OK
    );
    let r = app.admin_get("/v1/admin/sales?limit=1000").await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let state_of = |body: &Value, id: u64| {
        body["sales"]
            .as_array()
            .expect("sales")
            .iter()
            .find(|s| s["sale_id"] == id)
            .map(|s| s["state"].as_str().unwrap_or("").to_string())
    };
    assert_eq!(state_of(&r.body, scheduled).as_deref(), Some("scheduled"));
    assert_eq!(state_of(&r.body, live).as_deref(), Some("live"));
    assert_eq!(state_of(&r.body, paused).as_deref(), Some("paused"));
    let r = app
        .admin_get("/v1/admin/sales?state=paused&limit=1000")
        .await;
    assert!(r.body["sales"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["state"] == "paused"));
    assert_eq!(state_of(&r.body, paused).as_deref(), Some("paused"));
    for bad in [
        "state=open",
        "limit=0",
        "limit=1001",
        "state=live&state=live",
    ] {
        let r = app.admin_get(&format!("/v1/admin/sales?{bad}")).await;
        assert_eq!(
            r.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{bad}: {:?}",
            r.body
        );
    }
}

#[tokio::test]
async fn the_sale_view_is_served_from_a_cache_with_an_etag_and_forgets_changes() {
    let app = spawn_app_with(|c| c.server.sale_view_cache_ms = 10_000).await;
    let item = fresh_item();
    let sale = app
        .create_sale(json!([{"item_id": item, "stock": 5, "price_cents": 1}]))
        .await;
    let first = app.get(&format!("/v1/sales/{sale}")).await;
    assert_eq!(first.status, StatusCode::OK);
    let etag = first.headers["etag"].to_str().expect("etag").to_string();
    assert_eq!(first.headers["cache-control"], "public, max-age=1");
    assert_eq!(first.body["items"][0]["remaining"], 5);
    // A buy does not reach the cached view until it is old; the one read served both.
    assert_eq!(
        app.buy(sale, item, fresh_item(), 1, None).await.status,
        StatusCode::CREATED
    );
    let again = app.get(&format!("/v1/sales/{sale}")).await;
    assert_eq!(
        again.body["items"][0]["remaining"], 5,
        "served from the cache"
    );
    let r = app
        .send(
            app.http
                .get(format!("{}/v1/sales/{sale}", app.addr))
                .header("if-none-match", &etag),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);
    assert_eq!(r.headers["etag"].to_str().ok(), Some(etag.as_str()));
    // An operator's change on this node is seen at once.
    assert_eq!(
        patch(&app, sale, json!({"paused": true})).await.status,
        StatusCode::OK
    );
    let changed = app.get(&format!("/v1/sales/{sale}")).await;
    assert_eq!(changed.body["state"], "paused", "{:?}", changed.body);
    assert_eq!(changed.body["items"][0]["remaining"], 4);
    assert_ne!(changed.headers["etag"].to_str().ok(), Some(etag.as_str()));
    // Unknown sales: 404, remembered as unknown.
    for _ in 0..3 {
        let r = app
            .get(&format!("/v1/sales/{}", sale + 1_000_000_007))
            .await;
        assert_eq!((r.status, r.code()), (StatusCode::NOT_FOUND, "not_found"));
    }
}

#[tokio::test]
async fn made_up_items_get_404_without_a_gate_or_a_transaction() {
    let app = spawn_app().await;
    let item = fresh_item();
    let sale = app
        .create_sale(json!([{"item_id": item, "stock": 5, "price_cents": 1}]))
        .await;
    let gates = app.state.orders.hot.admission.gates();
    for _ in 0..200 {
        let r = app.buy(sale, fresh_item(), fresh_item(), 1, None).await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::NOT_FOUND, "not_found"),
            "{:?}",
            r.body
        );
    }
    assert_eq!(
        app.state.orders.hot.admission.gates(),
        gates,
        "no admission gate for made-up items"
    );
    assert_eq!(
        app.buy(sale, item, fresh_item(), 1, None).await.status,
        StatusCode::CREATED
    );
}

#[tokio::test]
async fn the_cli_pauses_resumes_ends_and_restocks_as_the_api_does() {
    // A cluster of its own: other tests move slots of the shared one, and the CLI (as every
    // engine) refuses to start on a layout that differs from the cluster's.
    let own = OwnCluster::start(2);
    let app = spawn_config(base_config(&own.0), quiet()).await;
    let item = fresh_item();
    let sale = app
        .create_sale(json!([{"item_id": item, "stock": 1, "price_cents": 1}]))
        .await;
    let dir = std::env::temp_dir().join(format!("seckill-sale-cli-{}", fresh_item()));
    std::fs::create_dir_all(&dir).expect("dir");
    let config = dir.join("shards.toml");
    std::fs::write(&config, own.0.shards_toml("127.0.0.1:0", &secrets())).expect("toml");
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_seckill"))
            .arg("sale")
            .arg("--config")
            .arg(&config)
            .args(args)
            .output()
            .expect("the CLI runs");
        (
            out.status.success(),
            out.stdout,
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (s, i) = (sale.to_string(), item.to_string());
    let (ok, out, err) = cli(&["pause", &s]);
    assert!(ok, "{err}");
    assert_eq!(
        serde_json::from_slice::<Value>(&out).expect("JSON")["state"],
        "paused"
    );
    assert_eq!(
        app.buy(sale, item, fresh_item(), 1, None).await.code(),
        "paused"
    );
    let (ok, _, err) = cli(&["resume", &s]);
    assert!(ok, "{err}");
    let (ok, out, err) = cli(&["restock", &s, &i, "2"]);
    assert!(ok, "{err}");
    assert_eq!(
        serde_json::from_slice::<Value>(&out).expect("JSON")["stock"],
        3
    );
    assert_eq!(
        app.buy(sale, item, fresh_item(), 1, None).await.status,
        StatusCode::CREATED
    );
    let (ok, _, err) = cli(&["end", &s]);
    assert!(ok, "{err}");
    assert_eq!(
        app.buy(sale, item, fresh_item(), 1, None).await.code(),
        "ended"
    );
    let (ok, out, err) = cli(&["list", "--state", "ended", "--limit", "1000"]);
    assert!(ok, "{err}");
    let listed: Value = serde_json::from_slice(&out).expect("JSON");
    assert!(listed["sales"]
        .as_array()
        .unwrap()
        .iter()
        .any(|x| x["sale_id"] == sale));
    // Refusals exit non-zero with the reason.
    let (ok, _, err) = cli(&["restock", &s, &i, "0"]);
    assert!(!ok && err.contains("add"), "{err}");
    let (ok, _, err) = cli(&["list", "--state", "open"]);
    assert!(!ok && err.contains("--state"), "{err}");
    let changes = app.audit(sale).await["changes"].clone();
    assert!(
        changes
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["request_id"].as_str().unwrap_or("").starts_with("cli-")),
        "{changes}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
