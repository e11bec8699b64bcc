//! Metrics, request ids and the OpenAPI document, through the HTTP API. A test binary of its own:
//! the metrics recorder is process-wide, so counters here see only this binary's requests.

#[path = "api/helpers.rs"]
mod helpers;

use helpers::*;
use reqwest::StatusCode;
use serde_json::json;

/// The order metrics are the process's, shared by every test here: the tests that buy take turns,
/// so that the one counting orders counts only its own.
static BUYERS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The sum of the series `name{...labels...}` (labels as they print, e.g. `outcome="created"`).
fn series(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            let matches = if labels.is_empty() {
                key == name
            } else {
                key.starts_with(&format!("{name}{{")) && key.contains(labels)
            };
            matches.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

async fn scrape(app: &TestApp) -> String {
    let r = app
        .send(app.http.get(format!("{}/metrics", app.addr)))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    r.body.as_str().unwrap_or("").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_orders_by_outcome_and_name_routes_by_template() {
    let _turn = BUYERS.lock().await;
    let app = spawn_app().await;
    let item = fresh_item();
    let sale = app
        .create_sale(json!([{"item_id": item, "stock": 5, "price_cents": 1}]))
        .await;
    let before = scrape(&app).await;
    let created = series(&before, "seckill_orders_total", "outcome=\"created\"");
    let sold_out = series(&before, "seckill_orders_total", "outcome=\"sold_out\"");
    let n = 5;
    for _ in 0..n {
        let r = app.buy(sale, item, fresh_item(), 1, None).await;
        assert_eq!(r.status, StatusCode::CREATED);
    }
    for _ in 0..3 {
        assert_eq!(
            app.buy(sale, item, fresh_item(), 1, None).await.code(),
            "sold_out"
        );
    }
    let after = scrape(&app).await;
    assert_eq!(
        series(&after, "seckill_orders_total", "outcome=\"created\"") - created,
        n as f64,
        "created grew by exactly the orders made"
    );
    assert_eq!(
        series(&after, "seckill_orders_total", "outcome=\"sold_out\"") - sold_out,
        3.0
    );
    // The buy route is a series under its template; no route label holds a number.
    let template = "http_route=\"/v1/sales/{sale_id}/items/{item_id}/orders\"";
    assert!(
        series(
            &after,
            "http_server_request_duration_seconds_count",
            template
        ) >= 8.0,
        "{after}"
    );
    for line in after.lines().filter(|l| l.contains("http_route=")) {
        let route = line
            .split("http_route=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        let concrete = route
            .split('/')
            .any(|seg| seg.parse::<u64>().is_ok() || uuid::Uuid::parse_str(seg).is_ok());
        assert!(!concrete, "a concrete id in a route label: {line}");
    }
    for name in [
        "seckill_order_phase_duration_seconds_bucket",
        "seckill_coalesce_batch_size_bucket",
        "seckill_db_pool_connections",
        "seckill_group_up",
        "seckill_replication_lag_bytes",
        "seckill_failovers_total",
        "http_server_active_requests",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
    ] {
        assert!(after.contains(name), "{name} missing");
    }
    assert!(
        series(&after, "process_resident_memory_bytes", "") > 0.0,
        "resident memory is measured"
    );
    // No label names a sale, an item or a user.
    for id in [sale.to_string(), item.to_string()] {
        assert!(!after.contains(&id), "an id in a label: {id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_round_trip_and_name_problems() {
    let app = spawn_app().await;
    let r = app
        .send(
            app.http
                .get(format!("{}/v1/time", app.addr))
                .header("x-request-id", "trace-me-123"),
        )
        .await;
    assert_eq!(r.headers["x-request-id"], "trace-me-123");
    let r = app.get("/v1/sales/1").await;
    let id = r.headers["x-request-id"].to_str().unwrap().to_string();
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "generated: {id}");
    assert_eq!(
        r.body["instance"],
        id.as_str(),
        "the problem names its request"
    );
    // An unusable id (not printable ASCII, too long) is replaced, not echoed.
    let r = app
        .send(
            app.http
                .get(format!("{}/v1/time", app.addr))
                .header("x-request-id", "x".repeat(200)),
        )
        .await;
    assert_ne!(r.headers["x-request-id"], "x".repeat(200).as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_openapi_document_lists_every_route() {
    let app = spawn_app().await;
    let r = app.get("/openapi.json").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["openapi"], "3.1.0");
    for path in [
        "/v1/time",
        "/v1/admin/sales",
        "/v1/sales/{sale_id}/items/{item_id}/orders",
        "/v1/payments",
        "/metrics",
    ] {
        assert!(r.body["paths"][path].is_object(), "{path}");
    }
    let codes = &r.body["components"]["schemas"]["Code"]["enum"];
    assert!(codes.as_array().unwrap().contains(&json!("sold_out")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_can_require_the_admin_token() {
    let app = spawn_app_with(|c| c.server.metrics_need_admin = true).await;
    let r = app
        .send(app.http.get(format!("{}/metrics", app.addr)))
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = app
        .send(
            app.http
                .get(format!("{}/metrics", app.addr))
                .bearer_auth(TOKEN),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
}

/// The log lines this test binary's engines write (JSON, `seckill=debug`), captured once for all
/// the binary's tests.
fn log() -> &'static std::sync::Arc<std::sync::Mutex<Vec<u8>>> {
    static LOG: std::sync::OnceLock<std::sync::Arc<std::sync::Mutex<Vec<u8>>>> =
        std::sync::OnceLock::new();
    LOG.get_or_init(|| {
        let buffer = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = buffer.clone();
        seckill::telemetry::init_tracing_with(
            true,
            seckill::telemetry::LogFilter::new("warn,seckill=debug").expect("directives"),
            move || Sink(sink.clone()),
        );
        buffer
    })
}

struct Sink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One buyer's request can be followed in the JSON log by its request id: the phases of its
/// order path (with their group and outcome) and its answer are lines that name it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// Long on purpose: one scenario, its steps in the order they happen; split, it would no longer
// read as one story.
async fn one_buyers_request_can_be_followed_in_the_json_log() {
    let _turn = BUYERS.lock().await;
    let log = log();
    let app = spawn_app().await;
    let item = fresh_item();
    let sale = app
        .create_sale(json!([{"item_id": item, "stock": 1, "price_cents": 1}]))
        .await;
    let user = fresh_item();
    let mut ids = Vec::new();
    for n in 0..2 {
        let id = format!("follow-{item}-{n}");
        let r = app
            .send(
                app.http
                    .post(format!("{}/v1/sales/{sale}/items/{item}/orders", app.addr))
                    .bearer_auth(user_token(user + n))
                    .header("x-request-id", &id)
                    .json(&json!({"user_id": user + n, "quantity": 1})),
            )
            .await;
        assert_eq!(r.headers["x-request-id"], id.as_str());
        ids.push((id, r.status));
    }
    assert_eq!(ids[0].1, StatusCode::CREATED);
    assert_eq!(
        ids[1].1,
        StatusCode::CONFLICT,
        "one unit: the second is sold out"
    );

    let text = String::from_utf8(log.lock().unwrap().clone()).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("every log line is one JSON object"))
        .collect();
    // The lines in a span of this request (spans list from the root: the request span first).
    let of = |id: &str| -> Vec<&serde_json::Value> {
        lines
            .iter()
            .filter(|l| {
                l["spans"].as_array().is_some_and(|spans| {
                    spans
                        .iter()
                        .any(|s| s["name"] == "request" && s["request_id"] == id)
                })
            })
            .collect()
    };
    let phase = |lines: &[&serde_json::Value], name: &str| -> Option<serde_json::Value> {
        lines
            .iter()
            .find(|l| l["fields"]["phase"] == name)
            .map(|l| (*l).clone())
    };

    let bought = of(&ids[0].0);
    let reserve = phase(&bought, "reserve").expect("the reserve phase is logged");
    assert_eq!(reserve["fields"]["outcome"], "reserved");
    let spans = reserve["spans"].as_array().unwrap();
    let reserve_span = spans.last().unwrap();
    assert_eq!(reserve_span["name"], "reserve");
    assert!(reserve_span["group"]
        .as_str()
        .is_some_and(|g| g.starts_with('g')));
    let root = &spans[0];
    assert_eq!(root["route"], "/v1/sales/{sale_id}/items/{item_id}/orders");
    let order = phase(&bought, "order").expect("the order phase is logged");
    assert_eq!(order["fields"]["outcome"], "ok");
    let done = bought
        .iter()
        .find(|l| l["fields"]["message"] == "request done")
        .expect("the answer is logged");
    assert_eq!(done["fields"]["status"], 201);

    let refused = of(&ids[1].0);
    let done = refused
        .iter()
        .find(|l| l["fields"]["message"] == "request done")
        .expect("the refusal is logged");
    assert_eq!(done["fields"]["status"], 409);
    assert_eq!(done["fields"]["code"], "sold_out");
    assert!(
        phase(&refused, "order").is_none(),
        "a sold-out buyer never reached the order insert"
    );
}
