//! Coalescing: many buy requests -> one transaction.
//!
//! One row lock per item serialises every conditional decrement, so one transaction per request
//! caps an item at a few hundred sales per second; and with a synchronous shadow every commit costs
//! a replication round trip, so one transaction per item caps a sale of many items. The
//! [`Coalescer`] batches per shard group: all requests for any items of a group that arrive while
//! that group's transaction 1 is in flight share the *next* one ([`super::batch`]): each item's
//! row locked once (in a fixed order), one decrement statement, bulk inserts of the reservations,
//! one commit, however many buyers and items; the `ordered` marks of orders made meanwhile ride
//! along ([`Coalescer::confirm_later`]). Transaction 2 is batched the same way per user group (one
//! multi-row insert).

use super::batch::{self, BatchAsk};
use super::hot::HotPath;
use super::reservations::{Refusal, Reserved};
use super::store::{self, NewOrder, Order};
use super::{BuyRequest, OrderError};
use crate::batcher::Batcher;
use crate::db::DbError;
use crate::router::Router;
use crate::shard::{Cluster, GroupError, Work};
use futures::FutureExt;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use uuid::Uuid;

/// A batch outcome that every member of the batch can hold a copy of.
#[derive(Debug, Clone)]
pub(crate) enum BatchFailure {
    /// The batch surely did not commit.
    NotCommitted(String),
    /// The batch may have committed.
    Unknown(String),
    /// Not inserted: the order's user is being moved to another group.
    Moving(String),
}

impl BatchFailure {
    fn from_group_error(e: &GroupError) -> Self {
        if e.surely_not_committed() {
            BatchFailure::NotCommitted(e.to_string())
        } else {
            BatchFailure::Unknown(e.to_string())
        }
    }
    pub(crate) fn into_order_error(self) -> OrderError {
        match self {
            BatchFailure::NotCommitted(m) => OrderError::Unavailable(m),
            BatchFailure::Unknown(m) => DbError::Lost(m).into(),
            BatchFailure::Moving(m) => DbError::Moving(m).into(),
        }
    }
}

type ReserveResult = Result<Result<Reserved, Refusal>, BatchFailure>;
type InsertResult = Result<Option<Order>, BatchFailure>;

pub(crate) struct Coalescer {
    /// Transaction 1, batched per item group.
    reserve: Arc<Batcher<usize, BatchAsk, ReserveResult>>,
    /// Transaction 2, batched per user group.
    insert: Arc<Batcher<usize, NewOrder, InsertResult>>,
    /// Confirmations waiting for their group's next transaction 1 ([`Coalescer::confirm_later`]).
    confirms: Arc<Confirms>,
    router: Arc<Router>,
}

/// Reservations to mark `ordered`, per item group.
#[derive(Default)]
struct Confirms(Mutex<HashMap<usize, Vec<Uuid>>>);

impl Confirms {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<usize, Vec<Uuid>>> {
        match self.0.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn take(&self, group: usize) -> Vec<Uuid> {
        self.lock().remove(&group).unwrap_or_default()
    }
}

impl Coalescer {
    pub fn new(
        cluster: Arc<Cluster>,
        router: Arc<Router>,
        hot: Arc<HotPath>,
        config: &crate::config::CoalesceConfig,
        timeout: Duration,
        tasks: tokio_util::task::TaskTracker,
    ) -> Self {
        let confirms = Arc::new(Confirms::default());
        let reserve = reserve_batcher(
            cluster.clone(),
            hot,
            confirms.clone(),
            config,
            timeout,
            tasks.clone(),
        );
        let user_slots = router.kind(crate::router::KeyKind::Users).slot_count();
        let insert = insert_batcher(cluster, user_slots, config, timeout, tasks);
        Self {
            reserve,
            insert,
            confirms,
            router,
        }
    }

    /// Transaction 1 through the item group's batch.
    pub async fn reserve(
        &self,
        req: &BuyRequest,
        txn_id: Uuid,
    ) -> Result<Result<Reserved, Refusal>, OrderError> {
        let ask = BatchAsk {
            sale: req.sale,
            item: req.item,
            txn_id,
            user: req.user,
            quantity: req.quantity,
        };
        let group = self.router.item_group(req.item);
        match self.reserve.submit(group, ask).await {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(f)) => Err(f.into_order_error()),
            Err(lost) => Err(DbError::Lost(lost.to_string()).into()),
        }
    }

