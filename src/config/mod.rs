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
mod validate;

use validate::positive;

pub use dsn::Dsn;
pub(crate) use dsn::{Resolved, TlsMode};
pub(crate) use frontdoor::FrontDoorConfig;
pub use secret::Secret;

use serde::Deserialize;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// Default number of hash slots (docs/dba.md "Routing"). Never change it for a live cluster: keys would move.
pub(crate) const DEFAULT_SLOTS: u32 = 1024;

/// Longest payment window, of the configuration and of a sale: 7 days.
pub(crate) const MAX_PAYMENT_WINDOW_SECS: u32 = 7 * 24 * 3600;

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
    pub(crate) auth: AuthConfig,
    #[serde(default)]
    pub(crate) payments: PaymentsConfig,
    #[serde(default)]
    pub frontdoor: FrontDoorConfig,
    /// Password of member DSNs that name none: `SECKILL_DB_PASSWORD` (not read from the file).
    #[serde(skip)]
    pub(crate) db_password: Option<Secret>,
    /// Password of admin DSNs that name none: `SECKILL_DB_ADMIN_PASSWORD` (not read from the file).
    #[serde(skip)]
    pub(crate) db_admin_password: Option<Secret>,
}

/// How users prove who they are (`[auth]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct AuthConfig {
    /// `jwt` (default): every user-facing endpoint needs `Authorization: Bearer <JWT>`, whose `sub`
    /// is the user id. `none`: trust the caller's `user_id` (only behind a gateway that already
    /// authenticated it; logged as a warning at start).
    pub users: UsersAuth,
    /// Shared secret for HS256 tokens (at least 32 characters). `SECKILL_USER_TOKEN_SECRET`
    /// overrides it.
    pub(crate) hs256_secret: Option<Secret>,
    /// PEM file with one or more public keys (RSA, EC P-256, Ed25519) for RS256/ES256/EdDSA
    /// tokens, e.g. the identity provider's.
    pub(crate) public_key_file: Option<std::path::PathBuf>,
    /// JWKS file (`{"keys": [...]}`) with the identity provider's public keys; a token's `kid`
    /// picks one.
    pub(crate) jwks_file: Option<std::path::PathBuf>,
    /// Required `iss`, when set.
    pub issuer: Option<String>,
    /// Required `aud`, when set; must be set with `public_key_file` or `jwks_file` (an identity
    /// provider signs tokens for other services too).
    pub(crate) audience: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`, in seconds. Default 30.
    pub(crate) leeway_secs: u64,
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
pub(crate) enum UsersAuth {
    #[default]
    Jwt,
    None,
}

/// The payment service's callbacks (`[payments]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct PaymentsConfig {
    /// HMAC-SHA256 key the payment service signs callbacks with (at least 16 characters).
    /// `SECKILL_PAYMENT_SECRET` overrides it. Without one, every callback is refused.
    pub secret: Option<Secret>,
    /// A signature's timestamp may be this far from the engine's clock, in seconds. Default 300.
    pub(crate) tolerance_secs: u64,
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
    pub(crate) body_limit_bytes: usize,
    /// Apply migrations to every group's master at start. Default true.
    pub migrate_on_start: bool,
    /// At start, how long to wait for a group found without a writable master (the health
    /// monitor running meanwhile: it may promote the shadow) before giving up, in ms. 0 gives up
    /// at once. Default 60000.
    pub start_wait_ms: u64,
    /// Largest body of the admin API's sale creation, in bytes: room for the largest sale
    /// ([`crate::sale::MAX_ITEMS`] items). Default 1048576.
    pub(crate) admin_body_limit_bytes: usize,
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
            start_wait_ms: 60_000,
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
    pub(crate) pool_size: usize,
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
    pub(crate) config_group: Option<String>,
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
    pub(crate) sweep_batch: i64,
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
    /// flight already form the next batch, which is where the gain comes from (the first batch
    /// only yields once, so that requests woken at the same moment join it: src/batcher.rs).
    pub(crate) max_wait_us: u64,
    /// Admission: at most this many times the item's remaining stock may be in flight. Default 4.
    pub inflight_per_stock: u32,
    /// Admission: most queued requests per item, whatever the stock. Default 4096.
    pub max_queue: usize,
    /// Admission: most buy requests in flight in this node over all items. Default 20000.
    pub(crate) max_inflight_total: usize,
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
    pub(crate) stream_timeout_ms: u64,
    /// The `application_name` the shadows connect to their master with (in their
    /// `primary_conninfo`); `synchronous_standby_names` names exactly it. Default `shadow`.
    pub(crate) shadow_name: String,
    /// Synchronous replication to the shadow, so a 201 means two servers hold the order. Default true.
    pub synchronous: bool,
    /// What the master does when no shadow streams: `block` (default) keeps commits waiting until
    /// a shadow is back; `degrade` switches to asynchronous commits after `shadow_loss_grace_ms`.
    pub shadow_loss: ShadowLossPolicy,
    /// How long a master waits for a lost shadow before degrading, in ms. Default 3000.
    pub(crate) shadow_loss_grace_ms: u64,
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
    pub(crate) fn load(path: &Path) -> Result<Self, ConfigError> {
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
    pub(crate) fn apply_env(&mut self) {
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
    pub(crate) fn members(&self, group: &GroupConfig) -> Result<Vec<Member>, ConfigError> {
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

    pub(crate) fn config_group(&self) -> &str {
        self.routing
            .config_group
            .as_deref()
            .unwrap_or_else(|| self.groups.first().map_or("", |g| g.name.as_str()))
    }

    pub(crate) fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.server.request_timeout_ms)
    }

    pub(crate) fn group_names(&self) -> Vec<String> {
        self.groups.iter().map(|g| g.name.clone()).collect()
    }
}

/// `host:port` of the first host in a DSN, used to refuse two members on one server.
pub(crate) fn endpoint_of(config: &tokio_postgres::Config) -> Option<String> {
    let host = match config.get_hosts().first()? {
        tokio_postgres::config::Host::Tcp(h) => h.clone(),
        tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    Some(format!("{host}:{port}"))
}

/// Parse `"0-511"` or `"7"` into an inclusive slot range.
pub(crate) fn parse_slot_range(text: &str) -> Option<(u32, u32)> {
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
mod tests;
