//! The shard map as DBAs manage it: where a key routes and why, the router-config table's entries,
//! and safe changes to them. Used by the admin API and the CLI alike.
//!
//! **A re-route never strands rows.** Changing a table entry only changes where a key's *new* rows
//! go. For a key that already has rows, that would leave a live item unreachable (404, its cancels
//! and expiries doing nothing) or let a retry create a second copy of a user's order on the new
//! group. So [`Maps::change`] refuses (`has_data`) when the key has rows on the group it routes to now
//! or on the group it would route to; moving rows is a move, not a re-route. What counts as rows:
//! for `items`, a sale item (and so its reservations) or a sale with that id (sales route with the
//! items' router, by sale id); for `users`, an order or a recorded payment.
//!
//! Engine nodes pick a change up within `routing.table_refresh_ms`. A key that gets its first rows
//! inside that window, on a node that still routes it the old way, is not caught by the check:
//! re-route keys before they are used (e.g. before the sale is created), not during a sale.

use crate::config::Config;
use crate::db::DbError;
use crate::router::{slot_of, KeyKind, Router};
use crate::shard::{Cluster, GroupError, Work};
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::time::Duration;

/// How a key's group was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Source {
    /// The hash slot map.
    Hash,
    /// A key range of `strategy = "range"`.
    Range,
    /// An entry of the router-config table: the key's own, or its moved slot's.
    Table,
}

/// Where one key routes.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct Route {
    #[schema(example = "items")]
    pub kind: &'static str,
    pub key: u64,
    #[schema(example = "g1")]
    pub group: String,
    /// The key's hash slot (whatever decided its group).
    pub slot: u32,
    pub source: Source,
}

/// One entry of the router-config table.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Entry {
    #[schema(example = "items")]
    pub kind: String,
    pub key: u64,
    #[schema(example = "g1")]
    pub group: String,
    pub(crate) updated_at: DateTime<Utc>,
}

/// A hash slot moved off the group the configuration gives it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct SlotEntry {
    #[schema(example = "users")]
    pub kind: String,
    pub slot: u32,
    #[schema(example = "g2")]
    pub group: String,
    pub(crate) updated_at: DateTime<Utc>,
}

