//! The nemesis's steady workload: many users buying a few items (some asking twice with the same
//! request id, some hanging up a few milliseconds in and asking again), cancelling and paying
//! their orders through signed callbacks (some replayed), and reading their orders back. Every
//! attempt goes into the history; a purchase whose answer was a 503 or nothing at all is retried
//! with its request id until it is settled, as the README tells clients to.

use super::history::{History, Kind, Op};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the clients buy.
pub struct Sale {
    pub sale: u64,
    pub items: Vec<u64>,
    pub users: Vec<u64>,
}

/// An order some client saw acknowledged: what cancels and payments pick from.
#[derive(Clone)]
struct Acked {
    user: u64,
    order_id: String,
    amount_cents: i64,
}

/// What the clients share.
pub struct Shared {
    pub http: reqwest::Client,
    /// The engine nodes: each request goes to the next one, as a round-robin load balancer
    /// sends it (so a retry often reaches another node than the first attempt).
    urls: Vec<String>,
    next: std::sync::atomic::AtomicUsize,
    pub users: seckill::config::Secret,
    pub payments: seckill::config::Secret,
    pub sale: Sale,
    pub history: Arc<History>,
    pub start: Instant,
    acked: Mutex<Vec<Acked>>,
    refs: Mutex<Vec<(String, Acked)>>,
}

impl Shared {
    pub fn new(
        urls: Vec<String>,
        users: seckill::config::Secret,
        payments: seckill::config::Secret,
        sale: Sale,
        history: Arc<History>,
        start: Instant,
    ) -> Result<Self, String> {
        Ok(Self {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(15))
                .build()
                .map_err(|e| e.to_string())?,
            urls,
            next: Default::default(),
            users,
            payments,
            sale,
            history,
            start,
            acked: Mutex::new(Vec::new()),
            refs: Mutex::new(Vec::new()),
        })
    }

    /// The engine node for the next request.
    pub fn url(&self) -> &str {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        &self.urls[n % self.urls.len()]
    }

    fn ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn token(&self, user: u64) -> String {
        seckill::auth::users::mint(&self.users, user, 3600).unwrap_or_default()
    }
}

/// One client: its own seeded randomness, until `stop` (then it settles what it started).
pub async fn client(shared: Arc<Shared>, id: u32, seed: u64, stop: Arc<AtomicBool>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (u64::from(id) << 32));
    let mut asked: Vec<(u64, u64, u32, String)> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let n: u32 = rng.random_range(0..100);
        match n {
            0..=59 => buy(&shared, id, &mut rng, &mut asked).await,
            60..=71 => cancel(&shared, id, &mut rng).await,
            72..=85 => pay(&shared, id, &mut rng).await,
            _ => read(&shared, id, &mut rng).await,
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..40))).await;
    }
}

/// Send `req` and record the attempt; the answer's status and body (None: no answer).
async fn send(
    shared: &Shared,
    mut op: Op,
    req: reqwest::RequestBuilder,
) -> (Option<u16>, Value, Option<u64>) {
    op.sent_ms = shared.ms();
    let (status, body, retry_after) = match req.send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            let retry_after = r
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()?.parse().ok());
            (
                Some(status),
                r.json().await.unwrap_or(Value::Null),
                retry_after,
            )
        }
        Err(_) => (None, Value::Null, None),
    };
    op.done_ms = shared.ms();
    op.status = status;
    op.code = body["code"].as_str().map(String::from);
    if op.order_id.is_none() {
        op.order_id = body["order_id"].as_str().map(String::from);
    }
    op.order_status = body["status"]
        .as_str()
        .or(body["order"]["status"].as_str())
        .map(String::from);
    if op.kind == Some(Kind::Read) && status == Some(200) {
        op.seen = body["orders"].as_array().map(|orders| {
            orders
                .iter()
                .filter_map(|o| {
                    Some((
                        o["order_id"].as_str()?.to_string(),
                        o["status"].as_str()?.to_string(),
                    ))
                })
                .collect()
        });
    }
    shared.history.record(op);
    (status, body, retry_after)
}

/// Whether to ask again (a 503, a rate limit or no answer), and after how long.
fn again(status: Option<u16>, retry_after: Option<u64>, rng: &mut impl Rng) -> Option<Duration> {
    match status {
        None | Some(503) | Some(429) => Some(Duration::from_millis(
            retry_after.map_or(0, |s| s * 1000) + rng.random_range(50..400),
        )),
        _ => None,
    }
}

