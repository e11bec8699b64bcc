//! Startup that tests can drive: [`Application::build`] connects the shard groups, applies
//! migrations, starts the background tasks and binds the listener (port 0 in tests), and returns
//! before serving so the caller knows the address.
//!
//! Background tasks (health monitors, table refresher, blocklist refresher, limiter cleanup,
//! front-door purge, sold-out refresher, expiry sweeper, reconciler) run under one cancellation token and one task tracker; shutdown cancels them and
//! waits for them with a bound.

use crate::config::Config;
use crate::order::OrderService;
use crate::router::Router;
use crate::shard::Cluster;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A release recorded in the outbox is left to the request that recorded it for this long before
/// the drainer takes over.
const OUTBOX_GRACE: Duration = Duration::from_secs(2);

/// Everything handlers share.
pub struct AppState {
    pub config: Arc<Config>,
    pub cluster: Arc<Cluster>,
    pub router: Arc<Router>,
    pub orders: Arc<OrderService>,
    pub admin_token: Option<crate::config::Secret>,
    /// Verifies user tokens.
    pub users: crate::auth::users::UserTokens,
    /// Order tokens, challenges, rate limits, the blocklist.
    pub frontdoor: crate::frontdoor::FrontDoor,
    /// The buyer's sale page and its assets.
    pub pages: crate::api::page::SalePages,
}

impl AppState {
    /// Connect to the shard groups, apply migrations (when configured) and find the writable
    /// members and the routing table; no listener, no background tasks. Used by the server and by
    /// one-shot commands such as `seckill reconcile`.
    pub async fn connect(config: Config, tasks: &TaskTracker) -> Result<Arc<Self>, StartError> {
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
        if config.server.migrate_on_start {
            crate::migrate::run(&cluster).await?;
        }
        let orders = OrderService::new(cluster.clone(), router.clone(), &config, tasks.clone());
        let frontdoor = crate::frontdoor::FrontDoor::new(&config, cluster.clone(), router.clone());
        let state = Arc::new(AppState {
            users,
            frontdoor,
            pages: Default::default(),
            admin_token: config.server.admin_token.clone(),
            config: config.clone(),
            cluster,
            router,
            orders,
        });
        refresh_table(&state).await;
        state.frontdoor.refresh_blocklist().await;
        Ok(state)
    }

    pub fn sales(&self) -> crate::sale::SaleService<'_> {
        crate::sale::SaleService {
            cluster: &self.cluster,
            router: &self.router,
            timeout: self.config.request_timeout(),
            default_window: self.config.orders.payment_window_secs,
        }
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
    #[error("migrations failed: {0}")]
    Migrate(#[from] crate::migrate::MigrateError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Which background tasks to run; tests switch some off to drive them by hand.
#[derive(Debug, Clone)]
pub struct Background {
    pub monitor: bool,
    pub sweeper: bool,
    pub reconciler: bool,
}

impl Default for Background {
    fn default() -> Self {
        Self {
            monitor: true,
            sweeper: true,
            reconciler: true,
        }
    }
}

pub struct Application {
    listener: TcpListener,
    state: Arc<AppState>,
    /// Stops the server (which then drains).
    cancel: CancellationToken,
    /// Stops the background tasks, once the server has drained.
    background: CancellationToken,
    tasks: TaskTracker,
}

impl Application {
    pub async fn build(config: Config) -> Result<Self, StartError> {
        Self::build_with(config, Background::default()).await
    }

    pub async fn build_with(config: Config, background: Background) -> Result<Self, StartError> {
        // The metrics recorder exists before the first request is counted.
        let _ = crate::telemetry::recorder();
        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();
        let state = AppState::connect(config, &tasks).await?;
        let config = state.config.clone();
        let listener = TcpListener::bind(config.server.listen)
            .await
            .map_err(|source| StartError::Bind {
                addr: config.server.listen,
                source,
            })?;
        let stop_background = CancellationToken::new();
        spawn_background(&state, &background, &stop_background, &tasks);
        Ok(Self {
            listener,
            state,
            cancel,
            background: stop_background,
            tasks,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| self.state.config.server.listen)
    }

    pub fn state(&self) -> Arc<AppState> {
        self.state.clone()
    }

    /// A token that stops the server and its background tasks when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Serve until the shutdown token fires, drain requests (`server.drain_ms`), then stop the
    /// background work (waiting at most 10 s for it).
    pub async fn run(self) -> std::io::Result<()> {
        let app = crate::api::router(self.state.clone());
        let cancel = self.cancel.clone();
        let server = &self.state.config.server;
        let limits = crate::api::server::Limits {
            max_connections: server.max_connections,
            header_read_timeout: Duration::from_millis(server.header_read_timeout_ms),
            drain: Duration::from_millis(server.drain_ms),
        };
        // Requests drain first; the background tasks (monitor, sweeper, ...) stop after them.
        let served = crate::api::server::serve(self.listener, app, limits, cancel).await;
        self.background.cancel();
        self.tasks.close();
        if tokio::time::timeout(Duration::from_secs(10), self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("background tasks did not stop within 10 s");
        }
        served
    }
}

async fn refresh_table(state: &AppState) {
    let Some((g, _)) = state.cluster.by_name(state.config.config_group()) else {
        return;
    };
    let table = state.router.table();
    let read = state
        .cluster
        .group(g)
        .run::<_, crate::order::OrderError>(
            crate::shard::Work::Settle,
            state.config.request_timeout(),
            async |c| Ok(table.refresh(c).await?),
        )
        .await;
    if let Err(e) = read {
        tracing::warn!(error = %e, "cannot read the router-config table");
    }
}

/// Run `work` every `every` until cancelled.
fn every<F, Fut>(
    name: &'static str,
    every: Duration,
    cancel: &CancellationToken,
    tasks: &TaskTracker,
    work: F,
) where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let cancel = cancel.clone();
    tasks.spawn(async move {
        tracing::debug!(task = name, "background task started");
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => work().await,
            }
        }
        tracing::debug!(task = name, "background task stopped");
    });
}

