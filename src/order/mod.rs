//! The order service: the two short transactions, compensation, idempotency, and the lifecycle
//! (pay, cancel, expiry).
//!
//! A purchase:
//! 1. the hot path answers from memory what it can ([`hot`]: sold out, overloaded);
//! 2. transaction 1 on the item's group ([`reservations::reserve_one`], or, coalesced through
//!    [`coalesce`], a batch of that group's buyers of any of its items: [`batch`]) decrements the
//!    stock and writes the reservation;
//! 3. transaction 2 on the user's group inserts the order (`order_id = txn_id`);
//! 4. if transaction 2 surely did not commit, a compensating release on the item's group returns the
//!    stock; if its outcome is unknown (connection lost mid-commit) nothing is undone: the reservation
//!    stays and the reconciler settles it by txn_id, while a retry with the same `request_id`
//!    finishes it;
//! 5. once the order exists, off the request path, the reservation is marked `ordered`.
//!
//! **A purchase finishes what it started, whatever the client does.** Once admitted, steps 2-4 run
//! as a task of their own that the HTTP handler merely awaits: a client that disconnects (hyper
//! then drops the handler) leaves the purchase running to its end — an order, or its stock back —
//! and its admission ticket is held until then, so a flood of send-and-close requests is bounded
//! like any other.
//!
//! **Replays.** The reservation row, keyed by txn_id, is the idempotency record: a retry with the
//! same `request_id` finds it in transaction 1 and resumes it, and its order is then read back.
//! No lookup runs before transaction 1, so a request id costs nothing on the way in. An order read
//! back for a replay is read durably ([`store::get_order_durable`]): never an order the shadow
//! does not hold yet. A replay of an order that was cancelled or has expired is refused with
//! `order_cancelled` / `order_expired` (the order in the body), never answered 201.
//!
//! Once an order exists, the order row on the user's group is the source of truth for its state;
//! the reservation follows it (order made -> `ordered`, pay -> `paid`, cancel/expiry ->
//! `released`). A cancel or an expiry
//! records the stock it must return in `release_outbox` in the same transaction as the status
//! change; the release follows at once, and when the item's group cannot be reached then (failing
//! over, say) every node's drainer retries it within seconds ([`OrderService::drain_releases`]).

pub mod allocate;
pub mod batch;
pub mod coalesce;
pub mod hot;
mod lifecycle;
pub mod payments;
mod purchase;
pub mod reservations;
pub mod store;

