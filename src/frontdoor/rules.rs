//! What the front door must know about an item of a sale: its window and its protection, and
//! roughly how much is left.
//!
//! Read from the item's own row (`sale_items`, on the item's group) on the front door's own share
//! of the pool ([`Work::Door`]), one read per item and node at a time ([`crate::flight`]): the
//! requests that find an entry too old wait for the one read under way. Rules are re-read at most
//! every second (an operator may move a sale's end: `sale::changes`); an unknown (sale, item) is
//! remembered as unknown for a second. Callers ask only after the user's rate limit, so probing
//! made-up ids costs a user at most its rate in reads. `remaining` is re-read at most every
//! 250 ms, for the challenge and order-token requests that refuse to hand out tokens for a
//! sold-out item.

use crate::domain::{ItemId, Protection, SaleId};
use crate::flight::Flights;
use crate::router::Router;
use crate::shard::{Cluster, GroupError, Work};
use chrono::{DateTime, Utc};
use std::sync::Arc;
use std::time::Duration;

const RULES_FOR: Duration = Duration::from_secs(1);
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
}

pub struct RulesCache {
    cluster: Arc<Cluster>,
    router: Arc<Router>,
    timeout: Duration,
    flights: Flights<(SaleId, ItemId), Cached>,
}

impl RulesCache {
    pub fn new(cluster: Arc<Cluster>, router: Arc<Router>, timeout: Duration) -> Self {
        Self {
            cluster,
            router,
            timeout,
            flights: Flights::new(MAX_ENTRIES),
        }
    }

    /// The item's rules (at most a second old), or None when the sale has no such item.
    pub async fn get(&self, sale: SaleId, item: ItemId) -> Result<Option<Rules>, GroupError> {
        let c = self.cached(sale, item, RULES_FOR).await?;
        Ok(c.rules)
    }

    /// The item's rules and its remaining stock as of at most 250 ms ago.
    pub(crate) async fn with_remaining(
        &self,
        sale: SaleId,
        item: ItemId,
    ) -> Result<Option<(Rules, i32)>, GroupError> {
        let c = self.cached(sale, item, REMAINING_FOR).await?;
        Ok(c.rules.map(|r| (r, c.remaining)))
    }

    /// The entry of (sale, item), read again when older than `max_age` (an unknown one is kept
    /// for [`RULES_FOR`] whatever the caller asks).
    async fn cached(
        &self,
        sale: SaleId,
        item: ItemId,
        max_age: Duration,
    ) -> Result<Cached, GroupError> {
        let fresh = |c: &Cached, age: Duration| {
            age < if c.rules.is_some() {
                max_age
            } else {
                RULES_FOR
            }
        };
        self.flights
            .get((sale, item), fresh, || self.read(sale, item))
            .await
    }

    async fn read(&self, sale: SaleId, item: ItemId) -> Result<Cached, GroupError> {
        let row = self
            .cluster
            .group(self.router.item_group(item))
            .run(Work::Door, self.timeout, async |c| {
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
        Ok(Cached {
            rules: row.as_ref().map(|r| Rules {
                starts_at: r.get(0),
                ends_at: r.get(1),
                protection: r
                    .get::<_, Option<serde_json::Value>>(2)
                    .map(Protection::from_stored),
            }),
            remaining: row.as_ref().map_or(0, |r| r.get(3)),
        })
    }
}
