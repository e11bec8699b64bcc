//! The faults of a real sale that are not server crashes: clients that send and disconnect,
//! retry storms with request ids on a sold-out item, replays of dead orders, slow clients, and
//! windows that close while a buyer waits for the row lock.

use crate::helpers::*;
use reqwest::StatusCode;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Send a complete request as `user` over a fresh connection and close it at once.
async fn send_and_close(addr: &str, path: &str, user: u64, body: &str) {
    let host = addr.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(host).await.expect("connect");
    let req = format!(
        "POST {path} HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        user_token(user),
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("send");
    drop(s);
}

async fn item_audit(app: &TestApp, sale: u64) -> serde_json::Value {
    app.audit(sale).await["items"][0].clone()
}

/// Buyers who send a purchase and hang up at once: every unit ends as an order or back in stock
/// within seconds, never as a reservation that nobody finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
// Long on purpose: one scenario (hang-ups in rounds, the settling, the stock and the orders
// counted), run once per coalescing mode; split, it would no longer read as one story.
async fn clients_that_send_and_close_strand_no_stock() {
    for coalesce in [true, false] {
        let app = Arc::new(spawn_app_with(|c| c.coalesce.enabled = coalesce).await);
        let item = fresh_item();
        let stock = 50;
        let sale = app
            .create_sale(json!([{"item_id": item, "stock": stock, "price_cents": 3}]))
            .await;
        let base = fresh_item();
        // One buyer who waits first: the node has then read the item's front-door rules, so the
        // hang-ups below reach the order service (a hang-up during that first read would cancel
        // the request before any purchase began, which strands nothing either).
        let r = app.buy(sale, item, base + 1_000, 1, None).await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
        let path = format!("/v1/sales/{sale}/items/{item}/orders");
        // Rounds of ten hang-ups until one of them has bought (a hang-up that comes before the
        // server reads the request buys nothing, which strands nothing either; a loaded machine
        // makes those more likely): at most 40 buyers for 49 units, so the stock never runs out.
        for round in 0..4u64 {
            let senders: Vec<_> = (round * 10..round * 10 + 10)
                .map(|u| {
                    let (addr, path) = (app.addr.clone(), path.clone());
                    tokio::spawn(async move {
                        let body = json!({"user_id": base + u, "quantity": 1, "request_id": format!("r{u}")});
                        send_and_close(&addr, &path, base + u, &body.to_string()).await
                    })
                })
                .collect();
            for s in senders {
                s.await.unwrap();
            }
            let bought = eventually(Duration::from_secs(2), || {
                let app = app.clone();
                async move {
                    item_audit(&app, sale).await["ordered"]
                        .as_i64()
                        .unwrap_or(0)
                        > 1
                }
            })
            .await;
            if bought {
                break;
            }
        }
        // Within 5 s nothing is in flight any more and nothing is left reserved.
        let settled = eventually(Duration::from_secs(5), || {
            let app = app.clone();
            async move {
                let a = item_audit(&app, sale).await;
                app.state.orders.hot.admission.in_flight() == 0
                    && a["reserved"] == 0
                    && a["conserved"] == true
            }
        })
        .await;
        let a = item_audit(&app, sale).await;
        assert!(
            settled,
            "coalesce={coalesce}: a reservation was left unfinished: {a}"
        );
        let ordered = a["ordered"].as_i64().unwrap();
        assert_eq!(
            ordered + a["remaining"].as_i64().unwrap(),
            stock,
            "every unit is an order or back in stock: {a}"
        );
        let group = app
            .state
            .router
            .route(seckill::router::KeyKind::Items, item);
        let mut orders = 0;
        for g in 0..2 {
            orders += app
                .sql_i64(
                    g,
                    &format!("SELECT count(*) FROM orders WHERE item_id = {item} AND status = 'pending_payment'"),
                )
                .await;
        }
        assert_eq!(
            orders, ordered,
            "each ordered unit has its order (item on g{group})"
        );
        println!("coalesce={coalesce}: {ordered} of {stock} units ordered by clients that hung up");
        assert!(
            ordered > 1,
            "the purchases went through although nobody waited"
        );
    }
}

/// A storm of buyers with request ids on a sold-out item is answered from memory, and a retry
/// whose earlier attempt holds a live reservation still gets its order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
// Long on purpose: one scenario, its steps in the order they happen; split, it would no longer
// read as one story.
async fn retries_on_a_sold_out_item_find_their_reservation() {
    let app = Arc::new(spawn_app().await);
    let item = fresh_item();
    let sale = app
        .create_sale(json!([{"item_id": item, "stock": 3, "price_cents": 10}]))
        .await;
    let (s, i) = (
        seckill::domain::SaleId::parse(sale.into()).unwrap(),
        seckill::domain::ItemId::parse(item.into()).unwrap(),
    );
    // One purchase gets as far as its reservation and no further (its client vanished before
    // transaction 2, say): the last unit.
    let stuck_user = fresh_item();
    let rid = seckill::domain::RequestId::parse("stuck-1".into()).unwrap();
    let user = seckill::domain::UserId::parse(stuck_user.into()).unwrap();
    let txn = seckill::domain::txn_id_for(s, i, user, Some(&rid));
    {
        let mut c = app
            .state
            .cluster
            .group(app.state.router.item_group(i))
            .writer()
            .await
            .unwrap();
        let (r, _) = seckill::order::reservations::reserve_one(
            &mut c,
            s,
            i,
            user,
            seckill::domain::Quantity::parse(1).unwrap(),
            txn,
            true,
        )
        .await
        .unwrap();
        assert!(r.is_ok());
    }
    // Two buyers take the rest; the item is sold out.
    let mut first = Vec::new();
    for u in 0..2 {
        let r = app
            .buy(sale, item, fresh_item() + u, 1, Some(&format!("ok-{u}")))
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
        first.push(r);
    }
    let gone = app.buy(sale, item, fresh_item(), 1, Some("late-1")).await;
    assert_eq!(gone.code(), "sold_out");
    // The node reads the holders of the sold-out item.
    let state = app.state.clone();
    let stranger = Some(uuid::Uuid::new_v4());
    assert!(
        eventually(Duration::from_secs(3), || {
            let state = state.clone();
            async move {
                state.orders.hot.soldout.verdict(s, i, stranger)
                    == seckill::order::hot::Verdict::SoldOut
            }
        })
        .await,
        "holders of the sold-out item are known"
    );
    // A storm of new request ids: all sold_out, none reaches the database.
    let storm: Vec<_> = (0..300u64)
        .map(|n| {
            let app = app.clone();
            tokio::spawn(async move {
                app.buy(sale, item, 1_000_000 + n, 1, Some(&format!("storm-{n}")))
                    .await
            })
        })
        .collect();
    for h in storm {
        let r = h.await.unwrap();
        assert_eq!((r.status, r.code()), (StatusCode::CONFLICT, "sold_out"));
    }
    // The stuck purchase's retry resumes its reservation and gets its order.
    let retry = app.buy(sale, item, stuck_user, 1, Some("stuck-1")).await;
    assert_eq!(retry.status, StatusCode::CREATED, "{:?}", retry.body);
    assert_eq!(retry.body["order_id"], txn.to_string());
    // The completed purchases' retries get their orders back.
    for (u, r) in first.iter().enumerate() {
        let user = r.body["user_id"].as_u64().unwrap();
        let again = app.buy(sale, item, user, 1, Some(&format!("ok-{u}"))).await;
        assert_eq!(again.status, StatusCode::CREATED);
        assert_eq!(again.body["order_id"], r.body["order_id"]);
        assert_eq!(again.headers["idempotent-replayed"], "true");
    }
    let audit = app.audit(sale).await;
    assert_eq!(audit["conserved"], true, "{audit}");
    assert_eq!(audit["items"][0]["remaining"], 0);
}

/// A request id whose order was cancelled is refused with the order's state, never 201.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replaying_a_cancelled_purchase_is_refused_with_its_order() {
    let app = spawn_app().await;
    let item = fresh_item();
    let sale = app
        .create_sale(json!([{"item_id": item, "stock": 5, "price_cents": 10}]))
        .await;
    let user = fresh_item();
    let r = app.buy(sale, item, user, 1, Some("cart-1")).await;
    assert_eq!(r.status, StatusCode::CREATED);
    let id = r.body["order_id"].as_str().unwrap().to_string();
    let c = app
        .post(&format!("/v1/users/{user}/orders/{id}/cancel"), json!({}))
        .await;
    assert_eq!(c.status, StatusCode::OK, "{:?}", c.body);
    let again = app.buy(sale, item, user, 1, Some("cart-1")).await;
    assert_eq!(
        (again.status, again.code()),
        (StatusCode::CONFLICT, "order_cancelled"),
        "{:?}",
        again.body
    );
    assert_eq!(again.body["order"]["order_id"], id.as_str());
    assert_eq!(again.body["order"]["status"], "cancelled");
    assert_eq!(
        app.remaining(sale, item).await,
        5,
        "the replay took no stock"
    );
    assert_eq!(app.audit(sale).await["conserved"], true);
}

