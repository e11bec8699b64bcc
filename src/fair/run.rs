//! The fair-start service: entries and their waiters, and the draws (module docs of [`super`]).

use super::rank::{self, Outcome};
use super::store::{self, Rules, Stored};
use crate::domain::{txn_id_for, ItemId, RequestId, SaleId, UserId};
use crate::order::store::{NewOrder, OrderStatus};
use crate::order::{Bought, BuyRequest, OrderError, OrderService};
use crate::router::Router;
use crate::shard::{Cluster, Work};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use uuid::Uuid;

/// How often each node asks the item groups for the outcomes its waiters wait for.
pub(crate) const POLL: Duration = Duration::from_millis(50);
/// How long a node's claim on a draw holds without renewal.
const LEASE_MS: i64 = 10_000;
/// How long a rules read is trusted (the window never changes; `drawn` does).
const RULES_TTL: Duration = Duration::from_millis(250);
/// The longest an entry waits for its outcome after the window, and a purchase for the draw.
const DRAW_WAIT: Duration = Duration::from_secs(20);

type Key = (i64, i64);

/// The requests of one item waiting for their entries' outcomes: user -> requests.
type Waiting = HashMap<i64, Vec<oneshot::Sender<Stored>>>;

/// Waiting entries of this node, per item (with its rules).
#[derive(Default)]
struct Waiters {
    by_item: HashMap<Key, (Rules, Waiting)>,
}

pub(crate) struct FairStart {
    cluster: Arc<Cluster>,
    router: Arc<Router>,
    orders: Arc<OrderService>,
    timeout: Duration,
    node: Uuid,
    rules: Mutex<HashMap<Key, (Rules, Instant)>>,
    waiters: Mutex<Waiters>,
    /// Waiting entries this node holds, over all items, and the most it may hold.
    waiting: std::sync::atomic::AtomicUsize,
    max_waiting: usize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// What the service makes of a purchase.
enum Path {
    /// No fair window, or its draw is done: the ordinary purchase.
    Plain,
    /// Received in the window: an entry.
    Entry(Rules),
    /// After the window, before the draw is done: wait for it, then the ordinary purchase.
    AfterWindow,
}

impl FairStart {
    pub fn new(
        cluster: Arc<Cluster>,
        router: Arc<Router>,
        orders: Arc<OrderService>,
        config: &crate::config::Config,
    ) -> Arc<Self> {
        Arc::new(Self {
            cluster,
            router,
            orders,
            timeout: config.request_timeout(),
            node: Uuid::new_v4(),
            rules: Mutex::new(HashMap::new()),
            waiters: Mutex::new(Waiters::default()),
            waiting: std::sync::atomic::AtomicUsize::new(0),
            max_waiting: config.coalesce.max_inflight_total,
        })
    }

    /// Buy: an entry when received in the item's fair window, else the ordinary purchase (after
    /// the draw, when the item has one). The ordinary purchase's future is boxed: a request waiting
    /// for its draw then holds only the small future of the wait.
    pub async fn buy(self: &Arc<Self>, req: BuyRequest) -> Result<Bought, OrderError> {
        let now = now_ms();
        match self.path(&req, now).await? {
            Path::Plain => Box::pin(self.orders.buy(req)).await,
            Path::Entry(rules) => self.enter(req, rules).await,
            Path::AfterWindow => {
                self.await_drawn(&req).await?;
                Box::pin(self.orders.buy(req)).await
            }
        }
    }

    async fn path(&self, req: &BuyRequest, now: i64) -> Result<Path, OrderError> {
        let Some(rules) = self.rules_of(req.sale, req.item).await? else {
            // An unknown item: the ordinary path answers 404.
            return Ok(Path::Plain);
        };
        Ok(
            if rules.window_ms == 0 || rules.drawn || now < rules.starts_ms {
                Path::Plain
            } else if now < rules.starts_ms + rules.window_ms {
                Path::Entry(rules)
            } else {
                Path::AfterWindow
            },
        )
    }

    /// An item's rules, from this node's cache while fresh (a drawn item stays drawn).
    async fn rules_of(&self, sale: SaleId, item: ItemId) -> Result<Option<Rules>, OrderError> {
        let key = (sale.db(), item.db());
        if let Some((r, at)) = lock(&self.rules).get(&key) {
            if r.window_ms == 0 || r.drawn || at.elapsed() < RULES_TTL {
                return Ok(Some(*r));
            }
        }
        let group = self.cluster.group(self.router.item_group(item));
        let read = group
            .run(Work::Read, self.timeout, async |c| {
                store::rules(c, key.0, key.1).await
            })
            .await?;
        if let Some(r) = read {
            lock(&self.rules).insert(key, (r, Instant::now()));
        }
        Ok(read)
    }

