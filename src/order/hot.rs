//! The hot path: what a node answers from memory before any database work.
//!
//! [`SoldOutCache`] answers `sold_out` without touching PostgreSQL once a node has seen an item at
//! zero. It learns that stock came back (cancel, expiry, compensation) immediately when this node
//! released it, and from other nodes by polling: every `coalesce.soldout_refresh_ms` it re-reads
//! the `remaining` and `version` of the items it holds sold out (one query per group, only for
//! those items). Polling was chosen over LISTEN/NOTIFY because it needs no dedicated connection per
//! group and survives a failover without re-subscribing; its cost is bounded by the number of
//! sold-out items.
//!
//! **Retries on a sold-out item.** A retry (same `request_id`) whose earlier attempt holds a live
//! reservation must still get its order, but looking every request id up in the database would
//! undo the fast path. So for each sold-out item the node keeps the txn ids of its live
//! reservations, the *holders*, read in the same statement (one snapshot) as the item's `version`.
//! While an item is sold out that set cannot grow: a new reservation needs stock, and stock coming
//! back moves the version, after which the set is read again. A request whose txn id is not a
//! holder is answered `sold_out` from memory; only a holder goes on to the database. Until an
//! item's holders are known (a few ms after it sells out), and for items with more than
//! [`MAX_HOLDERS`] live reservations, requests with a request id take the database path, bounded
//! by admission. A unit that came back and was bought again on *another* node within the last
//! refresh interval is the one case a retry can be told `sold_out` while holding stock; the
//! reconciler returns such an orphaned reservation's stock once it is older than the grace period.
//!
//! [`Admission`] keeps the queues bounded: per item, at most `inflight_per_stock` times the
//! remaining stock (as last seen) may be in flight, never more than `max_queue`, and never more
//! than `max_inflight_total` over all items of the node; beyond that a request is answered 503
//! `overloaded` at once. A [`Ticket`] is held until the purchase has finished, including the time
//! it waits in a coalescing queue, even when its client is long gone.
//!
//! Neither map grows with history: sold-out entries of ended or deleted items are dropped by the
//! refresh, and idle admission gates are swept.

use crate::domain::{ItemId, SaleId};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use uuid::Uuid;

pub(crate) type ItemKey = (SaleId, ItemId);

/// Beyond this many live reservations an item's holders are not kept in memory.
pub(crate) const MAX_HOLDERS: usize = 500_000;

/// An idle admission gate is forgotten after this long.
const GATE_IDLE: Duration = Duration::from_secs(600);

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
    pub(crate) fn observe(&self, sale: SaleId, item: ItemId, remaining: i32) {
        self.soldout.observe(sale, item, remaining);
        self.admission.observe(sale, item, remaining);
    }
}

/// The live reservations of a sold-out item, as of `version`.
#[derive(Debug, Clone)]
pub(crate) enum Holders {
    /// Not read yet.
    Unknown,
    /// More than [`MAX_HOLDERS`]: not kept.
    TooMany { version: i64 },
    Known {
        version: i64,
        txns: Arc<HashSet<Uuid>>,
    },
}

impl Holders {
    pub fn version(&self) -> Option<i64> {
        match self {
            Holders::Unknown => None,
            Holders::TooMany { version } | Holders::Known { version, .. } => Some(*version),
        }
    }
}

/// A sold-out item: its holders, and which sell-out this is (an item may sell out, get stock
/// back and sell out again; holders read for an earlier sell-out never land on a later one).
#[derive(Debug, Clone)]
struct Entry {
    generation: u64,
    holders: Holders,
}

/// Items known (to this node) to be sold out, with their holders.
#[derive(Default)]
pub struct SoldOutCache {
    items: RwLock<HashMap<ItemKey, Entry>>,
    generations: std::sync::atomic::AtomicU64,
    /// Woken when an item sells out, so its holders are read at once rather than at the next tick.
    pub(crate) wake: tokio::sync::Notify,
}

