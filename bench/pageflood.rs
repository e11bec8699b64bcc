//! `--scenario page-flood`: a started protected sale (order token, no challenge) whose buyers ask
//! for order tokens while a crowd reads the sale's page data. 50 buyers each ask for an order
//! token every 300 ms, first alone (`--duration` seconds), then under a flood of
//! `GET /v1/sales/{id}` over `--concurrency` connections (300 by default here: every open sale
//! page polls it) for as long. The report: the order-token answers of each phase and the flood's
//! answers; the run passes when the order tokens are as good under the flood as alone (at least
//! 99% 201 in both phases, no transport errors).

use serde::Serialize;
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BUYERS: u64 = 50;
const ASK_EVERY: Duration = Duration::from_millis(300);

#[derive(Debug, Clone, Default, Serialize)]
pub struct Phase {
    /// Order-token answers by status ("error" for a transport error).
    pub order_tokens: BTreeMap<String, u64>,
    pub order_tokens_ok_share: f64,
    /// The flood's answers by status (empty alone), and its rate.
    pub flood: BTreeMap<String, u64>,
    pub flood_per_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub sale_id: u64,
    pub seconds_per_phase: f64,
    pub flood_connections: usize,
    pub alone: Phase,
    pub flooded: Phase,
    pub ok: bool,
}

impl Report {
    pub fn print(&self) {
        println!(
            "== page flood: sale {}, {BUYERS} buyers asking for order tokens every {} ms ==",
            self.sale_id,
            ASK_EVERY.as_millis()
        );
        for (name, p) in [("alone", &self.alone), ("flooded", &self.flooded)] {
            println!(
                "{name:>8}: order tokens {:?} ({:.1}% 201)",
                p.order_tokens,
                100.0 * p.order_tokens_ok_share
            );
            if !p.flood.is_empty() {
                println!(
                    "          GET /v1/sales/{{id}} flood over {} connections: {:?}, {:.0}/s",
                    self.flood_connections, p.flood, p.flood_per_s
                );
            }
        }
        println!(
            "[{}] order tokens unaffected by the read flood (>= 99% 201 in both phases)",
            if self.ok { "ok" } else { "FAIL" }
        );
    }
}

type Counts = Arc<Mutex<BTreeMap<String, u64>>>;

fn count(counts: &Counts, r: &Result<reqwest::Response, reqwest::Error>) {
    let key = match r {
        Ok(r) => r.status().as_u16().to_string(),
        Err(_) => "error".to_string(),
    };
    add(counts, key);
}

fn add(counts: &Counts, key: String) {
    if let Ok(mut c) = counts.lock() {
        *c.entry(key).or_default() += 1;
    }
}

pub async fn run(
    url: &str,
    admin: &str,
    minter: &crate::Minter,
    seconds: f64,
    connections: usize,
) -> Result<Report, String> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(connections + BUYERS as usize)
        .build()
        .map_err(|e| e.to_string())?;
    let item = uuid::Uuid::new_v4().as_u64_pair().0 % (1 << 40) + 1;
    let now = chrono::Utc::now();
    let body = json!({
        "name": "seckill-bench page flood",
        "starts_at": (now - chrono::Duration::seconds(1)).to_rfc3339(),
        "ends_at": (now + chrono::Duration::hours(1)).to_rfc3339(),
        "items": [{"item_id": item, "stock": 1_000_000, "price_cents": 100, "per_user_limit": 1}],
        "protection": {"order_token": true, "challenge": "none"},
    });
    let r = http
        .post(format!("{url}/v1/admin/sales"))
        .bearer_auth(admin)
        .json(&body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if r.status() != reqwest::StatusCode::CREATED {
        return Err(format!(
            "create the sale: {} {}",
            r.status(),
            r.text().await.unwrap_or_default()
        ));
    }
    let sale = r
        .json::<serde_json::Value>()
        .await
        .map_err(|e| e.to_string())?["sale_id"]
        .as_u64()
        .ok_or("no sale_id")?;
    let span = Duration::from_secs_f64(seconds);
    let alone = phase(&http, url, minter, sale, item, span, 0).await;
    let flooded = phase(&http, url, minter, sale, item, span, connections).await;
    let ok = [&alone, &flooded]
        .iter()
        .all(|p| p.order_tokens_ok_share >= 0.99 && !p.order_tokens.contains_key("error"));
    Ok(Report {
        sale_id: sale,
        seconds_per_phase: seconds,
        flood_connections: connections,
        alone,
        flooded,
        ok,
    })
}

async fn phase(
    http: &reqwest::Client,
    url: &str,
    minter: &crate::Minter,
    sale: u64,
    item: u64,
    span: Duration,
    flood_connections: usize,
) -> Phase {
    let stop = Arc::new(AtomicBool::new(false));
    let (tokens, flood): (Counts, Counts) = Default::default();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..flood_connections {
        let (http, stop, flood) = (http.clone(), stop.clone(), flood.clone());
        let page = format!("{url}/v1/sales/{sale}");
        tasks.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let r = match http.get(&page).send().await {
                    Ok(resp) => {
                        let status = resp.status();
                        let _ = resp.bytes().await;
                        Ok(status)
                    }
                    Err(e) => Err(e),
                };
                add(
                    &flood,
                    r.map_or("error".to_string(), |s| s.as_u16().to_string()),
                );
            }
        });
    }
    let base = uuid::Uuid::new_v4().as_u64_pair().0 % (1 << 40) + 1;
    for b in 0..BUYERS {
        let (http, stop, tokens) = (http.clone(), stop.clone(), tokens.clone());
        let user = base + b;
        let bearer = minter.token(user);
        let ask = format!("{url}/v1/sales/{sale}/items/{item}/order-token");
        tasks.spawn(async move {
            // Spread the buyers over the period, as people are.
            tokio::time::sleep(ASK_EVERY.mul_f64(b as f64 / BUYERS as f64)).await;
            let mut tick = tokio::time::interval(ASK_EVERY);
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let r = http
                    .post(&ask)
                    .bearer_auth(&bearer)
                    .json(&json!({}))
                    .send()
                    .await;
                count(&tokens, &r);
            }
        });
    }
    let started = Instant::now();
    tokio::time::sleep(span).await;
    stop.store(true, Ordering::Relaxed);
    while tasks.join_next().await.is_some() {}
    let elapsed = started.elapsed().as_secs_f64();
    let tokens = tokens.lock().map(|c| c.clone()).unwrap_or_default();
    let flood = flood.lock().map(|c| c.clone()).unwrap_or_default();
    let asked: u64 = tokens.values().sum();
    Phase {
        order_tokens_ok_share: tokens.get("201").copied().unwrap_or(0) as f64 / asked.max(1) as f64,
        flood_per_s: flood.values().sum::<u64>() as f64 / elapsed,
        order_tokens: tokens,
        flood,
    }
}
