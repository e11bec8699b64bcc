//! `seckill-bench nemesis`: a steady workload against a `seckill dev` of its own while a seeded
//! random schedule deals faults (servers killed or frozen, the engine crashed and restarted, the
//! whole cluster restarted, items and hash slots moved live, two faults close together); then a
//! checker reads the whole history back ([`check`]) and exits non-zero on any violation, naming
//! the requests. The same seed gives the same schedule of faults and the same requests (their
//! timing, and so the answers, depend on the machine).
//!
//! The run: start `seckill dev` in `--dir` (a fresh folder each run) and, with `--engines 2`, a
//! second engine node beside it (`seckill serve`), create a sale, start the
//! clients ([`workload`]), deal faults every few seconds ([`cluster`]) for `--seconds`, stop
//! dealing, wait until every group is whole again, let the clients settle what they started, read
//! the end state back (every user's orders, the audit, the payments in the shards) and check.

mod check;
mod cluster;
mod history;
mod workload;

use history::{FaultEvent, Final, FinalOrder, History, ItemAudit, PaymentRow};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, clap::Args)]
pub struct NemesisArgs {
    /// How long faults are dealt, in seconds.
    #[arg(long, default_value_t = 600)]
    pub seconds: u64,
    /// Seed of the fault schedule and of the clients' choices.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// The dev cluster's folder: made fresh for each run (an earlier one is removed, only if it
    /// is a seckill cluster folder). The history and the report are written beside it.
    #[arg(long, default_value = ".seckill-nemesis")]
    pub dir: PathBuf,
    /// First PostgreSQL port of the dev cluster (four ports).
    #[arg(long, default_value_t = 27432)]
    pub base_port: u16,
    /// Where the engine listens.
    #[arg(long, default_value = "127.0.0.1:18090")]
    pub listen: String,
    /// Engine nodes: 1 (the engine of `seckill dev`), or 2 (and `seckill serve` beside it, the
    /// clients' requests alternating between the two, a retry often reaching the other node; one
    /// fault in four then freezes an engine or crashes the second one).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=2))]
    pub engines: u32,
    /// Where the second engine node listens.
    #[arg(long, default_value = "127.0.0.1:18091")]
    pub second_listen: String,
    /// Concurrent clients.
    #[arg(long, default_value_t = 24)]
    pub clients: u32,
    /// Items of the sale.
    #[arg(long, default_value_t = 4)]
    pub items: usize,
    /// Stock of each item (large enough not to sell out in a long run, so that acknowledgements
    /// keep coming; cancels and expiries return stock anyway).
    #[arg(long, default_value_t = 5000)]
    pub stock: i64,
    /// Per-user limit of each item.
    #[arg(long, default_value_t = 2)]
    pub limit: i64,
    /// Users buying.
    #[arg(long, default_value_t = 300)]
    pub users: u64,
    /// Seconds between two faults: at least, at most.
    #[arg(long, default_value = "4-12")]
    pub fault_every: String,
    /// The seckill binary (default: the one beside this bench).
    #[arg(long)]
    pub seckill: Option<PathBuf>,
}