/// A buyer waiting for the row lock when the window closes is refused: the clock decides, not
/// the transaction's start.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_window_that_closes_while_a_buyer_waits_is_closed() {
    for coalesce in [true, false] {
        let app = Arc::new(spawn_app_with(|c| c.coalesce.enabled = coalesce).await);
        let item = fresh_item();
        let now = chrono::Utc::now();
        let ends = now + chrono::Duration::milliseconds(1500);
        let sale = app
            .create_sale_at(
                json!([{"item_id": item, "stock": 5, "price_cents": 1}]),
                now - chrono::Duration::minutes(1),
                ends,
                None,
            )
            .await;
        let group = app
            .state
            .router
            .route(seckill::router::KeyKind::Items, item);
        // Another transaction holds the item's row lock past the end of the sale.
        let mut c = app.state.cluster.group(group).writer().await.unwrap();
        let tx = c.transaction().await.unwrap();
        tx.execute(
            "SELECT 1 FROM sale_items WHERE item_id = $1 FOR UPDATE",
            &[&(item as i64)],
        )
        .await
        .unwrap();
        let buyer = {
            let app = app.clone();
            tokio::spawn(async move { app.buy(sale, item, fresh_item(), 1, None).await })
        };
        tokio::time::sleep(Duration::from_millis(2000)).await;
        tx.rollback().await.unwrap();
        let r = buyer.await.unwrap();
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::CONFLICT, "ended"),
            "coalesce={coalesce}: {:?}",
            r.body
        );
        assert_eq!(app.remaining(sale, item).await, 5);
    }
}

