//! The sale page over HTTP: what a CDN may cache and what it may not, the friendly 404, and the
//! dev cluster's sign-in (absent from `serve`). The page itself runs in a browser in
//! `scripts/browser`.

use crate::helpers::*;
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test]
async fn the_page_is_cacheable_and_the_live_data_barely() {
    let app = spawn_app().await;
    let item = fresh_item();
    let sale = app
        .create_sale(json!([{"item_id": item, "stock": 5, "price_cents": 100}]))
        .await;

    let page = app
        .send(app.http.get(format!("{}/sales/{sale}", app.addr)))
        .await;
    assert_eq!(page.status, StatusCode::OK);
    assert_eq!(page.headers["cache-control"], "public, max-age=300");
    assert!(page.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let html = page.body.as_str().expect("html");
    assert!(html.contains("id=\"buy\"") && html.contains("id=\"countdown\""));
    assert!(
        !html.contains(&sale.to_string()),
        "the page is the same for every sale"
    );

    let etag = page.headers["etag"].to_str().unwrap().to_string();
    let again = app
        .send(
            app.http
                .get(format!("{}/sales/{sale}", app.addr))
                .header("If-None-Match", &etag),
        )
        .await;
    assert_eq!(again.status, StatusCode::NOT_MODIFIED);

    let script = html
        .split("/assets/")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("an asset link");
    let asset = app
        .send(app.http.get(format!("{}/assets/{script}", app.addr)))
        .await;
    assert_eq!(asset.status, StatusCode::OK);
    assert!(asset.headers["cache-control"]
        .to_str()
        .unwrap()
        .contains("immutable"));
    let unknown = app.get("/assets/sale.0000000000000000.js").await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);

    let live = app.get(&format!("/v1/sales/{sale}")).await;
    // A CDN may answer a crowd's polls for a second, no longer (the stock changes by the second).
    assert_eq!(live.headers["cache-control"], "public, max-age=1");
    assert!(live.headers.contains_key("etag"));
    let time = app.get("/v1/time").await;
    assert_eq!(time.headers["cache-control"], "no-store");
}

#[tokio::test]
async fn an_unknown_sale_gets_a_friendly_page() {
    let app = spawn_app().await;
    for path in ["/sales/987654321987", "/sales/not-a-sale"] {
        let r = app.send(app.http.get(format!("{}{path}", app.addr))).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{path}");
        assert!(r.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html"));
        assert!(r.body.as_str().unwrap().contains("no such sale"), "{path}");
    }
}

#[tokio::test]
async fn the_dev_sign_in_exists_only_in_the_dev_cluster() {
    let serve = spawn_app().await;
    let r = serve.post("/dev/token", json!({"user_id": 42})).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    let dev = spawn_app_with(|c| c.server.dev_login = true).await;
    let r = dev.post("/dev/token", json!({"user_id": 42})).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers["cache-control"], "no-store");
    let token = r.body["token"].as_str().expect("a token");
    let mine = dev
        .send(
            dev.http
                .get(format!("{}/v1/users/42/orders", dev.addr))
                .bearer_auth(token),
        )
        .await;
    assert_eq!(mine.status, StatusCode::OK, "the minted token is user 42's");
    let theirs = dev
        .send(
            dev.http
                .get(format!("{}/v1/users/43/orders", dev.addr))
                .bearer_auth(token),
        )
        .await;
    assert_eq!(theirs.status, StatusCode::FORBIDDEN);
    for bad in [json!({"user_id": 0}), json!({"user": 42}), json!({})] {
        let r = dev.post("/dev/token", bad.clone()).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
    }
}