/// The sold-out cache's answer for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not known to be sold out: go on.
    Open,
    /// Sold out, and this txn holds nothing: answer `sold_out` now.
    SoldOut,
    /// Sold out, but this txn may hold a live reservation: go on to the database.
    MayHold,
}

impl SoldOutCache {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<ItemKey, Entry>> {
        match self.items.read() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<ItemKey, Entry>> {
        match self.items.write() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        }
    }

    pub fn is_sold_out(&self, sale: SaleId, item: ItemId) -> bool {
        self.read().contains_key(&(sale, item))
    }

    /// What to do with a request for `(sale, item)`; `txn` is its txn id when it carries a
    /// request id (only then can it be a retry).
    pub fn verdict(&self, sale: SaleId, item: ItemId, txn: Option<Uuid>) -> Verdict {
        let items = self.read();
        let Some(entry) = items.get(&(sale, item)) else {
            return Verdict::Open;
        };
        match (txn, &entry.holders) {
            (None, _) => Verdict::SoldOut,
            (Some(t), Holders::Known { txns, .. }) if !txns.contains(&t) => Verdict::SoldOut,
            (Some(_), _) => Verdict::MayHold,
        }
    }

    /// Record the remaining stock just seen for an item.
    pub(crate) fn observe(&self, sale: SaleId, item: ItemId, remaining: i32) {
        let sold_out = remaining <= 0;
        if sold_out == self.is_sold_out(sale, item) {
            return;
        }
        let mut m = self.write();
        if sold_out {
            let generation = self.generations.fetch_add(1, Ordering::Relaxed);
            m.entry((sale, item)).or_insert(Entry {
                generation,
                holders: Holders::Unknown,
            });
            drop(m);
            self.wake.notify_one();
        } else if m.remove(&(sale, item)).is_some() {
            tracing::info!(%sale, %item, remaining, "stock is back: sold-out fast path off");
        }
    }

    /// Every sold-out item: the version its holders were read at, and its generation.
    pub(crate) fn sold_out_items(&self) -> Vec<(ItemKey, Option<i64>, u64)> {
        self.read()
            .iter()
            .map(|(k, e)| (*k, e.holders.version(), e.generation))
            .collect()
    }

    /// Install holders, unless the item left the sold-out set meanwhile (or left and came back:
    /// another `generation`).
    pub(crate) fn set_holders(&self, key: ItemKey, generation: u64, holders: Holders) {
        if let Some(e) = self.write().get_mut(&key) {
            if e.generation == generation {
                e.holders = holders;
            }
        }
    }

    /// The generation of an item's current sell-out, if it is sold out.
    #[cfg(test)]
    pub(crate) fn generation(&self, key: ItemKey) -> Option<u64> {
        self.read().get(&key).map(|e| e.generation)
    }

    /// Drop items that ended or no longer exist.
    pub(crate) fn forget(&self, keys: &[ItemKey]) {
        let mut m = self.write();
        for k in keys {
            m.remove(k);
        }
    }
}

/// Per-item bound on requests in flight (module docs).
#[derive(Clone)]
pub struct Admission {
    inner: Arc<Gates>,
}

struct Gates {
    per_stock: u32,
    max_queue: usize,
    max_total: usize,
    items: Mutex<HashMap<ItemKey, Gate>>,
    total: AtomicUsize,
}

struct Gate {
    inflight: usize,
    remaining: Option<i32>,
    touched: Instant,
}

impl Default for Gate {
    fn default() -> Self {
        Self {
            inflight: 0,
            remaining: None,
            touched: Instant::now(),
        }
    }
}

/// Holds one request's place until the purchase is over; gives it back on drop.
pub(crate) struct Ticket {
    gates: Arc<Gates>,
    key: ItemKey,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.gates.total.fetch_sub(1, Ordering::Relaxed);
        let mut items = self.gates.lock();
        if let Some(g) = items.get_mut(&self.key) {
            g.inflight = g.inflight.saturating_sub(1);
            g.touched = Instant::now();
        }
    }
}

