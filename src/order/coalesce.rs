//! Coalescing: many buy requests -> one transaction.
//!
//! One row lock per item serialises every conditional decrement, so one transaction per request
//! caps an item at a few hundred sales per second. The [`Coalescer`] serves all requests for an item
//! that arrive while a decrement is in flight with the *next* single transaction
//! ([`super::store::reserve_batch`]): one row lock, one decrement, one bulk insert, however many
//! buyers. Transaction 2 is batched the same way per user group (one multi-row insert).

use super::hot::{HotPath, ItemKey};
use super::store::{self, BatchAsk, NewOrder, Order, Refusal, Reserved};
use super::{BuyRequest, OrderError};
use crate::batcher::Batcher;
use crate::db::DbError;
use crate::router::Router;
use crate::shard::{Cluster, Work};
use futures::FutureExt;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

/// A batch outcome that every member of the batch can hold a copy of.
#[derive(Debug, Clone)]
pub enum BatchFailure {
    /// The batch surely did not commit.
    NotCommitted(String),
    /// The batch may have committed.
    Unknown(String),
}

impl BatchFailure {
    fn from_order_error(e: &OrderError) -> Self {
        match e {
            OrderError::Db(db) if !db.surely_not_committed() => {
                BatchFailure::Unknown(e.to_string())
            }
            _ => BatchFailure::NotCommitted(e.to_string()),
        }
    }
    pub fn into_order_error(self) -> OrderError {
        match self {
            BatchFailure::NotCommitted(m) => OrderError::Unavailable(m),
            BatchFailure::Unknown(m) => OrderError::Db(DbError::Lost(m)),
        }
    }
}

type ReserveResult = Result<Result<Reserved, Refusal>, BatchFailure>;
type InsertResult = Result<Option<Order>, BatchFailure>;

pub struct Coalescer {
    reserve: Arc<Batcher<ItemKey, BatchAsk, ReserveResult>>,
    insert: Arc<Batcher<usize, NewOrder, InsertResult>>,
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
        let max_wait = Duration::from_micros(config.max_wait_us);
        let (c, r) = (cluster.clone(), router.clone());
        let reserve = Batcher::new(
            config.max_batch,
            max_wait,
            tasks.clone(),
            move |(sale, item): ItemKey, asks: Vec<BatchAsk>| {
                let (cluster, router, hot) = (c.clone(), r.clone(), hot.clone());
                async move {
                let n = asks.len();
                let started = std::time::Instant::now();
                let group = cluster.group(router.item_group(item));
                let work = group.run::<_, OrderError>(Work::Reserve, timeout, async |c| {
                    store::reserve_batch(c, sale, item, &asks).await
                });
                metrics::histogram!(crate::telemetry::BATCH).record(n as f64);
                match work.await {
                    Ok((outcomes, remaining)) => {
                        if let Some(rem) = remaining {
                            hot.observe(sale, item, rem);
                        }
                        tracing::trace!(%item, batch = n, micros = started.elapsed().as_micros() as u64, "coalesced reserve");
                        outcomes.into_iter().map(Ok).collect()
                    }
                    Err(e) => {
                        let f = BatchFailure::from_order_error(&e);
                        tracing::warn!(%item, batch = n, error = %e, "coalesced reserve failed");
                        vec![Err(f); n]
                    }
                }
            }
            .boxed()
            },
        );
        let insert = Batcher::new(
            config.max_batch,
            Duration::ZERO,
            tasks,
            move |group: usize, orders: Vec<NewOrder>| {
                let cluster = cluster.clone();
                async move {
                    let n = orders.len();
                    let work = cluster.group(group).run::<_, OrderError>(
                        Work::Settle,
                        timeout,
                        async |c| store::insert_orders(c, &orders).await,
                    );
                    match work.await {
                        Ok(inserted) => {
                            let mut by_id: HashMap<Uuid, Order> =
                                inserted.into_iter().map(|o| (o.order_id, o)).collect();
                            orders
                                .iter()
                                .map(|o| Ok(by_id.remove(&o.order_id)))
                                .collect()
                        }
                        Err(e) => vec![Err(BatchFailure::from_order_error(&e)); n],
                    }
                }
                .boxed()
            },
        );
        Self { reserve, insert }
    }

    /// Transaction 1 through the item's batch.
    pub async fn reserve(
        &self,
        req: &BuyRequest,
        txn_id: Uuid,
    ) -> Result<Result<Reserved, Refusal>, OrderError> {
        let ask = BatchAsk {
            txn_id,
            user: req.user,
            quantity: req.quantity,
        };
        match self.reserve.submit((req.sale, req.item), ask).await {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(f)) => Err(f.into_order_error()),
            Err(lost) => Err(OrderError::Db(DbError::Lost(lost.to_string()))),
        }
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
            Err(lost) => Err(OrderError::Db(DbError::Lost(lost.to_string()))),
        }
    }
}
