//! The layout guard: an engine never starts with a routing layout that would send existing keys
//! to other groups.
//!
//! The hash slot map defaults to the slots split evenly over the groups in file order, so adding a
//! group to `shards.toml` (or reordering the groups, or editing `slot_map` or `ranges`) silently
//! re-routes a share of every key: items become 404 with their stock on the old group, users'
//! orders vanish from their lists, and a retry can create a second copy of an order on the new
//! group. The layout a cluster runs with — each kind's strategy, slot map and ranges, by group
//! name — is recorded in `cluster_layout` on the config group when the first engine starts. A
//! later start whose configuration resolves to another layout is refused with the differences
//! spelled out, unless it is started with `--accept-layout-change` (after the data has been
//! moved, or when the new groups only take slots that hold nothing).

use crate::config::routing::{resolve, KindRoutes};
use crate::config::{Config, ConfigError, Strategy};
use crate::db::DbError;
use crate::shard::{Cluster, GroupError, Work};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One kind's routing, by group name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct KindLayout {
    pub strategy: String,
    /// Runs of consecutive slots with their group: (first, last, group).
    pub slots: Vec<(u32, u32, String)>,
    /// Key ranges of `strategy = "range"`: (start, end or None, group).
    pub ranges: Vec<(u64, Option<u64>, String)>,
}

