//! The state every handler and background task shares ([`AppState`]), and how it is made: connect
//! the shard groups, apply migrations, build the order service, the router and the front door.
//! Below the HTTP layer (`api`) and the server's startup (`app`), which both use it.

use crate::config::Config;
use crate::order::OrderService;
use crate::router::Router;
use crate::shard::Cluster;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio_util::task::TaskTracker;

/// Everything handlers share.
pub struct AppState {
    pub config: Arc<Config>,
    pub cluster: Arc<Cluster>,
    pub router: Arc<Router>,
    pub orders: Arc<OrderService>,
    pub admin_token: Option<crate::config::Secret>,
    /// Verifies user tokens.
    pub(crate) users: crate::auth::users::UserTokens,
    /// Order tokens, challenges, rate limits, the blocklist.
    pub frontdoor: crate::frontdoor::FrontDoor,
    /// Live moves of keys between groups.
    pub moves: Arc<crate::moves::Mover>,
    /// Fair starts: window entries and draws.
    pub(crate) fair: Arc<crate::fair::FairStart>,
    /// `GET /v1/sales/{id}` as served lately ([`crate::sale::cache`]).
    pub(crate) sale_views: crate::sale::cache::ViewCache,
}

impl AppState {
    /// Connect to the shard groups, apply migrations (when configured) and find the writable
    /// members and the routing table; no listener, no background tasks. Used by the server and by
    /// one-shot commands such as `seckill reconcile`.
    pub(crate) async fn connect(
        config: Config,
        tasks: &TaskTracker,
    ) -> Result<Arc<Self>, StartError> {
        let config = Arc::new(config);
        let users = crate::auth::users::UserTokens::new(&config.auth)?;
        if config.auth.users == crate::config::UsersAuth::None {
            tracing::warn!(
                "auth.users = \"none\": user ids are trusted as given; only run this behind a \
                 gateway that authenticates users"
            );
        }
        let cluster = Arc::new(Cluster::new(&config)?);
        let router = Arc::new(Router::from_config(&config)?);
        // Know the writable members before migrating and before the first request.
        cluster.discover().await;
        // The groups the start-up checks below write to: every one for the migrations, the
        // config group for the layout check.
        let needed: Vec<usize> = if config.server.migrate_on_start {
            (0..cluster.groups.len()).collect()
        } else if config.server.layout_guard {
            vec![cluster.config_group()]
        } else {
            Vec::new()
        };
        if !needed.is_empty() && config.server.start_wait_ms > 0 {
            let missing = cluster
                .until_writable(
                    &needed,
                    std::time::Duration::from_millis(config.server.start_wait_ms),
                )
                .await;
            if !missing.is_empty() {
                return Err(StartError::NoMaster {
                    groups: missing.join(", "),
                    waited_ms: config.server.start_wait_ms,
                    why: why_no_master(&config.failover),
                });
            }
            for &g in &needed {
                let group = cluster.group(g);
                if group.durability() == crate::shard::Durability::NotDurable {
                    tracing::warn!(group = %group.name,
                        "the master has no shadow streaming synchronously: a migration's commit \
                         waits for one (the healer, or a person, must bring the shadow back)");
                }
            }
        }
        if config.server.migrate_on_start {
            crate::migrate::run(&cluster).await?;
        }
        if config.server.layout_guard {
            crate::router::layout::guard(&config, &cluster, config.server.accept_layout_change)
                .await?;
        }
        let orders = OrderService::new(cluster.clone(), router.clone(), &config, tasks.clone());
        let frontdoor = crate::frontdoor::FrontDoor::new(&config, cluster.clone(), router.clone());
        let moves = crate::moves::Mover::new(
            config.clone(),
            cluster.clone(),
            router.clone(),
            tasks.clone(),
        );
        let fair =
            crate::fair::FairStart::new(cluster.clone(), router.clone(), orders.clone(), &config);
        let state = Arc::new(AppState {
            sale_views: crate::sale::cache::ViewCache::new(std::time::Duration::from_millis(
                config.server.sale_view_cache_ms,
            )),
            fair,
            users,
            frontdoor,
            admin_token: config.server.admin_token.clone(),
            config: config.clone(),
            cluster,
            router,
            orders,
            moves,
        });
        state.refresh_table().await;
        state.frontdoor.refresh_blocklist().await;
        Ok(state)
    }

    /// Read the router-config table (the `table` routing strategy) from the config group.
    pub(crate) async fn refresh_table(&self) {
        if let Err(e) = self.maps().refresh().await {
            tracing::warn!(error = %e, "cannot read the router-config table");
        }
    }

    /// The shard map as DBAs see and change it.
    pub(crate) fn maps(&self) -> crate::shardmap::Maps<'_> {
        crate::shardmap::Maps {
            config: &self.config,
            cluster: &self.cluster,
            router: &self.router,
        }
    }

    pub(crate) fn sales(&self) -> crate::sale::SaleService<'_> {
        crate::sale::SaleService {
            cluster: &self.cluster,
            router: &self.router,
            timeout: self.config.request_timeout(),
            default_window: self.config.orders.payment_window_secs,
        }
    }
}

/// Why a start can wait in vain for a group's master, by failover mode.
fn why_no_master(failover: &crate::config::FailoverConfig) -> &'static str {
    if !failover.enabled {
        "failover is off (failover.enabled = false): promote the shadow by hand"
    } else if failover.mode == crate::config::FailoverMode::External {
        "failover.mode = \"external\": the engine never promotes; the HA manager (Patroni) has not"
    } else {
        "its master silent and its shadow not promotable: dead too, missing, or still hearing the \
         master (the log says which)"
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Shard(#[from] crate::shard::ShardError),
    #[error("auth: {0}")]
    Auth(#[from] crate::auth::users::KeyError),
    #[error(transparent)]
    Layout(#[from] crate::router::layout::LayoutError),
    #[error("migrations failed: {0}")]
    Migrate(#[from] crate::migrate::MigrateError),
    #[error(
        "no writable master in group {groups} after waiting {waited_ms} ms \
         (server.start_wait_ms): {why}"
    )]
    NoMaster {
        groups: String,
        waited_ms: u64,
        why: &'static str,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}
