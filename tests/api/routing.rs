//! Routing against real groups: ranges and the router-config table put rows where configured.

use crate::helpers::*;
use seckill::router::KeyKind;
use serde_json::json;
use std::time::Duration;

async fn rows_in(app: &TestApp, group: usize, sale: u64, item: u64) -> i64 {
    app.sql_i64(
        group,
        &format!("SELECT count(*) FROM sale_items WHERE sale_id = {sale} AND item_id = {item}"),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_routing_places_items_and_users_by_range() {
    let boundary = 5_000_000_000_000_000u64;
    let app = spawn_app_with(|c| {
        let ranges = |g0: &str, g1: &str| {
            vec![
                seckill::config::RangeAssignment {
                    start: 0,
                    end: Some(boundary),
                    group: g0.into(),
                },
                seckill::config::RangeAssignment {
                    start: boundary,
                    end: None,
                    group: g1.into(),
                },
            ]
        };
        c.routing.items.strategy = seckill::config::Strategy::Range;
        c.routing.items.ranges = ranges("g0", "g1");
        c.routing.users.strategy = seckill::config::Strategy::Range;
        c.routing.users.ranges = ranges("g1", "g0");
    })
    .await;
    let low = fresh_item() % boundary;
    let high = boundary + fresh_item() % 1_000_000;
    let sale = app
        .create_sale(json!([{"item_id": low, "stock": 3, "price_cents": 1}, {"item_id": high, "stock": 3, "price_cents": 1}]))
        .await;
    assert_eq!(
        (
            rows_in(&app, 0, sale, low).await,
            rows_in(&app, 1, sale, low).await
        ),
        (1, 0)
    );
    assert_eq!(
        (
            rows_in(&app, 0, sale, high).await,
            rows_in(&app, 1, sale, high).await
        ),
        (0, 1)
    );

    let user_low = 1 + fresh_item() % 1000;
    let r = app.buy(sale, high, user_low, 1, None).await;
    assert_eq!(r.status, reqwest::StatusCode::CREATED, "{:?}", r.body);
    let id = r.body["order_id"].as_str().expect("id");
    let sql = format!("SELECT count(*) FROM orders WHERE order_id = '{id}'");
    assert_eq!(
        (app.sql_i64(0, &sql).await, app.sql_i64(1, &sql).await),
        (0, 1),
        "users below the boundary live on g1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_routing_follows_shard_map_and_falls_back_to_hash() {
    let app = spawn_app_with(|c| c.routing.items.strategy = seckill::config::Strategy::Table).await;
    let pinned = fresh_item_in(&app, 0);
    let unpinned = fresh_item_in(&app, 0);
    // The config group is g0; pin one item to g1.
    {
        let client = app.state.cluster.group(0).writer().await.expect("conn");
        client
            .execute(
                "INSERT INTO shard_map (kind, key, group_name) VALUES ('items', $1, 'g1')",
                &[&(pinned as i64)],
            )
            .await
            .expect("insert");
    }
    let router = app.state.router.clone();
    assert!(
        eventually(Duration::from_secs(5), || {
            let router = router.clone();
            async move { router.route(KeyKind::Items, pinned) == 1 }
        })
        .await,
        "the engine picks up the shard_map change"
    );
    assert_eq!(
        app.state.router.route(KeyKind::Items, unpinned),
        0,
        "unnamed keys follow the hash"
    );

    let sale = app
        .create_sale(json!([{"item_id": pinned, "stock": 2, "price_cents": 1}, {"item_id": unpinned, "stock": 2, "price_cents": 1}]))
        .await;
    assert_eq!(
        (
            rows_in(&app, 0, sale, pinned).await,
            rows_in(&app, 1, sale, pinned).await
        ),
        (0, 1)
    );
    assert_eq!(
        (
            rows_in(&app, 0, sale, unpinned).await,
            rows_in(&app, 1, sale, unpinned).await
        ),
        (1, 0)
    );
    let r = app.buy(sale, pinned, 7, 1, None).await;
    assert_eq!(r.status, reqwest::StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(app.remaining(sale, pinned).await, 1);

    // Deleting the entry sends the key back to its hash group.
    let client = app.state.cluster.group(0).writer().await.expect("conn");
    client
        .execute(
            "DELETE FROM shard_map WHERE kind = 'items' AND key = $1",
            &[&(pinned as i64)],
        )
        .await
        .expect("delete");
    drop(client);
    let router = app.state.router.clone();
    assert!(
        eventually(Duration::from_secs(5), || {
            let router = router.clone();
            async move { router.route(KeyKind::Items, pinned) == 0 }
        })
        .await
    );
}
