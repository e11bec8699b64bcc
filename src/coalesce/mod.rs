//! Hot-item throughput: request coalescing, the sold-out fast path, and admission control.
//!
//! On one hot row PostgreSQL serialises every conditional decrement, so one transaction per request
//! caps an item at a few hundred sales per second. The [`Coalescer`] serves all requests for an item
//! that arrive while a decrement is in flight with the *next* single transaction
//! ([`crate::order::store::reserve_batch`]): one row lock, one decrement, one bulk insert, however many
//! buyers. Transaction 2 is batched the same way per user group (one multi-row insert).
//!
//! The [`SoldOutCache`] answers `sold_out` without touching PostgreSQL once a node has seen an item
//! at zero. It learns that stock came back (cancel, expiry, compensation) immediately when this node
//! released it, and from other nodes by polling: every `coalesce.soldout_refresh_ms` it re-reads the
//! `remaining` of the items it holds sold out (one query per group, only for those items). Polling
//! was chosen over LISTEN/NOTIFY because it needs no dedicated connection per group and survives a
//! failover without re-subscribing; its cost is bounded by the number of sold-out items.
//!
//! [`Admission`] keeps the queues bounded: per item, at most `inflight_per_stock` times the
//! remaining stock (as last seen) may be in flight, and never more than `max_queue`; beyond that a
//! request is answered 503 `overloaded` at once.

pub mod allocate;
pub mod batcher;

use crate::db::{deadline, DbError};
use crate::domain::{ItemId, SaleId};
use crate::order::store::{self, BatchAsk, NewOrder, Order, Refusal, Reserved};
use crate::order::{BuyRequest, OrderError};
use crate::router::Router;
use crate::shard::Cluster;
use batcher::Batcher;
use futures::FutureExt;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use uuid::Uuid;

type ItemKey = (SaleId, ItemId);

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
                let work = async {
                    let group = cluster.group(router.item_group(item));
                    let mut client = group.writer().await?;
                    Ok::<_, OrderError>(
                        deadline(timeout, store::reserve_batch(&mut client, sale, item, &asks)).await?,
                    )
                };
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
                    let work = async {
                        let client = cluster.group(group).writer().await?;
                        Ok::<_, OrderError>(
                            deadline(timeout, store::insert_orders(&client, &orders)).await?,
                        )
                    };
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

    pub fn queued(&self, sale: SaleId, item: ItemId) -> usize {
        self.reserve.queued(&(sale, item))
    }
}

/// What the hot path learns from every transaction on an item: the sold-out set and the stock
/// admission control bounds itself by.
pub struct HotPath {
    pub soldout: SoldOutCache,
    pub admission: Admission,
}

impl HotPath {
    pub fn new(config: &crate::config::CoalesceConfig) -> Self {
        Self {
            soldout: SoldOutCache::default(),
            admission: Admission::new(config),
        }
    }

    /// Record the remaining stock just seen for an item.
    pub fn observe(&self, sale: SaleId, item: ItemId, remaining: i32) {
        self.soldout.observe(sale, item, remaining);
        self.admission.observe(sale, item, remaining);
    }
}

/// Items known (to this node) to be sold out.
#[derive(Default)]
pub struct SoldOutCache {
    items: RwLock<HashMap<ItemKey, ()>>,
}

impl SoldOutCache {
    pub fn is_sold_out(&self, sale: SaleId, item: ItemId) -> bool {
        match self.items.read() {
            Ok(m) => m.contains_key(&(sale, item)),
            Err(p) => p.into_inner().contains_key(&(sale, item)),
        }
    }

    /// Record the remaining stock just seen for an item.
    pub fn observe(&self, sale: SaleId, item: ItemId, remaining: i32) {
        let sold_out = remaining <= 0;
        if sold_out == self.is_sold_out(sale, item) {
            return;
        }
        let mut m = match self.items.write() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        if sold_out {
            m.insert((sale, item), ());
        } else {
            m.remove(&(sale, item));
            tracing::info!(%sale, %item, remaining, "stock is back: sold-out fast path off");
        }
    }

    pub fn sold_out_items(&self) -> Vec<ItemKey> {
        match self.items.read() {
            Ok(m) => m.keys().copied().collect(),
            Err(p) => p.into_inner().keys().copied().collect(),
        }
    }

