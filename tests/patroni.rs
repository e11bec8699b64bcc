//! The engine in external-HA mode under a real Patroni 4 with etcd (one group of two servers,
//! `synchronous_mode: true`, ttl 20), buyers buying through each of: a Patroni switchover, SIGKILL
//! of the leader's postgres, SIGKILL of the leader's Patroni alone (its postgres stays up but stops
//! confirming synchronous commits once the other node is promoted), SIGSTOP of the whole leader.
//!
//! After each: every acknowledged order is present, the outage is printed (and bounded by
//! Patroni's ttl plus the old node's rejoin), and no order was acknowledged while the primary had
//! no synchronous standby streaming (Patroni's non-strict mode leaves a promoted primary
//! asynchronous until the old node rejoins; `shadow_loss = "block"` refuses to acknowledge then).
//!
//! Patroni and etcd come from scripts/install-patroni.sh (run here when missing), the cluster
//! from tests/patroni/cluster.py.

#[path = "api/helpers.rs"]
mod helpers;

use helpers::*;
use reqwest::StatusCode;
use seckill::app::Background;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Patroni's leader key lives this long without renewal: the slowest failover it makes.
const TTL: Duration = Duration::from_secs(20);

/// A Patroni cluster of this test's own, taken down when dropped.
struct Patroni {
    dir: PathBuf,
    secrets: Value,
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

impl Patroni {
    fn up() -> Self {
        let install = Command::new(repo().join("scripts/install-patroni.sh"))
            .output()
            .expect("scripts/install-patroni.sh runs");
        assert!(
            install.status.success(),
            "installing Patroni and etcd: {}",
            String::from_utf8_lossy(&install.stderr)
        );
        let dir = std::env::temp_dir().join(format!(
            "seckill-patroni-{}-{}",
            std::process::id(),
            rand_u64() % 1_000_000
        ));
        let mut p = Patroni {
            dir,
            secrets: Value::Null,
        };
        let base = free_port_block(6);
        p.tool(&["up", "--base-port", &base.to_string()]);
        let text = std::fs::read_to_string(p.dir.join("secrets.json")).expect("secrets.json");
        p.secrets = serde_json::from_str(&text).expect("secrets");
        p
    }

