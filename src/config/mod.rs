//! shards.toml: the engine's whole configuration, as plain data with documented defaults.
//!
//! One `validate()` checks everything that can be checked without a network: one master per group,
//! unique group names and hosts, every slot of the hash slot map owned by exactly one known group,
//! ranges that cover the whole key space without overlap. Errors name the field and the reason so a
//! DBA can fix the file without reading code. Secrets may come from the environment, which
//! overrides the file: `SECKILL_ADMIN_TOKEN` (`server.admin_token`), `SECKILL_USER_TOKEN_SECRET`
//! (`auth.hs256_secret`), `SECKILL_PAYMENT_SECRET` (`payments.secret`), `SECKILL_TOKEN_KEY` (`frontdoor.token_keys`), and `SECKILL_DB_PASSWORD` /
//! `SECKILL_DB_ADMIN_PASSWORD` (the password of member / admin DSNs that name none). Secrets never
//! reach a log or a `Debug` output ([`Secret`], [`Dsn`]).
//!
//! This module imports nothing of the crate: it turns the file into plain data.

pub mod dsn;
pub mod frontdoor;
pub mod routing;
pub mod secret;

pub use dsn::{Dsn, Resolved, TlsMode};
pub use frontdoor::FrontDoorConfig;
pub use secret::Secret;

use serde::Deserialize;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// Default number of hash slots (docs/dba.md "Routing"). Never change it for a live cluster: keys would move.
pub const DEFAULT_SLOTS: u32 = 1024;

/// Longest payment window, of the configuration and of a sale: 7 days.
pub const MAX_PAYMENT_WINDOW_SECS: u32 = 7 * 24 * 3600;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: String,
        source: Box<toml::de::Error>,
    },
    #[error("invalid config: `{field}`: {reason}")]
    Invalid { field: String, reason: String },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    /// The shard groups; at least one.
    pub groups: Vec<GroupConfig>,
    #[serde(default)]
    pub routing: RoutingConfig,
    #[serde(default)]
    pub orders: OrdersConfig,
    #[serde(default)]
    pub coalesce: CoalesceConfig,
    #[serde(default)]
    pub failover: FailoverConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub payments: PaymentsConfig,
    #[serde(default)]
    pub frontdoor: FrontDoorConfig,
    /// Password of member DSNs that name none: `SECKILL_DB_PASSWORD` (not read from the file).
    #[serde(skip)]
    pub db_password: Option<Secret>,
    /// Password of admin DSNs that name none: `SECKILL_DB_ADMIN_PASSWORD` (not read from the file).
    #[serde(skip)]
    pub db_admin_password: Option<Secret>,
}

/// How users prove who they are (`[auth]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// `jwt` (default): every user-facing endpoint needs `Authorization: Bearer <JWT>`, whose `sub`
    /// is the user id. `none`: trust the caller's `user_id` (only behind a gateway that already
    /// authenticated it; logged as a warning at start).
    pub users: UsersAuth,
    /// Shared secret for HS256 tokens (at least 32 characters). `SECKILL_USER_TOKEN_SECRET`
    /// overrides it.
    pub hs256_secret: Option<Secret>,
    /// PEM file with one or more public keys (RSA, EC P-256, Ed25519) for RS256/ES256/EdDSA
    /// tokens, e.g. the identity provider's.
    pub public_key_file: Option<std::path::PathBuf>,
    /// JWKS file (`{"keys": [...]}`) with the identity provider's public keys; a token's `kid`
    /// picks one.
    pub jwks_file: Option<std::path::PathBuf>,
    /// Required `iss`, when set.
    pub issuer: Option<String>,
    /// Required `aud`, when set; must be set with `public_key_file` or `jwks_file` (an identity
    /// provider signs tokens for other services too).
    pub audience: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`, in seconds. Default 30.
    pub leeway_secs: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            users: UsersAuth::Jwt,
            hs256_secret: None,
            public_key_file: None,
            jwks_file: None,
            issuer: None,
            audience: None,
            leeway_secs: 30,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum UsersAuth {
    #[default]
    Jwt,
    None,
}

/// The payment service's callbacks (`[payments]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PaymentsConfig {
    /// HMAC-SHA256 key the payment service signs callbacks with (at least 16 characters).
    /// `SECKILL_PAYMENT_SECRET` overrides it. Without one, every callback is refused.
    pub secret: Option<Secret>,
    /// A signature's timestamp may be this far from the engine's clock, in seconds. Default 300.
    pub tolerance_secs: u64,
}

