//! `seckill dev` as a user runs it: the real binary, its servers killed and frozen, the command
//! stopped with Ctrl-C, SIGKILLed and started again. After every step each group has a master and
//! one synchronous streaming shadow again within seconds, without a person acting, and every
//! acknowledged order is still there.

#[path = "api/helpers.rs"]
mod helpers;

use helpers::{free_port_block, rand_u64};
use reqwest::StatusCode;
use seckill::config::Secret;
use seckill::local::{LocalCluster, LocalServer};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `seckill dev`.
struct Dev {
    child: Child,
    addr: String,
}

/// The dev cluster's folder and ports, across restarts of the command.
struct Setup {
    dir: PathBuf,
    base_port: u16,
    http_port: u16,
    http: reqwest::Client,
}

impl Drop for Setup {
    fn drop(&mut self) {
        // Whatever the test left: the servers stop with the folder.
        if let Ok(c) = LocalCluster::open(&self.dir, self.base_port, 2) {
            c.stop_all("immediate");
        }
        if std::env::var_os("SECKILL_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
            let _ = std::fs::remove_file(self.stderr_log());
        }
    }
}

impl Setup {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "seckill-devtest-{}-{}",
            std::process::id(),
            rand_u64() % 1_000_000
        ));
        Self {
            dir,
            base_port: free_port_block(4),
            http_port: free_port_block(1),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("http client"),
        }
    }

    /// A new dev cluster, started and whole, and its servers' handles.
    async fn whole() -> (Self, Dev, LocalCluster) {
        let setup = Setup::new();
        let t = Instant::now();
        let dev = setup.start();
        setup.until_whole(&dev, "first start", t).await;
        let cluster = setup.cluster();
        (setup, dev, cluster)
    }

    /// Start `seckill dev` and SIGKILL it once it runs `tool` on `server`'s data directory.
    async fn start_cut_short(&self, server: &LocalServer, tool: &str) {
        let mut child = self.command().spawn().expect("seckill dev starts");
        let pids = until_tool(server, tool).await;
        let _ = child.kill();
        wait_exit(&mut child, Duration::from_secs(10));
        println!(
            "first start SIGKILLed during {tool} of {} ({pids:?})",
            server.name
        );
    }

    /// Start `seckill dev` and wait (bounded) for its welcome.
    fn start(&self) -> Dev {
        let mut child = self.command().spawn().expect("seckill dev starts");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("seckill dev is up") {
                    let _ = tx.send(());
                }
            }
        });
        if rx.recv_timeout(Duration::from_secs(180)).is_err() {
            let _ = child.kill();
            let stderr = std::fs::read_to_string(self.stderr_log()).unwrap_or_default();
            let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
            panic!(
                "seckill dev did not come up within 180 s; its stderr ends:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        Dev {
            child,
            addr: format!("http://127.0.0.1:{}", self.http_port),
        }
    }

    /// The `seckill dev` command of this setup, its stderr appended to [`Self::stderr_log`].
    fn command(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_seckill"));
        c.arg("dev")
            .arg("--dir")
            .arg(&self.dir)
            .args(["--base-port", &self.base_port.to_string()])
            .args(["--listen", &format!("127.0.0.1:{}", self.http_port)])
            .stdout(Stdio::piped())
            .stderr(Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.stderr_log())
                    .expect("a file for the command's stderr"),
            ));
        c
    }

    /// Where the command's stderr goes, every start appended (beside the cluster's folder).
    fn stderr_log(&self) -> PathBuf {
        self.dir.with_extension("stderr")
    }

    /// The servers of the dev cluster, as handles (nothing is started).
    fn cluster(&self) -> LocalCluster {
        LocalCluster::open(&self.dir, self.base_port, 2).expect("the dev cluster's folder")
    }

    fn secret(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join("secrets").join(name))
            .expect("secret")
            .trim()
            .to_string()
    }

    async fn admin(&self, dev: &Dev, method: reqwest::Method, path: &str, body: Value) -> Value {
        let r = self
            .http
            .request(method, format!("{}{path}", dev.addr))
            .bearer_auth(self.secret("admin-token"))
            .json(&body)
            .send()
            .await
            .expect("admin request");
        assert!(r.status().is_success(), "{path}: {}", r.status());
        r.json().await.expect("json")
    }

    async fn groups(&self, dev: &Dev) -> Value {
        let r = self
            .http
            .get(format!("{}/v1/admin/groups", dev.addr))
            .bearer_auth(self.secret("admin-token"))
            .send()
            .await;
        match r {
            Ok(r) => r.json().await.unwrap_or(Value::Null),
            Err(_) => Value::Null,
        }
    }

    /// Every group has a master and a shadow streaming from it synchronously, writes durable
    /// (printed: how long after `since`, the fault).
    async fn until_whole(&self, dev: &Dev, what: &str, since: Instant) {
        let start = Instant::now();
        loop {
            let g = self.groups(dev).await;
            let whole = g["groups"].as_array().is_some_and(|groups| {
                groups.len() == 2
                    && groups.iter().all(|g| {
                        g["writable_master"].is_string()
                            && g["shadow_streaming"] == true
                            && g["synchronous"] == true
                            && g["writes"] == "durable"
                    })
            });
            if whole {
                println!(
                    "{what}: whole again {:.1} s after the fault",
                    since.elapsed().as_secs_f64()
                );
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{what}: not whole within 60 s: {g}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Wait (bounded) until group `g`'s master is another server than `old`: the failover a
    /// fault of `old` causes has happened, so a following [`Self::until_whole`] does not read the
    /// state from before the fault was noticed.
    async fn until_master_moves(&self, dev: &Dev, g: usize, old: &LocalServer) {
        let start = Instant::now();
        loop {
            let groups = self.groups(dev).await;
            let writer = groups["groups"][g]["writable_master"].as_str();
            if writer.is_some_and(|w| !w.ends_with(&format!(":{}", old.port))) {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "group {g}'s master is still {} after 60 s: {groups}",
                old.name
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The member of group `g` that is its master now (`true`) or its shadow.
    async fn member(
        &self,
        dev: &Dev,
        cluster: &LocalCluster,
        g: usize,
        master: bool,
    ) -> LocalServer {
        let groups = self.groups(dev).await;
        let writer = groups["groups"][g]["writable_master"]
            .as_str()
            .expect("a master")
            .to_string();
        let group = &cluster.groups[g];
        let a_is_master = writer.ends_with(&format!(":{}", group.master.port));
        if a_is_master == master {
            group.master.clone()
        } else {
            group.shadow.clone()
        }
    }

    /// A sale of one item with [`STOCK`] units, open for an hour: (sale, item).
    async fn open_sale(&self, dev: &Dev) -> (u64, u64) {
        let item = 5_000_000 + rand_u64() % 1_000_000;
        let now = chrono::Utc::now();
        let created = self
            .admin(
                dev,
                reqwest::Method::POST,
                "/v1/admin/sales",
                json!({"name": "heal test", "starts_at": (now - chrono::Duration::minutes(1)).to_rfc3339(),
                       "ends_at": (now + chrono::Duration::hours(1)).to_rfc3339(),
                       "items": [{"item_id": item, "stock": STOCK, "price_cents": 1}]}),
            )
            .await;
        (created["sale_id"].as_u64().expect("sale_id"), item)
    }

    /// Buy `n` units, one per new user, each retried with its request id until it is answered
    /// 201; the (user, order id) of each.
    async fn buy(&self, dev: &Dev, sale: u64, item: u64, n: usize) -> Vec<(u64, String)> {
        let secret = Secret::new(self.secret("user-token-secret"));
        let mut orders = Vec::new();
        for _ in 0..n {
            let user = rand_u64() % (1 << 40);
            let token = seckill::auth::users::mint(&secret, user, 3600).expect("token");
            let rid = uuid::Uuid::new_v4().to_string();
            let start = Instant::now();
            loop {
                let r = self
                    .http
                    .post(format!("{}/v1/sales/{sale}/items/{item}/orders", dev.addr))
                    .bearer_auth(&token)
                    .json(&json!({"quantity": 1, "request_id": rid}))
                    .send()
                    .await;
                if let Ok(r) = r {
                    let status = r.status();
                    let retry_after: u64 = r
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok()?.parse().ok())
                        .unwrap_or(0);
                    let body: Value = r.json().await.unwrap_or(Value::Null);
                    match status {
                        StatusCode::CREATED => {
                            orders.push((user, body["order_id"].as_str().unwrap().to_string()));
                            break;
                        }
                        // A client retrying through an outage from one address meets the
                        // per-address limit: it waits as told.
                        StatusCode::TOO_MANY_REQUESTS => {
                            tokio::time::sleep(Duration::from_secs(retry_after)).await
                        }
                        _ => assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}"),
                    }
                }
                assert!(
                    start.elapsed() < Duration::from_secs(60),
                    "no order in 60 s"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        orders
    }

    async fn assert_all_present(&self, dev: &Dev, sale: u64, orders: &[(u64, String)]) {
        let secret = Secret::new(self.secret("user-token-secret"));
        for (user, id) in orders {
            let token = seckill::auth::users::mint(&secret, *user, 3600).expect("token");
            // A 503 (a group's pool still meeting the connections of a master just killed) is
            // retried as a client would; any other answer but 200 is an order lost.
            let start = Instant::now();
            loop {
                let r = self
                    .http
                    .get(format!("{}/v1/users/{user}/orders/{id}", dev.addr))
                    .bearer_auth(&token)
                    .send()
                    .await
                    .expect("read back");
                let status = r.status();
                let body: Value = r.json().await.unwrap_or(Value::Null);
                if status == StatusCode::SERVICE_UNAVAILABLE
                    && start.elapsed() < Duration::from_secs(30)
                {
                    println!("read of {id}: 503 {body}, retried");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                assert_eq!(
                    status,
                    StatusCode::OK,
                    "acknowledged order {id} present: {body}"
                );
                break;
            }
        }
        let sale_view: Value = self
            .http
            .get(format!("{}/v1/sales/{sale}", dev.addr))
            .send()
            .await
            .expect("sale")
            .json()
            .await
            .expect("json");
        let remaining = sale_view["items"][0]["remaining"]
            .as_i64()
            .expect("remaining");
        assert_eq!(
            remaining + orders.len() as i64,
            STOCK,
            "sold == acknowledged: {sale_view}"
        );
        let audit = self
            .admin(
                dev,
                reqwest::Method::GET,
                &format!("/v1/admin/sales/{sale}/audit"),
                Value::Null,
            )
            .await;
        assert_eq!(audit["conserved"], true, "{audit}");
    }
}

impl Drop for Dev {
    /// A test that fails leaves no `seckill dev` running (its servers stop with the folder).
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Dev {
    /// Ctrl-C: the engine stops, then its servers.
    fn interrupt(mut self) {
        // SAFETY: plain kill(2) of our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        wait_exit(&mut self.child, Duration::from_secs(90));
    }

    /// SIGKILL of the command alone: its servers go on running (or frozen) without it.
    fn crash(mut self) {
        let _ = self.child.kill();
        wait_exit(&mut self.child, Duration::from_secs(10));
    }
}

fn wait_exit(child: &mut Child, limit: Duration) {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    panic!("seckill dev did not exit within {limit:?}");
}

const STOCK: i64 = 100_000;

fn pid_of(server: &LocalServer) -> Option<i32> {
    let text = std::fs::read_to_string(Path::new(&server.data_dir).join("postmaster.pid")).ok()?;
    text.lines().next()?.trim().parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
// Long on purpose: one scenario, its steps in the order they happen; split, it would no longer
// read as one story.
async fn seckill_dev_heals_through_kills_freezes_and_restarts() {
    let (setup, dev, cluster) = Setup::whole().await;
    let (sale, item) = setup.open_sale(&dev).await;
    let mut orders = setup.buy(&dev, sale, item, 5).await;

    // Every master SIGKILLed while the command runs: failover, and the old masters come back as
    // shadows.
    let t = Instant::now();
    let mut killed = Vec::new();
    for g in 0..2 {
        let master = setup.member(&dev, &cluster, g, true).await;
        master.kill9().expect("kill the master");
        killed.push(master);
    }
    orders.extend(setup.buy(&dev, sale, item, 5).await);
    for (g, master) in killed.iter().enumerate() {
        setup.until_master_moves(&dev, g, master).await;
    }
    setup.until_whole(&dev, "masters killed", t).await;

    // Ctrl-C and start again: the groups come up as they were left.
    dev.interrupt();
    let t = Instant::now();
    let dev = setup.start();
    setup.until_whole(&dev, "restart after Ctrl-C", t).await;
    orders.extend(setup.buy(&dev, sale, item, 5).await);

    // The command SIGKILLed with g0's master frozen and g1's shadow killed: the next start finds
    // them so.
    let frozen = setup.member(&dev, &cluster, 0, true).await;
    let dead = setup.member(&dev, &cluster, 1, false).await;
    dev.crash();
    frozen.freeze().expect("freeze g0's master");
    dead.kill9().expect("kill g1's shadow");
    let t = Instant::now();
    let dev = setup.start();
    setup
        .until_whole(&dev, "restart after a crash with a frozen master", t)
        .await;
    assert!(
        pid_of(&frozen).is_some_and(|p| std::fs::read_to_string(format!("/proc/{p}/stat"))
            .is_ok_and(|s| !s.contains(") T "))),
        "no server is left frozen"
    );
    orders.extend(setup.buy(&dev, sale, item, 5).await);

    // Every shadow SIGKILLed, then every master frozen, while the command runs.
    for (what, master) in [("shadows killed", false), ("masters frozen", true)] {
        let t = Instant::now();
        let mut hit = Vec::new();
        for g in 0..2 {
            let s = setup.member(&dev, &cluster, g, master).await;
            let pid = pid_of(&s);
            if master {
                s.freeze().expect("freeze");
            } else {
                s.kill9().expect("kill");
            }
            hit.push((s, pid));
        }
        orders.extend(setup.buy(&dev, sale, item, 3).await);
        // Each server hit was started anew (a frozen one killed first), then the group is whole.
        for (s, pid) in &hit {
            let start = Instant::now();
            while pid_of(s) == *pid {
                assert!(
                    start.elapsed() < Duration::from_secs(60),
                    "{what}: {} restarted",
                    s.name
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        setup.until_whole(&dev, what, t).await;
    }

    setup.assert_all_present(&dev, sale, &orders).await;
    dev.interrupt();
}

/// Wait (bounded) until the engine's heal runs `tool` on `server`'s data directory.
async fn until_tool(server: &LocalServer, tool: &str) -> Vec<i32> {
    let start = Instant::now();
    loop {
        let pids = server.tool_processes(&[tool]);
        if !pids.is_empty() {
            return pids;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "no {tool} on {} within 90 s",
            server.name
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}

/// The marker a rejoin leaves beside the data directory until it is a standby's.
fn rejoin_marker(server: &LocalServer) -> PathBuf {
    server.data_dir.with_file_name("data.rejoining")
}

/// Old data directories a rebuild kept aside, beside `server`'s.
fn kept_aside(server: &LocalServer) -> usize {
    let parent = server.data_dir.parent().expect("a server folder");
    std::fs::read_dir(parent)
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with("data.replaced-")
                })
                .count()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
// One story in sequence, as the last: the command SIGKILLed in the middle of a heal, twice.
async fn a_heal_cut_short_by_a_crash_is_finished_at_the_next_start() {
    let (setup, dev, cluster) = Setup::whole().await;
    let (sale, item) = setup.open_sale(&dev).await;
    let mut orders = setup.buy(&dev, sale, item, 5).await;

    // g0's master SIGKILLed; the engine promotes the shadow and rewinds the old master into its
    // shadow. The command is SIGKILLed while pg_rewind runs. Here the rewind is then finished by
    // hand, as it would have finished had the command died a moment later: a data directory
    // rewound, "in archive recovery" with a backup_label, and no standby.signal yet. Read as a
    // primary on the promoted member's timeline, it made the next start refuse ("both are
    // primaries"), leaving the group to a person: found by the nemesis (seed 21).
    let old = setup.member(&dev, &cluster, 0, true).await;
    let promoted = setup.member(&dev, &cluster, 0, false).await;
    old.kill9().expect("kill g0's master");
    let rewind = until_tool(&old, "pg_rewind").await;
    for &pid in &rewind {
        // SAFETY: plain kill(2) of the pg_rewind the engine started (and its runuser).
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    dev.crash();
    assert!(
        rejoin_marker(&old).exists(),
        "the rejoin marked the directory before it touched it"
    );
    // pg_rewind first runs the crashed directory through crash recovery in a single-user server.
    let start = Instant::now();
    while !old.tool_processes(&["--single"]).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "single-user server ends"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    old.rewind("127.0.0.1", promoted.port)
        .expect("the rewind, finished by hand");
    assert!(old.data_dir.join("backup_label").exists(), "rewound");
    assert!(
        !old.data_dir.join("standby.signal").exists(),
        "not a standby's yet"
    );
    let t = Instant::now();
    let dev = setup.start();
    setup
        .until_whole(&dev, "restart after a rewind cut short", t)
        .await;
    assert!(!rejoin_marker(&old).exists(), "the rejoin was finished");
    assert_eq!(kept_aside(&old), 1, "the cut-short directory is kept aside");
    orders.extend(setup.buy(&dev, sale, item, 5).await);

    // Again on the same group, whose master is now the other member: this time the rewind is
    // frozen when the command dies, and still there when it starts again. The start stops it
    // before it takes a base backup into the directory the rewind writes to.
    let old = setup.member(&dev, &cluster, 0, true).await;
    old.kill9().expect("kill g0's new master");
    let rewind = until_tool(&old, "pg_rewind").await;
    for &pid in &rewind {
        // SAFETY: plain kill(2) of the pg_rewind the engine started (and its runuser).
        unsafe { libc::kill(pid, libc::SIGSTOP) };
    }
    dev.crash();
    assert!(rejoin_marker(&old).exists());
    let t = Instant::now();
    let dev = setup.start();
    setup
        .until_whole(&dev, "restart with the rewind frozen", t)
        .await;
    assert!(
        rewind.iter().all(|&p| !alive(p)),
        "the frozen pg_rewind was stopped"
    );
    assert!(!rejoin_marker(&old).exists(), "the rejoin was finished");
    orders.extend(setup.buy(&dev, sale, item, 5).await);

    // And the group still fails over and heals as usual afterwards, with the command running.
    let t = Instant::now();
    let master = setup.member(&dev, &cluster, 0, true).await;
    master.kill9().expect("kill g0's master a third time");
    orders.extend(setup.buy(&dev, sale, item, 3).await);
    setup.until_master_moves(&dev, 0, &master).await;
    setup.until_whole(&dev, "a third failover", t).await;

    setup.assert_all_present(&dev, sale, &orders).await;
    dev.interrupt();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
// The first start, the one `scripts/dev` makes, SIGKILLed twice as it builds the groups: during a
// master's initdb, then during a shadow's base backup. Before, the next start refused (a data
// directory without a control file) or came up with a master lacking its database.
async fn a_first_start_cut_short_comes_up_at_the_next() {
    let setup = Setup::new();
    let cluster = setup.cluster();
    let (g0, g1) = (&cluster.groups[0], &cluster.groups[1]);
    setup.start_cut_short(&g0.master, "initdb").await;
    assert!(
        setup.dir.join("g0.creating").exists(),
        "the group is marked while it is made"
    );
    setup.start_cut_short(&g1.shadow, "pg_basebackup").await;
    assert!(
        rejoin_marker(&g1.shadow).exists(),
        "the shadow is marked while it is made"
    );
    let t = Instant::now();
    let dev = setup.start();
    setup
        .until_whole(&dev, "a start after two cut short", t)
        .await;
    for g in ["g0", "g1"] {
        assert!(
            !setup.dir.join(format!("{g}.creating")).exists(),
            "{g} made"
        );
    }
    assert!(!rejoin_marker(&g1.shadow).exists());
    let (sale, item) = setup.open_sale(&dev).await;
    let mut orders = setup.buy(&dev, sale, item, 5).await;

    // And it lives on as any cluster does: a master SIGKILLed, the command restarted.
    let t = Instant::now();
    let master = setup.member(&dev, &cluster, 1, true).await;
    master.kill9().expect("kill g1's master");
    orders.extend(setup.buy(&dev, sale, item, 5).await);
    setup.until_master_moves(&dev, 1, &master).await;
    setup.until_whole(&dev, "g1's master killed", t).await;
    dev.interrupt();
    let dev = setup.start();
    setup.until_whole(&dev, "restart", Instant::now()).await;
    setup.assert_all_present(&dev, sale, &orders).await;
    dev.interrupt();
}
