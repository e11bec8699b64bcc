//! The order service: the two short transactions, compensation, idempotency, and the lifecycle
//! (pay, cancel, expiry).
//!
//! A purchase:
//! 1. transaction 1 on the item's group ([`store::reserve_one`], or a coalesced batch through
//!    [`crate::coalesce`]) decrements the stock and writes the reservation;
//! 2. transaction 2 on the user's group inserts the order (`order_id = txn_id`);
//! 3. if transaction 2 surely did not commit, a compensating release on the item's group returns the
//!    stock; if its outcome is unknown (connection lost mid-commit) nothing is undone: the reservation
//!    stays and the reconciler settles it by txn_id, while a retry with the same `request_id`
//!    finishes it.
//!
//! Once an order exists, the order row on the user's group is the source of truth for its state;
//! the reservation follows it (pay -> `paid`, cancel/expiry -> `released`). When following fails,
//! the reconciler repairs the reservation later.

pub mod store;

use crate::db::{deadline, DbError};
use crate::domain::{txn_id_for, ItemId, Quantity, RequestId, SaleId, UserId};
use crate::router::Router;
use crate::shard::{Cluster, ShardError};
use std::sync::Arc;
use std::time::Duration;
use store::{NewOrder, Order, Refusal, Reserved};
use uuid::Uuid;

pub use store::Order as OrderView;

#[derive(Debug, thiserror::Error)]
pub enum OrderError {
    #[error("sale {0} not found")]
    SaleNotFound(SaleId),
    #[error("item {item} is not part of sale {sale}")]
    ItemNotFound { sale: SaleId, item: ItemId },
    #[error("order {0} not found")]
    OrderNotFound(Uuid),
    #[error("the sale has not started yet")]
    NotStarted,
    #[error("the sale has ended")]
    Ended,
    #[error("sold out ({remaining} left)")]
    SoldOut { remaining: i32 },
    #[error("per-user limit {limit} reached ({already} already bought)")]
    LimitExceeded { limit: i32, already: i64 },
    #[error("order {order_id} is {status}")]
    WrongState { order_id: Uuid, status: String },
    #[error("too many requests in flight for this item")]
    Overloaded,
    #[error("shard group temporarily unavailable: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Shard(#[from] ShardError),
    #[error(transparent)]
    Db(#[from] DbError),
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
    pub router: Arc<Router>,
    pub timeout: Duration,
    pub tasks: tokio_util::task::TaskTracker,
    pub coalescer: Option<Arc<crate::coalesce::Coalescer>>,
    pub hot: Arc<crate::coalesce::HotPath>,
    pub confirmer: Arc<crate::coalesce::batcher::Batcher<usize, Uuid, ()>>,
}

impl OrderService {
    /// Buy: the whole order path of DESIGN.md.
    pub async fn buy(&self, req: BuyRequest) -> Result<Bought, OrderError> {
        let txn_id = txn_id_for(req.sale, req.item, req.user, req.request_id.as_ref());
        if req.request_id.is_some() {
            // A replay answers from the order. If the user's group cannot be asked, go on: the
            // reservation is keyed by txn_id and the insert is ON CONFLICT DO NOTHING, so a
            // duplicate can still not arise.
            match self.find_order(req.user, txn_id).await {
                Ok(Some(order)) => {
                    return Ok(Bought {
                        order,
                        replayed: true,
                    })
                }
                Ok(None) => {}
                Err(e) => tracing::debug!(error = %e, "replay lookup failed; continuing"),
            }
        }
        if self.hot.soldout.is_sold_out(req.sale, req.item) {
            // A retry whose earlier attempt holds a live reservation resumes it: it must not be
            // told "sold out" while it holds the stock.
            if req.request_id.is_some() {
                if let Some(resumed) = self.resume(&req, txn_id).await? {
                    return self.place_order(&req, resumed).await;
                }
            }
            return Err(OrderError::SoldOut { remaining: 0 });
        }
        let Some(_ticket) = self.hot.admission.admit(req.sale, req.item) else {
            return Err(OrderError::Overloaded);
        };
        let reserved = match &self.coalescer {
            Some(c) => c.reserve(&req, txn_id).await?,
            None => self.reserve_plain(&req, txn_id).await?,
        };
        let reserved = reserved.map_err(|r| OrderError::from_refusal(r, req.sale, req.item))?;
        self.place_order(&req, reserved).await
    }

