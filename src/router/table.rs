//! The router-config table: explicit key -> group entries in `shard_map` on the config group.
//!
//! Every engine node keeps the whole table in memory (it is small: it names only the keys a DBA
//! moved) and polls `shard_map_version`, which a trigger bumps on every change, so a change is seen
//! by all nodes within `routing.table_refresh_ms`. Entries naming a group this node does not know
//! are skipped with a warning rather than routing to nowhere.

use super::{GroupIdx, KeyKind};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

#[derive(Debug, Default)]
struct Snapshot {
    version: i64,
    entries: HashMap<(KeyKind, u64), GroupIdx>,
}

#[derive(Debug)]
pub struct TableCache {
    groups: Vec<String>,
    current: RwLock<Arc<Snapshot>>,
}

impl TableCache {
    pub fn new(groups: Vec<String>) -> Self {
        Self {
            groups,
            current: RwLock::new(Arc::new(Snapshot {
                version: -1,
                ..Default::default()
            })),
        }
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn get(&self, kind: KeyKind, key: u64) -> Option<GroupIdx> {
        self.snapshot().entries.get(&(kind, key)).copied()
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
        if version < self.version() {
            return;
        }
        let mut entries = HashMap::with_capacity(rows.len());
        for (kind, key, group) in rows {
            match self.groups.iter().position(|g| *g == group) {
                Some(idx) => {
                    entries.insert((kind, key), idx);
                }
                None => tracing::warn!(
                    kind = kind.as_str(),
                    key,
                    group,
                    "shard_map names an unknown group; entry ignored"
                ),
            }
        }
        let snapshot = Arc::new(Snapshot { version, entries });
        match self.current.write() {
            Ok(mut g) => *g = snapshot,
            Err(poisoned) => *poisoned.into_inner() = snapshot,
        }
    }

    /// Re-read the table from the config group if its version moved. Returns whether it changed.
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
        self.replace(version, parsed);
        tracing::info!(version, entries = self.len(), "router-config table loaded");
        Ok(true)
    }
}
