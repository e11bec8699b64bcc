//! `--scenario fair`: a sale with a fair start, met by a crowd in waves across its window and a
//! group of bots at its first millisecond. Every buyer asks once (with a request id) and waits for
//! its answer, which comes after the draw. The report: how the winners spread over the arrival
//! waves (a chi-square test of independence), how the bots did against their share (the
//! hypergeometric tail), the engine's memory while it held the waiting requests, and the draw
//! checked from the revealed seed (commitment, every rank, every outcome).

use serde::Serialize;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

/// What the fair scenario needs beyond the common options.
pub struct Plan {
    pub honest: usize,
    pub bots: usize,
    pub waves: usize,
    pub window_ms: u64,
    pub stock: i64,
    /// The sale starts this long after it is created.
    pub lead: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct Wave {
    pub wave: usize,
    pub entrants: usize,
    pub winners: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub sale_id: u64,
    pub item_id: u64,
    pub stock: i64,
    pub window_ms: u64,
    pub waves: Vec<Wave>,
    pub bots: usize,
    pub bot_winners: usize,
    pub winners: usize,
    /// Answers other than 201 / 409 (should be none).
    pub other_answers: usize,
    /// Chi-square test that winning is independent of the arrival wave (honest buyers).
    pub chi_square: f64,
    pub chi_square_p: f64,
    /// P(bots win at least as many as they did) if the draw ignores arrival.
    pub bots_tail_p: f64,
    /// The engine's resident memory before the window, at its most while it held the waiting
    /// requests (up to the window's close), and at its most overall (the answers included).
    pub engine_rss_before_mb: f64,
    pub engine_rss_holding_mb: f64,
    pub engine_rss_peak_mb: f64,
    /// The seed revealed, its commitment, every rank and outcome recomputed: all agree.
    pub draw_verified: bool,
    pub verification: Vec<String>,
    pub ok: bool,
}

/// The engine's resident memory (kB), summed over `seckill` processes.
fn engine_rss_kb() -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(comm) = std::fs::read_to_string(entry.path().join("comm")) else {
            continue;
        };
        if comm.trim() != "seckill" {
            continue;
        }
        let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
        total += status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0);
    }
    total
}

async fn server_offset_ms(http: &reqwest::Client, url: &str) -> Result<i64, String> {
    let mut best = (i64::MAX, 0);
    for _ in 0..5 {
        let sent = chrono::Utc::now().timestamp_millis();
        let v: Value = http
            .get(format!("{url}/v1/time"))
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        let back = chrono::Utc::now().timestamp_millis();
        let server = v["now_ms"].as_i64().ok_or("no now_ms")?;
        if back - sent < best.0 {
            best = (back - sent, server - (sent + back) / 2);
        }
    }
    Ok(best.1)
}

