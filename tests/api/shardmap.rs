//! The shard map for DBAs: route introspection, the table's entries, and re-routing that refuses
//! keys with rows (a re-route would strand them: 409 `has_data`).

use crate::helpers::*;
use reqwest::StatusCode;
use seckill::config::Strategy;
use seckill::router::KeyKind;
use serde_json::{json, Value};

async fn put(app: &TestApp, path: &str, group: &str) -> Resp {
    app.admin(reqwest::Method::PUT, path, Some(json!({ "group": group })))
        .await
}

async fn delete(app: &TestApp, path: &str) -> Resp {
    app.admin(reqwest::Method::DELETE, path, None).await
}

#[tokio::test]
async fn a_route_says_where_and_why() {
    let app = spawn_app().await;
    let item = fresh_item_in(&app, 1);
    let r = app
        .admin_get(&format!("/v1/admin/route/items/{item}"))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["kind"], "items");
    assert_eq!(r.body["key"], item);
    assert_eq!(r.body["group"], "g1");
    assert_eq!(r.body["source"], "hash");
    let slot = seckill::router::slot_of(item, app.state.router.kind(KeyKind::Items).slot_count());
    assert_eq!(r.body["slot"], slot);
    let user = app.admin_get("/v1/admin/route/users/42").await;
    assert_eq!(user.status, StatusCode::OK);
    let expected = app.state.router.route(KeyKind::Users, 42);
    assert_eq!(user.body["group"], format!("g{expected}"));

    for bad in [
        "/v1/admin/route/orders/1",
        "/v1/admin/route/items/0",
        "/v1/admin/route/items/x",
    ] {
        let r = app.admin_get(bad).await;
        assert_eq!(
            r.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{bad}: {:?}",
            r.body
        );
    }
    let anonymous = app.get(&format!("/v1/admin/route/items/{item}")).await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_key_without_rows_is_re_routed_and_back() {
    let app = spawn_app_with(|c| c.routing.items.strategy = Strategy::Table).await;
    let item = fresh_item_in(&app, 0);
    let path = format!("/v1/admin/shard-map/items/{item}");
    let before = app.admin_get("/v1/admin/shard-map").await;
    assert_eq!(before.status, StatusCode::OK);

    let r = put(&app, &path, "g1").await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(
        (r.body["group"].as_str(), r.body["source"].as_str()),
        (Some("g1"), Some("table"))
    );
    assert_eq!(
        app.state.router.route(KeyKind::Items, item),
        1,
        "this node at once"
    );
    let listed = app.admin_get("/v1/admin/shard-map").await;
    assert!(listed.body["version"].as_i64() > before.body["version"].as_i64());
    assert!(listed.body["entries"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["key"] == item && e["group"] == "g1" && e["kind"] == "items"));

    // The item sells on its new group.
    let sale = app
        .create_sale(json!([{"item_id": item, "stock": 3, "price_cents": 1}]))
        .await;
    let bought = app.buy(sale, item, fresh_item(), 1, None).await;
    assert_eq!(bought.status, StatusCode::CREATED, "{:?}", bought.body);
    let on_g1 = app
        .sql_i64(
            1,
            &format!("SELECT count(*) FROM sale_items WHERE item_id = {item}"),
        )
        .await;
    assert_eq!(on_g1, 1);

    // Now it has rows: neither another group nor the way back.
    let r = put(&app, &path, "g0").await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::CONFLICT, "has_data"),
        "{:?}",
        r.body
    );
    let r = delete(&app, &path).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::CONFLICT, "has_data"),
        "{:?}",
        r.body
    );
    assert_eq!(
        app.state.router.route(KeyKind::Items, item),
        1,
        "nothing changed"
    );
    assert_eq!(
        app.remaining(sale, item).await,
        2,
        "the item is still reachable"
    );

    // A fresh key goes back to its hash group when its entry is removed.
    let other = fresh_item_in(&app, 0);
    let other_path = format!("/v1/admin/shard-map/items/{other}");
    let r = put(&app, &other_path, "g1").await;
    assert_eq!(r.status, StatusCode::OK);
    let r = delete(&app, &other_path).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(
        (r.body["group"].as_str(), r.body["source"].as_str()),
        (Some("g0"), Some("hash"))
    );
    let r = delete(&app, &other_path).await;
    assert_eq!((r.status, r.code()), (StatusCode::NOT_FOUND, "not_found"));
}