    /// Store the entry, wait for the draw, answer with its outcome.
    async fn enter(self: &Arc<Self>, req: BuyRequest, rules: Rules) -> Result<Bought, OrderError> {
        let txn_id = entry_txn_id(&req);
        let group = self.cluster.group(self.router.item_group(req.item));
        let (sale, item, user) = (req.sale.db(), req.item.db(), req.user.db());
        let quantity = req.quantity.get() as i32;
        let stored = group
            .run(Work::Settle, self.timeout, async |c| {
                store::enter(c, sale, item, user, quantity, txn_id).await
            })
            .await?;
        let Some(stored) = stored else {
            // The draw has begun already (this node's clock was behind): after the window.
            self.await_drawn(&req).await?;
            return Box::pin(self.orders.buy(req)).await;
        };
        let decided = match stored.outcome {
            Some(o) if o != Outcome::Won || stored.ordered => stored,
            _ => self.wait(&req, rules).await?,
        };
        Box::pin(self.answer(&req, decided, rules)).await
    }

    /// Wait (no thread, no connection) until the poller hands this entry's outcome over.
    async fn wait(&self, req: &BuyRequest, rules: Rules) -> Result<Stored, OrderError> {
        let waiting = self
            .waiting
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let _held = Held(&self.waiting);
        if waiting >= self.max_waiting {
            return Err(OrderError::Overloaded);
        }
        let (tx, rx) = oneshot::channel();
        {
            let mut w = lock(&self.waiters);
            let (_, users) = w
                .by_item
                .entry((req.sale.db(), req.item.db()))
                .or_insert_with(|| (rules, HashMap::new()));
            users.entry(req.user.db()).or_default().push(tx);
        }
        let until = rules.starts_ms + rules.window_ms - now_ms();
        let limit = Duration::from_millis(until.max(0) as u64) + DRAW_WAIT;
        match tokio::time::timeout(limit, rx).await {
            Ok(Ok(stored)) => Ok(stored),
            _ => Err(OrderError::Unavailable(
                "the draw has not finished yet; ask again with the same request_id".into(),
            )),
        }
    }

    async fn answer(
        &self,
        req: &BuyRequest,
        e: Stored,
        rules: Rules,
    ) -> Result<Bought, OrderError> {
        match e.outcome {
            Some(Outcome::SoldOut) => Err(OrderError::SoldOut { remaining: 0 }),
            Some(Outcome::LimitExceeded) => Err(OrderError::LimitExceeded {
                limit: rules.per_user_limit,
                already: 0,
            }),
            _ => {
                let order = self
                    .orders
                    .find_order_durable(req.user, e.txn_id)
                    .await?
                    .ok_or(OrderError::OrderNotFound(e.txn_id))?;
                Ok(Bought {
                    order,
                    replayed: false,
                })
            }
        }
    }

    /// Wait until the item's draw is done (the purchase is after the window).
    async fn await_drawn(&self, req: &BuyRequest) -> Result<(), OrderError> {
        let started = Instant::now();
        while started.elapsed() < DRAW_WAIT {
            if self
                .rules_of(req.sale, req.item)
                .await?
                .is_none_or(|r| r.drawn)
            {
                return Ok(());
            }
            tokio::time::sleep(POLL).await;
        }
        Err(OrderError::Unavailable(
            "the sale's opening draw is still running; retry shortly".into(),
        ))
    }

    /// An item's draw for the audit; None for an unknown item.
    pub(crate) async fn listing(
        &self,
        sale: SaleId,
        item: ItemId,
    ) -> Result<Option<store::Listing>, OrderError> {
        let (s, i) = (sale.db(), item.db());
        Ok(self
            .cluster
            .group(self.router.item_group(item))
            .run(Work::Read, self.timeout, async |c| {
                store::listing(c, s, i).await
            })
            .await?)
    }

    /// One round of the poller: hand every decided entry to its waiters.
    pub(crate) async fn poll_waiters(&self) {
        let now = now_ms();
        let due: Vec<(Key, Vec<i64>)> = lock(&self.waiters)
            .by_item
            .iter()
            .filter(|(_, (r, users))| now >= r.starts_ms + r.window_ms && !users.is_empty())
            .map(|(k, (_, users))| (*k, users.keys().copied().collect()))
            .collect();
        for ((sale, item), users) in due {
            let group = self
                .cluster
                .group(self.router.item_group(ItemId::from_db(item)));
            let read = group
                .run(Work::Read, self.timeout, async |c| {
                    store::entries_of(c, sale, item, &users).await
                })
                .await;
            let Ok(entries) = read else { continue };
            let mut w = lock(&self.waiters);
            let Some((_, waiting)) = w.by_item.get_mut(&(sale, item)) else {
                continue;
            };
            for e in entries {
                let settled = matches!(e.outcome, Some(o) if o != Outcome::Won || e.ordered);
                if settled {
                    for tx in waiting.remove(&e.user_id).into_iter().flatten() {
                        let _ = tx.send(e.clone());
                    }
                }
            }
            waiting.retain(|_, txs| {
                txs.retain(|t| !t.is_closed());
                !txs.is_empty()
            });
            if waiting.is_empty() {
                w.by_item.remove(&(sale, item));
            }
        }
    }

