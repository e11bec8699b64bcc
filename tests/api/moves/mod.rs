//! Live moves of keys and slots between groups, under load: every acknowledged order survives,
//! stock is conserved, replays keep their order, the route follows; refusals carry codes; a move
//! whose runner died is resumed, and a cancelled one rolls back. The helpers the three files share
//! are here.

mod keys;
mod resume;
mod slots;

use crate::helpers::*;
use reqwest::StatusCode;
use seckill::router::KeyKind;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub(super) async fn admin_post(app: &TestApp, path: &str, body: Value) -> Resp {
    app.admin(reqwest::Method::POST, path, Some(body)).await
}

/// Start a move and wait until it rests; the move as shown at the end.
pub(super) async fn move_and_wait(app: &TestApp, body: Value) -> Value {
    let r = admin_post(app, "/v1/admin/moves", body.clone()).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{body}: {:?}", r.body);
    wait_for_rest(app, r.body["move_id"].as_u64().expect("move_id")).await
}

pub(super) async fn wait_for_rest(app: &TestApp, id: u64) -> Value {
    let path = format!("/v1/admin/moves/{id}");
    let started = std::time::Instant::now();
    loop {
        let r = app.admin_get(&path).await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        let b = r.body;
        let rest = match b["phase"].as_str() {
            Some("switched") => b["dest_live"] == true && b["complete_requested"] == false,
            Some("completed" | "failed" | "cancelled") => b["cleanup_pending"] == false,
            _ => false,
        };
        if rest {
            return b;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "move {id} did not come to rest: {b}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What one buyer saw.
#[derive(Default)]
pub(super) struct Seen {
    /// (user, request_id, order_id) of every purchase answered 201 (or 200: a replay).
    pub(super) orders: Vec<(u64, String, String)>,
    pub(super) unavailable: usize,
    pub(super) greedy: u64,
}

/// A buyer hammering one item until `stop`: fresh users, and every fifth purchase by one greedy
/// user (limit 2). Every 503 must carry Retry-After and is retried with its request_id until it
/// settles; anything but an order or a refusal with a code fails the test.
pub(super) async fn buyer(app: Arc<TestApp>, sale: u64, item: u64, stop: Arc<AtomicBool>) -> Seen {
    let mut seen = Seen {
        greedy: fresh_item(),
        ..Default::default()
    };
    let mut i = 0u64;
    while !stop.load(Ordering::SeqCst) {
        i += 1;
        let user = if i.is_multiple_of(5) {
            seen.greedy
        } else {
            fresh_item()
        };
        let rid = uuid::Uuid::new_v4().to_string();
        let mut r = app.buy(sale, item, user, 1, Some(&rid)).await;
        if r.status == StatusCode::SERVICE_UNAVAILABLE {
            assert!(
                r.headers.contains_key("retry-after"),
                "503 without Retry-After: {:?}",
                r.body
            );
            seen.unavailable += 1;
            r = app.buy_retrying(sale, item, user, 1, Some(&rid)).await;
        }
        match r.status {
            StatusCode::CREATED | StatusCode::OK => {
                let id = r.body["order_id"].as_str().expect("order_id").to_string();
                seen.orders.push((user, rid, id));
            }
            StatusCode::CONFLICT if ["limit_exceeded", "sold_out"].contains(&r.code()) => {}
            // The greedy user asks faster than the per-user rate limit allows.
            StatusCode::TOO_MANY_REQUESTS if user == seen.greedy => {}
            s => panic!("unexpected answer {s}: {:?}", r.body),
        }
    }
    seen
}

/// An engine on a cluster of the test's own.
pub(super) async fn own_app(own: &OwnCluster) -> TestApp {
    spawn_config(
        base_config(&own.0),
        seckill::app::Background {
            monitor: false,
            ..Default::default()
        },
    )
    .await
}