/// The router-config table.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct ShardMap {
    /// Bumped by every change; engine nodes reload when it moves.
    pub version: i64,
    pub entries: Vec<Entry>,
    /// Moved slots (a key's own entry wins over its slot's).
    pub slots: Vec<SlotEntry>,
    /// Moves in flight or resting switched (not completed, failed or cancelled).
    pub moves: Vec<crate::moves::Move>,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ShardMapError {
    #[error("unknown group {0:?}")]
    UnknownGroup(String),
    #[error("{kind} {key} has rows on group {group}: re-routing it would strand them (move the key instead)")]
    HasData {
        kind: &'static str,
        key: u64,
        group: String,
    },
    #[error("no table entry for {kind} {key}")]
    NoEntry { kind: &'static str, key: u64 },
    /// Work on a group failed.
    #[error(transparent)]
    Group(#[from] GroupError),
}

impl From<DbError> for ShardMapError {
    fn from(e: DbError) -> Self {
        ShardMapError::Group(e.into())
    }
}

/// The groups, the router and the config group's place: what every function here works with.
pub(crate) struct Maps<'a> {
    pub config: &'a Config,
    pub cluster: &'a Cluster,
    pub router: &'a Router,
}

impl Maps<'_> {
    fn budget(&self) -> Duration {
        self.config.request_timeout()
    }

    /// Where `key` routes now, on this node.
    pub fn route(&self, kind: KeyKind, key: u64) -> Route {
        let rules = self.router.kind(kind);
        let table = self.router.table();
        let moved_slot = table.slot(kind, slot_of(key, rules.slot_count())).is_some();
        let source = if table.get(kind, key).is_some() || moved_slot {
            Source::Table
        } else if rules.strategy() == crate::config::Strategy::Range {
            Source::Range
        } else {
            Source::Hash
        };
        Route {
            kind: kind.as_str(),
            key,
            group: self
                .cluster
                .group(self.router.route(kind, key))
                .name
                .clone(),
            slot: slot_of(key, rules.slot_count()),
            source,
        }
    }

    /// Re-read the router-config table now (a change made elsewhere shows at once).
    pub async fn refresh(&self) -> Result<(), ShardMapError> {
        self.router
            .table()
            .refresh_from(self.cluster, Work::Settle, self.budget())
            .await?;
        Ok(())
    }

    /// The router-config table as stored.
    pub async fn list(&self) -> Result<ShardMap, ShardMapError> {
        Ok(self
            .cluster
            .group(self.cluster.config_group())
            .run(Work::Read, self.budget(), async |c| {
                let version: i64 = c
                    .query_one("SELECT version FROM shard_map_version WHERE id = 1", &[])
                    .await?
                    .get(0);
                let rows = c
                    .query(
                        "SELECT kind, key, group_name, updated_at FROM shard_map ORDER BY kind, key",
                        &[],
                    )
                    .await?;
                let entries = rows
                    .iter()
                    .map(|r| Entry {
                        kind: r.get(0),
                        key: r.get::<_, i64>(1).unsigned_abs(),
                        group: r.get(2),
                        updated_at: r.get(3),
                    })
                    .collect();
                let slots = c
                    .query(
                        "SELECT kind, slot, group_name, updated_at FROM slot_map ORDER BY kind, slot",
                        &[],
                    )
                    .await?
                    .iter()
                    .map(|r| SlotEntry {
                        kind: r.get(0),
                        slot: r.get::<_, i32>(1).unsigned_abs(),
                        group: r.get(2),
                        updated_at: r.get(3),
                    })
                    .collect();
                let moves = crate::moves::open_moves(c).await?;
                Ok(ShardMap {
                    version,
                    entries,
                    slots,
                    moves,
                })
            })
            .await?)
    }

    /// Point `key` at `to` (an entry), or back at its rule (`None`: the entry removed). Refused
    /// when the key has rows on the group it routes to now or would route to. Returns where it
    /// routes afterwards on this node.
    pub async fn change(
        &self,
        kind: KeyKind,
        key: u64,
        to: Option<&str>,
    ) -> Result<Route, ShardMapError> {
        let target = match to {
            Some(name) => Some(
                self.cluster
                    .by_name(name)
                    .map(|(g, _)| g)
                    .ok_or_else(|| ShardMapError::UnknownGroup(name.to_string()))?,
            ),
            None => None,
        };
        self.refresh().await?;
        let now = self.router.route(kind, key);
        let after = match target {
            Some(g) => g,
            None => {
                if self.router.table().get(kind, key).is_none() {
                    return Err(ShardMapError::NoEntry {
                        kind: kind.as_str(),
                        key,
                    });
                }
                self.router.kind(kind).by_rule(key)
            }
        };
        if after != now {
            for g in [now, after] {
                if self.has_rows(g, kind, key).await? {
                    return Err(ShardMapError::HasData {
                        kind: kind.as_str(),
                        key,
                        group: self.cluster.group(g).name.clone(),
                    });
                }
            }
        }
        let db_key = i64::try_from(key).unwrap_or(i64::MAX);
        self.cluster
            .group(self.cluster.config_group())
            .run(Work::Settle, self.budget(), async |c| {
                crate::router::table::write_entry(&***c, kind, db_key, to).await?;
                Ok(())
            })
            .await?;
        self.refresh().await?;
        tracing::info!(
            kind = kind.as_str(),
            key,
            group = %self.cluster.group(after).name,
            "shard map changed"
        );
        Ok(self.route(kind, key))
    }

    /// Whether `key` has rows on group `g`.
    async fn has_rows(&self, g: usize, kind: KeyKind, key: u64) -> Result<bool, ShardMapError> {
        let db_key = i64::try_from(key).unwrap_or(i64::MAX);
        let sql = match kind {
            KeyKind::Items => {
                // Reservations exist only for sale items, so these two cover them.
                "SELECT EXISTS (SELECT 1 FROM sale_items WHERE item_id = $1)
                     OR EXISTS (SELECT 1 FROM sales WHERE sale_id = $1)"
            }
            // A payment may be recorded without an order (refund_due): its record is the
            // callback's idempotency, so it counts too.
            KeyKind::Users => {
                "SELECT EXISTS (SELECT 1 FROM orders WHERE user_id = $1)
                     OR EXISTS (SELECT 1 FROM payments WHERE user_id = $1)"
            }
        };
        Ok(self
            .cluster
            .group(g)
            .run(Work::Read, self.budget(), async |c| {
                Ok(c.query_one(sql, &[&db_key]).await?.get::<_, bool>(0))
            })
            .await?)
    }
}
