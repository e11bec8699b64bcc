//! What the front door must know about an item of a sale: its window and its protection (both
//! fixed when the sale is made), and roughly how much is left.
//!
//! Read from the item's own row (`sale_items`, on the item's group) once per node and kept; an
//! unknown (sale, item) is remembered as unknown for a second. Callers ask only after the user's
//! rate limit, so probing made-up ids costs a user at most its rate in reads. `remaining` is re-read at most every 250 ms, for the challenge and
//! order-token requests that refuse to hand out tokens for a sold-out item.

use crate::domain::{ItemId, Protection, SaleId};
use crate::router::Router;
use crate::shard::{Cluster, GroupError, Work};
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

const UNKNOWN_FOR: Duration = Duration::from_secs(1);
const REMAINING_FOR: Duration = Duration::from_millis(250);
/// Most (sale, item) pairs remembered; beyond, the memory starts over.
const MAX_ENTRIES: usize = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
    pub protection: Option<Protection>,
}

#[derive(Clone, Copy)]
struct Cached {
    rules: Option<Rules>,
    remaining: i32,
    read_at: Instant,
}

pub struct RulesCache {
    cluster: Arc<Cluster>,
    router: Arc<Router>,
    timeout: Duration,
    entries: RwLock<HashMap<(SaleId, ItemId), Cached>>,
}

impl RulesCache {
    pub fn new(cluster: Arc<Cluster>, router: Arc<Router>, timeout: Duration) -> Self {
        Self {
            cluster,
            router,
            timeout,
            entries: RwLock::new(HashMap::new()),
        }
    }

    fn cached(&self, key: (SaleId, ItemId)) -> Option<Cached> {
        let entries = match self.entries.read() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        entries.get(&key).copied()
    }

    /// The item's rules, or None when the sale has no such item.
    pub async fn get(&self, sale: SaleId, item: ItemId) -> Result<Option<Rules>, GroupError> {
        match self.cached((sale, item)) {
            Some(c) if c.rules.is_some() || c.read_at.elapsed() < UNKNOWN_FOR => Ok(c.rules),
            _ => Ok(self.read(sale, item).await?.rules),
        }
    }

    /// The item's rules and its remaining stock as of at most 250 ms ago.
    pub async fn with_remaining(
        &self,
        sale: SaleId,
        item: ItemId,
    ) -> Result<Option<(Rules, i32)>, GroupError> {
        let c = match self.cached((sale, item)) {
            Some(c) if c.read_at.elapsed() < REMAINING_FOR => c,
            Some(c) if c.rules.is_none() && c.read_at.elapsed() < UNKNOWN_FOR => c,
            _ => self.read(sale, item).await?,
        };
        Ok(c.rules.map(|r| (r, c.remaining)))
    }

    async fn read(&self, sale: SaleId, item: ItemId) -> Result<Cached, GroupError> {
        let row = self
            .cluster
            .group(self.router.item_group(item))
            .run(Work::Read, self.timeout, async |c| {
                Ok(c.query_opt(
                    &c.prepare_cached(
                        "SELECT starts_at, ends_at, protection, remaining FROM sale_items
                         WHERE sale_id = $1 AND item_id = $2",
                    )
                    .await?,
                    &[&sale.db(), &item.db()],
                )
                .await?)
            })
            .await?;
        let cached = Cached {
            rules: row.as_ref().map(|r| Rules {
                starts_at: r.get(0),
                ends_at: r.get(1),
                protection: r
                    .get::<_, Option<serde_json::Value>>(2)
                    .map(Protection::from_stored),
            }),
            remaining: row.as_ref().map_or(0, |r| r.get(3)),
            read_at: Instant::now(),
        };
        let mut entries = match self.entries.write() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if entries.len() >= MAX_ENTRIES {
            // Forget the unknown ids first (a probe flood); the live items only if that was not
            // enough.
            entries.retain(|_, c| c.rules.is_some());
            if entries.len() >= MAX_ENTRIES {
                entries.clear();
            }
        }
        entries.insert((sale, item), cached);
        Ok(cached)
    }
}
