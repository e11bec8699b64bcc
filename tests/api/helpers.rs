#![allow(dead_code)] // shared by several test binaries, each using a part

//! Test harness: real PostgreSQL shard groups started by the tests themselves, and the engine
//! spawned per test on port 0.
//!
//! One cluster (two groups, each a master and a streaming shadow) is started per test binary, on
//! free ports in a temporary folder, and stopped at process exit. Tests share it safely because
//! every test creates its own sale with item ids nobody else uses.

use reqwest::StatusCode;
use seckill::app::{Application, Background};
use seckill::config::Secret;
use seckill::local::{EngineSecrets, LocalCluster, ServerTuning};
use seckill::Config;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

pub const TOKEN: &str = "test-admin-token-0123456789";
pub const USER_SECRET: &str = "test-user-token-secret-0123456789abcdef";
pub const PAYMENT_SECRET: &str = "test-payment-secret-0123456789";
pub const TOKEN_KEY: &str = "test-order-token-key-0123456789abcdef";

/// The engine's secrets in every test.
pub fn secrets() -> EngineSecrets {
    EngineSecrets {
        admin_token: Secret::new(TOKEN),
        user_token_secret: Secret::new(USER_SECRET),
        payment_secret: Secret::new(PAYMENT_SECRET),
        token_key: Secret::new(TOKEN_KEY),
    }
}

/// A user token for `user`, valid for an hour.
pub fn user_token(user: u64) -> String {
    seckill::auth::users::mint(&Secret::new(USER_SECRET), user, 3600).expect("token")
}

/// The user a `/v1/users/{user}/...` path is about.
fn user_of(path: &str) -> Option<u64> {
    path.strip_prefix("/v1/users/")?
        .split('/')
        .next()?
        .parse()
        .ok()
}

static CLUSTER: OnceLock<LocalCluster> = OnceLock::new();

extern "C" fn stop_cluster_at_exit() {
    if let Some(c) = CLUSTER.get() {
        c.stop_all("immediate");
        let _ = std::fs::remove_dir_all(&c.root);
    }
}

/// A base port with `n` free ports after it, claimed for this process: the test binaries run at
/// once (scripts/test-lanes), and a port that is free now may be taken by another binary's server
/// a second later, between the check and the server's start. A claim is a file named after the
/// port in a folder all test processes share, holding the claimer's pid; a claim whose process is
/// gone is taken over.
pub fn free_port_block(n: u16) -> u16 {
    for _ in 0..400 {
        // Below the kernel's ephemeral range (32768-60999), where outgoing connections live.
        let base = 20_000 + (rand_u64() % 12_000) as u16;
        let free = (0..n).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok());
        if free && claim_ports(base, n) {
            return base;
        }
    }
    panic!("no block of {n} free ports found");
}

fn claim_ports(base: u16, n: u16) -> bool {
    let dir = std::env::temp_dir().join("seckill-test-ports");
    if std::fs::create_dir_all(&dir).is_err() {
        return false;
    }
    // One claimer at a time across processes, so that taking over a stale claim (remove, then
    // create) cannot race another process doing the same. Released when `lock` drops.
    let Ok(lock) = std::fs::File::create(dir.join(".lock")) else {
        return false;
    };
    // SAFETY: flock(2) on a file descriptor this function owns.
    if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) } != 0 {
        return false;
    }
    let me = std::process::id();
    let claim = |port: u16| {
        let path = dir.join(port.to_string());
        let create = || {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .and_then(|mut f| std::io::Write::write_all(&mut f, me.to_string().as_bytes()))
        };
        if create().is_ok() {
            return true;
        }
        let holder: Option<i32> = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| t.trim().parse().ok());
        // SAFETY: kill(2) with signal 0 only asks whether the process exists.
        let alive = holder.is_some_and(|pid| unsafe { libc::kill(pid, 0) } == 0);
        !alive && std::fs::remove_file(&path).is_ok() && create().is_ok()
    };
    let mut claimed: Vec<u16> = Vec::new();
    for port in base..base + n {
        if !claim(port) {
            for p in claimed {
                let _ = std::fs::remove_file(dir.join(p.to_string()));
            }
            return false;
        }
        claimed.push(port);
    }
    true
}

pub fn rand_u64() -> u64 {
    uuid::Uuid::new_v4().as_u64_pair().0
}