// Long on purpose: one run from setup to verdict, its steps in the order they happen.
pub async fn run(
    url: &str,
    admin: &str,
    minter: &crate::Minter,
    plan: &Plan,
) -> Result<Report, String> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(plan.honest + plan.bots)
        .build()
        .map_err(|e| e.to_string())?;
    let item = uuid::Uuid::new_v4().as_u64_pair().0 % (1 << 40) + 1;
    let offset = server_offset_ms(&http, url).await?;
    let starts =
        chrono::Utc::now() + chrono::Duration::from_std(plan.lead).map_err(|e| e.to_string())?;
    let body = json!({
        "name": "seckill-bench fair start",
        "starts_at": starts.to_rfc3339(),
        "ends_at": (starts + chrono::Duration::hours(1)).to_rfc3339(),
        "fair_window_ms": plan.window_ms,
        "items": [{"item_id": item, "stock": plan.stock, "price_cents": 100, "per_user_limit": 1}],
    });
    let created: Value = http
        .post(format!("{url}/v1/admin/sales"))
        .bearer_auth(admin)
        .json(&body)
        .send()
        .await
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())?;
    let sale = created["sale_id"]
        .as_u64()
        .ok_or_else(|| format!("the sale was refused: {created}"))?;
    // Server time -> this machine's clock.
    let start_local = starts.timestamp_millis() - offset;
    let base_user = uuid::Uuid::new_v4().as_u64_pair().1 % (1 << 40) + 1;
    let rss_before = engine_rss_kb();
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(rss_before));
    let holding = Arc::new(std::sync::atomic::AtomicU64::new(rss_before));
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let window_end_local = start_local + plan.window_ms as i64;
    let sampler = {
        let (peak, holding, sampling) = (peak.clone(), holding.clone(), sampling.clone());
        tokio::spawn(async move {
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                let rss = engine_rss_kb();
                peak.fetch_max(rss, std::sync::atomic::Ordering::Relaxed);
                if chrono::Utc::now().timestamp_millis() < window_end_local - 50 {
                    holding.fetch_max(rss, std::sync::atomic::Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    // (wave or None for a bot, user, send time in local ms)
    let slot = plan.window_ms as i64 / plan.waves as i64;
    let mut buyers: Vec<(Option<usize>, u64, i64)> = (0..plan.bots)
        .map(|b| (None, base_user + b as u64, start_local))
        .collect();
    for h in 0..plan.honest {
        let wave = h % plan.waves;
        let jitter = (h / plan.waves) as i64 * slot / (plan.honest / plan.waves).max(1) as i64;
        buyers.push((
            Some(wave),
            base_user + (plan.bots + h) as u64,
            start_local + wave as i64 * slot + jitter,
        ));
    }
    let tasks: Vec<_> = buyers
        .into_iter()
        .map(|(wave, user, at)| {
            let (http, token) = (http.clone(), minter.token(user));
            let path = format!("{url}/v1/sales/{sale}/items/{item}/orders");
            tokio::spawn(async move {
                let wait = at - chrono::Utc::now().timestamp_millis();
                if wait > 0 {
                    tokio::time::sleep(Duration::from_millis(wait as u64)).await;
                }
                let r = http
                    .post(&path)
                    .bearer_auth(token)
                    .json(&json!({"quantity": 1, "request_id": format!("fair-{user}")}))
                    .send()
                    .await;
                let status = r.map(|r| r.status().as_u16()).unwrap_or(0);
                (wave, user, status)
            })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.map_err(|e| e.to_string())?);
    }
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let _ = sampler.await;
    let mut waves: Vec<Wave> = (0..plan.waves)
        .map(|w| Wave {
            wave: w,
            entrants: 0,
            winners: 0,
        })
        .collect();
    let (mut bot_winners, mut other) = (0, 0);
    for (wave, _, status) in &answers {
        let won = *status == 201;
        if !won && *status != 409 {
            other += 1;
        }
        match wave {
            Some(w) => {
                waves[*w].entrants += 1;
                waves[*w].winners += usize::from(won);
            }
            None => bot_winners += usize::from(won),
        }
    }
    let winners = waves.iter().map(|w| w.winners).sum::<usize>() + bot_winners;
    let groups: Vec<(u64, u64)> = waves
        .iter()
        .map(|w| (w.entrants as u64, w.winners as u64))
        .collect();
    let (chi_square, chi_square_p) = seckill::fair::stats::independence(&groups);
    let total = plan.honest + plan.bots;
    let bots_tail_p = seckill::fair::stats::hypergeometric_tail(
        total as u64,
        winners as u64,
        plan.bots as u64,
        bot_winners as u64,
    );
    let verification = verify_draw(&http, url, admin, sale, item).await;
    let draw_verified = verification.iter().all(|l| l.starts_with("ok"));
    let ok = draw_verified
        && other == 0
        && winners as i64 == plan.stock.min(total as i64)
        && chi_square_p > 0.001
        && bots_tail_p > 0.001;
    Ok(Report {
        sale_id: sale,
        item_id: item,
        stock: plan.stock,
        window_ms: plan.window_ms,
        waves,
        bots: plan.bots,
        bot_winners,
        winners,
        other_answers: other,
        chi_square,
        chi_square_p,
        bots_tail_p,
        engine_rss_before_mb: rss_before as f64 / 1024.0,
        engine_rss_holding_mb: holding.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1024.0,
        engine_rss_peak_mb: peak.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1024.0,
        draw_verified,
        verification,
        ok,
    })
}

/// Recompute the draw from what the engine published: the seed (revealed on the sale) against its
/// commitment, every entry's rank key and place, every outcome served from the stock.
async fn verify_draw(
    http: &reqwest::Client,
    url: &str,
    admin: &str,
    sale: u64,
    item: u64,
) -> Vec<String> {
    let get = |path: String, auth: bool| {
        let mut r = http.get(format!("{url}{path}"));
        if auth {
            r = r.bearer_auth(admin);
        }
        async move {
            r.send()
                .await
                .map_err(|e| e.to_string())?
                .json::<Value>()
                .await
                .map_err(|e| e.to_string())
        }
    };
    let mut out = Vec::new();
    // The seed is revealed once the draw is done, which follows the answers closely.
    let mut sale_view = Value::Null;
    for _ in 0..100 {
        match get(format!("/v1/sales/{sale}"), false).await {
            Ok(v) if v["fair_draw"]["seed"].is_string() => {
                sale_view = v;
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let draw = get(format!("/v1/admin/sales/{sale}/items/{item}/draw"), true)
        .await
        .unwrap_or(Value::Null);
    match seckill::fair::verify::check(&sale_view, &draw) {
        Ok(lines) => out.extend(lines.into_iter().map(|l| format!("ok   {l}"))),
        Err(e) => out.push(format!("FAIL {e}")),
    }
    out
}

impl Report {
    pub fn print(&self) {
        println!(
            "\n== fair start: sale {}, item {}, stock {}, window {} ms ==",
            self.sale_id, self.item_id, self.stock, self.window_ms
        );
        println!("wave  entrants  winners  share");
        for w in &self.waves {
            println!(
                "{:>4}  {:>8}  {:>7}  {:>5.1}%",
                w.wave,
                w.entrants,
                w.winners,
                100.0 * w.winners as f64 / w.entrants.max(1) as f64
            );
        }
        let total: usize = self.waves.iter().map(|w| w.entrants).sum::<usize>() + self.bots;
        println!(
            "bots  {:>8}  {:>7}  {:>5.1}% (their share of the stock: {:.1} expected)",
            self.bots,
            self.bot_winners,
            100.0 * self.bot_winners as f64 / self.bots.max(1) as f64,
            self.bots as f64 * self.winners as f64 / total.max(1) as f64
        );
        println!(
            "winners {} of {} entrants; answers other than 201/409: {}",
            self.winners, total, self.other_answers
        );
        println!(
            "winning vs arrival wave: chi-square {:.2}, p = {:.3}; bots winning this many or more by chance: p = {:.3}",
            self.chi_square, self.chi_square_p, self.bots_tail_p
        );
        println!(
            "engine memory: {:.1} MB before the window, {:.1} MB at most while holding the entries \
             (+{:.1} MB), {:.1} MB at most while answering them",
            self.engine_rss_before_mb,
            self.engine_rss_holding_mb,
            self.engine_rss_holding_mb - self.engine_rss_before_mb,
            self.engine_rss_peak_mb
        );
        for l in &self.verification {
            println!("  {l}");
        }
        println!("fair start: {}", if self.ok { "OK" } else { "FAILED" });
    }
}