/// Run the nemesis; Ok(true) when the checker found nothing.
// Long on purpose: one run from setup to verdict, its steps in the order they happen.
pub async fn run(args: NemesisArgs) -> Result<bool, String> {
    let (min_gap, max_gap) = gaps(&args.fault_every)?;
    let exe = match &args.seckill {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .map_err(|e| e.to_string())?
            .with_file_name("seckill"),
    };
    let dir = std::env::current_dir()
        .map_err(|e| e.to_string())?
        .join(&args.dir);
    fresh_folder(&dir)?;
    let mut dev = cluster::Dev::new(exe, dir.clone(), args.base_port, args.listen.clone());
    println!(
        "nemesis: seed {}, {} s of faults every {min_gap}-{max_gap} s, {} clients; seckill dev in {}",
        args.seed,
        args.seconds,
        args.clients,
        dir.display()
    );
    dev.start()?;
    let admin = cluster::Admin {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| e.to_string())?,
        url: dev.url(),
        token: cluster::secret(&dir, "admin-token")?,
    };
    admin.until_whole(Duration::from_secs(60)).await?;
    let mut second = match args.engines {
        2 => {
            let mut s =
                cluster::Serve::new(dev.exe.clone(), dir.clone(), args.second_listen.clone());
            s.start(&admin.http).await?;
            println!("second engine node: seckill serve on {}", s.url());
            Some(s)
        }
        _ => None,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let sale = create_sale(&admin, &args, &mut rng).await?;
    let items = sale.items.clone();
    let sale_id = sale.sale;
    let history = Arc::new(History::new(&dir.with_extension("history.jsonl"))?);
    let start = Instant::now();
    let urls = std::iter::once(dev.url())
        .chain(second.as_ref().map(cluster::Serve::url))
        .collect();
    let shared = Arc::new(workload::Shared::new(
        urls,
        seckill::config::Secret::new(cluster::secret(&dir, "user-token-secret")?),
        seckill::config::Secret::new(cluster::secret(&dir, "payment-secret")?),
        sale,
        history.clone(),
        start,
    )?);
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..args.clients)
        .map(|id| {
            tokio::spawn(workload::client(
                shared.clone(),
                id,
                args.seed,
                stop.clone(),
            ))
        })
        .collect();

    let mut faults: Vec<FaultEvent> = Vec::new();
    let deadline = Duration::from_secs(args.seconds);
    loop {
        let pause = Duration::from_millis(rng.random_range(min_gap * 1000..=max_gap * 1000));
        if start.elapsed() + pause >= deadline {
            break;
        }
        tokio::time::sleep(pause).await;
        let fault = cluster::Fault::draw(&mut rng, &items, true, args.engines);
        let at_ms = start.elapsed().as_millis() as u64;
        let dealt = cluster::deal(&fault, &mut dev, &mut second, &admin).await;
        let event = FaultEvent {
            kind: fault.kind(),
            target: dealt.clone().unwrap_or_default(),
            at_ms,
            done_ms: start.elapsed().as_millis() as u64,
            refused: dealt.err(),
        };
        println!(
            "{:>7.1} s  {}: {}",
            at_ms as f64 / 1000.0,
            event.kind,
            event.refused.as_deref().unwrap_or(&event.target)
        );
        faults.push(event);
        if !dev.running() {
            // A restart that failed: the system must come back for the run to be judged.
            dev.start()?;
        }
        if let Some(status) = second.as_mut().and_then(cluster::Serve::exited) {
            return Err(format!(
                "the second engine exited by itself ({status}); see {}",
                dir.with_extension("serve.log").display()
            ));
        }
    }

    // Faults stop; everything heals; the clients settle what they started.
    tokio::time::sleep(deadline.saturating_sub(start.elapsed())).await;
    if let Ok(servers) = dev.servers() {
        for g in &servers.groups {
            let _ = g.master.thaw();
            let _ = g.shadow.thaw();
        }
    }
    // Frozen engines are continued (their own timers would do it; this is sooner).
    for pid in dev
        .pid()
        .into_iter()
        .chain(second.as_ref().and_then(cluster::Serve::pid))
    {
        // SAFETY: plain kill(2) of our own child.
        unsafe { libc::kill(pid, libc::SIGCONT) };
    }
    let healed = admin.until_whole(Duration::from_secs(120)).await?;
    println!(
        "faults stopped; every group whole again after {:.1} s",
        healed.as_secs_f64()
    );
    if let Some(s) = &second {
        // The second node must have followed every failover and move on its own.
        let other = cluster::Admin {
            http: admin.http.clone(),
            url: s.url(),
            token: admin.token.clone(),
        };
        let healed = other.until_whole(Duration::from_secs(60)).await?;
        println!(
            "the second engine sees every group whole after {:.1} s more",
            healed.as_secs_f64()
        );
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for c in clients {
        c.await.map_err(|e| e.to_string())?;
    }
    let end_ms = start.elapsed().as_millis() as u64;
    history.flush();
    let (fin, reads) =
        settled(async || read_back(&admin, &dir, &shared, sale_id, args.limit).await).await?;
    println!("end state read back ({reads} reads until two in a row agreed)");
    let ops = history.ops();
    let report = check::check(&ops, &fin, &faults, end_ms);
    print_report(&report, &faults);
    let path = dir.with_extension("report.json");
    let text = serde_json::to_string_pretty(&json!({"seed": args.seed, "seconds": args.seconds,
        "faults": faults, "report": report, "final": fin}))
    .map_err(|e| e.to_string())?;
    std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    println!(
        "history: {}, report: {}",
        dir.with_extension("history.jsonl").display(),
        path.display()
    );
    if let Some(s) = second.as_mut() {
        s.stop();
    }
    dev.interrupt()?;
    Ok(report.violations.is_empty())
}

