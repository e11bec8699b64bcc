//! Changing a running sale, for operators: pause and resume it (buys refused with 409 `paused`
//! meanwhile), move its end (end it now, or extend it), add stock to an item; and the list of
//! sales with their state. Every change is recorded in `sale_changes` with the admin request that
//! made it, and shown by the sale's audit.
//!
//! A sale's end and pause are copied into each item row (transaction 1 checks them in the row it
//! locks), so a change writes the item rows first, then the sale row: a change that fails halfway
//! is completed by asking again. A restock is one transaction on the item's group: stock and
//! remaining grow together, so conservation (stock = remaining + reserved + ordered + paid) holds
//! throughout; every node sells the new units at once (the stock lives in the row), and a node
//! that held the item sold out learns of it within `coalesce.soldout_refresh_ms`.

use super::{SaleError, SaleService, SaleView, MAX_STOCK};
use crate::db::DbError;
use crate::domain::{ItemId, SaleId};
use crate::shard::Work;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// `PATCH /v1/admin/sales/{sale_id}`: what to change; a field left out stays as it is.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SaleChange {
    /// The new end: now to end the sale at once, later to extend it. After `starts_at`.
    pub ends_at: Option<DateTime<Utc>>,
    /// `true` pauses the sale (buys get 409 `paused`), `false` resumes it.
    pub paused: Option<bool>,
}

/// `POST /v1/admin/sales/{sale_id}/items/{item_id}/restock`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Restock {
    /// Units to add: 1 to 1000000000 (the item's stock stays at most 1000000000).
    #[serde(deserialize_with = "crate::domain::integer_i64")]
    #[schema(minimum = 1, maximum = 1000000000)]
    pub add: i64,
}

/// Where a sale is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum SaleState {
    Scheduled,
    Live,
    Paused,
    Ended,
}

impl SaleState {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "scheduled" => Self::Scheduled,
            "live" => Self::Live,
            "paused" => Self::Paused,
            "ended" => Self::Ended,
            _ => return None,
        })
    }
}

/// A sale's state at `now`: ended once its end has passed (paused or not), paused while paused,
/// else scheduled before its start and live after.
pub(crate) fn state_of(
    now: DateTime<Utc>,
    starts: DateTime<Utc>,
    ends: DateTime<Utc>,
    paused: bool,
) -> SaleState {
    if now >= ends {
        SaleState::Ended
    } else if paused {
        SaleState::Paused
    } else if now < starts {
        SaleState::Scheduled
    } else {
        SaleState::Live
    }
}

/// One sale in `GET /v1/admin/sales`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct SaleSummary {
    pub sale_id: u64,
    pub name: String,
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
    pub state: SaleState,
    pub items: usize,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct SaleList {
    /// Newest start first.
    pub sales: Vec<SaleSummary>,
}

/// A recorded change (the audit shows them).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct Change {
    /// `ends_at`, `paused`, `resumed` or `restock`.
    pub change: String,
    pub item_id: Option<u64>,
    #[schema(value_type = Object)]
    pub detail: serde_json::Value,
    /// The `x-request-id` of the admin request that made it.
    pub request_id: Option<String>,
    pub(crate) made_at: DateTime<Utc>,
}

/// The item after a restock.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct Restocked {
    pub sale_id: u64,
    pub item_id: u64,
    pub stock: i32,
    pub remaining: i32,
}

const RECORD: &str = "INSERT INTO sale_changes (sale_id, item_id, change, detail, request_id)
                      VALUES ($1, $2, $3, $4, $5)";

