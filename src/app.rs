//! Startup that tests can drive: [`Application::build`] makes the shared state
//! ([`crate::state::AppState::connect`]: the shard groups, migrations, the services), starts the
//! background tasks and binds the listener (port 0 in tests), and returns before serving so the
//! caller knows the address.
//!
//! Background tasks (health monitors, table refresher, blocklist refresher, limiter cleanup,
//! front-door purge, sold-out refresher, release-outbox drainer, expiry sweeper, reconciler) run
//! under one cancellation token and one task tracker; shutdown cancels them and waits for them
//! with a bound.

use crate::config::Config;
pub use crate::state::AppState;
pub(crate) use crate::state::StartError;
use futures::future::BoxFuture;
use futures::FutureExt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A release recorded in the outbox is left to the request that recorded it for this long before
/// the drainer takes over.
const OUTBOX_GRACE: Duration = Duration::from_secs(2);

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
    pub(crate) async fn build(config: Config) -> Result<Self, StartError> {
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

    /// Heal the members whose servers this process controls (the dev cluster's, the test
    /// harness's): [`crate::shard::heal`]. Runs with the other background tasks until shutdown.
    pub fn spawn_healer(&self, servers: crate::shard::heal::Servers) {
        self.tasks.spawn(crate::shard::heal::run(
            self.state.cluster.clone(),
            servers,
            self.state.config.failover.shadow_name.clone(),
            self.background.clone(),
        ));
    }

    /// A token that stops the server and its background tasks when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Serve until the shutdown token fires, drain requests (`server.drain_ms`), then stop the
    /// background work (waiting at most 10 s for it).
    pub async fn run(self) -> std::io::Result<()> {
        let app = crate::api::front(self.state.clone());
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

/// The background tasks, each on its own period.
// Long on purpose: the list of background tasks, one short block each.
fn spawn_background(
    state: &Arc<AppState>,
    background: &Background,
    cancel: &CancellationToken,
    tasks: &TaskTracker,
) {
    let config = &state.config;
    let ms = |v: u64| Duration::from_millis(v.max(50));
    // Run `work` on the shared state every `period`.
    let periodic = |name, period, work: fn(Arc<AppState>) -> BoxFuture<'static, ()>| {
        let s = state.clone();
        every(name, period, cancel, tasks, move || work(s.clone()));
    };
    if background.monitor {
        tasks.spawn(crate::shard::monitor::run(
            state.cluster.clone(),
            config.failover.clone(),
            cancel.clone(),
        ));
    }
    periodic("router-table", ms(config.routing.table_refresh_ms), |s| {
        async move { s.refresh_table().await }.boxed()
    });
    periodic("fair-draws", Duration::from_millis(200), |s| {
        async move { s.fair.run_due_draws().await }.boxed()
    });
    periodic("fair-waiters", crate::fair::POLL, |s| {
        async move { s.fair.poll_waiters().await }.boxed()
    });
    periodic("moves", Duration::from_secs(2), |s| {
        async move { s.moves.resume_pending().await }.boxed()
    });
    periodic(
        "blocklist",
        ms(config.frontdoor.blocklist_refresh_ms),
        |s| async move { s.frontdoor.refresh_blocklist().await }.boxed(),
    );
    periodic(
        "limiter-cleanup",
        ms(config.frontdoor.limiter_cleanup_ms),
        |s| async move { s.frontdoor.cleanup_limiters() }.boxed(),
    );
    periodic("front-door-purge", Duration::from_secs(60), |s| {
        async move { s.frontdoor.purge().await }.boxed()
    });
    spawn_sold_out_refresher(state, ms(config.coalesce.soldout_refresh_ms), cancel, tasks);
    if background.sweeper {
        let period = ms(config.orders.sweep_interval_ms);
        periodic("release-outbox", period, |s| {
            async move {
                s.orders.drain_releases(OUTBOX_GRACE).await;
            }
            .boxed()
        });
        periodic("expiry-sweeper", period, |s| {
            async move {
                let batch = s.config.orders.sweep_batch;
                crate::reconcile::sweep(&s.orders, batch).await;
            }
            .boxed()
        });
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

/// The sold-out refresher: on every tick, and at once when an item sells out (to read its
/// holders).
fn spawn_sold_out_refresher(
    state: &Arc<AppState>,
    refresh: Duration,
    cancel: &CancellationToken,
    tasks: &TaskTracker,
) {
    let (s, stop) = (state.clone(), cancel.clone());
    tasks.spawn(async move {
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
}