/// Start a fresh local cluster of `groups` groups in a temporary folder.
pub fn start_cluster(groups: usize) -> LocalCluster {
    let root = std::env::temp_dir().join(format!(
        "seckill-test-{}-{}",
        std::process::id(),
        rand_u64() % 1_000_000
    ));
    let base = free_port_block(2 * groups as u16);
    copy_template(&root, groups);
    let cluster =
        LocalCluster::open(&root, base, groups).expect("PostgreSQL binaries (run scripts/test)");
    cluster
        .ensure_running(&tuning())
        .expect("local cluster starts");
    // An engine probes its groups once at start: a shadow not streaming yet then gates the group's
    // purchases (503 shadow_unavailable) until a monitor round sees it, and tests without a
    // monitor would wait forever. Every test cluster starts with its shadows streaming.
    for g in &cluster.groups {
        let streaming = || {
            g.master
                .psql(
                    "postgres",
                    "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
                )
                .is_ok_and(|n| n.trim() == "1")
        };
        let start = std::time::Instant::now();
        while !streaming() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the shadow of {} did not stream within 60 s",
                g.master.name
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    cluster
}

/// What a template is made of: a template made by another recipe is made again.
fn template_recipe() -> String {
    format!(
        "seckill test template 1: {:?} {:?}",
        tuning(),
        seckill::local::PgBin::locate().map(|b| b.dir).ok()
    )
}

/// A template cluster folder: one group, its master initialised with the engine's role and
/// database and its shadow streaming from it, both stopped cleanly. Made once (by whichever test
/// binary asks first; the others wait on a file lock) and copied into every test cluster: initdb,
/// the database and the base backup cost seconds of CPU a cluster, a copy a fraction of one. The
/// copy starts the way `seckill dev` starts a folder it finds (one master, its shadow following).
fn template() -> &'static std::path::Path {
    static TEMPLATE: OnceLock<std::path::PathBuf> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cluster-template");
        let lock = std::fs::File::create(dir.with_extension("lock")).expect("template lock file");
        // SAFETY: flock(2) on a file descriptor this function owns; released when `lock` drops.
        assert_eq!(
            unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) },
            0,
            "template lock"
        );
        let recipe = template_recipe();
        let ready = dir.join("ready");
        if std::fs::read_to_string(&ready).ok().as_deref() != Some(recipe.as_str()) {
            let _ = std::fs::remove_dir_all(&dir);
            let made = LocalCluster::open(&dir, free_port_block(2), 1)
                .expect("PostgreSQL binaries (run scripts/test)");
            made.ensure_running(&tuning())
                .expect("template cluster starts");
            made.stop_all("fast");
            std::fs::write(&ready, &recipe).expect("template marker");
        }
        drop(lock);
        dir
    })
}