async fn buy(
    shared: &Shared,
    client: u32,
    rng: &mut ChaCha8Rng,
    asked: &mut Vec<(u64, u64, u32, String)>,
) {
    // One purchase in seven asks again for an earlier one, with its request id.
    let (user, item, qty, rid) = match asked.len() {
        n if n > 0 && rng.random_range(0..7) == 0 => asked[rng.random_range(0..n)].clone(),
        _ => {
            let s = &shared.sale;
            let ask = (
                s.users[rng.random_range(0..s.users.len())],
                s.items[rng.random_range(0..s.items.len())],
                if rng.random_range(0..5) == 0 { 2 } else { 1 },
                uuid::Uuid::new_v4().to_string(),
            );
            asked.push(ask.clone());
            if asked.len() > 200 {
                asked.remove(0);
            }
            ask
        }
    };
    let op = Op {
        client,
        kind: Some(Kind::Buy),
        user,
        item: Some(item),
        qty: Some(qty),
        request_id: Some(rid.clone()),
        ..Default::default()
    };
    // Each attempt to the next engine node.
    let path = || {
        format!(
            "{}/v1/sales/{}/items/{item}/orders",
            shared.url(),
            shared.sale.sale
        )
    };
    let body = json!({"quantity": qty, "request_id": rid});
    let token = shared.token(user);
    // One in twenty hangs up a few milliseconds in, then asks again for the outcome.
    if rng.random_range(0..20) == 0 {
        let req = shared
            .http
            .post(path())
            .bearer_auth(&token)
            .json(&body)
            .timeout(Duration::from_millis(rng.random_range(1..20)));
        send(
            shared,
            Op {
                abandoned: true,
                ..op.clone()
            },
            req,
        )
        .await;
    }
    for _ in 0..60 {
        let req = shared.http.post(path()).bearer_auth(&token).json(&body);
        let (status, answer, retry_after) = send(shared, op.clone(), req).await;
        if let Some(pause) = again(status, retry_after, rng) {
            tokio::time::sleep(pause).await;
            continue;
        }
        if matches!(status, Some(200 | 201)) {
            if let Some(id) = answer["order_id"].as_str() {
                let mut acked = shared.acked.lock().unwrap_or_else(|p| p.into_inner());
                acked.push(Acked {
                    user,
                    order_id: id.to_string(),
                    amount_cents: answer["amount_cents"].as_i64().unwrap_or(0),
                });
            }
        }
        return;
    }
}

fn pick(shared: &Shared, rng: &mut ChaCha8Rng) -> Option<Acked> {
    let acked = shared.acked.lock().unwrap_or_else(|p| p.into_inner());
    (!acked.is_empty()).then(|| acked[rng.random_range(0..acked.len())].clone())
}

async fn cancel(shared: &Shared, client: u32, rng: &mut ChaCha8Rng) {
    let Some(a) = pick(shared, rng) else { return };
    let op = Op {
        client,
        kind: Some(Kind::Cancel),
        user: a.user,
        order_id: Some(a.order_id.clone()),
        ..Default::default()
    };
    for _ in 0..20 {
        let path = format!(
            "{}/v1/users/{}/orders/{}/cancel",
            shared.url(),
            a.user,
            a.order_id
        );
        let req = shared
            .http
            .post(path)
            .bearer_auth(shared.token(a.user))
            .json(&json!({}));
        let (status, _, retry_after) = send(shared, op.clone(), req).await;
        match again(status, retry_after, rng) {
            Some(pause) => tokio::time::sleep(pause).await,
            None => return,
        }
    }
}

async fn pay(shared: &Shared, client: u32, rng: &mut ChaCha8Rng) {
    // One payment in five is a replay of an earlier callback (the same reference).
    let replay = {
        let refs = shared.refs.lock().unwrap_or_else(|p| p.into_inner());
        (!refs.is_empty() && rng.random_range(0..5) == 0)
            .then(|| refs[rng.random_range(0..refs.len())].clone())
    };
    let (payment_ref, a) = match replay {
        Some(r) => r,
        None => {
            let Some(a) = pick(shared, rng) else { return };
            let r = format!("pay-{}", uuid::Uuid::new_v4().simple());
            let mut refs = shared.refs.lock().unwrap_or_else(|p| p.into_inner());
            refs.push((r.clone(), a.clone()));
            (r, a)
        }
    };
    let op = Op {
        client,
        kind: Some(Kind::Pay),
        user: a.user,
        order_id: Some(a.order_id.clone()),
        payment_ref: Some(payment_ref.clone()),
        ..Default::default()
    };
    let body = json!({"order_id": a.order_id, "user_id": a.user, "amount_cents": a.amount_cents,
                      "payment_ref": payment_ref})
    .to_string();
    for _ in 0..20 {
        let t = chrono::Utc::now().timestamp();
        let sig = seckill::auth::signature::sign(&shared.payments, t, body.as_bytes());
        let req = shared
            .http
            .post(format!("{}/v1/payments", shared.url()))
            .header("content-type", "application/json")
            .header("seckill-signature", sig)
            .body(body.clone());
        let (status, _, retry_after) = send(shared, op.clone(), req).await;
        match again(status, retry_after, rng) {
            Some(pause) => tokio::time::sleep(pause).await,
            None => return,
        }
    }
}

async fn read(shared: &Shared, client: u32, rng: &mut ChaCha8Rng) {
    let Some(a) = pick(shared, rng) else { return };
    let op = Op {
        client,
        kind: Some(Kind::Read),
        user: a.user,
        ..Default::default()
    };
    let req = shared
        .http
        .get(format!(
            "{}/v1/users/{}/orders?limit=1000",
            shared.url(),
            a.user
        ))
        .bearer_auth(shared.token(a.user));
    send(shared, op, req).await;
}