    /// One round of the draw runner: on every group, run the draws that are due (one node each,
    /// by claim).
    pub(crate) async fn run_due_draws(&self) {
        for g in 0..self.cluster.groups.len() {
            let group = self.cluster.group(g);
            let Ok(due) = group
                .run(Work::Settle, self.timeout, async |c| store::due(c).await)
                .await
            else {
                continue;
            };
            for (sale, item) in due {
                if let Err(e) = self.draw(g, sale, item).await {
                    tracing::warn!(sale, item, error = %e, "draw not finished; it is taken up again");
                }
            }
        }
    }

    /// Claim, run and finish one item's draw (module docs).
    async fn draw(&self, g: usize, sale: i64, item: i64) -> Result<(), OrderError> {
        let group = self.cluster.group(g);
        let node = self.node;
        let Some(claimed) = group
            .run(Work::Settle, self.timeout, async |c| {
                store::claim(c, sale, item, node, LEASE_MS).await
            })
            .await?
        else {
            return Ok(());
        };
        let pending = group
            .run(Work::Settle, self.timeout, async |c| {
                store::pending(c, sale, item).await
            })
            .await?;
        let (mut to_order, undecided): (Vec<Stored>, Vec<Stored>) =
            pending.into_iter().partition(|e| e.outcome.is_some());
        let mut ranked: Vec<(Stored, [u8; 32])> = undecided
            .into_iter()
            .map(|e| {
                let k = rank::rank_key(&claimed.seed, sale as u64, item as u64, e.user_id as u64);
                (e, k)
            })
            .collect();
        ranked.sort_by_key(|(e, k)| (*k, e.user_id));
        tracing::info!(
            sale,
            item,
            entries = ranked.len(),
            stock = claimed.stock,
            "drawing"
        );
        for chunk in ranked.chunks(super::CHUNK) {
            let outcomes = group
                .run(Work::Settle, self.timeout, async |c| {
                    store::decide(c, sale, item, node, chunk, claimed.limit, LEASE_MS).await
                })
                .await?;
            to_order.extend(
                chunk
                    .iter()
                    .zip(outcomes)
                    .filter(|(_, o)| *o == Outcome::Won)
                    .map(|((e, _), _)| e.clone()),
            );
        }
        self.make_orders(g, sale, item, &claimed, &to_order).await?;
        let finished = group
            .run(Work::Settle, self.timeout, async |c| {
                store::done(c, sale, item, node).await
            })
            .await?;
        if finished {
            lock(&self.rules).remove(&(sale, item));
            tracing::info!(sale, item, winners = to_order.len(), "draw done");
        }
        Ok(())
    }

    /// The winners' orders on their user groups (idempotent), then their entries marked ordered.
    async fn make_orders(
        &self,
        g: usize,
        sale: i64,
        item: i64,
        claimed: &store::Claimed,
        winners: &[Stored],
    ) -> Result<(), OrderError> {
        let orders: Vec<NewOrder> = winners
            .iter()
            .map(|e| NewOrder {
                order_id: e.txn_id,
                user: UserId::from_db(e.user_id),
                sale: SaleId::from_db(sale),
                item: ItemId::from_db(item),
                quantity: e.quantity,
                amount_cents: claimed.price_cents * i64::from(e.quantity),
                payment_window_secs: claimed.payment_window_secs,
                status: OrderStatus::PendingPayment,
            })
            .collect();
        let placed = self.orders.place_drawn(&orders).await?;
        let users: Vec<i64> = winners
            .iter()
            .filter(|e| placed.contains(&e.txn_id))
            .map(|e| e.user_id)
            .collect();
        self.cluster
            .group(g)
            .run(Work::Settle, self.timeout, async |c| {
                store::ordered(c, sale, item, &users).await
            })
            .await?;
        Ok(())
    }
}

/// Counts a waiting entry while it lives.
struct Held<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// An entry's transaction id: from its request id when it has one (so the same request_id
/// after the draw replays its order), else one fixed per user and item.
fn entry_txn_id(req: &BuyRequest) -> Uuid {
    let fixed = RequestId::parse("fair-start-entry".to_string()).ok();
    txn_id_for(
        req.sale,
        req.item,
        req.user,
        req.request_id.as_ref().or(fixed.as_ref()),
    )
}