fn spawn_background(
    state: &Arc<AppState>,
    background: &Background,
    cancel: &CancellationToken,
    tasks: &TaskTracker,
) {
    let config = &state.config;
    if background.monitor {
        tasks.spawn(crate::shard::monitor::run(
            state.cluster.clone(),
            config.failover.clone(),
            cancel.clone(),
        ));
    }
    let s = state.clone();
    every(
        "router-table",
        Duration::from_millis(config.routing.table_refresh_ms.max(50)),
        cancel,
        tasks,
        move || {
            let s = s.clone();
            async move { refresh_table(&s).await }
        },
    );
    let s = state.clone();
    every(
        "blocklist",
        Duration::from_millis(config.frontdoor.blocklist_refresh_ms.max(50)),
        cancel,
        tasks,
        move || {
            let s = s.clone();
            async move { s.frontdoor.refresh_blocklist().await }
        },
    );
    let s = state.clone();
    every(
        "limiter-cleanup",
        Duration::from_millis(config.frontdoor.limiter_cleanup_ms.max(50)),
        cancel,
        tasks,
        move || {
            let s = s.clone();
            async move { s.frontdoor.cleanup_limiters() }
        },
    );
    let s = state.clone();
    every(
        "front-door-purge",
        Duration::from_secs(60),
        cancel,
        tasks,
        move || {
            let s = s.clone();
            async move { s.frontdoor.purge().await }
        },
    );
    let s = state.clone();
    let refresh = Duration::from_millis(config.coalesce.soldout_refresh_ms.max(50));
    let stop = cancel.clone();
    tasks.spawn(async move {
        // On every tick, and at once when an item sells out (to read its holders).
        let mut tick = tokio::time::interval(refresh);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
                _ = s.orders.sold_out_changed() => {}
            }
            s.orders.refresh_sold_out().await;
        }
    });
    if background.sweeper {
        let s = state.clone();
        every(
            "release-outbox",
            Duration::from_millis(config.orders.sweep_interval_ms.max(50)),
            cancel,
            tasks,
            move || {
                let s = s.clone();
                async move {
                    s.orders.drain_releases(OUTBOX_GRACE).await;
                }
            },
        );
        let s = state.clone();
        let batch = config.orders.sweep_batch;
        every(
            "expiry-sweeper",
            Duration::from_millis(config.orders.sweep_interval_ms.max(50)),
            cancel,
            tasks,
            move || {
                let s = s.clone();
                async move {
                    crate::reconcile::sweep(&s.orders, batch).await;
                }
            },
        );
    }
    if background.reconciler && config.orders.reconcile_interval_ms > 0 {
        let s = state.clone();
        let grace = Duration::from_secs(config.orders.reconcile_grace_secs.into());
        let reconciler = Arc::new(tokio::sync::Mutex::new(
            crate::reconcile::Reconciler::default(),
        ));
        every(
            "reconciler",
            Duration::from_millis(config.orders.reconcile_interval_ms),
            cancel,
            tasks,
            move || {
                let (s, reconciler) = (s.clone(), reconciler.clone());
                async move {
                    reconciler.lock().await.pass(&s.orders, grace).await;
                }
            },
        );
    }
}