/// Fill a new cluster folder for `groups` groups from the template (`cp -a`: the data
/// directories keep their owner and modes).
fn copy_template(root: &std::path::Path, groups: usize) {
    let template = template();
    let cp = |from: std::path::PathBuf, to: std::path::PathBuf| {
        let out = std::process::Command::new("cp")
            .arg("-a")
            .arg(&from)
            .arg(&to)
            .output()
            .expect("cp runs");
        assert!(
            out.status.success(),
            "cp -a {} {}: {}",
            from.display(),
            to.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    std::fs::create_dir_all(root).expect("cluster folder");
    for entry in [".seckill-cluster", "secrets"] {
        cp(template.join(entry), root.join(entry));
    }
    for g in 0..groups {
        for member in ["a", "b"] {
            let to = root.join(format!("g{g}-{member}"));
            cp(template.join(format!("g0-{member}")), to.clone());
            let _ = std::fs::remove_file(to.join("server.log"));
        }
    }
}

/// A cluster of a test's own (it kills servers, or needs a fresh database), stopped and removed
/// when dropped, even when the test fails (`SECKILL_KEEP_TEST_DIRS=1` keeps the folder).
pub struct OwnCluster(pub LocalCluster);

impl OwnCluster {
    pub fn start(groups: usize) -> Self {
        Self(start_cluster(groups))
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        self.0.stop_all("immediate");
        if std::env::var_os("SECKILL_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.0.root);
        }
    }
}

/// The test servers' settings: no fsync (tests do not test OS crashes), small buffers.
pub fn tuning() -> ServerTuning {
    ServerTuning {
        fsync: false,
        shared_buffers: "32MB",
        max_connections: 400,
    }
}

pub fn cluster() -> &'static LocalCluster {
    CLUSTER.get_or_init(|| {
        let c = start_cluster(2);
        // SAFETY: registering a plain extern "C" function with atexit.
        unsafe {
            libc::atexit(stop_cluster_at_exit);
        }
        c
    })
}

/// The configuration the dev cluster would use, listening on port 0, with fast background loops.
pub fn base_config(cluster: &LocalCluster) -> Config {
    let mut config = Config::from_toml(&cluster.shards_toml("127.0.0.1:0", &secrets()), "test")
        .expect("valid config");
    config.routing.table_refresh_ms = 100;
    config.coalesce.soldout_refresh_ms = 200;
    config.orders.sweep_interval_ms = 200;
    config.failover.probe_interval_ms = 100;
    // Tests that need the reconciler drive it themselves (tests/reconcile.rs).
    config.orders.reconcile_interval_ms = 0;
    // Tests route the shared cluster in several ways on purpose; the guard is tested on its own
    // (tests/api/shardmap.rs).
    config.server.layout_guard = false;
    // Tests read a sale's remaining stock right after buying; the cache is tested on its own
    // (tests/api/sale_day.rs).
    config.server.sale_view_cache_ms = 0;
    config
}

pub struct TestApp {
    pub addr: String,
    pub http: reqwest::Client,
    pub state: Arc<seckill::AppState>,
    cancel: tokio_util::sync::CancellationToken,
    server: std::sync::Mutex<Option<tokio::task::JoinHandle<std::io::Result<()>>>>,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// No background work: tests drive the sweeper and reconciler themselves.
pub fn quiet() -> Background {
    Background {
        monitor: false,
        sweeper: false,
        reconciler: false,
    }
}

/// An engine on the shared cluster's g0 for items, whose users from `dead_from` up live on a
/// group whose server is gone (users below it on g0): transaction 2 fails for them.
pub async fn spawn_with_dead_users(dead_from: u64, coalesce: bool) -> TestApp {
    let dead_port = free_port_block(1);
    let user_ranges = if dead_from == 0 {
        "{ start = 0, group = \"gone\" }".to_string()
    } else {
        format!("{{ start = 0, end = {dead_from}, group = \"g0\" }}, {{ start = {dead_from}, group = \"gone\" }}")
    };
    let c = cluster();
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_token = \"{TOKEN}\"\nmigrate_on_start = false\n\
         [auth]\nhs256_secret = \"{USER_SECRET}\"\n\
         [[groups]]\nname = \"g0\"\nmaster = \"{}\"\nmaster_admin = \"{}\"\n\
         [[groups]]\nname = \"gone\"\nmaster = \"host=127.0.0.1 port={dead_port} user=seckill dbname=seckill connect_timeout=1\"\n\
         [routing.items]\nstrategy = \"range\"\nranges = [{{ start = 0, group = \"g0\" }}]\n\
         [routing.users]\nstrategy = \"range\"\nranges = [{user_ranges}]\n\
         [coalesce]\nenabled = {coalesce}\n",
        c.dsn(&c.groups[0].master),
        c.admin_dsn(&c.groups[0].master),
    );
    let mut config = Config::from_toml(&toml, "test").expect("config");
    config.server.layout_guard = false;
    spawn_config(config, quiet()).await
}

/// Fire every (user, quantity) purchase at once, each a well-behaved client (buy_retrying).
pub async fn buy_all(
    app: &Arc<TestApp>,
    sale: u64,
    item: u64,
    asks: Vec<(u64, u32)>,
) -> Vec<(u64, u32, Resp)> {
    let handles: Vec<_> = asks
        .into_iter()
        .map(|(user, q)| {
            let app = app.clone();
            tokio::spawn(
                async move { (user, q, app.buy_retrying(sale, item, user, q, None).await) },
            )
        })
        .collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("buyer task"));
    }
    out
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

pub async fn spawn_app_with(tweak: impl FnOnce(&mut Config)) -> TestApp {
    let mut config = base_config(cluster());
    tweak(&mut config);
    spawn_config(
        config,
        Background {
            monitor: false,
            ..Default::default()
        },
    )
    .await
}

pub async fn spawn_config(config: Config, background: Background) -> TestApp {
    spawn_built(config, background, None).await
}

/// An engine on `cluster` whose healer brings its old masters and dead or frozen shadows back as
/// streaming shadows, as `seckill dev` does.
pub async fn spawn_healing(
    config: Config,
    background: Background,
    cluster: &LocalCluster,
) -> TestApp {
    spawn_built(config, background, Some(cluster)).await
}

