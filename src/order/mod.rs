//! The order service: the two short transactions, compensation, idempotency, and the lifecycle
//! (pay, cancel, expiry).
//!
//! A purchase:
//! 1. the hot path answers from memory what it can ([`hot`]: sold out, overloaded);
//! 2. transaction 1 on the item's group ([`store::reserve_one`], or, coalesced through
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
pub mod payments;
pub mod store;

use crate::batcher::Batcher;
use crate::db::DbError;
use crate::domain::{txn_id_for, ItemId, Quantity, RequestId, SaleId, UserId};
use crate::router::{KeyKind, Router};
use crate::shard::{Cluster, GroupError, ShardError, Work};
use hot::{HotPath, Verdict};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use store::{NewOrder, Order, OrderStatus, Refusal, Reserved};
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
    pub(crate) cluster: Arc<Cluster>,
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

    /// Buy: the whole order path (module docs).
    pub async fn buy(self: &Arc<Self>, req: BuyRequest) -> Result<Bought, OrderError> {
        let txn_id = txn_id_for(req.sale, req.item, req.user, req.request_id.as_ref());
        let retry = req.request_id.as_ref().map(|_| txn_id);
        if self.hot.soldout.verdict(req.sale, req.item, retry) == Verdict::SoldOut {
            metrics::counter!(crate::telemetry::SOLDOUT_FASTPATH).increment(1);
            return Err(OrderError::SoldOut { remaining: 0 });
        }
        let ticket = self
            .hot
            .admission
            .admit(req.sale, req.item)
            .ok_or(OrderError::Overloaded)?;
        let this = self.clone();
        // The purchase keeps the request's span: its log lines stay with the request's id. It is
        // boxed: the spawn then moves a pointer, not the whole state machine (copied whole on
        // each move: memmove was the largest user-space frame of a hot order's profile).
        let purchase = self.tasks.spawn(
            Box::pin(async move {
                let _ticket = ticket;
                this.purchase(&req, txn_id).await
            })
            .instrument(tracing::Span::current()),
        );
        purchase.await.map_err(|e| {
            OrderError::from(DbError::Lost(format!("the purchase task failed: {e}")))
        })?
    }

    /// Transaction 1, then the order (or the stock back). An item fenced by a move is retried on
    /// its route as re-read, for up to [`FENCE_WAIT`]: the move switches it to its new group.
    async fn purchase(&self, req: &BuyRequest, txn_id: Uuid) -> Result<Bought, OrderError> {
        let started = std::time::Instant::now();
        // No stock is taken for an order its user's group could not acknowledge (no shadow there
        // under `block`); the item's group is checked by transaction 1 itself.
        let user_group = self.cluster.group(self.router.user_group(req.user));
        user_group.await_durable(self.timeout / 2).await?;
        let reserved = loop {
            match self.reserve(req, txn_id).await? {
                Err(Refusal::Moving) if started.elapsed() < FENCE_WAIT => {
                    self.await_reroute().await;
                }
                outcome => break outcome,
            }
        };
        let reserved = reserved.map_err(|r| OrderError::from_refusal(r, req.sale, req.item))?;
        self.place_order(req, reserved).await
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

    /// Transaction 1 on the item's group, as routed now.
    async fn reserve(
        &self,
        req: &BuyRequest,
        txn_id: Uuid,
    ) -> Result<Result<Reserved, Refusal>, OrderError> {
        let group = self.router.item_group(req.item);
        let span = tracing::debug_span!("reserve", group = %self.cluster.group(group).name,
            %txn_id, outcome = tracing::field::Empty);
        let work = async {
            match &self.coalescer {
                Some(c) => c.reserve(req, txn_id).await,
                None => self.reserve_plain(req, txn_id).await,
            }
        };
        phase("reserve", span, work, |r| match r {
            Ok(Ok(_)) => "reserved".into(),
            Ok(Err(refusal)) => format!("{refusal:?}"),
            Err(e) => e.to_string(),
        })
        .await
    }

    async fn reserve_plain(
        &self,
        req: &BuyRequest,
        txn_id: Uuid,
    ) -> Result<Result<Reserved, Refusal>, OrderError> {
        let group = self.cluster.group(self.router.item_group(req.item));
        let resumable = req.request_id.is_some();
        let (outcome, remaining) = group
            .run(Work::Reserve, self.timeout, async |c| {
                store::reserve_one(
                    c,
                    req.sale,
                    req.item,
                    req.user,
                    req.quantity,
                    txn_id,
                    resumable,
                )
                .await
            })
            .await?;
        if let Some(remaining) = remaining {
            self.hot.observe(req.sale, req.item, remaining);
        }
        Ok(outcome)
    }

    /// Transaction 2 and, when it surely failed, compensation.
    async fn place_order(&self, req: &BuyRequest, r: Reserved) -> Result<Bought, OrderError> {
        let new = NewOrder {
            order_id: r.txn_id,
            user: req.user,
            sale: req.sale,
            item: req.item,
            quantity: r.quantity,
            amount_cents: r.price_cents * i64::from(r.quantity),
            payment_window_secs: r.payment_window_secs,
            status: OrderStatus::PendingPayment,
        };
        let user_group = self.router.user_group(req.user);
        let span = tracing::debug_span!("order", group = %self.cluster.group(user_group).name,
            txn_id = %r.txn_id, outcome = tracing::field::Empty);
        let inserted = phase(
            "order",
            span,
            self.insert_order_retrying(req, new),
            outcome_of,
        )
        .await;
        let inserted = match inserted {
            Ok(inserted) => inserted,
            // A resumed reservation belongs to an earlier attempt whose order may still commit:
            // it is never released here, only by the reconciler once the txn id is settled.
            Err(e) if r.existing => {
                return Err(OrderError::Unavailable(format!(
                    "order not confirmed yet, retry with the same request_id: {e}"
                )))
            }
            Err(e) => {
                let span = tracing::debug_span!("compensate", txn_id = %r.txn_id,
                    outcome = tracing::field::Empty);
                let work = self.compensate(req.item, r.txn_id, r.attempt, e);
                return Err(phase("compensate", span, work, |e| e.to_string()).await);
            }
        };
        if let Some(order) = inserted {
            self.confirm_reservation(req.item, r.txn_id);
            return Ok(Bought {
                order,
                replayed: r.existing,
            });
        }
        // The order existed already: an earlier attempt of this purchase made it.
        let order = self
            .find_order_durable(req.user, r.txn_id)
            .await?
            .ok_or(OrderError::OrderNotFound(r.txn_id))?;
        if order.status.is_dead() {
            if !r.existing {
                // This attempt made a reservation live for a purchase that had already ended
                // (cancelled, expired, or tombstoned by the reconciler): give it back.
                let group = self.router.item_group(req.item);
                if let Err(e) = self
                    .release_on(group, &[r.txn_id], &[Some(r.attempt)])
                    .await
                {
                    tracing::warn!(txn_id = %r.txn_id, error = %e, "stock not returned yet; the reconciler will");
                }
            }
            return Err(OrderError::DeadOrder(Box::new(order)));
        }
        self.confirm_reservation(req.item, r.txn_id);
        Ok(Bought {
            order,
            replayed: true,
        })
    }

    /// Transaction 2 with retries. The insert is idempotent (`ON CONFLICT DO NOTHING`), so it is
    /// retried while the request's deadline allows: a full pool or a moment of failover must not
    /// cost a buyer the unit transaction 1 already reserved. The error returned is "surely not
    /// committed" only if no attempt had an unknown outcome.
    async fn insert_order_retrying(
        &self,
        req: &BuyRequest,
        new: NewOrder,
    ) -> Result<Option<Order>, OrderError> {
        const ATTEMPTS: u32 = 4;
        let started = std::time::Instant::now();
        let mut unknown_outcome = None;
        let mut attempt = 0;
        loop {
            // Routed afresh each time: the user may have moved to another group meanwhile.
            let user_group = self.router.user_group(req.user);
            let outcome = match &self.coalescer {
                Some(c) => c.insert(user_group, new.clone()).await,
                None => self
                    .insert_orders_on(user_group, std::slice::from_ref(&new))
                    .await
                    .and_then(|inserted| match inserted.moving.first() {
                        Some(_) => Err(OrderError::from(DbError::Moving(format!(
                            "user {}",
                            req.user.key()
                        )))),
                        None => Ok(inserted.orders.into_iter().next()),
                    }),
            };
            let e = match outcome {
                Ok(order) => return Ok(order),
                Err(e) => e,
            };
            if matches!(e, OrderError::Group(GroupError::Db(DbError::Moving(_))))
                && started.elapsed() < FENCE_WAIT
            {
                // Not inserted: the user is being moved. The move switches it shortly.
                self.await_reroute().await;
                continue;
            }
            attempt += 1;
            let permanent = matches!(
                e,
                OrderError::Group(GroupError::Db(DbError::Rejected { .. }))
            );
            if let OrderError::Group(g) = &e {
                if !g.surely_not_committed() {
                    unknown_outcome = Some(g.to_string());
                }
            }
            if permanent || attempt >= ATTEMPTS || started.elapsed() >= self.timeout {
                return Err(match unknown_outcome {
                    Some(m) => DbError::Lost(m).into(),
                    None => e,
                });
            }
            tracing::debug!(attempt, error = %e, "order insert failed; retrying");
            tokio::time::sleep(Duration::from_millis(25 << attempt)).await;
        }
    }

    /// Insert orders on one user group; the error says whether they surely did not commit.
    async fn insert_orders_on(
        &self,
        user_group: usize,
        orders: &[NewOrder],
    ) -> Result<store::Inserted, OrderError> {
        Ok(self
            .cluster
            .group(user_group)
            .run(Work::Settle, self.timeout, async |c| {
                store::insert_orders(c, orders, self.router.kind(KeyKind::Users).slot_count()).await
            })
            .await?)
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

    /// Transaction 2 failed: release the reservations if the orders surely do not exist, and
    /// return the error the client should see (503, retry later).
    async fn compensate(
        &self,
        item: ItemId,
        txn_id: Uuid,
        attempt: i32,
        cause: OrderError,
    ) -> OrderError {
        let surely_not_committed = match &cause {
            // No connection to the user's group was ever made, or the database refused the work:
            // surely not committed; the connection lost mid-commit: unknown.
            OrderError::Group(e) => e.surely_not_committed(),
            // Only raised for batch failures known not to have committed.
            OrderError::Unavailable(_) => true,
            _ => false,
        };
        if !surely_not_committed {
            tracing::warn!(error = %cause, %txn_id,
                "order insert outcome unknown; leaving the reservation to the reconciler");
            return OrderError::Unavailable(format!(
                "order outcome unknown, retry with the same request_id: {cause}"
            ));
        }
        tracing::warn!(error = %cause, %txn_id, "order insert failed; returning the stock");
        // Only while the reservation still carries this attempt: a retry that resumed it meanwhile
        // owns it now, and its order may commit.
        let release = self
            .release_on(self.router.item_group(item), &[txn_id], &[Some(attempt)])
            .await;
        if let Err(e) = release {
            tracing::error!(error = %e, "compensation failed; the reconciler will release");
        }
        OrderError::Unavailable(format!("the user's shard group is unavailable: {cause}"))
    }

    /// Release reservations on one item group and tell the sold-out cache.
    /// `attempts` as in [`store::release`] (empty: whatever the attempt).
    pub async fn release_on(
        &self,
        item_group: usize,
        txn_ids: &[Uuid],
        attempts: &[Option<i32>],
    ) -> Result<(), GroupError> {
        let released = self
            .cluster
            .group(item_group)
            .run(Work::Settle, self.timeout, async |c| {
                store::release(c, txn_ids, attempts).await
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

    /// Mark a reservation `ordered` after its order committed, off the request path: with the
    /// item group's next transaction 1 when buyers are queued for it, else in a batch of its own
    /// (one UPDATE for many orders). The state is informational until the reconciler needs it,
    /// and the reconciler repairs what this misses.
    /// The orders of a fair start's winners ([`crate::fair`]): their stock is taken and their
    /// reservations written by the draw, so nothing here may give it back. Inserted on each user's
    /// group (idempotent: an order that exists already counts), and their reservations marked
    /// ordered. The ids now placed; the others (a group unreachable, a user being moved) are tried
    /// again by the draw's next round.
    pub(crate) async fn place_drawn(&self, orders: &[NewOrder]) -> Result<Vec<Uuid>, OrderError> {
        let mut by_group: HashMap<usize, Vec<NewOrder>> = HashMap::new();
        for o in orders {
            by_group
                .entry(self.router.user_group(o.user))
                .or_default()
                .push(o.clone());
        }
        let mut placed = Vec::new();
        for (g, group_orders) in by_group {
            match self.insert_orders_on(g, &group_orders).await {
                Ok(inserted) => {
                    for o in group_orders
                        .iter()
                        .filter(|o| !inserted.moving.contains(&o.order_id))
                    {
                        self.confirm_reservation(o.item, o.order_id);
                        placed.push(o.order_id);
                    }
                }
                Err(e) => {
                    tracing::warn!(group = g, error = %e, "winners' orders not made yet; the draw retries")
                }
            }
        }
        Ok(placed)
    }

    fn confirm_reservation(&self, item: ItemId, txn_id: Uuid) {
        let group = self.router.item_group(item);
        // Under a storm the group's next transaction 1 carries it: no commit of its own.
        if let Some(c) = &self.coalescer {
            if c.confirm_later(group, txn_id) {
                return;
            }
        }
        let confirmer = self.confirmer.clone();
        self.tasks.spawn(async move {
            // Ignored on failure by design (see above).
            let _ = confirmer.submit(group, txn_id).await;
        });
    }

    pub async fn find_order(
        &self,
        user: UserId,
        order_id: Uuid,
    ) -> Result<Option<Order>, OrderError> {
        Ok(self
            .cluster
            .group(self.router.user_group(user))
            .run(Work::Read, self.timeout, async |c| {
                store::get_order(c, user, order_id).await
            })
            .await?)
    }

    /// The order, once the shadow holds it too (for replays).
    pub(crate) async fn find_order_durable(
        &self,
        user: UserId,
        order_id: Uuid,
    ) -> Result<Option<Order>, OrderError> {
        Ok(self
            .cluster
            .group(self.router.user_group(user))
            .run(Work::Settle, self.timeout, async |c| {
                store::get_order_durable(c, user, order_id).await
            })
            .await?)
    }

    pub async fn get_order(&self, user: UserId, order_id: Uuid) -> Result<Order, OrderError> {
        self.find_order(user, order_id)
            .await?
            .ok_or(OrderError::OrderNotFound(order_id))
    }

    pub async fn list_orders(&self, user: UserId, limit: i64) -> Result<Vec<Order>, OrderError> {
        Ok(self
            .cluster
            .group(self.router.user_group(user))
            .run(Work::Read, self.timeout, async |c| {
                store::list_orders(c, user, limit).await
            })
            .await?)
    }

    /// The user's hash slot (its group's writes check the slot's fence as well as the user's).
    fn user_slot(&self, user: UserId) -> i32 {
        let slots = self.router.kind(crate::router::KeyKind::Users).slot_count();
        crate::router::slot_of(user.key(), slots) as i32
    }

    /// Run a status transition on the order's own (user) group.
    async fn transition(
        &self,
        user: UserId,
        order_id: Uuid,
        transition: store::Transition,
    ) -> Result<Option<Order>, OrderError> {
        let slot = self.user_slot(user);
        Ok(self
            .on_user_group(user, |g| {
                self.cluster
                    .group(g)
                    .run(Work::Settle, self.timeout, async move |c| {
                        store::transition_order(c, user, slot, order_id, transition).await
                    })
            })
            .await?)
    }

    /// A payment callback ([`payments`]): applied to its order, or refused, and recorded either
    /// way; the same `payment_ref` again gives the recorded answer. The reservation follows a
    /// paid order, and an order this callback found past its window is expired (stock back).
    pub async fn settle_payment(
        &self,
        notice: payments::Notice,
    ) -> Result<payments::Settled, OrderError> {
        let mut settled = None;
        let slot = self.user_slot(notice.user);
        for _ in 0..3 {
            let notice = &notice;
            settled = self
                .on_user_group(notice.user, |g| {
                    self.cluster
                        .group(g)
                        .run(Work::Settle, self.timeout, async move |c| {
                            payments::settle(c, notice, slot).await
                        })
                })
                .await?;
            if settled.is_some() {
                break;
            }
        }
        let settled = settled.ok_or_else(|| {
            OrderError::Unavailable("the payment is being recorded concurrently; retry".into())
        })?;
        let Some(order) = settled.order.as_ref() else {
            return Ok(settled);
        };
        let item = ItemId::from_db(order.item_id as i64);
        if settled.expired_now {
            let user_group = self.router.user_group(notice.user);
            self.return_stock(user_group, vec![(order.order_id, item.db())])
                .await;
        } else if settled.payment.state == payments::PaymentState::Applied {
            let order_id = order.order_id;
            let follow = self
                .cluster
                .group(self.router.item_group(item))
                .run(Work::Settle, self.timeout, async |c| {
                    store::advance_reservations(c, &[order_id], store::ReservationState::Paid).await
                })
                .await;
            if let Err(e) = follow {
                tracing::warn!(%order_id, error = %e, "reservation not marked paid yet; the reconciler will");
            }
        }
        Ok(settled)
    }

    /// Recorded payments over all groups, newest first (admin API).
    pub async fn list_payments(
        &self,
        sale: Option<SaleId>,
        state: Option<payments::PaymentState>,
        limit: i64,
    ) -> Result<Vec<payments::Payment>, OrderError> {
        let mut all = Vec::new();
        for (idx, g) in self.cluster.groups.iter().enumerate() {
            let sale = sale.map(SaleId::db);
            let found = g
                .run(Work::Read, self.timeout, async |c| {
                    payments::list(c, sale, state, limit).await
                })
                .await?;
            // A moved user's inactive copy (left until the move is completed) is not counted.
            all.extend(
                found
                    .into_iter()
                    .filter(|p| self.router.route(crate::router::KeyKind::Users, p.user_id) == idx),
            );
        }
        all.sort_by_key(|p| std::cmp::Reverse(p.received_at));
        all.truncate(limit.max(0) as usize);
        Ok(all)
    }

    /// Cancel an unpaid order; its stock returns to the item.
    pub async fn cancel(&self, user: UserId, order_id: Uuid) -> Result<Order, OrderError> {
        let cancelled = self
            .transition(user, order_id, store::Transition::Cancel)
            .await?;
        let order = match cancelled {
            Some(order) => order,
            None => {
                let order = self.get_order(user, order_id).await?;
                if order.status == OrderStatus::Cancelled {
                    return Ok(order);
                }
                return Err(OrderError::WrongState {
                    order_id,
                    status: order.status,
                });
            }
        };
        let group = self.router.user_group(user);
        let item = order.item_id as i64;
        self.return_stock(group, vec![(order_id, item)]).await;
        Ok(order)
    }

    /// Expire due unpaid orders on one user group (at most `batch`), then return their stock.
    /// `only` restricts it to one order. Safe with several nodes ([`store::expire_due`]).
    /// Returns how many orders expired.
    pub async fn expire_orders(
        &self,
        user_group: usize,
        only: Option<Uuid>,
        batch: i64,
    ) -> Result<usize, OrderError> {
        let expired = self
            .cluster
            .group(user_group)
            .run(Work::Settle, self.timeout, async |c| {
                store::expire_due(c, only, batch).await
            })
            .await?;
        let n = expired.len();
        if n > 0 {
            tracing::info!(group = %self.cluster.group(user_group).name, expired = n, "expired unpaid orders");
            self.return_stock(user_group, expired).await;
        }
        Ok(n)
    }

    /// Return the stock of dead orders recorded in `user_group`'s outbox, then forget the entries.
    /// What fails stays in the outbox for [`Self::drain_releases`].
    async fn return_stock(&self, user_group: usize, dead: Vec<(Uuid, i64)>) {
        let (mut done, mut failed) = (Vec::new(), Vec::new());
        let started = std::time::Instant::now();
        let mut left = dead;
        while !left.is_empty() {
            let mut by_group: HashMap<usize, Vec<(Uuid, i64)>> = HashMap::new();
            for (order_id, item) in left.drain(..) {
                by_group
                    .entry(self.router.item_group(ItemId::from_db(item)))
                    .or_default()
                    .push((order_id, item));
            }
            for (g, batch) in by_group {
                let ids: Vec<Uuid> = batch.iter().map(|(id, _)| *id).collect();
                match self.release_on(g, &ids, &[]).await {
                    Ok(()) => done.extend(ids),
                    // An item fenced by a move: again on its route as re-read, for a while.
                    Err(GroupError::Db(DbError::Moving(_))) if started.elapsed() < FENCE_WAIT => {
                        left.extend(batch)
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, count = ids.len(),
                            "stock of dead orders not returned yet; the outbox drainer will");
                        failed.extend(ids);
                    }
                }
            }
            if !left.is_empty() {
                self.await_reroute().await;
            }
        }
        let group = self.cluster.group(user_group);
        if !done.is_empty() {
            let forgot = group
                .run(Work::Settle, self.timeout, async |c| {
                    store::forget_releases(c, &done).await
                })
                .await;
            if let Err(e) = forgot {
                // Harmless: releasing again is a no-op.
                tracing::debug!(error = %e, "outbox entries not forgotten yet");
            }
        }
        if !failed.is_empty() {
            let postponed = group
                .run(Work::Settle, self.timeout, async |c| {
                    store::postpone_releases(c, &failed).await
                })
                .await;
            if let Err(e) = postponed {
                tracing::debug!(error = %e, "outbox entries not postponed");
            }
        }
    }

    /// Retry the releases recorded in every group's outbox that are older than `min_age`. A
    /// group that cannot be read is skipped (and logged); the others are drained regardless.
    /// Returns how many entries were handled.
    pub async fn drain_releases(&self, min_age: Duration) -> usize {
        let mut handled = 0;
        for g in 0..self.cluster.groups.len() {
            let group = self.cluster.group(g);
            let pending = group
                .run(Work::Settle, self.timeout, async |c| {
                    store::pending_releases(c, min_age, DRAIN_BATCH).await
                })
                .await;
            match pending {
                Ok(pending) if !pending.is_empty() => {
                    tracing::info!(group = %group.name, count = pending.len(), "draining the release outbox");
                    handled += pending.len();
                    self.return_stock(g, pending).await;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(group = %group.name, error = %e, "release outbox not read")
                }
            }
        }
        handled
    }

    /// Re-read the stock of every item held sold out, one query per group; read the holders of
    /// items whose version moved; drop items that ended or vanished ([`hot`] module docs).
    pub async fn refresh_sold_out(&self) {
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
                    store::stock_versions(c, &sales, &items).await
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
                store::holders(c, key.0, key.1, limit).await
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
    pub fn known_sold_out(&self, sale: SaleId, item: ItemId) -> bool {
        self.hot.soldout.verdict(sale, item, None) == Verdict::SoldOut
    }

    /// Wait for an item to sell out somewhere, then read its holders at once (the background
    /// sold-out task runs this between its ticks).
    pub async fn sold_out_changed(&self) {
        self.hot.soldout.wake.notified().await;
    }
}

/// Run a phase of the order path in its span (a debug span declaring an empty `outcome`): its
/// duration goes to the phase histogram, its outcome to the span and to a debug line that carries the
/// request's id through the span's parent.
async fn phase<T>(
    name: &'static str,
    span: tracing::Span,
    work: impl std::future::Future<Output = T>,
    outcome: impl FnOnce(&T) -> String,
) -> T {
    let started = std::time::Instant::now();
    let out = work.instrument(span.clone()).await;
    let elapsed = started.elapsed();
    metrics::histogram!(crate::telemetry::PHASE, "phase" => name).record(elapsed.as_secs_f64());
    // The spans are at debug: at the default level nobody reads the outcome, so it is not
    // formatted (a refusal's words per sold-out buyer were a measurable share of an order).
    if span.is_disabled() {
        return out;
    }
    let outcome = outcome(&out);
    span.record("outcome", outcome.as_str());
    span.in_scope(|| {
        tracing::debug!(phase = name, elapsed_ms = elapsed.as_millis() as u64, %outcome, "phase done")
    });
    out
}

/// A short word for a span's `outcome` field.
fn outcome_of<T, E: std::fmt::Display>(r: &Result<T, E>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => e.to_string(),
    }
}

/// The batcher behind [`OrderService::confirm_reservation`].
fn confirm_batcher(
    cluster: Arc<Cluster>,
    timeout: Duration,
    max_batch: usize,
    tasks: TaskTracker,
) -> Arc<Batcher<usize, Uuid, ()>> {
    Batcher::new(
        max_batch,
        Duration::ZERO,
        tasks,
        move |group: usize, txn_ids: Vec<Uuid>| {
            let cluster = cluster.clone();
            Box::pin(async move {
                let n = txn_ids.len();
                let work = cluster
                    .group(group)
                    .run(Work::Settle, timeout, async |c| {
                        store::advance_reservations(c, &txn_ids, store::ReservationState::Ordered)
                            .await
                    })
                    .await;
                if let Err(e) = work {
                    tracing::debug!(error = %e, "could not mark reservations ordered; reconciler will");
                }
                vec![(); n]
            })
        },
    )
}
