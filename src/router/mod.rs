//! Routing: which shard group holds an item (and its sale) or a user.
//!
//! Each key kind has its own strategy (DESIGN.md "Routing"):
//! - `hash`: FNV-1a 64 over the key's 8 big-endian bytes, modulo a fixed slot count, then a
//!   slot -> group map. The slot count never changes, so moving load means moving slots.
//! - `range`: half-open key ranges -> group, covering the whole key space.
//! - `table`: the router-config table `shard_map` in the config group, cached by every node
//!   ([`table::TableCache`]) and refreshed when its version changes; keys it does not name fall
//!   back to `hash`.
//!
//! Groups are referred to by their index in the configuration's group list ([`GroupIdx`]).

pub mod hash;
pub mod table;

use crate::config::{invalid_field, parse_slot_range, ConfigError, KindRouting, Strategy};
use std::sync::Arc;

pub use hash::{fnv1a64, slot_of};
pub use table::TableCache;

/// Index of a shard group in the configuration's `groups` list.
pub type GroupIdx = usize;

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

impl KindRouter {
    /// Resolve and check one kind's routing section. `kind` names the section in errors.
    pub fn build(
        kind: &str,
        routing: &KindRouting,
        slots: u32,
        groups: &[String],
    ) -> Result<Self, ConfigError> {
        let group_idx = |field: String, name: &str| {
            groups
                .iter()
                .position(|g| g == name)
                .ok_or_else(|| invalid_field(field, format!("unknown group {name:?}")))
        };
        let base = format!("routing.{kind}");
        let slot_map = if routing.slot_map.is_empty() {
            // Default: slots split evenly over the groups in file order.
            (0..slots)
                .map(|s| (s as usize * groups.len()) / slots as usize)
                .collect()
        } else {
            let mut owner: Vec<Option<GroupIdx>> = vec![None; slots as usize];
            for (i, a) in routing.slot_map.iter().enumerate() {
                let field = format!("{base}.slot_map[{i}]");
                let (lo, hi) = parse_slot_range(&a.slots).ok_or_else(|| {
                    invalid_field(
                        format!("{field}.slots"),
                        format!("{:?} is not \"N\" or \"LO-HI\"", a.slots),
                    )
                })?;
                if hi >= slots {
                    return Err(invalid_field(
                        format!("{field}.slots"),
                        format!("slot {hi} is beyond the slot count {slots}"),
                    ));
                }
                let g = group_idx(format!("{field}.group"), &a.group)?;
                for s in lo..=hi {
                    if owner[s as usize].replace(g).is_some() {
                        return Err(invalid_field(
                            format!("{field}.slots"),
                            format!("slot {s} is assigned twice"),
                        ));
                    }
                }
            }
            if let Some(missing) = owner.iter().position(Option::is_none) {
                return Err(invalid_field(
                    format!("{base}.slot_map"),
                    format!("slot {missing} is not assigned to any group"),
                ));
            }
            owner.into_iter().flatten().collect()
        };

        let mut ranges = Vec::new();
        if routing.strategy == Strategy::Range {
            if routing.ranges.is_empty() {
                return Err(invalid_field(
                    format!("{base}.ranges"),
                    "strategy \"range\" needs at least one range",
                ));
            }
            let mut sorted: Vec<_> = routing.ranges.iter().enumerate().collect();
            sorted.sort_by_key(|(_, r)| r.start);
            let mut next: Option<u64> = Some(0);
            for (i, r) in sorted {
                let field = format!("{base}.ranges[{i}]");
                match next {
                    None => {
                        return Err(invalid_field(
                            field,
                            "overlaps an earlier range that runs to the largest key",
                        ))
                    }
                    Some(n) if r.start != n => {
                        return Err(invalid_field(
                            field,
                            if r.start > n {
                                format!("keys {n}..{} are not covered by any range", r.start)
                            } else {
                                format!("start {} overlaps the previous range", r.start)
                            },
                        ))
                    }
                    _ => {}
                }
                if let Some(end) = r.end {
                    if end <= r.start {
                        return Err(invalid_field(
                            format!("{field}.end"),
                            "must be greater than start",
                        ));
                    }
                }
                let g = group_idx(format!("{field}.group"), &r.group)?;
                ranges.push((r.start, r.end, g));
                next = r.end;
            }
            if let Some(n) = next {
                return Err(invalid_field(
                    format!("{base}.ranges"),
                    format!("keys from {n} up are not covered (omit `end` on the last range)"),
                ));
            }
        } else if !routing.ranges.is_empty() {
            return Err(invalid_field(
                format!("{base}.ranges"),
                "ranges are only used with strategy \"range\"",
            ));
        }
        Ok(Self {
            strategy: routing.strategy,
            slot_map,
            ranges,
        })
    }

    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    pub fn slot_count(&self) -> u32 {
        self.slot_map.len() as u32
    }

    /// The group of `key` by the hash slot map alone.
    pub fn by_hash(&self, key: u64) -> GroupIdx {
        self.slot_map[slot_of(key, self.slot_count()) as usize]
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

    pub fn from_config(config: &crate::config::Config) -> Result<Self, ConfigError> {
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

    pub fn route(&self, kind: KeyKind, key: u64) -> GroupIdx {
        let r = self.kind(kind);
        match r.strategy {
            Strategy::Hash => r.by_hash(key),
            Strategy::Range => r.by_range(key),
            Strategy::Table => self.table.get(kind, key).unwrap_or_else(|| r.by_hash(key)),
        }
    }

    pub fn item_group(&self, item: crate::domain::ItemId) -> GroupIdx {
        self.route(KeyKind::Items, item.key())
    }

    /// Sales live with the items' router, keyed by sale id.
    pub fn sale_group(&self, sale: crate::domain::SaleId) -> GroupIdx {
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
        // The users kind uses hash: the table does not apply to it.
        table.replace(2, vec![(KeyKind::Users, 0, "g1".into())]);
        assert_eq!(router.route(KeyKind::Users, 0), 0);
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