async fn spawn_built(
    config: Config,
    background: Background,
    healing: Option<&LocalCluster>,
) -> TestApp {
    // `RUST_LOG=seckill=debug cargo test ... -- --nocapture` shows the engine's log.
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
    let app = Application::build_with(config, background)
        .await
        .expect("app builds");
    if let Some(cluster) = healing {
        app.spawn_healer(cluster.servers());
    }
    serve(app)
}

/// Serve a built engine in the background.
fn serve(app: Application) -> TestApp {
    let addr = format!("http://{}", app.local_addr());
    let state = app.state();
    let cancel = app.shutdown_token();
    let server = tokio::spawn(app.run());
    TestApp {
        server: std::sync::Mutex::new(Some(server)),
        addr,
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(512)
            .timeout(Duration::from_secs(30))
            .build()
            .expect("http client"),
        state,
        cancel,
    }
}

static NEXT_ITEM: AtomicU64 = AtomicU64::new(0);

/// An item id no other test (or earlier run) uses.
pub fn fresh_item() -> u64 {
    let base = NEXT_ITEM.fetch_add(1, Ordering::SeqCst);
    (rand_u64() % (1 << 40)) * 1000 + base + 1
}

/// A fresh item id that the default hash routing puts in group `group`.
pub fn fresh_item_in(app: &TestApp, group: usize) -> u64 {
    loop {
        let id = fresh_item();
        if app.state.router.route(seckill::router::KeyKind::Items, id) == group {
            return id;
        }
    }
}

pub struct Resp {
    pub status: StatusCode,
    pub body: Value,
    pub headers: reqwest::header::HeaderMap,
}

impl Resp {
    pub fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or("")
    }
}

impl TestApp {
    /// Shut the server down (as SIGTERM does) and wait at most `limit` for it to stop.
    pub async fn stop_and_wait(&self, limit: Duration) -> bool {
        self.cancel.cancel();
        let server = self.server.lock().unwrap().take();
        match server {
            Some(h) => tokio::time::timeout(limit, h).await.is_ok(),
            None => true,
        }
    }

    pub async fn send(&self, req: reqwest::RequestBuilder) -> Resp {
        let resp = req.send().await.expect("request sent");
        let status = resp.status();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Resp {
            status,
            body,
            headers,
        }
    }

    /// POST, as the user a `/v1/users/{user}/...` path names (with that user's token).
    pub async fn post(&self, path: &str, body: Value) -> Resp {
        let mut req = self.http.post(format!("{}{path}", self.addr)).json(&body);
        if let Some(u) = user_of(path) {
            req = req.bearer_auth(user_token(u));
        }
        self.send(req).await
    }

    /// GET, as the user a `/v1/users/{user}/...` path names (with that user's token).
    pub async fn get(&self, path: &str) -> Resp {
        let mut req = self.http.get(format!("{}{path}", self.addr));
        if let Some(u) = user_of(path) {
            req = req.bearer_auth(user_token(u));
        }
        self.send(req).await
    }

    /// POST with `user`'s token.
    pub async fn post_as(&self, user: u64, path: &str, body: Value) -> Resp {
        self.send(
            self.http
                .post(format!("{}{path}", self.addr))
                .bearer_auth(user_token(user))
                .json(&body),
        )
        .await
    }

    /// The payment service's callback, signed with the test payment secret.
    pub async fn pay(
        &self,
        user: u64,
        order_id: &str,
        amount_cents: i64,
        payment_ref: &str,
    ) -> Resp {
        let body = json!({"order_id": order_id, "user_id": user, "amount_cents": amount_cents,
                          "payment_ref": payment_ref})
        .to_string();
        let t = chrono::Utc::now().timestamp();
        let sig = seckill::auth::signature::sign(&Secret::new(PAYMENT_SECRET), t, body.as_bytes());
        self.send(
            self.http
                .post(format!("{}/v1/payments", self.addr))
                .header("content-type", "application/json")
                .header("seckill-signature", sig)
                .body(body),
        )
        .await
    }

    pub async fn admin_get(&self, path: &str) -> Resp {
        self.admin(reqwest::Method::GET, path, None).await
    }