fn gaps(spec: &str) -> Result<(u64, u64), String> {
    let bad = || format!("--fault-every wants MIN-MAX seconds, got {spec:?}");
    let (a, b) = spec.split_once('-').ok_or_else(bad)?;
    let (a, b): (u64, u64) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
    if a == 0 || b < a {
        return Err(bad());
    }
    Ok((a, b))
}

/// Remove an earlier run's folder (only a seckill cluster folder) and its servers.
fn fresh_folder(dir: &std::path::Path) -> Result<(), String> {
    if !dir.exists() {
        return Ok(());
    }
    if !dir.join(".seckill-cluster").exists() {
        return Err(format!(
            "{} exists and is not a seckill cluster folder; choose another --dir",
            dir.display()
        ));
    }
    let stale = seckill::local::LocalCluster::open(dir, 1, 2).map_err(|e| e.to_string())?;
    for g in &stale.groups {
        for s in [&g.master, &g.shadow] {
            let _ = s.halt();
        }
    }
    std::fs::remove_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))
}

async fn create_sale(
    admin: &cluster::Admin,
    args: &NemesisArgs,
    rng: &mut ChaCha8Rng,
) -> Result<workload::Sale, String> {
    let items: Vec<u64> = (0..args.items)
        .map(|_| rng.random_range(1_000_000..1_000_000_000))
        .collect();
    let users: Vec<u64> = (0..args.users)
        .map(|_| rng.random_range(1..1u64 << 40))
        .collect();
    let now = chrono::Utc::now();
    let body = json!({
        "name": format!("nemesis seed {}", args.seed),
        "starts_at": (now - chrono::Duration::minutes(1)).to_rfc3339(),
        "ends_at": (now + chrono::Duration::hours(6)).to_rfc3339(),
        // Unpaid orders expire during the run: their stock returns mid-history.
        "payment_window_secs": 20,
        "items": items.iter().map(|i| json!({"item_id": i, "stock": args.stock, "price_cents": 100,
                                               "per_user_limit": args.limit})).collect::<Vec<_>>(),
    });
    let (status, answer) = admin.post("/v1/admin/sales", body).await?;
    if status != 201 {
        return Err(format!("the sale was refused ({status}): {answer}"));
    }
    Ok(workload::Sale {
        sale: answer["sale_id"].as_u64().ok_or("no sale_id")?,
        items,
        users,
    })
}

/// How long the end state may keep changing once the clients stopped: unpaid orders still expire
/// (the sale's payment window) and the reconcilers finish their repairs.
const SETTLE_WITHIN: Duration = Duration::from_secs(120);