impl Default for PaymentsConfig {
    fn default() -> Self {
        Self {
            secret: None,
            tolerance_secs: 300,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// HTTP listen address. Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// Bearer token for `/v1/admin/*`. Default: none, which disables the admin API until
    /// `SECKILL_ADMIN_TOKEN` is set. Must be at least 16 characters when set.
    pub admin_token: Option<Secret>,
    /// Largest accepted request body in bytes. Default 16384.
    pub body_limit_bytes: usize,
    /// Apply migrations to every group's master at start. Default true.
    pub migrate_on_start: bool,
    /// Largest body of the admin API's sale creation, in bytes: room for the largest sale
    /// ([`crate::sale::MAX_ITEMS`] items). Default 1048576.
    pub admin_body_limit_bytes: usize,
    /// Per-request budget for database work, in milliseconds. Default 5000.
    pub request_timeout_ms: u64,
    /// A whole HTTP request, body included, is answered within this many ms (503 `unavailable`
    /// after it; a purchase under way goes on). Must exceed `request_timeout_ms`. Default 15000.
    pub http_timeout_ms: u64,
    /// A client must send a whole request head within this many ms; keep-alive connections idle
    /// this long are closed too. Default 10000.
    pub header_read_timeout_ms: u64,
    /// Most open HTTP connections per engine node; one more is answered 503 `overloaded` and
    /// closed. Default 10000.
    pub max_connections: usize,
    /// On shutdown (SIGTERM, Ctrl-C), how long in-flight requests may take to finish, in ms.
    /// Default 10000.
    pub drain_ms: u64,
    /// `GET /v1/sales/{id}` is answered from a per-node cache at most this many ms old (one
    /// database read per sale per period, however many ask). 0 reads every time. Default 250.
    pub sale_view_cache_ms: u64,
    /// `GET /metrics` needs the admin token. Default false: open on the listener (keep the
    /// listener on a private network, or set this).
    pub metrics_need_admin: bool,
    /// `POST /dev/token` mints user tokens for the sale page's sign-in form: `seckill dev` only,
    /// never from a file.
    #[serde(skip)]
    pub dev_login: bool,
    /// Refuse to start when the routing layout would move existing keys (`layout` module):
    /// always on, except for test harnesses that share one database among engines routed
    /// differently on purpose. Never from a file.
    #[serde(skip)]
    pub layout_guard: bool,
    /// `--accept-layout-change`: record this configuration's layout as the cluster's.
    #[serde(skip)]
    pub accept_layout_change: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_token: None,
            body_limit_bytes: 16 * 1024,
            admin_body_limit_bytes: 1024 * 1024,
            migrate_on_start: true,
            request_timeout_ms: 5_000,
            http_timeout_ms: 15_000,
            header_read_timeout_ms: 10_000,
            max_connections: 10_000,
            drain_ms: 10_000,
            sale_view_cache_ms: 250,
            metrics_need_admin: false,
            dev_login: false,
            layout_guard: true,
            accept_layout_change: false,
        }
    }
}

/// One member of a group, its DSNs resolved for connecting.
#[derive(Debug, Clone)]
pub struct Member {
    /// `master` or `shadow`: its role in shards.toml.
    pub role: &'static str,
    /// The engine's own connections (the application role).
    pub conn: Resolved,
    /// Administration (see [`GroupConfig::master_admin`]).
    pub admin: Resolved,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    /// Unique group name, used by slot maps, ranges and the router-config table.
    pub name: String,
    /// libpq-style DSN of the master, e.g. `host=10.0.0.1 port=5432 user=seckill dbname=seckill`:
    /// the engine's application role (DML on its tables is all it needs).
    pub master: Dsn,
    /// DSN of the shadow (streaming replica). Optional: a group without one has no failover.
    #[serde(default)]
    pub shadow: Option<Dsn>,
    /// DSN of the master for administration — migrations, and in built-in failover mode the
    /// health probes, promotion, fencing and replication settings — with a role that may do them
    /// (a superuser). Default: `master`.
    #[serde(default)]
    pub master_admin: Option<Dsn>,
    /// The same for the shadow. Default: `shadow`.
    #[serde(default)]
    pub shadow_admin: Option<Dsn>,
    /// Connections per member in this engine node's pool. Default 16.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
}