    /// An admin request, with a JSON body when given.
    pub async fn admin(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Resp {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.addr))
            .bearer_auth(TOKEN);
        if let Some(b) = body {
            req = req.json(&b);
        }
        self.send(req).await
    }

    /// Create a sale that is open now (unless times are given) and return its id.
    pub async fn create_sale(&self, items: Value) -> u64 {
        let now = chrono::Utc::now();
        self.create_sale_at(
            items,
            now - chrono::Duration::minutes(1),
            now + chrono::Duration::hours(1),
            None,
        )
        .await
    }

    pub async fn create_sale_at(
        &self,
        items: Value,
        starts: chrono::DateTime<chrono::Utc>,
        ends: chrono::DateTime<chrono::Utc>,
        window: Option<u32>,
    ) -> u64 {
        let mut body = json!({"name": "test sale", "starts_at": starts.to_rfc3339(), "ends_at": ends.to_rfc3339(), "items": items});
        if let Some(w) = window {
            body["payment_window_secs"] = json!(w);
        }
        let r = self
            .send(
                self.http
                    .post(format!("{}/v1/admin/sales", self.addr))
                    .bearer_auth(TOKEN)
                    .json(&body),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "create sale: {:?}", r.body);
        r.body["sale_id"].as_u64().expect("sale_id")
    }

    pub async fn buy(
        &self,
        sale: u64,
        item: u64,
        user: u64,
        quantity: u32,
        request_id: Option<&str>,
    ) -> Resp {
        let mut body = json!({"user_id": user, "quantity": quantity});
        if let Some(r) = request_id {
            body["request_id"] = json!(r);
        }
        self.send(
            self.http
                .post(format!("{}/v1/sales/{sale}/items/{item}/orders", self.addr))
                .bearer_auth(user_token(user))
                .json(&body),
        )
        .await
    }

    /// Buy as a well-behaved client does: one request_id for the purchase, retried with that same
    /// id while the engine answers 503 (so an attempt whose outcome was unknown is settled), backing
    /// off with jitter between attempts (a 503 is cheap for the engine; a retry loop without
    /// backoff would only measure how fast two cores can say no).
    pub async fn buy_retrying(
        &self,
        sale: u64,
        item: u64,
        user: u64,
        quantity: u32,
        request_id: Option<&str>,
    ) -> Resp {
        let own_id = uuid::Uuid::new_v4().to_string();
        let request_id = Some(request_id.unwrap_or(&own_id));
        let start = std::time::Instant::now();
        let mut pause = 20u64;
        while start.elapsed() < Duration::from_secs(60) {
            let r = self.buy(sale, item, user, quantity, request_id).await;
            if r.status == StatusCode::TOO_MANY_REQUESTS {
                // As a client should: wait as long as Retry-After says.
                let secs: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
                assert!(secs >= 1, "Retry-After is at least a second");
                tokio::time::sleep(Duration::from_secs(secs)).await;
                continue;
            }
            if r.status != StatusCode::SERVICE_UNAVAILABLE {
                return r;
            }
            if r.code() == "overloaded" {
                // The item's gate is full: as a client should, wait the Retry-After it gives
                // (jittered). Two thousand buyers retrying it within 400 ms kept a debug engine on
                // a slow night answering 503s instead of selling, past this loop's minute.
                let secs: u64 = r
                    .headers
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok()?.parse().ok())
                    .unwrap_or(1);
                tokio::time::sleep(Duration::from_millis(secs * 1000 + rand_u64() % 500)).await;
                continue;
            }
            eprintln!("buy: 503 {}, retrying", r.body);
            tokio::time::sleep(Duration::from_millis(pause / 2 + rand_u64() % pause)).await;
            pause = (pause * 2).min(400);
        }
        panic!("still 503 after 60 s");
    }

    pub async fn remaining(&self, sale: u64, item: u64) -> i64 {
        let r = self.get(&format!("/v1/sales/{sale}")).await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        r.body["items"]
            .as_array()
            .expect("items")
            .iter()
            .find(|i| i["item_id"].as_u64() == Some(item))
            .expect("item in sale")["remaining"]
            .as_i64()
            .expect("remaining")
    }

    pub async fn audit(&self, sale: u64) -> Value {
        let r = self
            .admin_get(&format!("/v1/admin/sales/{sale}/audit"))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        r.body
    }

    /// Run SQL on a group's master directly (bypassing the engine) and return the first column
    /// of the first row as i64.
    pub async fn sql_i64(&self, group: usize, sql: &str) -> i64 {
        let client = self
            .state
            .cluster
            .group(group)
            .writer()
            .await
            .expect("connection");
        client.query_one(sql, &[]).await.expect("query").get(0)
    }
}

/// Poll `check` every 50 ms until it returns true or `limit` passes.
/// The kinds of the changes an audit records (`paused`, `restock`, ...), oldest first.
pub fn change_kinds(audit: &Value) -> Vec<String> {
    audit["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .map(|c| c["change"].as_str().unwrap_or("").to_string())
        .collect()
}

pub async fn eventually<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}
