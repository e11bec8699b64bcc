//! Routing: which shard group holds an item (and its sale) or a user.
//!
//! Each key kind has its own strategy (docs/dba.md "Routing"):
//! - `hash`: FNV-1a 64 over the key's 8 big-endian bytes, modulo a fixed slot count, then a
//!   slot -> group map. The slot count never changes, so moving load means moving slots.
//! - `range`: half-open key ranges -> group, covering the whole key space.
//! - `table`: the router-config table `shard_map` in the config group, cached by every node
//!   ([`table::TableCache`]) and refreshed when its version changes; keys it does not name fall
//!   back to `hash`.
//!
//! A key moved to another group ([`crate::moves`]) gets an entry in the same table, and an entry
//! wins under every strategy: moving a key never means rewriting slot maps or ranges.
//!
//! Groups are referred to by their index in the configuration's group list ([`GroupIdx`]).
//!
//! The routing wing also holds the route table's refresh from the config group
//! ([`table::TableCache::refresh_from`]) and the layout guard ([`layout`]): the shard layer below
//! knows groups, not keys.

pub mod hash;
pub mod layout;
pub mod table;

use crate::config::routing::{resolve, KindRoutes};
use crate::config::{ConfigError, KindRouting, Strategy};
use std::sync::Arc;

pub use hash::slot_of;
pub(crate) use table::TableCache;

/// Index of a shard group in the configuration's `groups` list.
pub(crate) type GroupIdx = usize;

/// The two kinds of routed keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyKind {
    Items,
    Users,
}

impl KeyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyKind::Items => "items",
            KeyKind::Users => "users",
        }
    }
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "items" | "item" => Some(KeyKind::Items),
            "users" | "user" => Some(KeyKind::Users),
            _ => None,
        }
    }

    /// [`Self::parse`] of what a user gave (API, CLI), with the message to show when it is neither.
    pub(crate) fn parse_given(text: &str) -> Result<Self, String> {
        Self::parse(text).ok_or_else(|| format!("kind must be `items` or `users`, got {text:?}"))
    }
}

/// The routing rules of one key kind, resolved to group indexes.
#[derive(Debug, Clone)]
pub struct KindRouter {
    strategy: Strategy,
    /// slot -> group; used by `hash` and as the fallback of `table`.
    slot_map: Vec<GroupIdx>,
    /// (start, exclusive end or None for "to the top", group), sorted and contiguous.
    ranges: Vec<(u64, Option<u64>, GroupIdx)>,
}

impl From<KindRoutes> for KindRouter {
    fn from(r: KindRoutes) -> Self {
        Self {
            strategy: r.strategy,
            slot_map: r.slot_map,
            ranges: r.ranges,
        }
    }
}

impl KindRouter {
    /// Resolve and check one kind's routing section ([`crate::config::routing::resolve`]).
    /// `kind` names the section in errors.
    pub fn build(
        kind: &str,
        routing: &KindRouting,
        slots: u32,
        groups: &[String],
    ) -> Result<Self, ConfigError> {
        Ok(Self::from(resolve(kind, routing, slots, groups)?))
    }

    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    pub fn slot_count(&self) -> u32 {
        self.slot_map.len() as u32
    }

    /// The group of `key` by the hash slot map alone.
    pub(crate) fn by_hash(&self, key: u64) -> GroupIdx {
        self.slot_map[slot_of(key, self.slot_count()) as usize]
    }

    /// The group of `key` by the kind's rule (ranges, or the hash slots), ignoring the table.
    pub(crate) fn by_rule(&self, key: u64) -> GroupIdx {
        match self.strategy {
            Strategy::Range => self.by_range(key),
            _ => self.by_hash(key),
        }
    }

    fn by_range(&self, key: u64) -> GroupIdx {
        // Ranges are sorted and contiguous from 0, so the last range starting at or below the
        // key holds it.
        let i = self.ranges.partition_point(|(start, _, _)| *start <= key);
        self.ranges[i.saturating_sub(1)].2
    }
}

/// Routes both key kinds; cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Router {
    items: KindRouter,
    users: KindRouter,
    table: Arc<TableCache>,
}

impl Router {
    pub fn new(items: KindRouter, users: KindRouter, table: Arc<TableCache>) -> Self {
        Self {
            items,
            users,
            table,
        }
    }

    pub(crate) fn from_config(config: &crate::config::Config) -> Result<Self, ConfigError> {
        let names = config.group_names();
        let items =
            KindRouter::build("items", &config.routing.items, config.routing.slots, &names)?;
        let users =
            KindRouter::build("users", &config.routing.users, config.routing.slots, &names)?;
        Ok(Self::new(items, users, Arc::new(TableCache::new(names))))
    }

    pub fn table(&self) -> &Arc<TableCache> {
        &self.table
    }

    pub fn kind(&self, kind: KeyKind) -> &KindRouter {
        match kind {
            KeyKind::Items => &self.items,
            KeyKind::Users => &self.users,
        }
    }