impl SaleService<'_> {
    /// Sales of every group, newest start first, with their state; at most `limit`.
    pub async fn list(
        &self,
        state: Option<SaleState>,
        limit: usize,
    ) -> Result<SaleList, SaleError> {
        let mut sales = Vec::new();
        let now = Utc::now();
        for g in 0..self.cluster.groups.len() {
            let rows = self
                .cluster
                .group(g)
                .run(Work::Read, self.timeout, async |c| {
                    Ok(c.query(
                        &c.prepare_cached(
                            "SELECT sale_id, name, starts_at, ends_at, paused, cardinality(item_ids)
                             FROM sales WHERE fenced_by IS NULL
                             ORDER BY starts_at DESC LIMIT $1",
                        )
                        .await?,
                        &[&(limit as i64)],
                    )
                    .await?)
                })
                .await?;
            sales.extend(rows.iter().map(|r| SaleSummary {
                sale_id: r.get::<_, i64>(0).unsigned_abs(),
                name: r.get(1),
                starts_at: r.get(2),
                ends_at: r.get(3),
                state: state_of(now, r.get(2), r.get(3), r.get(4)),
                items: r.get::<_, Option<i32>>(5).unwrap_or(0).max(0) as usize,
            }));
        }
        sales.retain(|s| state.is_none_or(|want| s.state == want));
        sales.sort_by_key(|s| std::cmp::Reverse((s.starts_at, s.sale_id)));
        sales.truncate(limit);
        Ok(SaleList { sales })
    }

    /// Pause, resume, or move the end of a sale (module docs).
    pub async fn change(
        &self,
        sale: SaleId,
        change: &SaleChange,
        request_id: Option<&str>,
    ) -> Result<SaleView, SaleError> {
        let Some((before, item_ids)) = self.header(sale).await? else {
            return Err(SaleError::NotFound(sale));
        };
        check_change(before.starts_at, change)?;
        self.change_items(sale, &item_ids, change).await?;
        let mut records: Vec<(&str, serde_json::Value)> = Vec::new();
        if let Some(ends) = change.ends_at.filter(|e| *e != before.ends_at) {
            records.push((
                "ends_at",
                serde_json::json!({"from": before.ends_at, "to": ends}),
            ));
        }
        if let Some(p) = change.paused.filter(|p| *p != before.paused) {
            records.push((if p { "paused" } else { "resumed" }, serde_json::json!({})));
        }
        self.cluster
            .group(self.router.sale_group(sale))
            .run(Work::Settle, self.timeout, async |c| {
                let tx = c.transaction().await?;
                tx.execute(
                    &tx.prepare_cached(
                        "UPDATE sales SET ends_at = coalesce($2, ends_at),
                                          paused = coalesce($3, paused)
                         WHERE sale_id = $1 AND fenced_by IS NULL",
                    )
                    .await?,
                    &[&sale.db(), &change.ends_at, &change.paused],
                )
                .await?;
                let record = tx.prepare_cached(RECORD).await?;
                for (what, detail) in &records {
                    tx.execute(
                        &record,
                        &[&sale.db(), &None::<i64>, what, detail, &request_id],
                    )
                    .await?;
                }
                tx.commit().await?;
                Ok::<_, DbError>(())
            })
            .await?;
        for (what, detail) in &records {
            tracing::info!(sale_id = %sale, change = what, %detail, "sale changed");
        }
        self.get(sale).await
    }

    /// The change on every item row of the sale, group by group; refused while an item is fenced
    /// by a move (asked again, the change lands on its new group).
    async fn change_items(
        &self,
        sale: SaleId,
        item_ids: &[ItemId],
        change: &SaleChange,
    ) -> Result<(), SaleError> {
        let mut by_group: HashMap<usize, Vec<i64>> = HashMap::new();
        for item in item_ids {
            by_group
                .entry(self.router.item_group(*item))
                .or_default()
                .push(item.db());
        }
        for (g, ids) in by_group {
            let changed = self
                .cluster
                .group(g)
                .run(Work::Settle, self.timeout, async |c| {
                    Ok(c.execute(
                        &c.prepare_cached(
                            "UPDATE sale_items SET ends_at = coalesce($3, ends_at),
                                                   paused = coalesce($4, paused)
                             WHERE sale_id = $1 AND item_id = ANY($2) AND fenced_by IS NULL",
                        )
                        .await?,
                        &[&sale.db(), &ids, &change.ends_at, &change.paused],
                    )
                    .await?)
                })
                .await?;
            if changed != ids.len() as u64 {
                // An item is being moved to another group: asked again, the change lands there.
                return Err(SaleError::Group(
                    DbError::Moving(format!("an item of sale {sale}")).into(),
                ));
            }
        }
        Ok(())
    }

    /// Add `add` units to an item's stock and remaining, in one transaction (module docs).
    pub async fn restock(
        &self,
        sale: SaleId,
        item: ItemId,
        add: i64,
        request_id: Option<&str>,
    ) -> Result<Restocked, SaleError> {
        if !(1..=MAX_STOCK).contains(&add) {
            return Err(SaleError::Invalid(
                "add: must be between 1 and 1000000000".into(),
            ));
        }
        let row = self
            .cluster
            .group(self.router.item_group(item))
            .run(Work::Settle, self.timeout, async |c| {
                let tx = c.transaction().await?;
                let found = tx
                    .query_opt(
                        &tx.prepare_cached(
                            "SELECT stock, fenced_by IS NOT NULL FROM sale_items
                             WHERE sale_id = $1 AND item_id = $2 FOR UPDATE",
                        )
                        .await?,
                        &[&sale.db(), &item.db()],
                    )
                    .await?;
                let Some(found) = found else {
                    return Ok(Err(SaleError::ItemNotFound { sale, item }));
                };
                if found.get::<_, bool>(1) {
                    return Err(DbError::Moving(format!("item {item}")));
                }
                let stock: i32 = found.get(0);
                if i64::from(stock) + add > MAX_STOCK {
                    return Ok(Err(SaleError::Invalid(format!(
                        "add: the stock would be {}, above 1000000000",
                        i64::from(stock) + add
                    ))));
                }
                let add32 = add as i32;
                let r = tx
                    .query_one(
                        &tx.prepare_cached(
                            "UPDATE sale_items SET stock = stock + $3, remaining = remaining + $3,
                                                   version = version + 1
                             WHERE sale_id = $1 AND item_id = $2 RETURNING stock, remaining",
                        )
                        .await?,
                        &[&sale.db(), &item.db(), &add32],
                    )
                    .await?;
                let (stock, remaining): (i32, i32) = (r.get(0), r.get(1));
                let detail = serde_json::json!({"add": add, "stock": stock});
                tx.execute(
                    &tx.prepare_cached(RECORD).await?,
                    &[
                        &sale.db(),
                        &Some(item.db()),
                        &"restock",
                        &detail,
                        &request_id,
                    ],
                )
                .await?;
                tx.commit().await?;
                Ok(Ok(Restocked {
                    sale_id: sale.key(),
                    item_id: item.key(),
                    stock,
                    remaining,
                }))
            })
            .await??;
        tracing::info!(sale_id = %sale, item_id = %item, add, stock = row.stock, "item restocked");
        Ok(row)
    }

    /// The recorded changes of a sale (its own group's and its items' groups'), oldest first.
    pub async fn changes(&self, sale: SaleId, items: &[ItemId]) -> Result<Vec<Change>, SaleError> {
        let mut groups: Vec<usize> = items.iter().map(|i| self.router.item_group(*i)).collect();
        groups.push(self.router.sale_group(sale));
        groups.sort_unstable();
        groups.dedup();
        let mut all = HashMap::new();
        for g in groups {
            let rows = self
                .cluster
                .group(g)
                .run(Work::Read, self.timeout, async |c| {
                    Ok(c.query(
                        &c.prepare_cached(
                            "SELECT change, item_id, detail, request_id, made_at, change_id
                             FROM sale_changes WHERE sale_id = $1 ORDER BY made_at",
                        )
                        .await?,
                        &[&sale.db()],
                    )
                    .await?)
                })
                .await?;
            for r in &rows {
                // A move copies a change with its item or sale; the old group may keep it too.
                all.entry(r.get::<_, uuid::Uuid>(5))
                    .or_insert_with(|| Change {
                        change: r.get(0),
                        item_id: r.get::<_, Option<i64>>(1).map(i64::unsigned_abs),
                        detail: r.get(2),
                        request_id: r.get(3),
                        made_at: r.get(4),
                    });
            }
        }
        let mut all: Vec<Change> = all.into_values().collect();
        all.sort_by_key(|c| c.made_at);
        Ok(all)
    }
}

