//! The `bots` scenario: what the front door costs honest buyers, and what bots cost the database.
//!
//! One protected item (order tokens behind a proof of work). Honest virtual users each buy as a
//! browser would: a new user every time, GET the challenge, solve it, POST the order-token request,
//! POST the order URL. Bot virtual users, in turn: buy at the plain URL (skipping the challenge:
//! `token_required`), at a made-up order URL (`invalid_token`), at an honest user's order URL with
//! their own user token (a replayed token: `invalid_token`), hammer the challenge as one user
//! (`rate_limited`), and buy as a blocked user (`blocked`).
//!
//! Four phases of the same length: honest users alone; honest users with bots (the honest
//! figures of both are compared); bots alone and then nobody, each between two readings of the
//! engine's `seckill_db_work_total`: the database work during the bots-alone phase beyond the idle
//! phase's (background tasks) is what bot requests cost PostgreSQL.

use crate::conn::{Conn, Target};
use crate::Args;
use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Serialize)]
pub struct HonestFigures {
    pub orders: u64,
    pub orders_per_s: f64,
    /// The buy request (POST to the order URL).
    pub buy_p99_ms: f64,
    /// The whole flow: challenge, solving, token, buy.
    pub flow_p99_ms: f64,
    pub failures: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BotsReport {
    pub url: String,
    pub honest_connections: usize,
    pub bot_connections: usize,
    pub phase_s: f64,
    pub honest_alone: HonestFigures,
    pub honest_with_bots: HonestFigures,
    pub orders_ratio: f64,
    pub p99_ratio: f64,
    pub bot_requests: u64,
    pub bot_answers: BTreeMap<String, u64>,
    /// Bot requests that were not refused by the front door (201s and anything unexpected).
    pub bot_requests_through: u64,
    pub db_work_bots_alone: f64,
    pub db_work_idle: f64,
    pub ok: bool,
}

impl BotsReport {
    pub fn print(&self) {
        let h = |name: &str, f: &HonestFigures| {
            println!(
                "{name:<22} {:>6} orders ({:.0}/s), buy p99 {:.2} ms, flow p99 {:.2} ms, {} failures",
                f.orders, f.orders_per_s, f.buy_p99_ms, f.flow_p99_ms, f.failures
            )
        };
        println!(
            "\n== bots on {} ({} honest + {} bot connections, {:.0} s phases) ==",
            self.url, self.honest_connections, self.bot_connections, self.phase_s
        );
        h("honest alone", &self.honest_alone);
        h("honest with bots", &self.honest_with_bots);
        println!(
            "with bots / alone:     orders/s {:.2}x, buy p99 {:.2}x",
            self.orders_ratio, self.p99_ratio
        );
        println!("bot requests           {} answered:", self.bot_requests);
        for (k, v) in &self.bot_answers {
            println!("  {k:<30} {v}");
        }
        println!(
            "bot requests through the front door: {}",
            self.bot_requests_through
        );
        println!(
            "database work, bots alone {:.0} vs idle {:.0} (seckill_db_work_total, same length)",
            self.db_work_bots_alone, self.db_work_idle
        );
        println!("{}", if self.ok { "OK" } else { "FAILED" });
    }
}

/// What a bot does on its next request.
#[derive(Clone, Copy)]
enum Bot {
    SkipChallenge,
    ForgeToken,
    ReplayToken,
    Flood,
    Blocked,
}

const BOTS: [Bot; 5] = [
    Bot::SkipChallenge,
    Bot::ForgeToken,
    Bot::ReplayToken,
    Bot::Flood,
    Bot::Blocked,
];

struct Shared {
    sale: u64,
    item: u64,
    minter: crate::Minter,
    /// The bots' own user tokens, minted once (a bot reuses its account's token).
    /// `[flooding user, blocked user, 1000 bot accounts...]`.
    bot_tokens: Vec<String>,
    /// Order URLs honest users were given (for bots to replay).
    stolen: Mutex<Vec<String>>,
}

fn rand_u64() -> u64 {
    uuid::Uuid::new_v4().as_u64_pair().0
}

fn histogram() -> Result<Histogram<u64>, String> {
    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| e.to_string())
}

