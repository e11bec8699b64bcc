//! Running one scenario against one engine and reporting it.

use crate::sale::{Acked, Setup};
use crate::{chaos, conn, verify, Args, Scenario};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Serialize, Default)]
pub struct Latency {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Self {
        let ms = |v: u64| v as f64 / 1000.0;
        Self {
            p50_ms: ms(h.value_at_quantile(0.5)),
            p90_ms: ms(h.value_at_quantile(0.9)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: Scenario,
    pub url: String,
    pub concurrency: usize,
    pub sale_id: u64,
    pub elapsed_s: f64,
    pub attempts: u64,
    pub attempts_per_s: f64,
    pub orders: u64,
    /// Orders per second over the selling window (start to the last acknowledged order).
    pub orders_per_s: f64,
    pub sell_window_s: f64,
    /// 409 sold_out answers, per second of the run (the storm phase for `soldout`).
    pub rejections_per_s: f64,
    pub by_status: BTreeMap<String, u64>,
    pub latency_all: Latency,
    pub latency_orders: Latency,
    pub outage: Option<chaos::Outage>,
    /// Where the CPU went during the measured phase, and what an order and an answer cost.
    pub cost: crate::cpu::Cost,
    pub verification: verify::Verification,
}

impl Report {
    pub fn print(&self) {
        println!(
            "\n== {:?} on {} ({} connections, sale {}) ==",
            self.scenario, self.url, self.concurrency, self.sale_id
        );
        println!("elapsed            {:.2} s", self.elapsed_s);
        println!(
            "attempts           {} ({:.0}/s)",
            self.attempts, self.attempts_per_s
        );
        println!(
            "successful orders  {} ({:.0}/s over a {:.2} s selling window)",
            self.orders, self.orders_per_s, self.sell_window_s
        );
        println!("sold_out answers   {:.0}/s", self.rejections_per_s);
        let l = &self.latency_all;
        println!(
            "latency, all       p50 {:.2} ms  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
            l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms
        );
        let l = &self.latency_orders;
        println!(
            "latency, accepted  p50 {:.2} ms  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
            l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms
        );
        println!("by status/code:");
        for (k, v) in &self.by_status {
            println!("  {k:<32} {v}");
        }
        self.cost.print();
        if let Some(o) = &self.outage {
            println!(
                "{} of {} at {:.2} s: write outage {:.2} s; {} failed attempts after it{}",
                o.fault,
                o.member,
                o.killed_at_s,
                o.outage_s,
                o.failures_after_kill,
                o.write_pause_ms
                    .map(|p| format!("; write pause (engine) {p} ms"))
                    .unwrap_or_default()
            );
        }
        self.verification.print();
    }
}

fn rand_u64() -> u64 {
    uuid::Uuid::new_v4().as_u64_pair().0
}

pub fn client(concurrency: usize) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| e.to_string())
}

async fn create_sale(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    items: &[(u64, i64)],
    limit: i64,
) -> Result<u64, String> {
    let now = chrono::Utc::now();
    let body = serde_json::json!({
        "name": "seckill-bench",
        "starts_at": (now - chrono::Duration::seconds(5)).to_rfc3339(),
        "ends_at": (now + chrono::Duration::hours(2)).to_rfc3339(),
        "items": items.iter().map(|(id, stock)| serde_json::json!({
            "item_id": id, "stock": stock, "price_cents": 100, "per_user_limit": limit
        })).collect::<Vec<_>>(),
    });
    let resp = http
        .post(format!("{url}/v1/admin/sales"))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .map_err(|e| format!("cannot reach {url}: {e}"))?;
    let status = resp.status();
    let v: serde_json::Value = resp.json().await.map_err(|e| e.to_string())?;
    if status != reqwest::StatusCode::CREATED {
        return Err(format!("creating the sale failed: {status} {v}"));
    }
    v["sale_id"]
        .as_u64()
        .ok_or_else(|| "no sale_id in answer".to_string())
}

/// Counters of a run shared by all virtual users (progress, stopping at the sell-out).
struct Tally {
    attempts: AtomicU64,
    orders: AtomicU64,
    sold_out: AtomicU64,
    stop: AtomicBool,
}

/// What one virtual user saw, merged after the run (no locks on the request path).
struct Seen {
    by_status: HashMap<(u16, String), u64>,
    all: Histogram<u64>,
    accepted: Histogram<u64>,
    acked: Vec<Acked>,
    failures: Vec<f64>,
}

impl Seen {
    fn new() -> Result<Self, String> {
        let h = || Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| e.to_string());
        Ok(Self {
            by_status: HashMap::new(),
            all: h()?,
            accepted: h()?,
            acked: Vec::new(),
            failures: Vec::new(),
        })
    }