/// A change that can be made: something to change, and an end after the start.
fn check_change(starts_at: DateTime<Utc>, change: &SaleChange) -> Result<(), SaleError> {
    if let Some(ends) = change.ends_at {
        if ends <= starts_at {
            return Err(SaleError::Invalid(
                "ends_at: must be after the sale's starts_at".into(),
            ));
        }
        if !(1970..=9999).contains(&chrono::Datelike::year(&ends)) {
            return Err(SaleError::Invalid(
                "ends_at: must be between the years 1970 and 9999".into(),
            ));
        }
    }
    if change.ends_at.is_none() && change.paused.is_none() {
        return Err(SaleError::Invalid(
            "nothing to change: give ends_at, paused or both".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sale_is_in_one_state_at_a_time() {
        let t = |h: i64| Utc::now() + chrono::Duration::hours(h);
        let now = Utc::now();
        assert_eq!(state_of(now, t(1), t(2), false), SaleState::Scheduled);
        assert_eq!(state_of(now, t(-1), t(2), false), SaleState::Live);
        assert_eq!(state_of(now, t(-1), t(2), true), SaleState::Paused);
        assert_eq!(state_of(now, t(1), t(2), true), SaleState::Paused);
        assert_eq!(
            state_of(now, t(-2), t(-1), true),
            SaleState::Ended,
            "an ended sale is ended, paused or not"
        );
        assert_eq!(SaleState::parse("live"), Some(SaleState::Live));
        assert_eq!(SaleState::parse("x"), None);
    }
}