use crate::batcher::Batcher;
use crate::db::DbError;
use crate::domain::{txn_id_for, ItemId, Quantity, RequestId, SaleId, UserId};
use crate::router::{KeyKind, Router};
use crate::shard::{Cluster, GroupError, ShardError, Work};
use hot::{HotPath, Verdict};
use purchase::confirm_batcher;
use reservations::{Refusal, Reserved};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use store::{NewOrder, Order, OrderStatus};
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum OrderError {
    #[error("item {item} is not part of sale {sale}")]
    ItemNotFound { sale: SaleId, item: ItemId },
    #[error("order {0} not found")]
    OrderNotFound(Uuid),
    #[error("the sale has not started yet")]
    NotStarted,
    #[error("the sale has ended")]
    Ended,
    #[error("the sale is paused; buying resumes when the operator resumes it")]
    Paused,
    #[error("sold out ({remaining} left)")]
    SoldOut { remaining: i32 },
    #[error("per-user limit {limit} reached ({already} already bought)")]
    LimitExceeded { limit: i32, already: i64 },
    #[error("order {order_id} is {status}")]
    WrongState { order_id: Uuid, status: OrderStatus },
    /// A replayed purchase whose order was cancelled or has expired.
    #[error("this purchase's order {} is {}", .0.order_id, .0.status)]
    DeadOrder(Box<Order>),
    #[error("too many requests in flight for this item")]
    Overloaded,
    /// The item is being moved to another shard group and the switch took longer than a buyer
    /// waits for it.
    #[error("item {0} is moving to another shard group; retry shortly")]
    Moving(ItemId),
    #[error("shard group temporarily unavailable: {0}")]
    Unavailable(String),
    /// Work on a shard group failed; it says whether that work surely did not commit.
    #[error(transparent)]
    Group(#[from] GroupError),
}

/// A shard or database error of the order path's own making (a wait for a shadow that did not
/// come, a task lost, an insert a move turned away) means what it would mean from `run`.
impl From<ShardError> for OrderError {
    fn from(e: ShardError) -> Self {
        OrderError::Group(e.into())
    }
}

impl From<DbError> for OrderError {
    fn from(e: DbError) -> Self {
        OrderError::Group(e.into())
    }
}

impl OrderError {
    fn from_refusal(r: Refusal, sale: SaleId, item: ItemId) -> Self {
        match r {
            Refusal::NotFound => OrderError::ItemNotFound { sale, item },
            Refusal::NotStarted => OrderError::NotStarted,
            Refusal::Ended => OrderError::Ended,
            Refusal::SoldOut { remaining } => OrderError::SoldOut { remaining },
            Refusal::LimitExceeded { limit, already } => {
                OrderError::LimitExceeded { limit, already }
            }
            Refusal::Moving => OrderError::Moving(item),
            Refusal::Paused => OrderError::Paused,
            Refusal::InProgress => OrderError::Unavailable(
                "the same purchase (request_id) is being made right now; retry shortly with the \
                 same request_id to get its order"
                    .into(),
            ),
        }
    }
}

/// A buy request after validation.
#[derive(Debug, Clone)]
pub struct BuyRequest {
    pub sale: SaleId,
    pub item: ItemId,
    pub user: UserId,
    pub quantity: Quantity,
    pub request_id: Option<RequestId>,
}

/// The answer to a buy: the order, and whether it already existed (an idempotent replay).
#[derive(Debug, Clone)]
pub struct Bought {
    pub order: Order,
    pub replayed: bool,
}

pub struct OrderService {
    pub cluster: Arc<Cluster>,
    pub(crate) router: Arc<Router>,
    pub(crate) timeout: Duration,
    tasks: TaskTracker,
    coalescer: Option<coalesce::Coalescer>,
    pub hot: Arc<HotPath>,
    confirmer: Arc<Batcher<usize, Uuid, ()>>,
    /// When this node last re-read the router-config table for a writer that met a move's fence
    /// ([`Self::refresh_routes`]).
    routes_read: tokio::sync::Mutex<Option<std::time::Instant>>,
}

/// How long a writer that met a move's fence waits for the move to switch (then 503).
const FENCE_WAIT: Duration = Duration::from_secs(2);
/// Between two tries of a writer that met a fence; also the least time between two re-reads of
/// the router-config table on its behalf.
const REROUTE_PAUSE: Duration = Duration::from_millis(20);

/// How many outbox entries one drain handles per group.
const DRAIN_BATCH: i64 = 500;

impl OrderService {
    pub fn new(
        cluster: Arc<Cluster>,
        router: Arc<Router>,
        config: &crate::config::Config,
        tasks: TaskTracker,
    ) -> Arc<Self> {
        let timeout = config.request_timeout();
        let hot = Arc::new(HotPath::new(&config.coalesce));
        let coalescer = config.coalesce.enabled.then(|| {
            coalesce::Coalescer::new(
                cluster.clone(),
                router.clone(),
                hot.clone(),
                &config.coalesce,
                timeout,
                tasks.clone(),
            )
        });
        let confirmer = confirm_batcher(
            cluster.clone(),
            timeout,
            config.coalesce.max_batch.max(64),
            tasks.clone(),
        );
        Arc::new(Self {
            cluster,
            router,
            timeout,
            tasks,
            coalescer,
            hot,
            confirmer,
            routes_read: tokio::sync::Mutex::new(None),
        })
    }

    /// A writer met a move's fence: pause, then re-read the routes before it tries again (where the
    /// key routes then, the switched move's new group once it has switched).
    async fn await_reroute(&self) {
        tokio::time::sleep(REROUTE_PAUSE).await;
        self.refresh_routes().await;
    }

    /// Re-read the router-config table now, at most once per [`REROUTE_PAUSE`] however many
    /// writers ask (the others wait for the read in flight and use it).
    async fn refresh_routes(&self) {
        let mut last = self.routes_read.lock().await;
        if last.is_some_and(|t| t.elapsed() < REROUTE_PAUSE) {
            return;
        }
        let read = self
            .router
            .table()
            .refresh_from(&self.cluster, Work::Read, self.timeout)
            .await;
        if let Err(e) = read {
            tracing::debug!(error = %e, "router-config table not re-read");
        }
        *last = Some(std::time::Instant::now());
    }

    /// Run `work` on the user's group, as routed now.
    async fn on_user<T>(
        &self,
        user: UserId,
        kind: Work,
        work: impl AsyncFnOnce(&mut deadpool_postgres::Object) -> Result<T, DbError>,
    ) -> Result<T, GroupError> {
        let group = self.cluster.group(self.router.user_group(user));
        group.run(kind, self.timeout, work).await
    }

    /// Run `work` on the item's group, as routed now.
    async fn on_item<T>(
        &self,
        item: ItemId,
        kind: Work,
        work: impl AsyncFnOnce(&mut deadpool_postgres::Object) -> Result<T, DbError>,
    ) -> Result<T, GroupError> {
        let group = self.cluster.group(self.router.item_group(item));
        group.run(kind, self.timeout, work).await
    }

    /// Work on a user's group that a move may fence ([`DbError::Moving`]): retried on the user's
    /// route as re-read, for up to [`FENCE_WAIT`].
    async fn on_user_group<T, Fut>(
        &self,
        user: UserId,
        work: impl Fn(usize) -> Fut,
    ) -> Result<T, GroupError>
    where
        Fut: std::future::Future<Output = Result<T, GroupError>>,
    {
        let started = std::time::Instant::now();
        loop {
            match work(self.router.user_group(user)).await {
                Err(GroupError::Db(DbError::Moving(_))) if started.elapsed() < FENCE_WAIT => {
                    self.await_reroute().await;
                }
                other => return other,
            }
        }
    }

    /// Release reservations on one item group and tell the sold-out cache.
    /// `attempts` as in [`reservations::release`] (empty: whatever the attempt).
    pub(crate) async fn release_on(
        &self,
        item_group: usize,
        txn_ids: &[Uuid],
        attempts: &[Option<i32>],
    ) -> Result<(), GroupError> {
        let released = self
            .cluster
            .group(item_group)
            .run(Work::Settle, self.timeout, async |c| {
                reservations::release(c, txn_ids, attempts).await
            })
            .await?;
        for (sale, item, remaining) in released.back {
            self.hot
                .observe(SaleId::from_db(sale), ItemId::from_db(item), remaining);
        }
        if released.moving > 0 {
            // Retried by the caller on the item's new group (return_stock, the outbox, the
            // reconciler).
            return Err(
                DbError::Moving(format!("{} item(s) of this release", released.moving)).into(),
            );
        }
        Ok(())
    }

    /// The user's hash slot (its group's writes check the slot's fence as well as the user's).
    fn user_slot(&self, user: UserId) -> i32 {
        let slots = self.router.kind(crate::router::KeyKind::Users).slot_count();
        crate::router::slot_of(user.key(), slots) as i32
    }

    /// Re-read the stock of every item held sold out, one query per group; read the holders of
    /// items whose version moved; drop items that ended or vanished ([`hot`] module docs).
    pub(crate) async fn refresh_sold_out(&self) {
        let mut by_group: HashMap<usize, (Vec<i64>, Vec<i64>)> = HashMap::new();
        let known: HashMap<hot::ItemKey, (Option<i64>, u64)> = self
            .hot
            .soldout
            .sold_out_items()
            .into_iter()
            .map(|(k, v, g)| (k, (v, g)))
            .collect();
        for (sale, item) in known.keys() {
            let e = by_group.entry(self.router.item_group(*item)).or_default();
            e.0.push(sale.db());
            e.1.push(item.db());
        }
        for (g, (sales, items)) in by_group {
            let group = self.cluster.group(g);
            let rows = group
                .run(Work::Settle, self.timeout, async |c| {
                    reservations::stock_versions(c, &sales, &items).await
                })
                .await;
            let rows = match rows {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::debug!(error = %e, "sold-out refresh failed");
                    continue;
                }
            };
            let mut seen = std::collections::HashSet::new();
            let mut gone = Vec::new();
            for s in rows {
                let key = (SaleId::from_db(s.sale), ItemId::from_db(s.item));
                seen.insert(key);
                if s.ended {
                    gone.push(key);
                    continue;
                }
                self.hot.observe(key.0, key.1, s.remaining);
                let Some(&(version, generation)) = known.get(&key) else {
                    continue;
                };
                if s.remaining <= 0 && version != Some(s.version) {
                    self.load_holders(g, key, generation).await;
                }
            }
            gone.extend(sales.iter().zip(&items).filter_map(|(s, i)| {
                let key = (SaleId::from_db(*s), ItemId::from_db(*i));
                (!seen.contains(&key)).then_some(key)
            }));
            self.hot.soldout.forget(&gone);
        }
        self.hot.admission.sweep();
    }

    async fn load_holders(&self, group: usize, key: hot::ItemKey, generation: u64) {
        let limit = hot::MAX_HOLDERS as i64 + 1;
        let read = self
            .cluster
            .group(group)
            .run(Work::Settle, self.timeout, async |c| {
                reservations::holders(c, key.0, key.1, limit).await
            })
            .await;
        match read {
            Ok(Some((remaining, version, txns))) if remaining <= 0 => {
                let holders = if txns.len() > hot::MAX_HOLDERS {
                    hot::Holders::TooMany { version }
                } else {
                    hot::Holders::Known {
                        version,
                        txns: Arc::new(txns.into_iter().collect()),
                    }
                };
                self.hot.soldout.set_holders(key, generation, holders);
            }
            Ok(Some((remaining, _, _))) => self.hot.observe(key.0, key.1, remaining),
            Ok(None) => self.hot.soldout.forget(&[key]),
            Err(e) => tracing::debug!(error = %e, "cannot read a sold-out item's holders"),
        }
    }

    /// Whether this node knows the item to be sold out (no database work).
    pub(crate) fn known_sold_out(&self, sale: SaleId, item: ItemId) -> bool {
        self.hot.soldout.verdict(sale, item, None) == Verdict::SoldOut
    }

    /// Wait for an item to sell out somewhere, then read its holders at once (the background
    /// sold-out task runs this between its ticks).
    pub(crate) async fn sold_out_changed(&self) {
        self.hot.soldout.wake.notified().await;
    }
}