    /// Run tests/patroni/cluster.py with `args` on this cluster; its JSON answer.
    fn tool(&self, args: &[&str]) -> Value {
        let out = Command::new("python3")
            .arg(repo().join("tests/patroni/cluster.py"))
            .args(args)
            .arg("--dir")
            .arg(&self.dir)
            .output()
            .expect("cluster.py runs");
        assert!(
            out.status.success(),
            "cluster.py {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    fn dsn(&self, member: &str, kind: &str) -> String {
        self.secrets["members"][member][kind]
            .as_str()
            .expect("a DSN")
            .to_string()
    }

    fn leader(&self) -> String {
        self.tool(&["status"])["leader"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    /// The engine's configuration: one group whose members are Patroni's two nodes, external mode.
    fn config(&self) -> seckill::Config {
        let toml = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_token = \"{TOKEN}\"\nrequest_timeout_ms = 3000\n\
             [auth]\nhs256_secret = \"{USER_SECRET}\"\n\
             [payments]\nsecret = \"{PAYMENT_SECRET}\"\n\
             [frontdoor]\ntoken_keys = [\"{TOKEN_KEY}\"]\n\
             [failover]\nmode = \"external\"\nprobe_interval_ms = 100\nprobe_timeout_ms = 300\n\
             [[groups]]\nname = \"g0\"\nmaster = \"{}\"\nshadow = \"{}\"\nmaster_admin = \"{}\"\nshadow_admin = \"{}\"\n",
            self.dsn("pa", "app_dsn"),
            self.dsn("pb", "app_dsn"),
            self.dsn("pa", "admin_dsn"),
            self.dsn("pb", "admin_dsn"),
        );
        let mut config = Config::from_toml(&toml, "patroni test").expect("config");
        config.server.layout_guard = false;
        config.orders.reconcile_interval_ms = 0;
        config
    }
}

use seckill::Config;

impl Drop for Patroni {
    fn drop(&mut self) {
        let keep = std::env::var_os("SECKILL_KEEP_TEST_DIRS").is_some();
        let mut down = Command::new("python3");
        down.arg(repo().join("tests/patroni/cluster.py"))
            .args(["down", "--dir"])
            .arg(&self.dir);
        if !keep {
            down.arg("--rm");
        }
        let _ = down.output();
    }
}

/// One sample of the cluster: when, and whether some primary had no synchronous standby
/// streaming (a commit there would be acknowledged by one server alone).
#[derive(Clone, Copy)]
struct Sample {
    at: Instant,
    alone: bool,
}

/// Sample both servers every 100 ms, with the admin role, until `stop`.
async fn watch(dsns: Vec<String>, stop: Arc<std::sync::atomic::AtomicBool>) -> Vec<Sample> {
    let mut samples = Vec::new();
    let mut clients: Vec<Option<tokio_postgres::Client>> = vec![None, None];
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        let mut alone = false;
        for (i, dsn) in dsns.iter().enumerate() {
            if clients[i].as_ref().is_none_or(|c| c.is_closed()) {
                let connect = tokio::time::timeout(
                    Duration::from_millis(300),
                    tokio_postgres::connect(dsn, tokio_postgres::NoTls),
                );
                clients[i] = match connect.await {
                    Ok(Ok((c, conn))) => {
                        tokio::spawn(conn);
                        Some(c)
                    }
                    _ => None,
                };
            }
            let Some(c) = &clients[i] else { continue };
            let q = c.query_one(
                "SELECT NOT pg_is_in_recovery()
                        AND (current_setting('synchronous_standby_names') = ''
                             OR NOT EXISTS (SELECT 1 FROM pg_stat_replication
                                            WHERE state = 'streaming' AND sync_state = 'sync'))",
                &[],
            );
            match tokio::time::timeout(Duration::from_millis(300), q).await {
                Ok(Ok(row)) => alone |= row.get::<_, bool>(0),
                _ => clients[i] = None,
            }
        }
        samples.push(Sample {
            at: Instant::now(),
            alone,
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    samples
}

/// What the buyers saw: (sent, answered, user, order id) of every 201.
#[derive(Default)]
struct Seen {
    acked: Vec<(Instant, Instant, u64, String)>,
    codes: std::collections::HashMap<String, usize>,
}

/// Buyers until `stop`: each purchase a new user with its own request_id, retried with that id on
/// 503 (every 503 with Retry-After), as a well-behaved client does.
async fn buyers(
    app: Arc<TestApp>,
    sale: u64,
    item: u64,
    n: u64,
    stop: Arc<std::sync::atomic::AtomicBool>,
    seen: Arc<Mutex<Seen>>,
) {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (app, seen, stop) = (app.clone(), seen.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let user = fresh_item();
                    let rid = uuid::Uuid::new_v4().to_string();
                    loop {
                        let sent = Instant::now();
                        let r = app.buy(sale, item, user, 1, Some(&rid)).await;
                        match r.status {
                            StatusCode::CREATED => {
                                let id = r.body["order_id"].as_str().unwrap().to_string();
                                seen.lock()
                                    .unwrap()
                                    .acked
                                    .push((sent, Instant::now(), user, id));
                                break;
                            }
                            StatusCode::SERVICE_UNAVAILABLE => {
                                assert!(r.headers.contains_key("retry-after"), "{:?}", r.body);
                                *seen
                                    .lock()
                                    .unwrap()
                                    .codes
                                    .entry(r.code().into())
                                    .or_default() += 1;
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                            // Buyers retrying through an outage from one address meet the
                            // per-address limit: they wait as told.
                            StatusCode::TOO_MANY_REQUESTS => {
                                let secs: u64 =
                                    r.headers["retry-after"].to_str().unwrap().parse().unwrap();
                                tokio::time::sleep(Duration::from_secs(secs)).await;
                            }
                            s => panic!("unexpected {s}: {:?}", r.body),
                        }
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("buyer");
    }
}

/// The longest time without an acknowledgement from `fault` on.
fn outage_after(fault: Instant, seen: &Seen) -> Duration {
    let mut after: Vec<Instant> = seen
        .acked
        .iter()
        .map(|a| a.1)
        .filter(|t| *t > fault)
        .collect();
    after.sort();
    let mut last = fault;
    let mut outage = Duration::ZERO;
    for t in after {
        outage = outage.max(t.duration_since(last));
        last = t;
    }
    outage
}

/// Wait until a purchase sent after the fault (which happened just before this is called) was
/// acknowledged, and the leader Patroni names has its synchronous standby streaming again with
/// the engine writing to it.
async fn until_whole(app: &TestApp, patroni: &Patroni, seen: &Mutex<Seen>, limit: Duration) {
    let start = Instant::now();
    loop {
        let sold = seen.lock().unwrap().acked.iter().any(|a| a.0 > start);
        if !sold {
            assert!(
                start.elapsed() < limit,
                "no order acknowledged within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        let status = patroni.tool(&["status"]);
        let sync = match &status["sync_standby"] {
            Value::String(s) => !s.is_empty(),
            Value::Array(a) => !a.is_empty(),
            _ => false,
        };
        let g = app.state.cluster.group(0);
        let writes = g.durability() == seckill::shard::Durability::Durable;
        if sync && writes && g.writer_index().is_some() {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "not whole within {limit:?}: {status} {:?}",
            g.replication()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
// Long on purpose: one scenario, its steps in the order they happen; split, it would no longer
// read as one story.
async fn external_mode_under_patroni_loses_nothing_through_its_faults() {
    let patroni = Patroni::up();
    // As README asks of external mode: the probing role may see pg_stat_replication.
    let admin = patroni.dsn(&patroni.leader(), "admin_dsn");
    let (c, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
        .await
        .expect("admin connection");
    tokio::spawn(conn);
    c.batch_execute("GRANT pg_read_all_stats TO seckill")
        .await
        .expect("grant");
    let app = Arc::new(
        spawn_config(
            patroni.config(),
            Background {
                monitor: true,
                sweeper: false,
                reconciler: false,
            },
        )
        .await,
    );
    let item = fresh_item();
    let sale = app
        .create_sale(json!([{"item_id": item, "stock": 1_000_000, "price_cents": 1}]))
        .await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let dsns = vec![
        patroni.dsn("pa", "admin_dsn"),
        patroni.dsn("pb", "admin_dsn"),
    ];
    let watcher = tokio::spawn(watch(dsns, stop.clone()));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let storm = tokio::spawn(buyers(
        app.clone(),
        sale,
        item,
        8,
        stop.clone(),
        seen.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut faults: Vec<(&str, Instant)> = Vec::new();
    // A planned switchover.
    faults.push(("switchover", Instant::now()));
    patroni.tool(&["switchover"]);
    until_whole(&app, &patroni, &seen, Duration::from_secs(60)).await;
    // SIGKILL of the leader's postgres: Patroni restarts it in place.
    faults.push(("SIGKILL of the leader's postgres", Instant::now()));
    patroni.tool(&["kill-postgres", "--member", "leader"]);
    until_whole(&app, &patroni, &seen, Duration::from_secs(60)).await;
    // SIGKILL of the leader's Patroni alone; a supervisor restarts it once the other node leads.
    let old = patroni.leader();
    faults.push(("SIGKILL of the leader's Patroni", Instant::now()));
    patroni.tool(&["kill-patroni", "--member", "leader"]);
    patroni.tool(&["wait", "--timeout", "60"]);
    let promoted = Instant::now();
    while patroni.leader() == old {
        assert!(
            promoted.elapsed() < Duration::from_secs(60),
            "no new leader"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    patroni.tool(&["restart-patroni", "--member", &old]);
    until_whole(&app, &patroni, &seen, Duration::from_secs(90)).await;
    // SIGSTOP of the whole leader (a hung host), thawed once the other node leads.
    let old = patroni.leader();
    faults.push(("SIGSTOP of the whole leader", Instant::now()));
    patroni.tool(&["freeze", "--member", "leader"]);
    let frozen = Instant::now();
    loop {
        let leader = patroni.tool(&["status"])["leader"]
            .as_str()
            .map(String::from);
        if leader.as_deref().is_some_and(|l| l != old) {
            break;
        }
        assert!(frozen.elapsed() < Duration::from_secs(60), "no new leader");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    patroni.tool(&["thaw"]);
    until_whole(&app, &patroni, &seen, Duration::from_secs(90)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    storm.await.expect("buyers");
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    let samples = watcher.await.expect("watcher");
    println!(
        "{} orders acknowledged; 503s by code: {:?}",
        seen.acked.len(),
        seen.codes
    );
    for (i, (what, at)) in faults.iter().enumerate() {
        let window = Seen {
            acked: seen
                .acked
                .iter()
                .filter(|a| faults.get(i + 1).is_none_or(|(_, next)| a.1 < *next))
                .cloned()
                .collect(),
            ..Default::default()
        };
        let outage = outage_after(*at, &window);
        println!(
            "{what}: longest time without an acknowledged order {:.1} s",
            outage.as_secs_f64()
        );
        // Patroni's ttl, then the old node's rejoin (a pg_rewind and a restart, ~10 s here).
        assert!(outage < TTL + Duration::from_secs(30), "{what}: {outage:?}");
    }
    // Never acknowledged by one server alone: no 201 whose request lay inside a stretch where
    // every sample (one each ~100 ms, from just before it was sent to just after its answer)
    // showed a primary without a synchronous standby.
    let margin = Duration::from_millis(150);
    for (sent, answered, _, id) in &seen.acked {
        let around: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.at + margin >= *sent && s.at <= *answered + margin)
            .collect();
        assert!(
            around.is_empty() || around.iter().any(|s| !s.alone),
            "order {id} was acknowledged while the primary had no synchronous standby"
        );
    }
    let alone = samples.iter().filter(|s| s.alone).count();
    println!(
        "{alone} of {} samples saw a primary without a synchronous standby",
        samples.len()
    );
    for (_, _, user, id) in &seen.acked {
        let r = app.get(&format!("/v1/users/{user}/orders/{id}")).await;
        assert_eq!(r.status, StatusCode::OK, "acknowledged order {id} present");
    }
    let remaining = app.remaining(sale, item).await;
    assert_eq!(
        remaining + seen.acked.len() as i64,
        1_000_000,
        "sold == acknowledged"
    );
}