    /// The key's table entry if it has one (set, or written by a move), else its slot's if the slot
    /// was moved, else its kind's rule.
    pub fn route(&self, kind: KeyKind, key: u64) -> GroupIdx {
        let rules = self.kind(kind);
        self.table
            .get(kind, key)
            .or_else(|| self.table.slot(kind, slot_of(key, rules.slot_count())))
            .unwrap_or_else(|| rules.by_rule(key))
    }

    /// The group the configuration gives a slot (hash and table strategies).
    pub(crate) fn slot_home(&self, kind: KeyKind, slot: u32) -> Option<GroupIdx> {
        self.kind(kind).slot_map.get(slot as usize).copied()
    }

    pub fn item_group(&self, item: crate::domain::ItemId) -> GroupIdx {
        self.route(KeyKind::Items, item.key())
    }

    /// Sales live with the items' router, keyed by sale id.
    pub(crate) fn sale_group(&self, sale: crate::domain::SaleId) -> GroupIdx {
        self.route(KeyKind::Items, sale.key())
    }

    pub fn user_group(&self, user: crate::domain::UserId) -> GroupIdx {
        self.route(KeyKind::Users, user.key())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{RangeAssignment, SlotAssignment, Strategy};
    use proptest::prelude::{any, prop_assert, prop_assert_eq, proptest};

    fn names() -> Vec<String> {
        vec!["g0".into(), "g1".into()]
    }

    #[test]
    fn default_slot_map_splits_evenly() {
        let r = KindRouter::build("items", &KindRouting::default(), 1024, &names()).unwrap();
        assert_eq!(r.slot_map[0], 0);
        assert_eq!(r.slot_map[511], 0);
        assert_eq!(r.slot_map[512], 1);
        assert_eq!(r.slot_map[1023], 1);
    }

    #[test]
    fn explicit_slot_map_routes_by_slot() {
        let routing = KindRouting {
            strategy: Strategy::Hash,
            slot_map: vec![
                SlotAssignment {
                    slots: "0-99".into(),
                    group: "g1".into(),
                },
                SlotAssignment {
                    slots: "100-1023".into(),
                    group: "g0".into(),
                },
            ],
            ranges: vec![],
        };
        let r = KindRouter::build("items", &routing, 1024, &names()).unwrap();
        // Key 1 hashes to slot 18 (pinned in hash.rs), key 0 to slot 453.
        assert_eq!(r.by_hash(1), 1);
        assert_eq!(r.by_hash(0), 0);
    }

    fn range_router() -> KindRouter {
        let routing = KindRouting {
            strategy: Strategy::Range,
            slot_map: vec![],
            ranges: vec![
                RangeAssignment {
                    start: 1_000,
                    end: None,
                    group: "g1".into(),
                },
                RangeAssignment {
                    start: 0,
                    end: Some(1_000),
                    group: "g0".into(),
                },
            ],
        };
        KindRouter::build("users", &routing, 1024, &names()).unwrap()
    }

    #[test]
    fn ranges_route_half_open() {
        let r = range_router();
        assert_eq!(r.by_range(0), 0);
        assert_eq!(r.by_range(999), 0);
        assert_eq!(r.by_range(1_000), 1);
        assert_eq!(r.by_range(u64::MAX), 1);
    }

    #[test]
    fn table_falls_back_to_hash() {
        let table = Arc::new(TableCache::new(names()));
        let items = KindRouter::build(
            "items",
            &KindRouting {
                strategy: Strategy::Table,
                ..Default::default()
            },
            1024,
            &names(),
        )
        .unwrap();
        let users = KindRouter::build("users", &KindRouting::default(), 1024, &names()).unwrap();
        let router = Router::new(items, users, table.clone());
        // Key 0 hashes to slot 453 -> g0 by the default map; pin it to g1 through the table.
        assert_eq!(router.route(KeyKind::Items, 0), 0);
        table.replace(1, vec![(KeyKind::Items, 0, "g1".into())]);
        assert_eq!(router.route(KeyKind::Items, 0), 1);
        // A key the table does not name still follows the hash.
        assert_eq!(
            router.route(KeyKind::Items, 1),
            router.kind(KeyKind::Items).by_hash(1)
        );
        // The users kind uses hash, but an entry (a moved key) wins there too.
        assert_eq!(router.route(KeyKind::Users, 0), 0);
        table.replace(2, vec![(KeyKind::Users, 0, "g1".into())]);
        assert_eq!(router.route(KeyKind::Users, 0), 1);
    }

    proptest! {
        #[test]
        fn range_routing_matches_a_linear_scan(key in any::<u64>()) {
            let r = range_router();
            let expected = r.ranges.iter()
                .find(|(s, e, _)| key >= *s && e.is_none_or(|e| key < e))
                .map(|(_, _, g)| *g)
                .unwrap();
            prop_assert_eq!(r.by_range(key), expected);
        }

        #[test]
        fn hash_routing_is_always_a_known_group(key in any::<u64>(), slots in 1u32..4096) {
            let r = KindRouter::build("items", &KindRouting::default(), slots, &names()).unwrap();
            prop_assert!(r.by_hash(key) < 2);
        }
    }
}
