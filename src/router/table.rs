//! The router-config table: explicit key -> group entries in `shard_map` on the config group, and
//! moved hash slots in `slot_map` (slot moves write them; a key's own entry wins).
//!
//! Every engine node keeps the whole table in memory (it is small: it names only the keys a DBA
//! moved) and polls `shard_map_version`, which a trigger bumps on every change, so a change is seen
//! by all nodes within `routing.table_refresh_ms`. Entries naming a group this node does not know
//! are skipped with a warning rather than routing to nowhere.

use super::{GroupIdx, KeyKind};
use crate::shard::{Cluster, GroupError, Work};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

#[derive(Debug, Default)]
struct Snapshot {
    version: i64,
    entries: HashMap<(KeyKind, u64), GroupIdx>,
    slots: HashMap<(KeyKind, u32), GroupIdx>,
}

#[derive(Debug)]
pub struct TableCache {
    groups: Vec<String>,
    current: RwLock<Arc<Snapshot>>,
    /// Whether the snapshot names no key and no slot, as it does until a DBA moves something:
    /// every order asks this cache two or three times, and an empty table is then answered
    /// without touching the lock (whose shared counter every core would write). Set under the
    /// write lock, with the snapshot it describes.
    empty: AtomicBool,
}

impl TableCache {
    pub fn new(groups: Vec<String>) -> Self {
        Self {
            groups,
            current: RwLock::new(Arc::new(Snapshot {
                version: -1,
                ..Default::default()
            })),
            empty: AtomicBool::new(true),
        }
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Look into the current snapshot under the read lock (no reference taken to it).
    fn with<R>(&self, f: impl FnOnce(&Snapshot) -> R) -> R {
        match self.current.read() {
            Ok(g) => f(&g),
            Err(poisoned) => f(&poisoned.into_inner()),
        }
    }

    pub fn get(&self, kind: KeyKind, key: u64) -> Option<GroupIdx> {
        if self.empty.load(Ordering::Acquire) {
            return None;
        }
        self.with(|s| s.entries.get(&(kind, key)).copied())
    }

    /// Where a moved hash slot lives now, if it was moved.
    pub fn slot(&self, kind: KeyKind, slot: u32) -> Option<GroupIdx> {
        if self.empty.load(Ordering::Acquire) {
            return None;
        }
        self.with(|s| s.slots.get(&(kind, slot)).copied())
    }

    /// The keys of `kind` with an entry naming group `group`.
    pub(crate) fn keys_on(&self, kind: KeyKind, group: GroupIdx) -> Vec<u64> {
        self.snapshot()
            .entries
            .iter()
            .filter(|((k, _), g)| *k == kind && **g == group)
            .map(|((_, key), _)| *key)
            .collect()
    }

    /// The version of the table this cache holds (-1 before the first load).
    pub fn version(&self) -> i64 {
        self.snapshot().version
    }

    pub fn len(&self) -> usize {
        self.snapshot().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Install a freshly read table; an older one than this cache holds (a slow refresh that
    /// started before a faster one) is ignored.
    pub fn replace(&self, version: i64, rows: Vec<(KeyKind, u64, String)>) {
        self.replace_with_slots(version, rows, Vec::new());
    }

    /// [`Self::replace`], with the moved slots.
    pub(crate) fn replace_with_slots(
        &self,
        version: i64,
        rows: Vec<(KeyKind, u64, String)>,
        slot_rows: Vec<(KeyKind, u32, String)>,
    ) {
        if version < self.version() {
            return;
        }
        let known = |kind: KeyKind, what: String, group: &str| {
            let idx = self.groups.iter().position(|g| g == group);
            if idx.is_none() {
                tracing::warn!(
                    kind = kind.as_str(),
                    what,
                    group,
                    "the router-config table names an unknown group; entry ignored"
                );
            }
            idx
        };
        let mut entries = HashMap::with_capacity(rows.len());
        for (kind, key, group) in rows {
            if let Some(idx) = known(kind, format!("key {key}"), &group) {
                entries.insert((kind, key), idx);
            }
        }
        let mut slots = HashMap::with_capacity(slot_rows.len());
        for (kind, slot, group) in slot_rows {
            if let Some(idx) = known(kind, format!("slot {slot}"), &group) {
                slots.insert((kind, slot), idx);
            }
        }
        let empty = entries.is_empty() && slots.is_empty();
        let snapshot = Arc::new(Snapshot {
            version,
            entries,
            slots,
        });
        let mut current = match self.current.write() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        *current = snapshot;
        self.empty.store(empty, Ordering::Release);
    }

    /// Re-read the table from the config group of `cluster` if its version moved (as `work`: a
    /// buyer's re-read is a read, an admin's is not); whether it changed.
    pub(crate) async fn refresh_from(
        &self,
        cluster: &Cluster,
        work: Work,
        budget: Duration,
    ) -> Result<bool, GroupError> {
        cluster
            .group(cluster.config_group())
            .run(work, budget, async |c| Ok(self.refresh(c).await?))
            .await
    }

    /// Re-read the table over `client` (a session on the config group) if its version moved.
    /// Returns whether it changed.
    pub async fn refresh(
        &self,
        client: &tokio_postgres::Client,
    ) -> Result<bool, tokio_postgres::Error> {
        let version: i64 = client
            .query_one("SELECT version FROM shard_map_version WHERE id = 1", &[])
            .await?
            .get(0);
        if version == self.version() {
            return Ok(false);
        }
        let rows = client
            .query("SELECT kind, key, group_name FROM shard_map", &[])
            .await?;
        let parsed = rows
            .iter()
            .filter_map(|r| {
                let kind = KeyKind::parse(r.get::<_, &str>(0))?;
                let key: i64 = r.get(1);
                Some((kind, key.unsigned_abs(), r.get::<_, String>(2)))
            })
            .collect();
        let slots = client
            .query("SELECT kind, slot, group_name FROM slot_map", &[])
            .await?
            .iter()
            .filter_map(|r| {
                let kind = KeyKind::parse(r.get::<_, &str>(0))?;
                let slot: i32 = r.get(1);
                Some((kind, slot.unsigned_abs(), r.get::<_, String>(2)))
            })
            .collect();
        self.replace_with_slots(version, parsed, slots);
        tracing::info!(version, entries = self.len(), "router-config table loaded");
        Ok(true)
    }
}

/// Point `key` of `kind` at `group` by an entry, or remove its entry (`None`): what `shard-map
/// set`/`delete` and a key move's switch write. Returns the rows changed.
pub(crate) async fn write_entry(
    c: &impl tokio_postgres::GenericClient,
    kind: KeyKind,
    key: i64,
    group: Option<&str>,
) -> Result<u64, tokio_postgres::Error> {
    match group {
        Some(group) => {
            c.execute(
                "INSERT INTO shard_map (kind, key, group_name) VALUES ($1, $2, $3)
                 ON CONFLICT (kind, key) DO UPDATE
                    SET group_name = EXCLUDED.group_name, updated_at = now()",
                &[&kind.as_str(), &key, &group],
            )
            .await
        }
        None => {
            c.execute(
                "DELETE FROM shard_map WHERE kind = $1 AND key = $2",
                &[&kind.as_str(), &key],
            )
            .await
        }
    }
}