#[tokio::test]
async fn users_with_orders_and_bad_requests_are_refused() {
    let app = spawn_app_with(|c| c.routing.users.strategy = Strategy::Table).await;
    let item = fresh_item();
    let sale = app
        .create_sale(json!([{"item_id": item, "stock": 3, "price_cents": 1}]))
        .await;
    let user = fresh_item();
    let bought = app.buy(sale, item, user, 1, None).await;
    assert_eq!(bought.status, StatusCode::CREATED);
    let home = app.state.router.route(KeyKind::Users, user);
    let elsewhere = format!("g{}", 1 - home);
    let path = format!("/v1/admin/shard-map/users/{user}");
    let r = put(&app, &path, &elsewhere).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::CONFLICT, "has_data"),
        "{:?}",
        r.body
    );
    assert!(r.body["detail"]
        .as_str()
        .unwrap()
        .contains(&format!("g{home}")));
    // The order is still found.
    let mine = app.get(&format!("/v1/users/{user}/orders")).await;
    assert_eq!(mine.body["orders"].as_array().unwrap().len(), 1);

    // An unknown group and a misspelt body are refused.
    for (target, body) in [
        (&path, json!({"group": "g9"})),
        (&path, json!({"grup": "g1"})),
    ] {
        let r = app
            .admin(reqwest::Method::PUT, target, Some(body.clone()))
            .await;
        assert_eq!(
            r.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{target} {body}: {:?}",
            r.body
        );
    }
    let anonymous = app
        .send(
            app.http
                .put(format!("{}{path}", app.addr))
                .json(&json!({"group": "g0"})),
        )
        .await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);

    // The CLI refuses the same way, with a non-zero exit.
    let dir = std::env::temp_dir().join(format!("seckill-shardmap-{}", fresh_item()));
    std::fs::create_dir_all(&dir).unwrap();
    let toml = cluster().shards_toml("127.0.0.1:0", &secrets())
        + "\n[routing.users]\nstrategy = \"table\"\n";
    let config = dir.join("shards.toml");
    std::fs::write(&config, toml).unwrap();
    let cli = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_seckill"))
            .arg("shard-map")
            .arg("--config")
            .arg(&config)
            .args(args)
            .output()
            .expect("the CLI runs")
    };
    let user_arg = user.to_string();
    let out = cli(&["set", "users", &user_arg, &elsewhere]);
    assert!(!out.status.success(), "set on a user with orders must fail");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("has rows"),
        "{out:?}"
    );
    let out = cli(&["route", "users", &user_arg]);
    assert!(out.status.success(), "{out:?}");
    let route: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(route["group"], format!("g{home}"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The only test with the layout guard on (the others route the shared cluster in several ways on
/// purpose): a configuration that would move existing keys does not start; accepted, it becomes
/// the cluster's layout.
#[tokio::test]
async fn a_layout_that_moves_keys_is_refused_until_accepted() {
    use seckill::app::Application;
    let guarded = |tweak: &dyn Fn(&mut seckill::Config)| {
        let mut c = base_config(cluster());
        c.server.layout_guard = true;
        tweak(&mut c);
        c
    };
    let swapped = |c: &mut seckill::Config| {
        c.routing.items.slot_map = vec![
            seckill::config::SlotAssignment {
                slots: "0-511".into(),
                group: "g1".into(),
            },
            seckill::config::SlotAssignment {
                slots: "512-1023".into(),
                group: "g0".into(),
            },
        ];
    };
    // Build (and drop) an engine with no background work: Ok, or the start error's text.
    let starts = |config: seckill::Config| async move {
        Application::build_with(config, quiet())
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    };
    // The usual layout: recorded by the first start (or already the recorded one).
    assert_eq!(starts(guarded(&|_| {})).await, Ok(()));
    // Swapping the slot halves would move every item.
    let text = starts(guarded(&swapped))
        .await
        .expect_err("a layout that moves keys must not start");
    assert!(
        text.contains("routing.items slots 0-511: g0 -> g1"),
        "{text}"
    );
    assert!(text.contains("--accept-layout-change"), "{text}");
    assert!(
        text.contains(r#"routing.items.slot_map = [{ slots = "0-511", group = "g0" }"#),
        "the recorded slot map, ready to pin: {text}"
    );
    // Users routed by the table fall back to the same slots: that is no change.
    let table = guarded(&|c| c.routing.users.strategy = seckill::config::Strategy::Table);
    assert_eq!(starts(table).await, Ok(()));
    // Accepted, it becomes the layout; then the old one is the change. Put it back.
    let accepted = guarded(&|c| {
        swapped(c);
        c.server.accept_layout_change = true;
    });
    assert_eq!(starts(accepted).await, Ok(()));
    assert!(starts(guarded(&|_| {})).await.is_err());
    let restored = guarded(&|c| c.server.accept_layout_change = true);
    assert_eq!(starts(restored).await, Ok(()));
}