fn default_pool_size() -> usize {
    16
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// Number of hash slots. Default 1024. Fixed for the life of a cluster.
    pub slots: u32,
    /// Group that holds the router-config table `shard_map`. Default: the first group.
    pub config_group: Option<String>,
    /// How often each engine node checks `shard_map` for changes, in ms. Default 1000.
    pub table_refresh_ms: u64,
    /// Routing of item keys (and sale ids, which live with the items' router).
    pub items: KindRouting,
    /// Routing of user keys.
    pub users: KindRouting,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            slots: DEFAULT_SLOTS,
            config_group: None,
            table_refresh_ms: 1_000,
            items: KindRouting::default(),
            users: KindRouting::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    #[default]
    Hash,
    Range,
    Table,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct KindRouting {
    /// `hash` (default), `range` or `table`.
    pub strategy: Strategy,
    /// Slot -> group map for `hash` (and the fallback of `table`). Default: slots split evenly
    /// over the groups in file order.
    pub slot_map: Vec<SlotAssignment>,
    /// Half-open key ranges for `range`; they must cover every key exactly once.
    pub ranges: Vec<RangeAssignment>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotAssignment {
    /// Inclusive slot range `"0-511"`, or a single slot `"7"`.
    pub slots: String,
    pub group: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RangeAssignment {
    /// First key of the range (inclusive).
    pub start: u64,
    /// First key after the range (exclusive). Omitted: up to the largest key.
    #[serde(default)]
    pub end: Option<u64>,
    pub group: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OrdersConfig {
    /// Payment window for sales that do not set one, in seconds. Default 900 (15 min).
    pub payment_window_secs: u32,
    /// How often each node's sweeper looks for expired orders, in ms. Default 1000.
    pub sweep_interval_ms: u64,
    /// Most orders one sweep expires per group. Default 500.
    pub sweep_batch: i64,
    /// How often the reconciler runs in each node, in ms (0 disables the background task). Default 30000.
    pub reconcile_interval_ms: u64,
    /// A reservation without an order is repaired only when older than this, in seconds. Default 60.
    pub reconcile_grace_secs: u32,
}

impl Default for OrdersConfig {
    fn default() -> Self {
        Self {
            payment_window_secs: 900,
            sweep_interval_ms: 1_000,
            sweep_batch: 500,
            reconcile_interval_ms: 30_000,
            reconcile_grace_secs: 60,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoalesceConfig {
    /// Serve concurrent buy requests for the items of one shard group with one transaction.
    /// Default true; `false` keeps one transaction per request (for comparison).
    pub enabled: bool,
    /// Most requests served by one transaction (over all its items). Default 256.
    pub max_batch: usize,
    /// How long the first request of a batch may wait for company, in microseconds, when no
    /// transaction is in flight for the group. Default 0: requests that arrive while one is in
    /// flight already form the next batch, which is where the gain comes from.
    pub max_wait_us: u64,
    /// Admission: at most this many times the item's remaining stock may be in flight. Default 4.
    pub inflight_per_stock: u32,
    /// Admission: most queued requests per item, whatever the stock. Default 4096.
    pub max_queue: usize,
    /// Admission: most buy requests in flight in this node over all items. Default 20000.
    pub max_inflight_total: usize,
    /// How often the sold-out cache re-reads the stock of items it holds sold out, in ms. Default 500.
    pub soldout_refresh_ms: u64,
}

impl Default for CoalesceConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_batch: 256,
            max_wait_us: 0,
            inflight_per_stock: 4,
            max_queue: 4096,
            max_inflight_total: 20_000,
            soldout_refresh_ms: 500,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FailoverConfig {
    /// `builtin` (default): the engine promotes shadows, fences old masters and manages
    /// synchronous replication. `external`: an HA manager (Patroni, pg_auto_failover, a managed
    /// service) does all of that; the engine only finds and follows the writable member.
    pub mode: FailoverMode,
    /// Promote shadows automatically (built-in mode). Default true.
    pub enabled: bool,
    /// Interval between health probes, in ms. Default 250.
    pub probe_interval_ms: u64,
    /// Timeout of one probe, in ms. Default 500.
    pub probe_timeout_ms: u64,
    /// Consecutive failed probes before the master is declared dead. Default 3 (about 1.5 s).
    pub failures_before_promote: u32,
    /// A shadow counts as having lost its master after this long without a message from it, in
    /// ms. The engine sets the shadow's `wal_receiver_timeout` to it and the master's
    /// `wal_sender_timeout` to twice it. Default 1500.
    pub stream_timeout_ms: u64,
    /// The `application_name` the shadows connect to their master with (in their
    /// `primary_conninfo`); `synchronous_standby_names` names exactly it. Default `shadow`.
    pub shadow_name: String,
    /// Synchronous replication to the shadow, so a 201 means two servers hold the order. Default true.
    pub synchronous: bool,
    /// What the master does when no shadow streams: `block` (default) keeps commits waiting until
    /// a shadow is back; `degrade` switches to asynchronous commits after `shadow_loss_grace_ms`.
    pub shadow_loss: ShadowLossPolicy,
    /// How long a master waits for a lost shadow before degrading, in ms. Default 3000.
    pub shadow_loss_grace_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FailoverMode {
    #[default]
    Builtin,
    External,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ShadowLossPolicy {
    Degrade,
    #[default]
    Block,
}

impl Default for FailoverConfig {
    fn default() -> Self {
        Self {
            mode: FailoverMode::Builtin,
            enabled: true,
            probe_interval_ms: 250,
            probe_timeout_ms: 500,
            failures_before_promote: 3,
            stream_timeout_ms: 1_500,
            shadow_name: "shadow".to_string(),
            synchronous: true,
            shadow_loss: ShadowLossPolicy::Block,
            shadow_loss_grace_ms: 3_000,
        }
    }
}

impl Config {
    /// Read, apply environment overrides, and validate.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: origin.to_string(),
            source: Box::new(source),
        })?;
        config.apply_env();
        config.validate()?;
        Ok(config)
    }

    /// Environment overrides for secrets (module docs).
    pub fn apply_env(&mut self) {
        if let Some(t) = secret::from_env("SECKILL_ADMIN_TOKEN") {
            self.server.admin_token = Some(t);
        }
        if let Some(t) = secret::from_env("SECKILL_USER_TOKEN_SECRET") {
            self.auth.hs256_secret = Some(t);
        }
        if let Some(t) = secret::from_env("SECKILL_PAYMENT_SECRET") {
            self.payments.secret = Some(t);
        }
        self.frontdoor.apply_env();
        self.db_password = secret::from_env("SECKILL_DB_PASSWORD");
        self.db_admin_password = secret::from_env("SECKILL_DB_ADMIN_PASSWORD");
    }

    /// The DSNs of one group's members, resolved: `(role, connection, administration)`.
    pub fn members(&self, group: &GroupConfig) -> Result<Vec<Member>, ConfigError> {
        let admin_pw = self
            .db_admin_password
            .as_ref()
            .or(self.db_password.as_ref());
        let mut out = Vec::new();
        for (role, dsn, admin) in [
            ("master", Some(&group.master), group.master_admin.as_ref()),
            ("shadow", group.shadow.as_ref(), group.shadow_admin.as_ref()),
        ] {
            let Some(dsn) = dsn else { continue };
            let index = self
                .groups
                .iter()
                .position(|g| g.name == group.name)
                .unwrap_or(0);
            let field = |f: &str| format!("groups[{index}].{f}");
            let conn = dsn
                .resolve(self.db_password.as_ref())
                .map_err(|e| invalid(field(role), format!("not a valid DSN: {e}")))?;
            let admin = match admin {
                Some(a) => a.resolve(admin_pw).map_err(|e| {
                    invalid(
                        field(&format!("{role}_admin")),
                        format!("not a valid DSN: {e}"),
                    )
                })?,
                None => conn.clone(),
            };
            out.push(Member { role, conn, admin });
        }
        Ok(out)
    }

    pub fn config_group(&self) -> &str {
        self.routing
            .config_group
            .as_deref()
            .unwrap_or_else(|| self.groups.first().map_or("", |g| g.name.as_str()))
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.server.request_timeout_ms)
    }

    /// Everything that can be checked without a network; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_groups()?;
        self.validate_server()?;
        self.validate_orders()?;
        self.validate_coalesce()?;
        self.validate_failover()?;
        self.validate_auth()?;
        self.frontdoor.validate()?;
        self.validate_routing()
    }

    fn validate_auth(&self) -> Result<(), ConfigError> {
        let a = &self.auth;
        if let Some(s) = &a.hs256_secret {
            if s.len() < 32 {
                return Err(invalid(
                    "auth.hs256_secret",
                    "must be at least 32 characters (or set SECKILL_USER_TOKEN_SECRET)",
                ));
            }
        }
        let keys = a.hs256_secret.is_some() || a.public_key_file.is_some() || a.jwks_file.is_some();
        if a.users == UsersAuth::Jwt && !keys {
            return Err(invalid(
                "auth",
                "users = \"jwt\" needs hs256_secret (or SECKILL_USER_TOKEN_SECRET), public_key_file or jwks_file",
            ));
        }
        // An identity provider's keys sign tokens for many services: without a required
        // audience, a token it minted for another of them would be taken here.
        let provider_keys = a.public_key_file.is_some() || a.jwks_file.is_some();
        if provider_keys && a.audience.as_deref().is_none_or(str::is_empty) {
            return Err(invalid(
                "auth.audience",
                "required with public_key_file or jwks_file: the `aud` your identity provider puts \
                 in tokens meant for this engine (others are refused)",
            ));
        }
        if let Some(s) = &self.payments.secret {
            if s.len() < 16 {
                return Err(invalid(
                    "payments.secret",
                    "must be at least 16 characters (or set SECKILL_PAYMENT_SECRET)",
                ));
            }
        }
        positive("payments.tolerance_secs", self.payments.tolerance_secs)
    }

    fn validate_groups(&self) -> Result<(), ConfigError> {
        if self.groups.is_empty() {
            return Err(invalid("groups", "at least one shard group is required"));
        }
        let mut names = HashSet::new();
        let mut hosts: HashMap<String, String> = HashMap::new();
        for (i, g) in self.groups.iter().enumerate() {
            let field = format!("groups[{i}]");
            if g.name.is_empty()
                || !g
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return Err(invalid(
                    format!("{field}.name"),
                    "must be non-empty letters, digits, '_' or '-'",
                ));
            }
            if !names.insert(g.name.as_str()) {
                return Err(invalid(
                    format!("{field}.name"),
                    format!("duplicate group name {:?}", g.name),
                ));
            }
            if g.pool_size == 0 || g.pool_size > 1024 {
                return Err(invalid(
                    format!("{field}.pool_size"),
                    "must be between 1 and 1024",
                ));
            }
            for m in self.members(g)? {
                let f = format!("{field}.{}", m.role);
                let endpoint = endpoint_of(&m.conn.pg)
                    .ok_or_else(|| invalid(f.clone(), "names no host and port"))?;
                if let Some(other) = hosts.insert(endpoint.clone(), f.clone()) {
                    return Err(invalid(
                        f,
                        format!("server {endpoint} is already used by {other}"),
                    ));
                }
            }
        }
        Ok(())
    }

    fn validate_server(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        if s.body_limit_bytes < 256 {
            return Err(invalid("server.body_limit_bytes", "must be at least 256"));
        }
        if s.admin_body_limit_bytes < s.body_limit_bytes {
            return Err(invalid(
                "server.admin_body_limit_bytes",
                "must be at least server.body_limit_bytes",
            ));
        }
        if let Some(t) = &s.admin_token {
            if t.len() < 16 {
                return Err(invalid(
                    "server.admin_token",
                    "must be at least 16 characters (or set SECKILL_ADMIN_TOKEN)",
                ));
            }
        }
        if s.request_timeout_ms < 100 {
            return Err(invalid("server.request_timeout_ms", "must be at least 100"));
        }
        if s.http_timeout_ms <= s.request_timeout_ms {
            return Err(invalid(
                "server.http_timeout_ms",
                "must be greater than server.request_timeout_ms",
            ));
        }
        positive("server.header_read_timeout_ms", s.header_read_timeout_ms)?;
        if s.sale_view_cache_ms > 10_000 {
            return Err(invalid(
                "server.sale_view_cache_ms",
                "must be at most 10000 (a sale's view older than that misleads buyers)",
            ));
        }
        positive("server.max_connections", s.max_connections as u64)
    }

    fn validate_orders(&self) -> Result<(), ConfigError> {
        let o = &self.orders;
        if !(1..=MAX_PAYMENT_WINDOW_SECS).contains(&o.payment_window_secs) {
            return Err(invalid(
                "orders.payment_window_secs",
                format!("must be between 1 and {MAX_PAYMENT_WINDOW_SECS} (7 days)"),
            ));
        }
        positive("orders.sweep_interval_ms", o.sweep_interval_ms)?;
        if o.sweep_batch <= 0 {
            return Err(invalid("orders.sweep_batch", "must be positive"));
        }
        if u64::from(o.reconcile_grace_secs) * 1000 < 2 * self.server.request_timeout_ms {
            // A shorter grace would tombstone orders whose transaction 2 is still in flight.
            return Err(invalid(
                "orders.reconcile_grace_secs",
                "must be at least twice server.request_timeout_ms",
            ));
        }
        Ok(())
    }

    fn validate_coalesce(&self) -> Result<(), ConfigError> {
        let c = &self.coalesce;
        positive("coalesce.max_batch", c.max_batch as u64)?;
        positive("coalesce.max_queue", c.max_queue as u64)?;
        positive("coalesce.max_inflight_total", c.max_inflight_total as u64)?;
        positive("coalesce.inflight_per_stock", c.inflight_per_stock.into())?;
        positive("coalesce.soldout_refresh_ms", c.soldout_refresh_ms)?;
        if c.max_wait_us > 1_000_000 {
            return Err(invalid(
                "coalesce.max_wait_us",
                "must be at most 1000000 (1 s)",
            ));
        }
        Ok(())
    }

    fn validate_failover(&self) -> Result<(), ConfigError> {
        let f = &self.failover;
        positive("failover.probe_interval_ms", f.probe_interval_ms)?;
        positive("failover.probe_timeout_ms", f.probe_timeout_ms)?;
        positive(
            "failover.failures_before_promote",
            f.failures_before_promote.into(),
        )?;
        positive("failover.shadow_loss_grace_ms", f.shadow_loss_grace_ms)?;
        if f.stream_timeout_ms < 500 {
            // The receiver pings an idle master at half of it; shorter would end healthy streams.
            return Err(invalid(
                "failover.stream_timeout_ms",
                "must be at least 500",
            ));
        }
        if f.shadow_name.is_empty()
            || !f
                .shadow_name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
        {
            return Err(invalid(
                "failover.shadow_name",
                "must be non-empty letters, digits, '_', '-' or '.'",
            ));
        }
        Ok(())
    }

    fn validate_routing(&self) -> Result<(), ConfigError> {
        if self.routing.slots == 0 || self.routing.slots > 65_536 {
            return Err(invalid("routing.slots", "must be between 1 and 65536"));
        }
        positive("routing.table_refresh_ms", self.routing.table_refresh_ms)?;
        if let Some(cg) = &self.routing.config_group {
            if !self.groups.iter().any(|g| &g.name == cg) {
                return Err(invalid(
                    "routing.config_group",
                    format!("unknown group {cg:?}"),
                ));
            }
        }
        for (kind, routing) in [
            ("items", &self.routing.items),
            ("users", &self.routing.users),
        ] {
            routing::resolve(kind, routing, self.routing.slots, &self.group_names())?;
        }
        Ok(())
    }

    pub fn group_names(&self) -> Vec<String> {
        self.groups.iter().map(|g| g.name.clone()).collect()
    }
}

fn positive(field: &str, value: u64) -> Result<(), ConfigError> {
    if value == 0 {
        return Err(invalid(field, "must be positive"));
    }
    Ok(())
}

/// `host:port` of the first host in a DSN, used to refuse two members on one server.
pub fn endpoint_of(config: &tokio_postgres::Config) -> Option<String> {
    let host = match config.get_hosts().first()? {
        tokio_postgres::config::Host::Tcp(h) => h.clone(),
        tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    Some(format!("{host}:{port}"))
}

/// Parse `"0-511"` or `"7"` into an inclusive slot range.
pub fn parse_slot_range(text: &str) -> Option<(u32, u32)> {
    let text = text.trim();
    match text.split_once('-') {
        Some((a, b)) => {
            let (a, b) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
            (a <= b).then_some((a, b))
        }
        None => text.parse().ok().map(|s| (s, s)),
    }
}

pub(crate) fn invalid_field(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    invalid(field, reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[[groups]]
name = "g0"
master = "host=127.0.0.1 port=5432 user=seckill dbname=seckill"
shadow = "host=127.0.0.1 port=5433 user=seckill dbname=seckill"
[[groups]]
name = "g1"
master = "host=127.0.0.1 port=5434 user=seckill dbname=seckill"
[auth]
hs256_secret = "0123456789abcdef0123456789abcdef"
"#;

    fn err(text: &str) -> String {
        match Config::from_toml(text, "test.toml") {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn minimal_config_has_defaults() {
        let c = Config::from_toml(BASE, "t").unwrap();
        assert_eq!(c.routing.slots, 1024);
        assert_eq!(c.groups[0].pool_size, 16);
        assert_eq!(c.config_group(), "g0");
        assert!(c.coalesce.enabled);
    }

    #[test]
    fn duplicate_group_names_are_named() {
        let text = BASE.replace("name = \"g1\"", "name = \"g0\"");
        assert!(err(&text).contains("groups[1].name"), "{}", err(&text));
    }

    #[test]
    fn duplicate_hosts_are_refused() {
        let text = BASE.replace("port=5434", "port=5432");
        let e = err(&text);
        assert!(
            e.contains("groups[1].master") && e.contains("already used"),
            "{e}"
        );
    }

    #[test]
    fn bad_dsn_is_named() {
        let text = BASE.replace("host=127.0.0.1 port=5434", "host=127.0.0.1 port=notaport");
        assert!(err(&text).contains("groups[1].master"));
    }

    #[test]
    fn slot_map_must_cover_every_slot() {
        let text = format!(
            "{BASE}\n[routing.items]\nstrategy = \"hash\"\nslot_map = [{{ slots = \"0-500\", group = \"g0\" }}, {{ slots = \"502-1023\", group = \"g1\" }}]\n"
        );
        let e = err(&text);
        assert!(
            e.contains("routing.items.slot_map") && e.contains("501"),
            "{e}"
        );
    }

    #[test]
    fn slot_map_unknown_group() {
        let text = format!(
            "{BASE}\n[routing.users]\nslot_map = [{{ slots = \"0-1023\", group = \"nope\" }}]\n"
        );
        assert!(err(&text).contains("unknown group"));
    }

    #[test]
    fn ranges_must_not_leave_gaps() {
        let text = format!(
            "{BASE}\n[routing.users]\nstrategy = \"range\"\nranges = [{{ start = 0, end = 100, group = \"g0\" }}, {{ start = 200, group = \"g1\" }}]\n"
        );
        let e = err(&text);
        assert!(e.contains("routing.users.ranges"), "{e}");
    }

    #[test]
    fn unknown_field_is_named() {
        let text = format!("{BASE}\n[server]\nlisten_addr = \"1.2.3.4:1\"\n");
        assert!(err(&text).contains("listen_addr"));
    }

    #[test]
    fn short_admin_token_refused() {
        let text = format!("{BASE}\n[server]\nadmin_token = \"short\"\n");
        assert!(err(&text).contains("server.admin_token"));
    }

    #[test]
    fn unknown_config_group() {
        let text = format!("{BASE}\n[routing]\nconfig_group = \"g9\"\n");
        assert!(err(&text).contains("routing.config_group"));
    }

    #[test]
    fn zero_durations_and_bad_relations_are_named() {
        for (section, line, field) in [
            (
                "failover",
                "probe_interval_ms = 0",
                "failover.probe_interval_ms",
            ),
            (
                "failover",
                "probe_timeout_ms = 0",
                "failover.probe_timeout_ms",
            ),
            (
                "failover",
                "stream_timeout_ms = 10",
                "failover.stream_timeout_ms",
            ),
            ("failover", "shadow_name = \"a'b\"", "failover.shadow_name"),
            (
                "coalesce",
                "soldout_refresh_ms = 0",
                "coalesce.soldout_refresh_ms",
            ),
            (
                "orders",
                "sweep_interval_ms = 0",
                "orders.sweep_interval_ms",
            ),
            (
                "orders",
                "payment_window_secs = 4294967295",
                "orders.payment_window_secs",
            ),
            (
                "server",
                "request_timeout_ms = 0",
                "server.request_timeout_ms",
            ),
            ("server", "http_timeout_ms = 4000", "server.http_timeout_ms"),
            (
                "server",
                "header_read_timeout_ms = 0",
                "server.header_read_timeout_ms",
            ),
            (
                "routing",
                "table_refresh_ms = 0",
                "routing.table_refresh_ms",
            ),
        ] {
            let text = format!("{BASE}\n[{section}]\n{line}\n");
            let e = err(&text);
            assert!(e.contains(field), "{line}: {e}");
        }
    }

    #[test]
    fn user_tokens_need_a_key_and_secrets_a_length() {
        let no_key = BASE.replace("hs256_secret = \"0123456789abcdef0123456789abcdef\"", "");
        assert!(err(&no_key).contains("auth"), "{}", err(&no_key));
        let trusting = format!("{no_key}users = \"none\"\n");
        assert!(Config::from_toml(&trusting, "t").is_ok());
        let short = BASE.replace("0123456789abcdef0123456789abcdef", "short");
        assert!(err(&short).contains("auth.hs256_secret"));
        let weak = format!("{BASE}[payments]\nsecret = \"short\"\n");
        assert!(err(&weak).contains("payments.secret"));
        let idp = no_key.replace("[auth]", "[auth]\njwks_file = \"/etc/seckill/jwks.json\"");
        assert!(err(&idp).contains("auth.audience"), "{}", err(&idp));
        let idp = idp.replace("[auth]", "[auth]\naudience = \"seckill\"");
        assert!(Config::from_toml(&idp, "t").is_ok());
    }

    #[test]
    fn secrets_and_passwords_never_reach_debug_output() {
        let text = format!(
            "{}\n[server]\nadmin_token = \"admin-token-admin-token\"\n[payments]\nsecret = \"payment-secret-xyz\"\n",
            BASE.replace("user=seckill dbname=seckill\"\nshadow", "user=seckill password=db-pass-123 dbname=seckill\"\nshadow")
        );
        let c = Config::from_toml(&text, "t").unwrap();
        let shown = format!("{c:?}");
        for secret in [
            "admin-token-admin-token",
            "payment-secret-xyz",
            "db-pass-123",
            "0123456789abcdef0123456789abcdef",
        ] {
            assert!(!shown.contains(secret), "{secret} leaked: {shown}");
        }
    }

    #[test]
    fn the_compose_deployment_configs_are_valid_with_their_environment() {
        for text in [
            include_str!("../../deploy/shards.compose.toml"),
            include_str!("../../deploy/shards.migrate.toml"),
            include_str!("../../deploy/patroni/shards.patroni.toml"),
        ] {
            let mut c: Config = toml::from_str(text).unwrap();
            c.auth.hs256_secret = Some(Secret::new("x".repeat(32)));
            c.validate().unwrap();
            assert!(c.groups.iter().all(|g| g.master_admin.is_some()));
            assert!(!text.contains("password="), "no password ships in the file");
        }
        let patroni: Config =
            toml::from_str(include_str!("../../deploy/patroni/shards.patroni.toml")).unwrap();
        assert_eq!(patroni.failover.mode, FailoverMode::External);
    }

    #[test]
    fn no_groups() {
        assert!(err("groups = []").contains("groups"));
    }

    #[test]
    fn slot_range_parsing() {
        assert_eq!(parse_slot_range("0-511"), Some((0, 511)));
        assert_eq!(parse_slot_range(" 7 "), Some((7, 7)));
        assert_eq!(parse_slot_range("9-3"), None);
        assert_eq!(parse_slot_range("x"), None);
    }
}