struct HonestSeen {
    orders: u64,
    failures: u64,
    buy: Histogram<u64>,
    flow: Histogram<u64>,
}

/// One honest purchase, as the sale page does it. Returns whether it got its order.
async fn honest_buy(
    conn: &mut Conn,
    s: &Shared,
    user: u64,
    seen: &mut HonestSeen,
) -> Result<bool, String> {
    let token = s.minter.token(user);
    let base = format!("/v1/sales/{}/items/{}", s.sale, s.item);
    let t0 = Instant::now();
    let (status, body) = conn
        .send(
            hyper::Method::GET,
            &format!("{base}/challenge"),
            None,
            Some(&token),
        )
        .await?;
    if status != 200 {
        return Ok(false);
    }
    let c: serde_json::Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    let field = |k: &str| c[k].as_str().unwrap_or_default().to_string();
    let number = seckill::frontdoor::challenge::solve_pow(
        &field("challenge"),
        &field("salt"),
        c["maxnumber"].as_u64().unwrap_or(0),
    )
    .ok_or("unsolvable challenge")?;
    let solution = serde_json::json!({"solution": {"number": number, "salt": field("salt"),
        "challenge": field("challenge"), "signature": field("signature")}});
    let (status, body) = conn
        .send(
            hyper::Method::POST,
            &format!("{base}/order-token"),
            Some(solution.to_string().into()),
            Some(&token),
        )
        .await?;
    if status != 201 {
        return Ok(false);
    }
    let t: serde_json::Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    let url = t["order_url"].as_str().unwrap_or_default().to_string();
    let t1 = Instant::now();
    let (status, _) = conn
        .send(
            hyper::Method::POST,
            &url,
            Some(format!(r#"{{"quantity":1,"request_id":"h{user}"}}"#).into()),
            Some(&token),
        )
        .await?;
    if status != 201 {
        return Ok(false);
    }
    let _ = seen.buy.record(t1.elapsed().as_micros().max(1) as u64);
    let _ = seen.flow.record(t0.elapsed().as_micros().max(1) as u64);
    if let Ok(mut stolen) = s.stolen.lock() {
        if stolen.len() < 1000 {
            stolen.push(url);
        }
    }
    Ok(true)
}

/// One bot request; returns its answer as "status code".
async fn bot_request(conn: &mut Conn, s: &Shared, bot: Bot, n: u64) -> String {
    let base = format!("/v1/sales/{}/items/{}", s.sale, s.item);
    let own = &s.bot_tokens[2 + (n % (s.bot_tokens.len() as u64 - 2)) as usize];
    let body = Some(bytes::Bytes::from_static(br#"{"quantity":1}"#));
    let answer = match bot {
        Bot::SkipChallenge => {
            conn.send(
                hyper::Method::POST,
                &format!("{base}/orders"),
                body,
                Some(own),
            )
            .await
        }
        Bot::ForgeToken => {
            let fake = format!(
                "v1.{:016x}{:016x}.{:016x}",
                rand_u64(),
                rand_u64(),
                rand_u64()
            );
            conn.send(
                hyper::Method::POST,
                &format!("{base}/orders/{fake}"),
                body,
                Some(own),
            )
            .await
        }
        Bot::ReplayToken => {
            let stolen = s
                .stolen
                .lock()
                .ok()
                .and_then(|v| v.get(n as usize % v.len().max(1)).cloned());
            match stolen {
                Some(url) => conn.send(hyper::Method::POST, &url, body, Some(own)).await,
                None => return "no token to replay yet".into(),
            }
        }
        Bot::Flood => {
            conn.send(
                hyper::Method::GET,
                &format!("{base}/challenge"),
                None,
                Some(&s.bot_tokens[0]),
            )
            .await
        }
        Bot::Blocked => {
            conn.send(
                hyper::Method::POST,
                &format!("{base}/orders"),
                body,
                Some(&s.bot_tokens[1]),
            )
            .await
        }
    };
    match answer {
        Ok((status, body)) => {
            let code = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["code"].as_str().map(str::to_string))
                .unwrap_or_default();
            format!("{status} {code}").trim().to_string()
        }
        Err(e) => format!("error {e}"),
    }
}

/// Run `honest` and `bots` connections for `length`; returns the honest figures and the bots'
/// answers.
async fn phase(
    target: &Target,
    shared: &Arc<Shared>,
    honest: usize,
    bots: usize,
    length: Duration,
) -> Result<(HonestFigures, BTreeMap<String, u64>), String> {
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut honest_handles = Vec::new();
    for _ in 0..honest {
        let (s, stop, mut conn) = (shared.clone(), stop.clone(), Conn::new(target.clone()));
        honest_handles.push(tokio::spawn(async move {
            let mut seen = HonestSeen {
                orders: 0,
                failures: 0,
                buy: histogram()?,
                flow: histogram()?,
            };
            while !stop.load(Ordering::Relaxed) {
                let user = rand_u64() % (1 << 52) + 1;
                match honest_buy(&mut conn, &s, user, &mut seen).await {
                    Ok(true) => seen.orders += 1,
                    _ => seen.failures += 1,
                }
            }
            Ok::<_, String>(seen)
        }));
    }
    let mut bot_handles = Vec::new();
    for b in 0..bots {
        let (s, stop, mut conn) = (shared.clone(), stop.clone(), Conn::new(target.clone()));
        bot_handles.push(tokio::spawn(async move {
            let mut answers: BTreeMap<String, u64> = BTreeMap::new();
            let mut n = b as u64;
            while !stop.load(Ordering::Relaxed) {
                let bot = BOTS[(n % BOTS.len() as u64) as usize];
                *answers
                    .entry(bot_request(&mut conn, &s, bot, n).await)
                    .or_default() += 1;
                n += bots as u64;
            }
            answers
        }));
    }
    tokio::time::sleep(length).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    let (mut orders, mut failures) = (0, 0);
    let (mut buy, mut flow) = (histogram()?, histogram()?);
    for h in honest_handles {
        let seen = h.await.map_err(|e| e.to_string())??;
        orders += seen.orders;
        failures += seen.failures;
        buy.add(&seen.buy).map_err(|e| e.to_string())?;
        flow.add(&seen.flow).map_err(|e| e.to_string())?;
    }
    let mut answers = BTreeMap::new();
    for h in bot_handles {
        for (k, v) in h.await.map_err(|e| e.to_string())? {
            *answers.entry(k).or_default() += v;
        }
    }
    let ms = |h: &Histogram<u64>| h.value_at_quantile(0.99) as f64 / 1000.0;
    Ok((
        HonestFigures {
            orders,
            orders_per_s: orders as f64 / elapsed,
            buy_p99_ms: ms(&buy),
            flow_p99_ms: ms(&flow),
            failures,
        },
        answers,
    ))
}

/// The sum of `seckill_db_work_total` over every group and kind.
async fn db_work(http: &reqwest::Client, url: &str, admin: &str) -> Result<f64, String> {
    let text = http
        .get(format!("{url}/metrics"))
        .bearer_auth(admin)
        .send()
        .await
        .map_err(|e| e.to_string())?
        .text()
        .await
        .map_err(|e| e.to_string())?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("seckill_db_work_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum())
}

async fn admin_post(
    http: &reqwest::Client,
    url: &str,
    admin: &str,
    path: &str,
    body: serde_json::Value,
) -> Result<serde_json::Value, String> {
    let resp = http
        .post(format!("{url}{path}"))
        .bearer_auth(admin)
        .json(&body)
        .send()
        .await
        .map_err(|e| format!("cannot reach {url}: {e}"))?;
    let status = resp.status();
    let v: serde_json::Value = resp.json().await.map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("{path}: {status} {v}"));
    }
    Ok(v)
}

// Long on purpose: one run from setup to verdict, its steps in the order they happen.
pub async fn run(args: &Args, url: &str, keys: &crate::Keys) -> Result<BotsReport, String> {
    let http = crate::run::client(4)?;
    let item = rand_u64() % (1 << 50) + 1;
    let now = chrono::Utc::now();
    let sale = admin_post(&http, url, &keys.admin, "/v1/admin/sales", serde_json::json!({
        "name": "seckill-bench bots",
        "starts_at": (now - chrono::Duration::seconds(5)).to_rfc3339(),
        "ends_at": (now + chrono::Duration::hours(2)).to_rfc3339(),
        "items": [{"item_id": item, "stock": 1_000_000_000, "price_cents": 100, "per_user_limit": 1}],
        "protection": {"order_token": true, "challenge": "pow", "pow_difficulty": 1000},
    }))
    .await?["sale_id"]
        .as_u64()
        .ok_or("no sale_id")?;
    let flood_user = rand_u64() % (1 << 52) + 1;
    let blocked_user = flood_user + 5_000;
    let entry = admin_post(&http, url, &keys.admin, "/v1/admin/blocklist", serde_json::json!({
        "kind": "user", "value": blocked_user.to_string(), "reason": "seckill-bench bot", "ttl_secs": 3600,
    }))
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut bot_tokens: Vec<String> = [flood_user, blocked_user]
        .iter()
        .map(|u| keys.users.token(*u))
        .collect();
    bot_tokens.extend((1..=1000).map(|n| keys.users.token(flood_user + 10_000 + n)));
    let shared = Arc::new(Shared {
        sale,
        item,
        bot_tokens,
        minter: keys.users.clone(),
        stolen: Mutex::new(Vec::new()),
    });
    let target = Target::parse(url)?;
    let length = Duration::from_secs_f64(args.duration);
    let (honest, bots) = (args.concurrency, args.bots);
    if !args.quiet {
        println!("bots: honest users alone ...");
    }
    let (alone, _) = phase(&target, &shared, honest, 0, length).await?;
    if !args.quiet {
        println!("bots: honest users with bots ...");
    }
    let (with, mut answers) = phase(&target, &shared, honest, bots, length).await?;
    if !args.quiet {
        println!("bots: bots alone, then nobody (database work) ...");
    }
    let w0 = db_work(&http, url, &keys.admin).await?;
    let (_, alone_answers) = phase(&target, &shared, 0, bots, length).await?;
    let w1 = db_work(&http, url, &keys.admin).await?;
    tokio::time::sleep(length).await;
    let w2 = db_work(&http, url, &keys.admin).await?;
    for (k, v) in alone_answers {
        *answers.entry(k).or_default() += v;
    }
    if let Some(id) = entry["id"].as_u64() {
        let _ = http
            .delete(format!("{url}/v1/admin/blocklist/{id}"))
            .bearer_auth(&keys.admin)
            .send()
            .await;
    }
    let refused = |k: &str| {
        [
            "403 token_required",
            "403 invalid_token",
            "403 blocked",
            "429 rate_limited",
            "no token to replay yet",
        ]
        .contains(&k)
            // The flooding user's first requests, within its burst, are served challenges.
            || k == "200"
    };
    let through: u64 = answers
        .iter()
        .filter(|(k, _)| !refused(k))
        .map(|(_, v)| *v)
        .sum();
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::INFINITY };
    Ok(BotsReport {
        url: url.to_string(),
        honest_connections: honest,
        bot_connections: bots,
        phase_s: length.as_secs_f64(),
        orders_ratio: ratio(with.orders_per_s, alone.orders_per_s),
        p99_ratio: ratio(with.buy_p99_ms, alone.buy_p99_ms),
        honest_alone: alone,
        honest_with_bots: with,
        bot_requests: answers.values().sum(),
        bot_answers: answers,
        bot_requests_through: through,
        db_work_bots_alone: w1 - w0,
        db_work_idle: w2 - w1,
        ok: through == 0,
    })
}