impl Gates {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ItemKey, Gate>> {
        match self.items.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

impl Admission {
    pub fn new(config: &crate::config::CoalesceConfig) -> Self {
        Self {
            inner: Arc::new(Gates {
                per_stock: config.inflight_per_stock,
                max_queue: config.max_queue,
                max_total: config.max_inflight_total,
                items: Mutex::new(HashMap::new()),
                total: AtomicUsize::new(0),
            }),
        }
    }

    /// A place for one request, or None when the item (or the node) has enough in flight already.
    pub(crate) fn admit(&self, sale: SaleId, item: ItemId) -> Option<Ticket> {
        let g = &self.inner;
        let mut items = g.lock();
        let gate = items.entry((sale, item)).or_default();
        let by_stock = gate
            .remaining
            .map(|r| (r.max(1) as usize).saturating_mul(g.per_stock as usize))
            .unwrap_or(usize::MAX);
        if gate.inflight >= by_stock.min(g.max_queue)
            || g.total.load(Ordering::Relaxed) >= g.max_total
        {
            return None;
        }
        gate.inflight += 1;
        gate.touched = Instant::now();
        g.total.fetch_add(1, Ordering::Relaxed);
        Some(Ticket {
            gates: g.clone(),
            key: (sale, item),
        })
    }

    /// Record the remaining stock last seen for an item.
    pub(crate) fn observe(&self, sale: SaleId, item: ItemId, remaining: i32) {
        let mut items = self.inner.lock();
        let gate = items.entry((sale, item)).or_default();
        gate.remaining = Some(remaining);
        gate.touched = Instant::now();
    }

    /// Requests in flight over all items.
    pub fn in_flight(&self) -> usize {
        self.inner.total.load(Ordering::Relaxed)
    }

    /// Forget gates with nothing in flight that nobody touched for a while.
    pub fn sweep(&self) {
        self.inner
            .lock()
            .retain(|_, g| g.inflight > 0 || g.touched.elapsed() < GATE_IDLE);
    }

    pub fn gates(&self) -> usize {
        self.inner.lock().len()
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
        assert_eq!(a.in_flight(), 3);
        drop(tickets);
        assert!(a.admit(s, i).is_some());
    }

    #[test]
    fn idle_gates_are_swept_busy_ones_kept() {
        let a = Admission::new(&Default::default());
        let (s, i) = key(30);
        let _busy = a.admit(s, i).unwrap();
        a.observe(SaleId::parse(2).unwrap(), i, 5);
        a.inner.lock().values_mut().for_each(|g| {
            g.touched = Instant::now()
                .checked_sub(GATE_IDLE * 2)
                .unwrap_or_else(Instant::now)
        });
        a.sweep();
        assert_eq!(a.gates(), 1, "only the gate with a request in flight stays");
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

    #[test]
    fn holders_decide_which_retries_reach_the_database() {
        let c = SoldOutCache::default();
        let (s, i) = key(8);
        let (holder, stranger) = (Uuid::from_u128(1), Uuid::from_u128(2));
        c.observe(s, i, 0);
        assert_eq!(c.verdict(s, i, None), Verdict::SoldOut);
        assert_eq!(
            c.verdict(s, i, Some(stranger)),
            Verdict::MayHold,
            "holders unknown yet"
        );
        let generation = c.generation((s, i)).unwrap();
        c.set_holders(
            (s, i),
            generation + 1,
            Holders::Known {
                version: 3,
                txns: Arc::new(HashSet::from([holder])),
            },
        );
        assert_eq!(
            c.verdict(s, i, Some(stranger)),
            Verdict::MayHold,
            "holders of another sell-out are not installed"
        );
        c.set_holders(
            (s, i),
            generation,
            Holders::Known {
                version: 3,
                txns: Arc::new(HashSet::from([holder])),
            },
        );
        assert_eq!(c.verdict(s, i, Some(holder)), Verdict::MayHold);
        assert_eq!(c.verdict(s, i, Some(stranger)), Verdict::SoldOut);
        c.observe(s, i, 1);
        assert_eq!(c.verdict(s, i, Some(stranger)), Verdict::Open);
    }
}