    /// Re-read the stock of every item held sold out, one query per group.
    pub async fn refresh(&self, cluster: &Cluster, router: &Router) {
        let mut by_group: HashMap<usize, (Vec<i64>, Vec<i64>)> = HashMap::new();
        for (sale, item) in self.sold_out_items() {
            let e = by_group.entry(router.item_group(item)).or_default();
            e.0.push(sale.db());
            e.1.push(item.db());
        }
        for (g, (sales, items)) in by_group {
            let Ok(client) = cluster.group(g).writer().await else {
                continue;
            };
            const SQL: &str = "SELECT si.sale_id, si.item_id, si.remaining FROM sale_items si
                 JOIN unnest($1::bigint[], $2::bigint[]) AS k(s, i) ON si.sale_id = k.s AND si.item_id = k.i";
            let rows = match client.prepare_cached(SQL).await {
                Ok(stmt) => client.query(&stmt, &[&sales, &items]).await,
                Err(e) => Err(e),
            };
            match rows {
                Ok(rows) => {
                    for r in rows {
                        self.observe(
                            SaleId::from_db(r.get(0)),
                            ItemId::from_db(r.get(1)),
                            r.get(2),
                        );
                    }
                }
                Err(e) => tracing::debug!(error = %e, "sold-out refresh failed"),
            }
        }
    }
}

/// Per-item bound on requests in flight (module docs).
pub struct Admission {
    per_stock: u32,
    max_queue: usize,
    max_total: usize,
    items: Mutex<HashMap<ItemKey, Gate>>,
    total: std::sync::atomic::AtomicUsize,
}

#[derive(Default)]
struct Gate {
    inflight: usize,
    remaining: Option<i32>,
}

/// Holds one request's place; gives it back on drop.
pub struct Ticket<'a> {
    admission: &'a Admission,
    key: ItemKey,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.admission
            .total
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        let mut items = self.admission.lock();
        if let Some(g) = items.get_mut(&self.key) {
            g.inflight = g.inflight.saturating_sub(1);
            if g.inflight == 0 && g.remaining.is_none() {
                items.remove(&self.key);
            }
        }
    }
}

impl Admission {
    pub fn new(config: &crate::config::CoalesceConfig) -> Self {
        Self {
            per_stock: config.inflight_per_stock,
            max_queue: config.max_queue,
            max_total: config.max_inflight_total,
            items: Mutex::new(HashMap::new()),
            total: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ItemKey, Gate>> {
        match self.items.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// A place for one request, or None when the item has enough in flight already.
    pub fn admit(&self, sale: SaleId, item: ItemId) -> Option<Ticket<'_>> {
        let mut items = self.lock();
        let gate = items.entry((sale, item)).or_default();
        let by_stock = gate
            .remaining
            .map(|r| (r.max(1) as usize).saturating_mul(self.per_stock as usize))
            .unwrap_or(usize::MAX);
        if gate.inflight >= by_stock.min(self.max_queue)
            || self.total.load(std::sync::atomic::Ordering::Relaxed) >= self.max_total
        {
            return None;
        }
        gate.inflight += 1;
        self.total
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Some(Ticket {
            admission: self,
            key: (sale, item),
        })
    }

    /// Record the remaining stock last seen for an item.
    pub fn observe(&self, sale: SaleId, item: ItemId, remaining: i32) {
        self.lock().entry((sale, item)).or_default().remaining = Some(remaining);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: i128) -> (SaleId, ItemId) {
        (SaleId::parse(1).unwrap(), ItemId::parse(i).unwrap())
    }

    #[test]
    fn admission_bounds_inflight_by_remaining_stock() {
        let cfg = crate::config::CoalesceConfig {
            inflight_per_stock: 2,
            max_queue: 100,
            ..Default::default()
        };
        let a = Admission::new(&cfg);
        let (s, i) = key(5);
        a.observe(s, i, 3);
        let tickets: Vec<_> = (0..6).map(|_| a.admit(s, i).expect("room")).collect();
        assert!(
            a.admit(s, i).is_none(),
            "7th request beyond 2 x 3 in flight"
        );
        drop(tickets);
        assert!(a.admit(s, i).is_some(), "room again once requests finish");
    }

    #[test]
    fn admission_bounds_by_max_queue_when_stock_unknown() {
        let cfg = crate::config::CoalesceConfig {
            max_queue: 2,
            ..Default::default()
        };
        let a = Admission::new(&cfg);
        let (s, i) = key(6);
        let _t1 = a.admit(s, i).unwrap();
        let _t2 = a.admit(s, i).unwrap();
        assert!(a.admit(s, i).is_none());
    }

    #[test]
    fn admission_bounds_the_node_over_all_items() {
        let cfg = crate::config::CoalesceConfig {
            max_inflight_total: 3,
            ..Default::default()
        };
        let a = Admission::new(&cfg);
        let tickets: Vec<_> = (10..13)
            .map(key)
            .map(|(s, i)| a.admit(s, i).expect("room"))
            .collect();
        let (s, i) = key(20);
        assert!(a.admit(s, i).is_none(), "a fourth item finds the node full");
        drop(tickets);
        assert!(a.admit(s, i).is_some());
    }

    #[test]
    fn sold_out_cache_turns_on_and_off() {
        let c = SoldOutCache::default();
        let (s, i) = key(7);
        assert!(!c.is_sold_out(s, i));
        c.observe(s, i, 0);
        assert!(c.is_sold_out(s, i));
        c.observe(s, i, 2);
        assert!(!c.is_sold_out(s, i));
    }
}