/// Clients that open connections and send their request head slowly (or never) are cut off,
/// and do not hold the server back at shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_header_clients_are_cut_off_and_do_not_block_shutdown() {
    let mut config = base_config(cluster());
    config.server.header_read_timeout_ms = 500;
    config.server.drain_ms = 1_000;
    let app = spawn_config(config, quiet()).await;
    let host = app.addr.trim_start_matches("http://").to_string();
    let mut slow = Vec::new();
    for _ in 0..20 {
        let mut s = tokio::net::TcpStream::connect(&host).await.unwrap();
        s.write_all(b"GET /v1/time HTTP/1.1\r\nhost: x\r\n")
            .await
            .unwrap();
        slow.push(s);
    }
    // Cut off after the header timeout: reading sees the connection end.
    tokio::time::sleep(Duration::from_millis(900)).await;
    for s in &mut slow {
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
            .await
            .expect("the server ends a slow connection")
            .unwrap_or(0);
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(n == 0 || text.starts_with("HTTP/1.1 408"), "{text}");
    }
    // Meanwhile normal requests are served.
    assert_eq!(app.get("/v1/time").await.status, StatusCode::OK);
    // New slow clients, then shutdown: the server stops within the drain period.
    for _ in 0..20 {
        let mut s = tokio::net::TcpStream::connect(&host).await.unwrap();
        s.write_all(b"GET /v1/ti").await.unwrap();
        slow.push(s);
    }
    let stopped = app.stop_and_wait(Duration::from_secs(5)).await;
    assert!(stopped, "shutdown was not held back by slow clients");
}

/// Beyond `server.max_connections`, a new connection gets 503 overloaded (problem+json) at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_beyond_the_bound_are_refused_not_queued() {
    let mut config = base_config(cluster());
    config.server.max_connections = 4;
    let app = spawn_config(config, quiet()).await;
    let host = app.addr.trim_start_matches("http://").to_string();
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(tokio::net::TcpStream::connect(&host).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut extra = tokio::net::TcpStream::connect(&host).await.unwrap();
    extra
        .write_all(b"GET /v1/time HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(2), extra.read_to_string(&mut answer))
        .await
        .expect("answered at once")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("application/problem+json") && answer.contains("retry-after: 1"));
    assert!(answer.contains("\"code\":\"overloaded\""));
    drop(held);
    let ok = eventually(Duration::from_secs(2), || async {
        reqwest::get(format!("{}/v1/time", app.addr))
            .await
            .is_ok_and(|r| r.status() == StatusCode::OK)
    })
    .await;
    assert!(ok, "served again once connections close");
}

