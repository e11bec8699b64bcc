//! Sales and their items: creation across groups, and the public view with remaining stock;
//! changing a running sale ([`changes`]).
//!
//! A sale row lives on the group of its sale id (items' router); each item row on the group of its
//! item id. Creation writes the items first and the sale row last, so a sale is visible only once
//! all of its items exist; if any write fails, the items already written are removed again.

pub mod cache;
pub mod changes;

use crate::db::DbError;
use crate::domain::{ItemId, Protection, SaleId};
use crate::router::Router;
use crate::shard::{Cluster, GroupError, Work};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::time::Duration;

/// Largest stock of one item.
pub(crate) const MAX_STOCK: i64 = 1_000_000_000;
/// Most items in one sale.
pub(crate) const MAX_ITEMS: usize = 1_000;

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewSale {
    /// 1 to 200 characters, no control characters.
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]*\\S[^\\x00-\\x1f\\x7f-\\x9f]*$"
    )]
    pub name: String,
    /// Years 1970 to 9999.
    pub starts_at: DateTime<Utc>,
    /// After `starts_at`; years 1970 to 9999.
    pub ends_at: DateTime<Utc>,
    /// Seconds an order may stay unpaid. Default: `orders.payment_window_secs`.
    #[serde(default, deserialize_with = "crate::domain::integer_opt_u32")]
    #[schema(minimum = 1, maximum = 604800)]
    pub payment_window_secs: Option<u32>,
    /// 1 to 1000 items, each item id once.
    #[schema(min_items = 1, max_items = 1000)]
    pub items: Vec<NewItem>,
    /// Guard the buy path with order tokens and a challenge (docs/api.md "Protected sales"). Fields
    /// left out take their defaults; without `protection` the plain buy path serves.
    #[serde(default)]
    pub protection: Option<Protection>,
    /// 1 to 10000: the first milliseconds of the sale are a seeded draw instead of first come,
    /// first served (docs/api.md "A fair start"). 0 or absent: first come, first served.
    #[serde(default, deserialize_with = "crate::domain::integer_opt_u32")]
    #[schema(minimum = 0, maximum = 10000)]
    pub fair_window_ms: Option<u32>,
}

/// Longest fair window of a sale, in ms.
pub(crate) const MAX_FAIR_WINDOW_MS: u32 = 10_000;

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewItem {
    #[schema(value_type = u64, minimum = 1, maximum = 9223372036854775807_u64)]
    pub item_id: ItemId,
    #[schema(minimum = 0, maximum = 1000000000)]
    #[serde(deserialize_with = "crate::domain::integer_i64")]
    pub stock: i64,
    #[schema(minimum = 0, maximum = 9223372036854_i64)]
    #[serde(deserialize_with = "crate::domain::integer_i64")]
    pub price_cents: i64,
    /// Default 1.
    #[serde(default = "one", deserialize_with = "crate::domain::integer_i64")]
    #[schema(minimum = 1, maximum = 1000000)]
    pub per_user_limit: i64,
}

fn one() -> i64 {
    1
}