/// The end state, read until two reads in a row agree. One read is not a snapshot: the orders
/// (per user, through the API), the audit and the payments are read one after another while
/// unpaid orders keep expiring, so an order read as `pending_payment` may have released its
/// stock by the time the audit is read, which the checker would take for an oversell (a 600 s
/// run at seed 7 did exactly that). Expiry and repair only move forward and stop once the
/// payment window has passed, so the reads settle; if they do not within [`SETTLE_WITHIN`], that
/// is itself reported as a failure.
async fn settled(
    mut read_back: impl AsyncFnMut() -> Result<Final, String>,
) -> Result<(Final, u32), String> {
    let started = Instant::now();
    let mut last = read_back().await?;
    let mut reads = 1;
    loop {
        let next = read_back().await?;
        reads += 1;
        if next == last {
            return Ok((next, reads));
        }
        if started.elapsed() > SETTLE_WITHIN {
            return Err(format!(
                "the end state still changed after {} s ({reads} reads): something keeps \
                 rewriting orders or stock with no client running",
                SETTLE_WITHIN.as_secs()
            ));
        }
        last = next;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The end state: every user's orders (through the API), the audit, the payments (from the shards).
async fn read_back(
    admin: &cluster::Admin,
    dir: &std::path::Path,
    shared: &workload::Shared,
    sale: u64,
    limit: i64,
) -> Result<Final, String> {
    let mut fin = Final {
        per_user_limit: limit,
        ..Default::default()
    };
    let users = seckill::config::Secret::new(cluster::secret(dir, "user-token-secret")?);
    for &user in &shared.sale.users {
        let token = seckill::auth::users::mint(&users, user, 3600).map_err(|e| e.to_string())?;
        let body: Value = admin
            .http
            .get(format!("{}/v1/users/{user}/orders?limit=1000", admin.url))
            .bearer_auth(token)
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        let orders = body["orders"]
            .as_array()
            .ok_or_else(|| format!("user {user}'s orders: {body}"))?;
        let mut mine: Vec<FinalOrder> = orders
            .iter()
            .filter(|o| o["sale_id"].as_u64() == Some(sale))
            .filter_map(|o| {
                Some(FinalOrder {
                    order_id: o["order_id"].as_str()?.to_string(),
                    item: o["item_id"].as_u64()?,
                    qty: o["quantity"].as_i64()?,
                    status: o["status"].as_str()?.to_string(),
                })
            })
            .collect();
        if !mine.is_empty() {
            mine.sort_by(|a, b| a.order_id.cmp(&b.order_id));
            fin.orders.insert(user, mine);
        }
    }
    let audit = admin.get(&format!("/v1/admin/sales/{sale}/audit")).await?;
    for i in audit["items"].as_array().into_iter().flatten() {
        let n = |k: &str| i[k].as_i64().unwrap_or(-1);
        fin.items.push(ItemAudit {
            item: i["item_id"].as_u64().unwrap_or(0),
            stock: n("stock"),
            remaining: n("remaining"),
            reserved: n("reserved"),
            ordered: n("ordered"),
            paid: n("paid"),
            conserved: i["conserved"] == true,
        });
    }
    fin.items.sort_by_key(|i| i.item);
    fin.payments = payments(admin, dir, sale).await?;
    fin.payments.sort_by(|a, b| {
        (&a.order_id, &a.payment_ref, &a.state).cmp(&(&b.order_id, &b.payment_ref, &b.state))
    });
    Ok(fin)
}

/// The sale's payments, read from every group's master as the dev cluster's superuser.
async fn payments(
    admin: &cluster::Admin,
    dir: &std::path::Path,
    sale: u64,
) -> Result<Vec<PaymentRow>, String> {
    let password = cluster::secret(dir, "db-admin-password")?;
    let groups = admin.get("/v1/admin/groups").await?;
    let mut rows = Vec::new();
    for g in groups["groups"].as_array().into_iter().flatten() {
        let endpoint = g["writable_master"]
            .as_str()
            .ok_or("a group without a master")?;
        let (host, port) = endpoint.rsplit_once(':').ok_or("a bad endpoint")?;
        let mut config = tokio_postgres::Config::new();
        config
            .host(host)
            .port(port.parse().map_err(|_| "a bad port")?)
            .user(seckill::local::ADMIN_ROLE)
            .password(password.as_str())
            .dbname("seckill");
        let (client, conn) = config
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(|e| e.to_string())?;
        let task = tokio::spawn(conn);
        let found = client
            .query(
                "SELECT order_id::text, payment_ref, state FROM payments WHERE sale_id = $1",
                &[&(sale as i64)],
            )
            .await
            .map_err(|e| e.to_string())?;
        rows.extend(found.iter().map(|r| PaymentRow {
            order_id: r.get(0),
            payment_ref: r.get(1),
            state: r.get(2),
        }));
        task.abort();
    }
    Ok(rows)
}

fn print_report(report: &check::Report, faults: &[FaultEvent]) {
    let dealt = faults.iter().filter(|f| f.refused.is_none()).count();
    println!(
        "\n== nemesis: {} faults dealt ({} could not be), {} orders acknowledged ==",
        dealt,
        faults.len() - dealt,
        report.acknowledged_orders
    );
    println!("requests (kind, status): {:?}", report.requests);
    println!("availability after each kind of fault (until the next fault): how long purchases were refused or unanswered, and the longest time without an acknowledged purchase (a sold-out item lengthens the latter):");
    let spread = |v: &[u64]| {
        let mut o = v.to_vec();
        o.sort_unstable();
        let at = |i: usize| o.get(i).copied().unwrap_or(0) as f64 / 1000.0;
        (at(o.len() / 2), at(o.len().saturating_sub(1)))
    };
    for a in &report.availability {
        let (rm, rx) = spread(&a.refused_ms);
        let (om, ox) = spread(&a.outages_ms);
        println!(
            "  {:<34} {:>3} dealt; refused for median {rm:>5.1} s, max {rx:>5.1} s; no ack for median {om:>5.1} s, max {ox:>5.1} s; {:?}",
            a.fault, a.dealt, a.refused
        );
    }
    if report.violations.is_empty() {
        println!("checks: every acknowledged order present once with its state or a later one; no request with two orders; every read after an acknowledgement lists it; nobody above the limit; stock conserved, nothing oversold; every paid order paid once: OK");
    } else {
        println!("\nVIOLATIONS ({}):", report.violations.len());
        for v in &report.violations {
            println!("  {}: {} [{}]", v.kind, v.detail, v.requests.join(", "));
        }
    }
}