/// Four times `server.max_connections` buyers at once, each on a connection of its own with a
/// body on the way: every one gets an answer (201, 409 or a clean 503 with Retry-After), none a
/// reset, and the stock sells exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_beyond_the_connection_bound_gets_answers_not_resets() {
    let mut config = base_config(cluster());
    config.server.max_connections = 8;
    let app = Arc::new(spawn_config(config, quiet()).await);
    let host = app.addr.trim_start_matches("http://").to_string();
    let item = fresh_item();
    let sale = app
        .create_sale(json!([{"item_id": item, "stock": 10, "price_cents": 1}]))
        .await;
    // Six connections held open: two slots left for 32 buyers, so most are refused.
    let mut held = Vec::new();
    for _ in 0..6 {
        held.push(tokio::net::TcpStream::connect(&host).await.unwrap());
    }
    let mut buyers = tokio::task::JoinSet::new();
    for _ in 0..32 {
        let app = app.clone();
        buyers.spawn(async move {
            let user = fresh_item();
            let mut seen = Vec::new();
            for _ in 0..3 {
                // A client of its own: a new connection each time.
                let http = reqwest::Client::builder()
                    .pool_max_idle_per_host(0)
                    .build()
                    .unwrap();
                let r = http
                    .post(format!("{}/v1/sales/{sale}/items/{item}/orders", app.addr))
                    .bearer_auth(user_token(user))
                    .json(&json!({"quantity": 1, "request_id": format!("burst-{user}")}))
                    .send()
                    .await;
                match r {
                    Ok(r) => {
                        let status = r.status();
                        let retry = r.headers().get("retry-after").is_some();
                        seen.push(Ok((status, retry)));
                    }
                    Err(e) => seen.push(Err(format!("{e:?}"))),
                }
            }
            seen
        });
    }
    let mut statuses = std::collections::BTreeMap::new();
    while let Some(done) = buyers.join_next().await {
        for r in done.unwrap() {
            let (status, retry) = r.unwrap_or_else(|e| panic!("a transport error: {e}"));
            assert!(
                [
                    StatusCode::CREATED,
                    StatusCode::CONFLICT,
                    StatusCode::SERVICE_UNAVAILABLE
                ]
                .contains(&status),
                "{status}"
            );
            if status == StatusCode::SERVICE_UNAVAILABLE {
                assert!(retry, "a 503 says when to retry");
            }
            *statuses.entry(status.as_u16()).or_insert(0) += 1;
        }
    }
    assert!(statuses.get(&503).is_some_and(|n| *n > 0), "{statuses:?}");
    drop(held);
    let audit = app.audit(sale).await;
    assert_eq!(audit["conserved"], true, "{audit}");
    assert!(audit["items"][0]["remaining"].as_i64().unwrap() >= 0);
}

/// The sold-out set does not grow with every past sale: an item whose sale ended is forgotten.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sold_out_items_of_ended_sales_are_forgotten() {
    let app = spawn_app().await;
    let item = fresh_item();
    let now = chrono::Utc::now();
    let sale = app
        .create_sale_at(
            json!([{"item_id": item, "stock": 1, "price_cents": 1}]),
            now - chrono::Duration::minutes(1),
            now + chrono::Duration::milliseconds(1500),
            None,
        )
        .await;
    assert_eq!(
        app.buy(sale, item, fresh_item(), 1, None).await.status,
        StatusCode::CREATED
    );
    assert_eq!(
        app.buy(sale, item, fresh_item(), 1, None).await.code(),
        "sold_out"
    );
    let (s, i) = (
        seckill::domain::SaleId::parse(sale.into()).unwrap(),
        seckill::domain::ItemId::parse(item.into()).unwrap(),
    );
    assert!(app.state.orders.hot.soldout.is_sold_out(s, i));
    let state = app.state.clone();
    let forgotten = eventually(Duration::from_secs(5), || {
        let state = state.clone();
        async move { !state.orders.hot.soldout.is_sold_out(s, i) }
    })
    .await;
    assert!(forgotten, "the ended sale's item left the sold-out set");
    // And buying now says what is true: the sale ended.
    assert_eq!(
        app.buy(sale, item, fresh_item(), 1, None).await.code(),
        "ended"
    );
}