impl NewSale {
    /// Everything the type system could not say. Returns the offending field and why.
    pub fn check(&self) -> Result<(), (String, String)> {
        let bad = |f: &str, r: &str| Err((f.to_string(), r.to_string()));
        if self.name.trim().is_empty() || self.name.chars().count() > 200 {
            return bad("name", "must be 1 to 200 characters");
        }
        if self.name.chars().any(char::is_control) {
            return bad(
                "name",
                "must not contain control characters (NUL, newlines, ...)",
            );
        }
        // PostgreSQL stores years up to 294276, chrono parses signed years; keep to sane ones.
        let sane = |t: &DateTime<Utc>| (1970..=9999).contains(&chrono::Datelike::year(t));
        if !sane(&self.starts_at) {
            return bad("starts_at", "must be between the years 1970 and 9999");
        }
        if !sane(&self.ends_at) {
            return bad("ends_at", "must be between the years 1970 and 9999");
        }
        if self.ends_at <= self.starts_at {
            return bad("ends_at", "must be after starts_at");
        }
        if self.items.is_empty() || self.items.len() > MAX_ITEMS {
            return bad("items", "a sale needs 1 to 1000 items");
        }
        if let Some(w) = self.payment_window_secs {
            if w == 0 || w > crate::config::MAX_PAYMENT_WINDOW_SECS {
                return bad("payment_window_secs", "must be between 1 and 604800");
            }
        }
        if self.fair_window_ms.is_some_and(|w| w > MAX_FAIR_WINDOW_MS) {
            return bad("fair_window_ms", "must be between 0 and 10000");
        }
        if let Some(p) = &self.protection {
            if let Err((field, why)) = p.check() {
                return bad(&format!("protection.{field}"), why);
            }
        }
        let mut seen = HashSet::new();
        for (i, item) in self.items.iter().enumerate() {
            if !seen.insert(item.item_id) {
                return bad(
                    &format!("items[{i}].item_id"),
                    "duplicate item in this sale",
                );
            }
            if !(0..=MAX_STOCK).contains(&item.stock) {
                return bad(
                    &format!("items[{i}].stock"),
                    "must be between 0 and 1000000000",
                );
            }
            if !(0..=i64::MAX / 1_000_000).contains(&item.price_cents) {
                return bad(
                    &format!("items[{i}].price_cents"),
                    "must be a non-negative amount",
                );
            }
            if !(1..=1_000_000).contains(&item.per_user_limit) {
                return bad(
                    &format!("items[{i}].per_user_limit"),
                    "must be between 1 and 1000000",
                );
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct SaleView {
    pub sale_id: u64,
    pub name: String,
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
    pub payment_window_secs: i32,
    /// `scheduled`, `live`, `paused` or `ended`, now.
    pub state: changes::SaleState,
    /// Paused by an operator: buys get 409 `paused` until it resumes.
    pub paused: bool,
    /// The sale's protection, when it has one: what a buyer must do before buying.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protection: Option<Protection>,
    /// A fair start's draw, when the sale has one; null otherwise.
    pub fair_draw: Option<FairDraw>,
    pub items: Vec<ItemView>,
}

/// What a sale shows of its fair start (DESIGN.md "Fair start").
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct FairDraw {
    pub window_ms: i32,
    /// hex(SHA-256 of the seed's 32 raw bytes), from the sale's creation on.
    pub commitment: String,
    /// The seed, hex, once every item of the sale is drawn; null until then.
    pub seed: Option<String>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct ItemView {
    pub item_id: u64,
    pub stock: i32,
    pub remaining: i32,
    pub price_cents: i64,
    pub per_user_limit: i32,
}

/// What can go wrong with a sale.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SaleError {
    #[error("sale {0} not found")]
    NotFound(SaleId),
    #[error("item {item} is not part of sale {sale}")]
    ItemNotFound { sale: SaleId, item: ItemId },
    /// A change that cannot be made: the field and why.
    #[error("{0}")]
    Invalid(String),
    /// Work on a group failed.
    #[error(transparent)]
    Group(#[from] GroupError),
}

pub(crate) struct SaleService<'a> {
    pub cluster: &'a Cluster,
    pub router: &'a Router,
    pub timeout: Duration,
    pub(crate) default_window: u32,
}

impl SaleService<'_> {
    pub async fn create(&self, sale: &NewSale) -> Result<SaleView, SaleError> {
        // Random positive 63-bit id: engine nodes need no coordination to pick one.
        let sale_id = SaleId::from_db((uuid::Uuid::new_v4().as_u64_pair().0 >> 1).max(1) as i64);
        let window = sale.payment_window_secs.unwrap_or(self.default_window) as i32;
        let fair = match sale.fair_window_ms.filter(|w| *w > 0) {
            Some(w) => Some((
                w as i32,
                crate::fair::rank::fresh_seed().map_err(|e| {
                    GroupError::from(DbError::Rejected {
                        code: "seckill".into(),
                        message: format!("no secure random seed for the draw: {e}"),
                    })
                })?,
            )),
            None => None,
        };
        let mut by_group: HashMap<usize, Vec<&NewItem>> = HashMap::new();
        for item in &sale.items {
            by_group
                .entry(self.router.item_group(item.item_id))
                .or_default()
                .push(item);
        }
        let mut written: Vec<usize> = Vec::new();
        let mut failure = None;
        for (&g, items) in &by_group {
            match self
                .insert_items(g, sale_id, sale, window, fair, items)
                .await
            {
                Ok(()) => written.push(g),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        if failure.is_none() {
            if let Err(e) = self.insert_sale(sale_id, sale, window, fair).await {
                failure = Some(e);
            }
        }
        if let Some(e) = failure {
            for g in written {
                if let Err(undo) = self.delete_items(g, sale_id).await {
                    tracing::error!(%sale_id, error = %undo, "could not remove items of a failed sale creation");
                }
            }
            return Err(e.into());
        }
        tracing::info!(%sale_id, name = %sale.name, items = sale.items.len(), "sale created");
        self.get(sale_id).await
    }

    async fn insert_items(
        &self,
        g: usize,
        sale_id: SaleId,
        sale: &NewSale,
        window: i32,
        fair: Option<(i32, crate::fair::rank::Seed)>,
        items: &[&NewItem],
    ) -> Result<(), GroupError> {
        let (fair_window, seed) = match fair {
            Some((w, seed)) => (w, Some(seed.to_vec())),
            None => (0, None),
        };
        let ids: Vec<i64> = items.iter().map(|i| i.item_id.db()).collect();
        let stock: Vec<i32> = items.iter().map(|i| i.stock as i32).collect();
        let price: Vec<i64> = items.iter().map(|i| i.price_cents).collect();
        let limit: Vec<i32> = items.iter().map(|i| i.per_user_limit as i32).collect();
        let protection = sale.protection.map(tokio_postgres::types::Json);
        let slot_count = self.router.kind(crate::router::KeyKind::Items).slot_count();
        let slots: Vec<i32> = items
            .iter()
            .map(|i| crate::router::slot_of(i.item_id.key(), slot_count) as i32)
            .collect();
        self.cluster
            .group(g)
            .run(Work::Settle, self.timeout, async |client| {
                // One statement: an item being moved away from this group (its rows or its slot
                // fenced by a move) gets no new sale here, or the move would leave it behind. (A
                // slot move waits out the statements that began before its fence.)
                let inserted = client
                    .execute(
                        &client
                            .prepare_cached(
                                "INSERT INTO sale_items (sale_id, item_id, stock, remaining, price_cents,
                                     per_user_limit, starts_at, ends_at, payment_window_secs, protection,
                                     fair_window_ms, fair_seed)
                                 SELECT $1, i, s, s, p, l, $6, $7, $8, $9, $11, $12
                                 FROM unnest($2::bigint[], $3::int[], $4::bigint[], $5::int[])
                                      AS t(i, s, p, l)
                                 WHERE NOT EXISTS (SELECT 1 FROM sale_items
                                                   WHERE item_id = ANY($2) AND fenced_by IS NOT NULL)
                                   AND NOT EXISTS (SELECT 1 FROM item_fences
                                                   WHERE item_id = ANY($2)
                                                     AND (until IS NULL OR until > now()))
                                   AND NOT EXISTS (SELECT 1 FROM slot_fences
                                                   WHERE kind = 'items' AND slot = ANY($10)
                                                     AND (until IS NULL OR until > now()))",
                            )
                            .await?,
                        &[
                            &sale_id.db(),
                            &ids,
                            &stock,
                            &price,
                            &limit,
                            &sale.starts_at,
                            &sale.ends_at,
                            &window,
                            &protection,
                            &slots,
                            &fair_window,
                            &seed,
                        ],
                    )
                    .await?;
                if inserted != ids.len() as u64 {
                    return Err(DbError::Moving("an item of this sale".into()));
                }
                Ok::<_, DbError>(())
            })
            .await
    }

    async fn insert_sale(
        &self,
        sale_id: SaleId,
        sale: &NewSale,
        window: i32,
        fair: Option<(i32, crate::fair::rank::Seed)>,
    ) -> Result<(), GroupError> {
        let ids: Vec<i64> = sale.items.iter().map(|i| i.item_id.db()).collect();
        let fair_window = fair.map_or(0, |(w, _)| w);
        let commitment = fair.map(|(_, seed)| crate::fair::rank::commitment(&seed).to_vec());
        let protection = sale.protection.map(tokio_postgres::types::Json);
        let slot = crate::router::slot_of(
            sale_id.key(),
            self.router.kind(crate::router::KeyKind::Items).slot_count(),
        ) as i32;
        self.cluster
            .group(self.router.sale_group(sale_id))
            .run(Work::Settle, self.timeout, async |client| {
                let inserted = client
                    .execute(
                        &client.prepare_cached("INSERT INTO sales (sale_id, name, starts_at, ends_at, item_ids, payment_window_secs, protection,
                                                                   fair_window_ms, fair_commitment)
                         SELECT $1, $2, $3, $4, $5, $6, $7, $9, $10
                         WHERE NOT EXISTS (SELECT 1 FROM slot_fences WHERE kind = 'items' AND slot = $8
                                           AND (until IS NULL OR until > now()))").await?,
                        &[&sale_id.db(), &sale.name, &sale.starts_at, &sale.ends_at, &ids, &window, &protection, &slot,
                          &fair_window, &commitment],
                    )
                    .await?;
                if inserted == 0 {
                    return Err(DbError::Moving("the sale".into()));
                }
                Ok::<_, DbError>(())
            })
            .await
    }

    async fn delete_items(&self, g: usize, sale_id: SaleId) -> Result<(), GroupError> {
        self.cluster
            .group(g)
            .run(Work::Settle, self.timeout, async |client| {
                client
                    .execute(
                        &client
                            .prepare_cached("DELETE FROM sale_items WHERE sale_id = $1")
                            .await?,
                        &[&sale_id.db()],
                    )
                    .await?;
                Ok::<_, DbError>(())
            })
            .await
    }

    /// The sale row, or None.
    pub async fn header(
        &self,
        sale_id: SaleId,
    ) -> Result<Option<(SaleView, Vec<ItemId>)>, SaleError> {
        let row = self
            .cluster
            .group(self.router.sale_group(sale_id))
            .run(Work::Read, self.timeout, async |client| {
                Ok(client
                    .query_opt(
                        &client.prepare_cached("SELECT name, starts_at, ends_at, payment_window_secs, item_ids, protection,
                                                       fair_window_ms, fair_commitment, paused FROM sales
                                                WHERE sale_id = $1").await?,
                        &[&sale_id.db()],
                    )
                    .await?)
            })
            .await?;
        Ok(row.map(|r| {
            let ids: Vec<i64> = r.get(4);
            (
                SaleView {
                    sale_id: sale_id.key(),
                    name: r.get(0),
                    starts_at: r.get(1),
                    ends_at: r.get(2),
                    payment_window_secs: r.get(3),
                    state: changes::state_of(Utc::now(), r.get(1), r.get(2), r.get(8)),
                    paused: r.get(8),
                    protection: r
                        .try_get::<_, Option<serde_json::Value>>(5)
                        .ok()
                        .flatten()
                        .map(Protection::from_stored),
                    fair_draw: r
                        .get::<_, Option<Vec<u8>>>(7)
                        .filter(|_| r.get::<_, i32>(6) > 0)
                        .map(|c| FairDraw {
                            window_ms: r.get(6),
                            commitment: hex::encode(c),
                            seed: None,
                        }),
                    items: Vec::new(),
                },
                ids.into_iter().map(ItemId::from_db).collect(),
            )
        }))
    }

    pub async fn get(&self, sale_id: SaleId) -> Result<SaleView, SaleError> {
        let Some((mut view, item_ids)) = self.header(sale_id).await? else {
            return Err(SaleError::NotFound(sale_id));
        };
        let mut by_group: HashMap<usize, Vec<i64>> = HashMap::new();
        for item in &item_ids {
            by_group
                .entry(self.router.item_group(*item))
                .or_default()
                .push(item.db());
        }
        let mut items = HashMap::new();
        // The seed is revealed once every item is drawn.
        let (mut seed, mut all_drawn) = (None, true);
        for (g, ids) in by_group {
            let rows = self
                .cluster
                .group(g)
                .run(Work::Read, self.timeout, async |client| {
                    Ok(client
                        .query(
                            &client
                                .prepare_cached(
                                    "SELECT item_id, stock, remaining, price_cents, per_user_limit,
                                    fair_seed, drawn_at IS NOT NULL FROM sale_items
                             WHERE sale_id = $1 AND item_id = ANY($2)",
                                )
                                .await?,
                            &[&sale_id.db(), &ids],
                        )
                        .await?)
                })
                .await?;
            for r in rows {
                let id: i64 = r.get(0);
                all_drawn &= r.get::<_, bool>(6);
                seed = seed.or(r.get::<_, Option<Vec<u8>>>(5));
                items.insert(
                    id,
                    ItemView {
                        item_id: id.unsigned_abs(),
                        stock: r.get(1),
                        remaining: r.get(2),
                        price_cents: r.get(3),
                        per_user_limit: r.get(4),
                    },
                );
            }
        }
        view.items = item_ids
            .iter()
            .filter_map(|i| items.remove(&i.db()))
            .collect();
        if let Some(fair) = view.fair_draw.as_mut() {
            fair.seed = seed.filter(|_| all_drawn).map(hex::encode);
        }
        Ok(view)
    }
}