    async fn resume(&self, req: &BuyRequest, txn_id: Uuid) -> Result<Option<Reserved>, OrderError> {
        let group = self.cluster.group(self.router.item_group(req.item));
        let client = group.writer().await?;
        Ok(deadline(
            self.timeout,
            store::resume(&client, req.sale, req.item, txn_id),
        )
        .await?)
    }

    async fn reserve_plain(
        &self,
        req: &BuyRequest,
        txn_id: Uuid,
    ) -> Result<Result<Reserved, Refusal>, OrderError> {
        let group = self.cluster.group(self.router.item_group(req.item));
        let mut client = group.writer().await?;
        let (outcome, remaining) = deadline(
            self.timeout,
            store::reserve_one(
                &mut client,
                req.sale,
                req.item,
                req.user,
                req.quantity,
                txn_id,
                req.request_id.is_some(),
            ),
        )
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
            status: "pending_payment",
        };
        let outcome = self.insert_order_retrying(req, new).await;
        match outcome {
            Ok(inserted) => {
                let replayed = inserted.is_none() || r.existing;
                let order = match inserted {
                    Some(order) => order,
                    None => self
                        .find_order(req.user, r.txn_id)
                        .await?
                        .ok_or(OrderError::OrderNotFound(r.txn_id))?,
                };
                if matches!(order.status.as_str(), "cancelled" | "expired") && !r.existing {
                    // This attempt made a reservation live for a purchase that had already
                    // ended (cancelled, expired, or tombstoned by the reconciler): give it back.
                    if let Err(e) = self
                        .release_on(
                            self.router.item_group(req.item),
                            &[r.txn_id],
                            &[Some(r.attempt)],
                        )
                        .await
                    {
                        tracing::warn!(txn_id = %r.txn_id, error = %e, "stock not returned yet; the reconciler will");
                    }
                } else {
                    self.confirm_reservation(req.item, r.txn_id);
                }
                Ok(Bought { order, replayed })
            }
            // A resumed reservation belongs to an earlier attempt whose order may still commit:
            // it is never released here, only by the reconciler once the txn id is settled.
            Err(e) if r.existing => Err(OrderError::Unavailable(format!(
                "order not confirmed yet, retry with the same request_id: {e}"
            ))),
            Err(e) => Err(self.compensate(req.item, r.txn_id, r.attempt, e).await),
        }
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
        let user_group = self.router.user_group(req.user);
        let started = std::time::Instant::now();
        let mut unknown_outcome = None;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let outcome = match &self.coalescer {
                Some(c) => c.insert(user_group, new.clone()).await,
                None => self
                    .insert_orders_on(user_group, std::slice::from_ref(&new))
                    .await
                    .map(|inserted| inserted.into_iter().next()),
            };
            let e = match outcome {
                Ok(order) => return Ok(order),
                Err(e) => e,
            };
            let permanent = matches!(e, OrderError::Db(DbError::Rejected { .. }));
            if let OrderError::Db(db) = &e {
                if !db.surely_not_committed() {
                    unknown_outcome = Some(db.to_string());
                }
            }
            if permanent || attempt >= ATTEMPTS || started.elapsed() >= self.timeout {
                return Err(match unknown_outcome {
                    Some(m) => OrderError::Db(DbError::Lost(m)),
                    None => e,
                });
            }
            tracing::debug!(attempt, error = %e, "order insert failed; retrying");
            tokio::time::sleep(std::time::Duration::from_millis(25 << attempt)).await;
        }
    }

    /// Insert orders on one user group; the error says whether they surely did not commit.
    pub(crate) async fn insert_orders_on(
        &self,
        user_group: usize,
        orders: &[NewOrder],
    ) -> Result<Vec<Order>, OrderError> {
        let group = self.cluster.group(user_group);
        let client = group.writer().await?;
        Ok(deadline(self.timeout, store::insert_orders(&client, orders)).await?)
    }

    /// Transaction 2 failed: release the reservations if the orders surely do not exist, and
    /// return the error the client should see (503, retry later).
    pub(crate) async fn compensate(
        &self,
        item: ItemId,
        txn_id: Uuid,
        attempt: i32,
        cause: OrderError,
    ) -> OrderError {
        let surely_not_committed = match &cause {
            OrderError::Db(e) => e.surely_not_committed(),
            // No connection to the user's group was ever made.
            OrderError::Shard(_) => true,
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
    ) -> Result<(), OrderError> {
        let group = self.cluster.group(item_group);
        let client = group.writer().await?;
        let back = deadline(self.timeout, store::release(&client, txn_ids, attempts)).await?;
        for (sale, item, remaining) in back {
            self.hot
                .observe(SaleId::from_db(sale), ItemId::from_db(item), remaining);
        }
        Ok(())
    }

    /// Mark a reservation `ordered` after its order committed. Off the request path and batched
    /// per item group (one UPDATE for many orders): the state is informational until the
    /// reconciler needs it, and the reconciler repairs what this misses.
    pub(crate) fn confirm_reservation(&self, item: ItemId, txn_id: Uuid) {
        let group = self.router.item_group(item);
        let confirmer = self.confirmer.clone();
        self.tasks.spawn(async move {
            // Ignored on failure by design (see above).
            let _ = confirmer.submit(group, txn_id).await;
        });
    }

    /// The batcher behind [`Self::confirm_reservation`].
    pub fn confirm_batcher(
        cluster: Arc<Cluster>,
        timeout: Duration,
        max_batch: usize,
        tasks: tokio_util::task::TaskTracker,
    ) -> Arc<crate::coalesce::batcher::Batcher<usize, Uuid, ()>> {
        crate::coalesce::batcher::Batcher::new(
            max_batch,
            Duration::ZERO,
            tasks,
            move |group: usize, txn_ids: Vec<Uuid>| {
                let cluster = cluster.clone();
                Box::pin(async move {
                    let n = txn_ids.len();
                    let work = async {
                        let client = cluster
                            .group(group)
                            .writer()
                            .await
                            .map_err(|e| e.to_string())?;
                        deadline(
                            timeout,
                            store::advance_reservations(&client, &txn_ids, "ordered"),
                        )
                        .await
                        .map_err(|e| e.to_string())
                    };
                    if let Err(e) = work.await {
                        tracing::debug!(error = %e, "could not mark reservations ordered; reconciler will");
                    }
                    vec![(); n]
                })
            },
        )
    }

    pub async fn find_order(
        &self,
        user: UserId,
        order_id: Uuid,
    ) -> Result<Option<Order>, OrderError> {
        let group = self.cluster.group(self.router.user_group(user));
        let client = group.writer().await?;
        Ok(deadline(self.timeout, store::get_order(&client, user, order_id)).await?)
    }

    pub async fn get_order(&self, user: UserId, order_id: Uuid) -> Result<Order, OrderError> {
        self.find_order(user, order_id)
            .await?
            .ok_or(OrderError::OrderNotFound(order_id))
    }

    pub async fn list_orders(&self, user: UserId, limit: i64) -> Result<Vec<Order>, OrderError> {
        let group = self.cluster.group(self.router.user_group(user));
        let client = group.writer().await?;
        Ok(deadline(self.timeout, store::list_orders(&client, user, limit)).await?)
    }

    /// Run a status transition on the order's own (user) group.
    async fn transition(
        &self,
        user: UserId,
        order_id: Uuid,
        transition: store::Transition,
    ) -> Result<Option<Order>, OrderError> {
        let group = self.cluster.group(self.router.user_group(user));
        let client = group.writer().await?;
        Ok(deadline(
            self.timeout,
            store::transition_order(&client, user, order_id, transition),
        )
        .await?)
    }

    /// Payment callback: pending -> paid; a repeated callback returns the paid order unchanged.
    pub async fn pay(&self, user: UserId, order_id: Uuid) -> Result<Order, OrderError> {
        let paid = self
            .transition(user, order_id, store::Transition::Pay)
            .await?;
        let order = match paid {
            Some(order) => order,
            None => {
                let order = self.get_order(user, order_id).await?;
                match order.status.as_str() {
                    "paid" => order,
                    "pending_payment" => {
                        // Past its window but not swept yet: expire it now, then refuse.
                        self.expire_orders(self.router.user_group(user), Some(order_id), 1)
                            .await?;
                        return Err(OrderError::WrongState {
                            order_id,
                            status: "expired".into(),
                        });
                    }
                    other => {
                        return Err(OrderError::WrongState {
                            order_id,
                            status: other.to_string(),
                        })
                    }
                }
            }
        };
        let item = ItemId::from_db(order.item_id as i64);
        let item_group = self.cluster.group(self.router.item_group(item));
        let follow = async {
            let client = item_group.writer().await?;
            deadline(
                self.timeout,
                store::advance_reservations(&client, &[order_id], "paid"),
            )
            .await?;
            Ok::<_, OrderError>(())
        };
        if let Err(e) = follow.await {
            tracing::warn!(%order_id, error = %e, "reservation not marked paid yet; the reconciler will");
        }
        Ok(order)
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
                if order.status == "cancelled" {
                    return Ok(order);
                }
                return Err(OrderError::WrongState {
                    order_id,
                    status: order.status,
                });
            }
        };
        let item = ItemId::from_db(order.item_id as i64);
        if let Err(e) = self
            .release_on(self.router.item_group(item), &[order_id], &[])
            .await
        {
            tracing::warn!(%order_id, error = %e, "stock not returned yet; the reconciler will");
        }
        Ok(order)
    }

    /// Expire due unpaid orders on one user group (at most `batch`), then return their stock.
    /// `only` restricts it to one order. Safe with several nodes: rows are claimed with
    /// `FOR UPDATE SKIP LOCKED` and the status change is conditional, so each order expires once,
    /// and the release is idempotent anyway. Returns how many orders expired.
    pub async fn expire_orders(
        &self,
        user_group: usize,
        only: Option<Uuid>,
        batch: i64,
    ) -> Result<usize, OrderError> {
        let group = self.cluster.group(user_group);
        let client = group.writer().await?;
        let rows = deadline(self.timeout, async {
            Ok(client
                .query(
                    &client
                        .prepare_cached(
                            "WITH due AS (
                         SELECT order_id FROM orders
                         WHERE status = 'pending_payment' AND expires_at <= now()
                           AND ($1::uuid IS NULL OR order_id = $1)
                         ORDER BY expires_at LIMIT $2
                         FOR UPDATE SKIP LOCKED)
                     UPDATE orders o SET status = 'expired', updated_at = now()
                     FROM due WHERE o.order_id = due.order_id
                     RETURNING o.order_id, o.item_id",
                        )
                        .await?,
                    &[&only, &batch],
                )
                .await?)
        })
        .await?;
        drop(client);
        let mut by_group: std::collections::HashMap<usize, Vec<Uuid>> = Default::default();
        for r in &rows {
            let item = ItemId::from_db(r.get(1));
            by_group
                .entry(self.router.item_group(item))
                .or_default()
                .push(r.get(0));
        }
        for (g, ids) in by_group {
            if let Err(e) = self.release_on(g, &ids, &[]).await {
                tracing::warn!(error = %e, count = ids.len(), "expired orders' stock not returned yet; the reconciler will");
            }
        }
        if !rows.is_empty() {
            tracing::info!(group = %group.name, expired = rows.len(), "expired unpaid orders");
        }
        Ok(rows.len())
    }
}