    /// Leave the confirmation of `txn_id` (its order exists) to the next transaction 1 of its item
    /// group, if one is coming: buyers are queued there. Otherwise false, and the caller confirms
    /// on its own. Checking the queue and leaving the confirmation happen under one lock, which the
    /// batch also takes to collect them, so a confirmation left here is never stranded: the queued
    /// buyers' batch starts after it.
    pub(crate) fn confirm_later(&self, group: usize, txn_id: Uuid) -> bool {
        let mut waiting = self.confirms.lock();
        if self.reserve.queued(&group) == 0 {
            return false;
        }
        waiting.entry(group).or_default().push(txn_id);
        true
    }

    /// Transaction 2 through the user group's batch: the order if this call inserted it.
    pub async fn insert(
        &self,
        user_group: usize,
        order: NewOrder,
    ) -> Result<Option<Order>, OrderError> {
        match self.insert.submit(user_group, order).await {
            Ok(Ok(inserted)) => Ok(inserted),
            Ok(Err(f)) => Err(f.into_order_error()),
            Err(lost) => Err(DbError::Lost(lost.to_string()).into()),
        }
    }
}

/// Transaction 1 batched per item group: each batch also carries the confirmations waiting for
/// its group, and its outcomes feed the hot path's view of the stock.
fn reserve_batcher(
    cluster: Arc<Cluster>,
    hot: Arc<HotPath>,
    confirms: Arc<Confirms>,
    config: &crate::config::CoalesceConfig,
    timeout: Duration,
    tasks: tokio_util::task::TaskTracker,
) -> Arc<Batcher<usize, BatchAsk, ReserveResult>> {
    Batcher::new(
        config.max_batch,
        Duration::from_micros(config.max_wait_us),
        tasks,
        move |group: usize, asks: Vec<BatchAsk>| {
            let (cluster, hot) = (cluster.clone(), hot.clone());
            let confirm = confirms.take(group);
            async move {
                let n = asks.len();
                let started = std::time::Instant::now();
                let group = cluster.group(group);
                let work = group.run(Work::Reserve, timeout, async |c| {
                    batch::reserve_batch(c, &asks, &confirm).await
                });
                metrics::histogram!(crate::telemetry::BATCH).record(n as f64);
                match work.await {
                    Ok(settled) => {
                        for &(sale, item, rem) in &settled.remaining {
                            hot.observe(sale, item, rem);
                        }
                        tracing::trace!(group = %group.name, batch = n, items = settled.remaining.len(),
                            micros = started.elapsed().as_micros() as u64, "coalesced reserve");
                        settled.outcomes.into_iter().map(Ok).collect()
                    }
                    Err(e) => {
                        let f = BatchFailure::from_group_error(&e);
                        // The confirmations are lost with it: the reconciler marks those.
                        tracing::warn!(group = %group.name, batch = n, confirmations = confirm.len(),
                            error = %e, "coalesced reserve failed");
                        vec![Err(f); n]
                    }
                }
            }
            .boxed()
        },
    )
}

/// Transaction 2 batched per user group, sent as soon as the group is free.
fn insert_batcher(
    cluster: Arc<Cluster>,
    user_slots: u32,
    config: &crate::config::CoalesceConfig,
    timeout: Duration,
    tasks: tokio_util::task::TaskTracker,
) -> Arc<Batcher<usize, NewOrder, InsertResult>> {
    Batcher::new(
        config.max_batch,
        Duration::ZERO,
        tasks,
        move |group: usize, orders: Vec<NewOrder>| {
            let cluster = cluster.clone();
            async move {
                let n = orders.len();
                let work = cluster.group(group).run(Work::Settle, timeout, async |c| {
                    store::insert_orders(c, &orders, user_slots).await
                });
                match work.await {
                    Ok(inserted) => {
                        let mut by_id: HashMap<Uuid, Order> = inserted
                            .orders
                            .into_iter()
                            .map(|o| (o.order_id, o))
                            .collect();
                        orders
                            .iter()
                            .map(|o| {
                                if inserted.moving.contains(&o.order_id) {
                                    Err(BatchFailure::Moving(format!("user {}", o.user.key())))
                                } else {
                                    Ok(by_id.remove(&o.order_id))
                                }
                            })
                            .collect()
                    }
                    Err(e) => vec![Err(BatchFailure::from_group_error(&e)); n],
                }
            }
            .boxed()
        },
    )
}