/// The whole routing layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Layout {
    pub slots: u32,
    pub kinds: BTreeMap<String, KindLayout>,
}

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error(
        "the routing layout differs from the one this cluster runs with, so existing keys would \
         route to other groups: {}. Keep the old layout (write its slot_map out in shards.toml: {}), \
         or move the data first and start once with --accept-layout-change",
        .changes.join("; "),
        .recorded
    )]
    Changed {
        changes: Vec<String>,
        /// The recorded slot maps, as shards.toml would spell them.
        recorded: String,
    },
    #[error("cannot check the routing layout: {0}")]
    Unavailable(String),
    /// The config group could not record or read the layout.
    #[error("cannot check the routing layout: {0}")]
    Group(#[from] GroupError),
    #[error(transparent)]
    Config(#[from] ConfigError),
}

impl Layout {
    /// The layout `config` resolves to.
    pub fn of(config: &Config) -> Result<Self, ConfigError> {
        let names = config.group_names();
        let mut kinds = BTreeMap::new();
        for (kind, routing) in [
            ("items", &config.routing.items),
            ("users", &config.routing.users),
        ] {
            let routes = resolve(kind, routing, config.routing.slots, &names)?;
            kinds.insert(kind.to_string(), KindLayout::of(&routes, &names));
        }
        Ok(Self {
            slots: config.routing.slots,
            kinds,
        })
    }

    /// The slot maps as `[routing.KIND] slot_map` entries would spell them.
    pub(crate) fn slot_maps(&self) -> String {
        self.kinds
            .iter()
            .map(|(kind, k)| {
                let runs: Vec<String> = k
                    .slots
                    .iter()
                    .map(|(lo, hi, g)| format!("{{ slots = \"{lo}-{hi}\", group = \"{g}\" }}"))
                    .collect();
                format!("routing.{kind}.slot_map = [{}]", runs.join(", "))
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// What moves from `self` (recorded) to `new`, one line per change; empty when nothing does.
    pub(crate) fn changes_to(&self, new: &Layout) -> Vec<String> {
        let mut changes = Vec::new();
        if self.slots != new.slots {
            changes.push(format!("routing.slots {} -> {}", self.slots, new.slots));
            return changes;
        }
        for (kind, old) in &self.kinds {
            let Some(now) = new.kinds.get(kind) else {
                continue;
            };
            // `table` falls back to the slot map for every key it does not name (and naming one is
            // guarded by has_data), so hash <-> table moves nothing; to or from `range` does.
            let ranged = old.strategy == "range" || now.strategy == "range";
            if old.strategy != now.strategy && ranged {
                changes.push(format!(
                    "routing.{kind}.strategy {} -> {}",
                    old.strategy, now.strategy
                ));
            }
            changes.extend(slot_moves(kind, &old.slots, &now.slots));
            if old.ranges != now.ranges && ranged {
                changes.push(format!("routing.{kind}.ranges changed"));
            }
        }
        changes
    }
}

impl KindLayout {
    fn of(routes: &KindRoutes, names: &[String]) -> Self {
        let name = |g: usize| names.get(g).cloned().unwrap_or_default();
        let mut slots: Vec<(u32, u32, String)> = Vec::new();
        for (slot, &g) in routes.slot_map.iter().enumerate() {
            let slot = slot as u32;
            match slots.last_mut() {
                Some((_, last, group)) if *group == name(g) && *last + 1 == slot => *last = slot,
                _ => slots.push((slot, slot, name(g))),
            }
        }
        let strategy = match routes.strategy {
            Strategy::Hash => "hash",
            Strategy::Range => "range",
            Strategy::Table => "table",
        };
        Self {
            strategy: strategy.to_string(),
            slots,
            ranges: routes
                .ranges
                .iter()
                .map(|&(start, end, g)| (start, end, name(g)))
                .collect(),
        }
    }
}

/// The slot runs whose group changed, as "routing.items slots 342-511: g0 -> g2".
fn slot_moves(kind: &str, old: &[(u32, u32, String)], new: &[(u32, u32, String)]) -> Vec<String> {
    let owner = |runs: &[(u32, u32, String)], slot: u32| {
        runs.iter()
            .find(|(lo, hi, _)| (*lo..=*hi).contains(&slot))
            .map(|(_, _, g)| g.clone())
            .unwrap_or_default()
    };
    let last = old.iter().map(|(_, hi, _)| *hi).max().unwrap_or(0);
    let mut moves: Vec<(u32, u32, String, String)> = Vec::new();
    for slot in 0..=last {
        let (from, to) = (owner(old, slot), owner(new, slot));
        if from == to {
            continue;
        }
        match moves.last_mut() {
            Some((_, hi, f, t)) if *hi + 1 == slot && *f == from && *t == to => *hi = slot,
            _ => moves.push((slot, slot, from, to)),
        }
    }
    moves
        .into_iter()
        .map(|(lo, hi, from, to)| {
            let slots = if lo == hi {
                format!("slot {lo}")
            } else {
                format!("slots {lo}-{hi}")
            };
            format!("routing.{kind} {slots}: {from} -> {to}")
        })
        .collect()
}

/// Check `config`'s layout against the recorded one (module docs); record it when there is none,
/// or when `accept` says a change is meant.
pub(crate) async fn guard(
    config: &Config,
    cluster: &Cluster,
    accept: bool,
) -> Result<(), LayoutError> {
    let layout = Layout::of(config)?;
    let (g, _) = cluster.by_name(config.config_group()).ok_or_else(|| {
        LayoutError::Unavailable(format!("no config group {:?}", config.config_group()))
    })?;
    let text =
        serde_json::to_value(&layout).map_err(|e| LayoutError::Unavailable(e.to_string()))?;
    let recorded: serde_json::Value = cluster
        .group(g)
        .run(Work::Settle, config.request_timeout(), async |c| {
            // The first engine records its layout; every later one reads the recorded one.
            c.execute(
                "INSERT INTO cluster_layout (id, layout) VALUES (1, $1) ON CONFLICT (id) DO NOTHING",
                &[&text],
            )
            .await?;
            let row = c
                .query_one("SELECT layout FROM cluster_layout WHERE id = 1", &[])
                .await?;
            Ok::<_, DbError>(row.get(0))
        })
        .await?;
    let recorded: Layout = serde_json::from_value(recorded)
        .map_err(|e| LayoutError::Unavailable(format!("the recorded layout is unreadable: {e}")))?;
    let changes = recorded.changes_to(&layout);
    if changes.is_empty() {
        return Ok(());
    }
    if !accept {
        return Err(LayoutError::Changed {
            changes,
            recorded: recorded.slot_maps(),
        });
    }
    tracing::warn!(changes = %changes.join("; "), "routing layout change accepted");
    cluster
        .group(g)
        .run(Work::Settle, config.request_timeout(), async |c| {
            c.execute(
                "UPDATE cluster_layout SET layout = $1, updated_at = now() WHERE id = 1",
                &[&text],
            )
            .await?;
            Ok(())
        })
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(groups: &[&str], extra: &str) -> Config {
        let mut text =
            String::from("[auth]\nhs256_secret = \"0123456789abcdef0123456789abcdef\"\n\n");
        for (i, g) in groups.iter().enumerate() {
            text.push_str(&format!(
                "[[groups]]\nname = \"{g}\"\nmaster = \"host=127.0.0.1 port={} user=seckill dbname=seckill\"\n\n",
                i + 1
            ));
        }
        text.push_str(extra);
        Config::from_toml(&text, "test.toml").expect("config")
    }

    #[test]
    fn the_same_configuration_is_the_same_layout() {
        let c = config(&["g0", "g1"], "");
        assert!(
            c.server.layout_guard,
            "the guard is on unless a harness turns it off"
        );
        let a = Layout::of(&c).unwrap();
        let b = Layout::of(&config(&["g0", "g1"], "")).unwrap();
        assert!(a.changes_to(&b).is_empty());
        assert_eq!(a.kinds["items"].slots.len(), 2, "two runs of slots");
    }

    #[test]
    fn adding_a_group_moves_slots_and_says_which() {
        let two = Layout::of(&config(&["g0", "g1"], "")).unwrap();
        let three = Layout::of(&config(&["g0", "g1", "g2"], "")).unwrap();
        let changes = two.changes_to(&three);
        assert!(!changes.is_empty());
        assert!(
            changes
                .iter()
                .any(|c| c.starts_with("routing.items slots ") && c.ends_with("g1 -> g2")),
            "{changes:?}"
        );
        // Pinning the old slot map keeps every key where it is: nothing moves.
        let pinned = Layout::of(&config(
            &["g0", "g1", "g2"],
            "[routing.items]\nslot_map = [{ slots = \"0-511\", group = \"g0\" }, { slots = \"512-1023\", group = \"g1\" }]\n\
             [routing.users]\nslot_map = [{ slots = \"0-511\", group = \"g0\" }, { slots = \"512-1023\", group = \"g1\" }]\n",
        ))
        .unwrap();
        assert!(
            two.changes_to(&pinned).is_empty(),
            "{:?}",
            two.changes_to(&pinned)
        );
    }

    #[test]
    fn strategies_and_renames_are_changes_too() {
        let hash = Layout::of(&config(&["g0", "g1"], "")).unwrap();
        let table = Layout::of(&config(
            &["g0", "g1"],
            "[routing.items]\nstrategy = \"table\"\n",
        ))
        .unwrap();
        assert!(
            hash.changes_to(&table).is_empty(),
            "table falls back to the same slots"
        );
        let range = Layout::of(&config(
            &["g0", "g1"],
            "[routing.users]\nstrategy = \"range\"\nranges = [{ start = 0, group = \"g1\" }]\n",
        ))
        .unwrap();
        assert_eq!(
            hash.changes_to(&range),
            vec![
                "routing.users.strategy hash -> range".to_string(),
                "routing.users.ranges changed".to_string()
            ]
        );
        let renamed = Layout::of(&config(&["g0", "g9"], "")).unwrap();
        assert!(hash
            .changes_to(&renamed)
            .iter()
            .any(|c| c.ends_with("g1 -> g9")));
    }
}