    fn merge(&mut self, other: Seen) -> Result<(), String> {
        for (k, v) in other.by_status {
            *self.by_status.entry(k).or_default() += v;
        }
        self.all.add(&other.all).map_err(|e| e.to_string())?;
        self.accepted
            .add(&other.accepted)
            .map_err(|e| e.to_string())?;
        self.acked.extend(other.acked);
        self.failures.extend(other.failures);
        Ok(())
    }
}

/// The fields of an answer the bench looks at.
#[derive(serde::Deserialize, Default)]
struct Answer<'a> {
    #[serde(borrow, default)]
    code: Option<&'a str>,
    #[serde(borrow, default)]
    order_id: Option<&'a str>,
    #[serde(default)]
    quantity: Option<i64>,
}

/// What one virtual user does next.
enum Step {
    Buy { item: u64, user: u64 },
    ReadSale,
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*: plenty for picking users and items.
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn next_step(scenario: Scenario, setup: &Setup, demand: u64, rng: &mut Rng) -> Step {
    let buyers = demand.max(1);
    let user = setup.user_base + rng.next() % buyers;
    match scenario {
        Scenario::Hot
        | Scenario::Soldout
        | Scenario::Bots
        | Scenario::Fair
        | Scenario::PageFlood => Step::Buy {
            item: setup.items[0].0,
            user,
        },
        Scenario::Spread => Step::Buy {
            item: setup.items[(rng.next() % setup.items.len() as u64) as usize].0,
            user,
        },
        Scenario::Mixed => match rng.next() % 10 {
            0..=3 => Step::Buy {
                item: setup.items[0].0,
                user,
            },
            4..=7 => Step::Buy {
                item: setup.items[1 + (rng.next() % (setup.items.len() as u64 - 1)) as usize].0,
                user,
            },
            _ => Step::ReadSale,
        },
    }
}

/// One phase of a run.
struct Phase {
    duration: Duration,
    /// End at the first sold_out answer.
    until_sold_out: bool,
    /// Count this phase in the report (the sell-out before a storm is not counted).
    record: bool,
    chaos_at: Option<(f64, chaos::Target)>,
}

/// Drive `concurrency` virtual users through one phase.
// Long on purpose: the load loop, its clients and its clock in one place, so what is timed is
// in sight of what is counted.
async fn drive(
    args: &Args,
    url: &str,
    http: &reqwest::Client,
    setup: &Arc<Setup>,
    minter: &crate::Minter,
    phase: Phase,
) -> Result<(Arc<Tally>, Seen, f64, Option<chaos::Kill>), String> {
    let Phase {
        duration,
        until_sold_out,
        record,
        chaos_at,
    } = phase;
    let target = conn::Target::parse(url)?;
    let tally = Arc::new(Tally {
        attempts: AtomicU64::new(0),
        orders: AtomicU64::new(0),
        sold_out: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    // Every virtual user connects first; the clock starts when all are connected, so the figures
    // measure the engine, not a burst of simultaneous TCP handshakes (which on one host can hit the
    // listen backlog and cost a one-second SYN retransmission).
    let ready = Arc::new(tokio::sync::Barrier::new(args.concurrency + 1));
    let started = Arc::new(std::sync::OnceLock::<Instant>::new());
    let demand = args.demand
        * setup
            .items
            .iter()
            .map(|(_, s)| *s as u64)
            .sum::<u64>()
            .max(1);
    let bar = if args.quiet || !record {
        indicatif::ProgressBar::hidden()
    } else {
        let bar = indicatif::ProgressBar::new((duration.as_secs_f64() * 10.0) as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    };
    let sale_path = format!("/v1/sales/{}", setup.sale_id);
    let mut handles = Vec::new();
    let request_ids = args.request_ids;
    let run_tag = rand_u64() % 1_000_000;
    for vu in 0..args.concurrency {
        let vu = format!("{run_tag}-{vu}");
        let mut attempt = 0u64;
        let (setup, tally, sale_path) = (setup.clone(), tally.clone(), sale_path.clone());
        let minter = minter.clone();
        let mut conn = conn::Conn::new(target.clone());
        let mut seen = Seen::new()?;
        let scenario = args.scenario;
        let mut rng = Rng(rand_u64() | 1);
        let (ready, started) = (ready.clone(), started.clone());
        handles.push(tokio::spawn(async move {
            // A failure here shows up as failed attempts: each request connects again.
            let _ = conn.connect_now().await;
            ready.wait().await;
            let start = *started.get_or_init(Instant::now);
            while !tally.stop.load(Ordering::Relaxed) && start.elapsed() < duration {
                let step = next_step(scenario, &setup, demand, &mut rng);
                let t0 = Instant::now();
                let resp = match &step {
                    Step::Buy { item, user } => {
                        let body = if request_ids {
                            attempt += 1;
                            format!(r#"{{"user_id":{user},"quantity":1,"request_id":"b{vu}-{attempt}"}}"#)
                        } else {
                            format!(r#"{{"user_id":{user},"quantity":1}}"#)
                        };
                        let token = minter.token(*user);
                        conn.send(
                            hyper::Method::POST,
                            &format!("{sale_path}/items/{item}/orders"),
                            Some(body.into()),
                            Some(&token),
                        )
                        .await
                    }
                    Step::ReadSale => conn.send(hyper::Method::GET, &sale_path, None, None).await,
                };
                let (status, body) = resp.unwrap_or_default();
                let micros = t0.elapsed().as_micros().max(1) as u64;
                let answer: Answer = if status >= 300 || matches!(step, Step::Buy { .. }) {
                    serde_json::from_slice(&body).unwrap_or_default()
                } else {
                    Answer::default()
                };
                let code = answer.code.unwrap_or("");
                if !record {
                    if status == 409 && code == "sold_out" && until_sold_out {
                        tally.stop.store(true, Ordering::Relaxed);
                    }
                    continue;
                }
                tally.attempts.fetch_add(1, Ordering::Relaxed);
                let _ = seen.all.record(micros);
                *seen
                    .by_status
                    .entry((status, code.to_string()))
                    .or_default() += 1;
                match (&step, status) {
                    (Step::Buy { item, user }, 201) => {
                        tally.orders.fetch_add(1, Ordering::Relaxed);
                        let _ = seen.accepted.record(micros);
                        seen.acked.push(Acked {
                            item: *item,
                            user: *user,
                            quantity: answer.quantity.unwrap_or(1),
                            order_id: answer.order_id.unwrap_or("").to_string(),
                            at_s: start.elapsed().as_secs_f64(),
                        });
                    }
                    (Step::Buy { .. }, 409) if code == "sold_out" => {
                        tally.sold_out.fetch_add(1, Ordering::Relaxed);
                        if until_sold_out {
                            tally.stop.store(true, Ordering::Relaxed);
                        }
                    }
                    (Step::Buy { .. }, 409) => {}
                    (Step::ReadSale, 200) => {}
                    _ => {
                        seen.failures.push(start.elapsed().as_secs_f64());
                        if status == 503 {
                            // Back off as a client honouring Retry-After would, but briefly,
                            // so the outage is still measured to ~50 ms.
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }
            seen
        }));
    }
    ready.wait().await;
    let start = *started.get_or_init(Instant::now);
    // The ticker: progress, and the kill when one is scheduled.
    let mut kill = None;
    let mut pending_chaos = chaos_at;
    while handles.iter().any(|h| !h.is_finished()) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t = start.elapsed().as_secs_f64();
        bar.set_position((t * 10.0) as u64);
        bar.set_message(format!(
            "{} attempts, {} orders",
            tally.attempts.load(Ordering::Relaxed),
            tally.orders.load(Ordering::Relaxed)
        ));
        if let Some((at, target)) = &pending_chaos {
            if t >= *at {
                kill = Some(chaos::kill_master(url, target, http, t).await?);
                pending_chaos = None;
            }
        }
    }
    let mut seen = Seen::new()?;
    for h in handles {
        seen.merge(h.await.map_err(|e| e.to_string())?)?;
    }
    bar.finish_and_clear();
    Ok((tally, seen, start.elapsed().as_secs_f64(), kill))
}

// Long on purpose: one bench scenario from setup to summary, in the order a reader follows it.
pub async fn run_scenario(args: &Args, url: &str, keys: &crate::Keys) -> Result<Report, String> {
    let (token, minter) = (keys.admin.as_str(), &keys.users);
    let http = client(args.concurrency)?;
    let base = rand_u64() % (1 << 50) + 1;
    let items: Vec<(u64, i64)> = match args.scenario {
        Scenario::Hot | Scenario::Bots | Scenario::Fair | Scenario::PageFlood => {
            vec![(base, args.stock)]
        }
        Scenario::Soldout => vec![(base, args.stock.min(1_000))],
        Scenario::Spread => (0..args.items as u64)
            .map(|i| (base + i, args.stock))
            .collect(),
        Scenario::Mixed => (0..args.items.max(2) as u64)
            .map(|i| (base + i, args.stock))
            .collect(),
    };
    let sale_id = create_sale(&http, url, token, &items, args.limit).await?;
    let setup = Arc::new(Setup {
        sale_id,
        items,
        user_base: rand_u64() % (1 << 52) + 1,
    });
    let duration = Duration::from_secs_f64(args.duration);
    if args.scenario == Scenario::Soldout {
        // Sell the item out first, unrecorded.
        let sell_out = Phase {
            duration: Duration::from_secs(300),
            until_sold_out: true,
            record: false,
            chaos_at: None,
        };
        drive(args, url, &http, &setup, minter, sell_out).await?;
    }
    let fault = [
        (&args.kill_master, chaos::Fault::Kill),
        (&args.freeze_master, chaos::Fault::Freeze),
        (&args.kill_shadow, chaos::Fault::KillShadow),
        (&args.move_to, chaos::Fault::Move(setup.items[0].0)),
    ]
    .into_iter()
    .find_map(|(spec, fault)| spec.as_ref().map(|s| (fault, s)));
    let chaos_at = match fault {
        Some((fault, spec)) => Some(chaos::parse(fault, spec, &args.cluster_dir, token)?),
        None => None,
    };
    let until_sold_out = args.scenario == Scenario::Hot && chaos_at.is_none();
    let phase = Phase {
        duration,
        until_sold_out,
        record: true,
        chaos_at,
    };
    let before = crate::cpu::snapshot();
    let (tally, seen, elapsed, kill) = drive(args, url, &http, &setup, minter, phase).await?;
    let after = crate::cpu::snapshot();
    let roles = crate::cpu::roles(&http, url, token).await;

    let acked = seen.acked;
    let orders = acked.len() as u64;
    let window = acked.iter().map(|a| a.at_s).fold(0.0, f64::max);
    let attempts = tally.attempts.load(Ordering::Relaxed);
    let mut kill = kill;
    if let Some(k) = kill.as_mut() {
        chaos::thaw(k);
    }
    let mut outage = kill
        .as_ref()
        .map(|k| chaos::outage(k, &acked, &seen.failures));
    if let (Some(o), Some(id)) = (outage.as_mut(), kill.as_ref().and_then(|k| k.move_id)) {
        o.write_pause_ms = chaos::write_pause(url, token, &http, id).await;
    }
    let reached_sellout =
        tally.sold_out.load(Ordering::Relaxed) > 0 || args.scenario == Scenario::Soldout;
    let verification =
        verify::verify(args, url, keys, &http, &setup, &acked, reached_sellout).await;
    let by_status: BTreeMap<String, u64> = seen
        .by_status
        .iter()
        .map(|((status, code), n)| (format!("{status} {code}").trim().to_string(), *n))
        .collect();
    let latency_all = Latency::of(&seen.all);
    let latency_orders = Latency::of(&seen.accepted);
    let cost = crate::cpu::cost(&before, &after, &roles, orders, attempts);
    Ok(Report {
        cost,
        scenario: args.scenario,
        url: url.to_string(),
        concurrency: args.concurrency,
        sale_id,
        elapsed_s: elapsed,
        attempts,
        attempts_per_s: attempts as f64 / elapsed,
        orders,
        orders_per_s: if window > 0.0 {
            orders as f64 / window
        } else {
            0.0
        },
        sell_window_s: window,
        rejections_per_s: tally.sold_out.load(Ordering::Relaxed) as f64 / elapsed,
        by_status,
        latency_all,
        latency_orders,
        outage,
        verification,
    })
}

/// Requests answered with `expect` at `url + path` by `concurrency` keep-alive connections
/// sending for `duration`, and the seconds it took.
pub async fn drive_fixed(
    url: &str,
    concurrency: usize,
    duration: Duration,
    method: hyper::Method,
    path: &str,
    body: Option<&str>,
    expect: u16,
) -> Result<(u64, f64), String> {
    let target = conn::Target::parse(url)?;
    let count = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let handles: Vec<_> = (0..concurrency)
        .map(|_| {
            let (mut conn, count) = (conn::Conn::new(target.clone()), count.clone());
            let (method, path) = (method.clone(), path.to_string());
            let body = body.map(|b| bytes::Bytes::copy_from_slice(b.as_bytes()));
            tokio::spawn(async move {
                while start.elapsed() < duration {
                    if let Ok((status, _)) =
                        conn.send(method.clone(), &path, body.clone(), None).await
                    {
                        if status == expect {
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.await.map_err(|e| e.to_string())?;
    }
    Ok((count.load(Ordering::Relaxed), start.elapsed().as_secs_f64()))
}

/// One endpoint's floor: answers per second, and CPU µs of the serving process per answer.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Floor {
    pub per_s: f64,
    pub us_each: f64,
}

impl Floor {
    fn of(answers: u64, secs: f64, cpu_s: f64) -> Self {
        let n = answers.max(1) as f64;
        Self {
            per_s: answers as f64 / secs.max(1e-9),
            us_each: cpu_s * 1e6 / n,
        }
    }
}

/// `--baseline`: the engine's `GET /v1/time`, then a bare axum server's (bench/bare.rs) `GET`
/// and JSON `POST` answered 409, each at the run's concurrency for its duration (at most 10 s),
/// with the CPU of the serving process from /proc.
#[derive(Debug, Clone, Serialize)]
pub struct Baseline {
    pub engine_time: Floor,
    pub bare_time: Floor,
    pub bare_post_409: Floor,
}

pub async fn baseline(args: &Args, url: &str) -> Result<Baseline, String> {
    let duration = Duration::from_secs_f64(args.duration.min(10.0));
    let c = args.concurrency;
    let before = crate::cpu::engine_cpu_s();
    let (n, secs) =
        drive_fixed(url, c, duration, hyper::Method::GET, "/v1/time", None, 200).await?;
    let engine_time = Floor::of(n, secs, crate::cpu::engine_cpu_s() - before);

    let bare = crate::bare::BareServer::start().await?;
    let cpu = |pid| crate::cpu::process_cpu_s(pid).ok_or("the bare server is gone");
    let before = cpu(bare.pid())?;
    let (n, secs) = drive_fixed(
        &bare.url,
        c,
        duration,
        hyper::Method::GET,
        "/v1/time",
        None,
        200,
    )
    .await?;
    let mid = cpu(bare.pid())?;
    let bare_time = Floor::of(n, secs, mid - before);
    let body = r#"{"user_id":4242,"quantity":1}"#;
    let (n, secs) = drive_fixed(
        &bare.url,
        c,
        duration,
        hyper::Method::POST,
        "/v1/sales/1/items/1/orders",
        Some(body),
        409,
    )
    .await?;
    let bare_post_409 = Floor::of(n, secs, cpu(bare.pid())? - mid);
    Ok(Baseline {
        engine_time,
        bare_time,
        bare_post_409,
    })
}
