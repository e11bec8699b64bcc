//! The blocklist: users and IPs refused at the front door (403 `blocked`) on every node.
//!
//! It lives in the `blocklist` table of the config group, like `shard_map`. Every engine node keeps
//! a copy in memory, checks `blocklist_version` every `frontdoor.blocklist_refresh_ms` and reloads
//! when it moved, so a block reaches every node within about a second and checking one costs no
//! database work. Entries may expire (`ttl_secs`); an expired entry stops counting at once on
//! every node (the expiry is checked in memory) and its row is purged later.

use crate::config::frontdoor::parse_net;
use crate::domain::UserId;
use chrono::{DateTime, Utc};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
use tokio_postgres::Row;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    User,
    Ip,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::User => "user",
            Kind::Ip => "ip",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "user" => Some(Kind::User),
            "ip" => Some(Kind::Ip),
            _ => None,
        }
    }
}

/// One blocklist entry.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Entry {
    #[schema(minimum = 1)]
    pub id: u64,
    pub kind: Kind,
    /// A user id (decimal), or an IP address or CIDR.
    pub value: String,
    pub reason: String,
    pub(crate) created_at: DateTime<Utc>,
    /// None: until removed.
    pub expires_at: Option<DateTime<Utc>>,
}

/// A new entry (`POST /v1/admin/blocklist`).
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewEntry {
    pub kind: Kind,
    /// A user id (decimal string or number), or an IP address or CIDR (`203.0.113.0/24`,
    /// `2001:db8::/64`).
    #[schema(value_type = String, max_length = 64)]
    pub value: serde_json::Value,
    /// Why (shown in the list). Up to 500 characters.
    #[serde(default)]
    #[schema(max_length = 500)]
    pub reason: String,
    /// The entry expires after this many seconds (1 to 31536000); default never.
    #[serde(default, deserialize_with = "crate::domain::integer_opt_u32")]
    #[schema(minimum = 1, maximum = 31536000)]
    pub ttl_secs: Option<u32>,
}

impl NewEntry {
    /// The value in canonical form, or the offending field and why.
    pub(crate) fn canonical(&self) -> Result<String, (&'static str, String)> {
        if self.reason.chars().count() > 500 || self.reason.chars().any(char::is_control) {
            return Err((
                "reason",
                "must be at most 500 characters, without control characters".into(),
            ));
        }
        if let Some(t) = self.ttl_secs {
            if !(1..=31_536_000).contains(&t) {
                return Err(("ttl_secs", "must be between 1 and 31536000".into()));
            }
        }
        let text = match &self.value {
            serde_json::Value::String(s) => s.trim().to_string(),
            serde_json::Value::Number(n) => n.to_string(),
            _ => return Err(("value", "must be a string or a user id".into())),
        };
        match self.kind {
            Kind::User => text
                .parse::<i128>()
                .ok()
                .and_then(|n| UserId::parse(n).ok())
                .map(|u| u.to_string())
                .ok_or(("value", "must be a user id between 1 and 2^63-1".into())),
            Kind::Ip => parse_net(&text)
                .map(|n| net_text(&n))
                .ok_or(("value", "must be an IP address or a CIDR".into())),
        }
    }
}

/// A single address prints without its prefix length.
fn net_text(n: &IpNet) -> String {
    if n.prefix_len() == n.max_prefix_len() {
        n.addr().to_string()
    } else {
        n.to_string()
    }
}

#[derive(Debug, Clone)]
struct Block {
    reason: String,
    /// Unix ms; None: never.
    until_ms: Option<i64>,
}

impl Block {
    fn active(&self, now_ms: i64) -> bool {
        self.until_ms.is_none_or(|t| now_ms < t)
    }
}

#[derive(Default)]
struct Snapshot {
    users: HashMap<u64, Block>,
    /// Single addresses, looked up directly.
    addresses: HashMap<IpAddr, Block>,
    /// Networks, scanned (blocks of whole ranges are few).
    nets: Vec<(IpNet, Block)>,
}

/// This node's copy of the blocklist.
pub struct Blocklist {
    current: RwLock<Arc<Snapshot>>,
    version: AtomicI64,
    /// Automatic blocks made on this node, in force at once and until they expire, whatever the
    /// table says meanwhile (they reach it at the next refresh).
    local: RwLock<HashMap<u64, Block>>,
}

impl Default for Blocklist {
    fn default() -> Self {
        Self {
            current: RwLock::new(Arc::new(Snapshot::default())),
            version: AtomicI64::new(-1),
            local: RwLock::new(HashMap::new()),
        }
    }
}

impl Blocklist {
    fn snapshot(&self) -> Arc<Snapshot> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Why `user` is blocked, if it is.
    pub fn user(&self, user: UserId, now_ms: i64) -> Option<String> {
        let shared = self
            .snapshot()
            .users
            .get(&user.key())
            .filter(|b| b.active(now_ms))
            .map(|b| b.reason.clone());
        shared.or_else(|| {
            let local = match self.local.read() {
                Ok(l) => l,
                Err(poisoned) => poisoned.into_inner(),
            };
            local
                .get(&user.key())
                .filter(|b| b.active(now_ms))
                .map(|b| b.reason.clone())
        })
    }

    /// Why `ip` is blocked, if it is.
    pub fn ip(&self, ip: IpAddr, now_ms: i64) -> Option<String> {
        let snapshot = self.snapshot();
        if let Some(b) = snapshot.addresses.get(&ip).filter(|b| b.active(now_ms)) {
            return Some(b.reason.clone());
        }
        snapshot
            .nets
            .iter()
            .find(|(n, b)| n.contains(&ip) && b.active(now_ms))
            .map(|(_, b)| b.reason.clone())
    }

    /// Block `user` on this node at once (an automatic block, before the table has it). Returns
    /// false when an automatic block of this node holds the user already.
    pub(crate) fn block_user_here(&self, user: UserId, reason: &str, until_ms: i64) -> bool {
        let mut local = match self.local.write() {
            Ok(l) => l,
            Err(poisoned) => poisoned.into_inner(),
        };
        let now = until_ms.min(crate::frontdoor::now_ms());
        local.retain(|_, b| b.active(now));
        if local.get(&user.key()).is_some_and(|b| b.active(now)) {
            return false;
        }
        local.insert(
            user.key(),
            Block {
                reason: reason.into(),
                until_ms: Some(until_ms),
            },
        );
        true
    }

    fn replace(&self, version: i64, entries: &[Entry]) {
        let mut next = Snapshot::default();
        for e in entries {
            let block = Block {
                reason: e.reason.clone(),
                until_ms: e.expires_at.map(|t| t.timestamp_millis()),
            };
            match e.kind {
                Kind::User => {
                    if let Ok(u) = e.value.parse::<u64>() {
                        next.users.insert(u, block);
                    }
                }
                Kind::Ip => match parse_net(&e.value) {
                    Some(n) if n.prefix_len() == n.max_prefix_len() => {
                        next.addresses.insert(n.addr(), block);
                    }
                    Some(n) => next.nets.push((n, block)),
                    None => {}
                },
            }
        }
        match self.current.write() {
            Ok(mut g) => *g = Arc::new(next),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(next),
        }
        self.version.store(version, Ordering::Release);
    }

    /// Reload from the config group if the table's version moved. Returns whether it did.
    pub async fn refresh(
        &self,
        client: &tokio_postgres::Client,
    ) -> Result<bool, tokio_postgres::Error> {
        let version: i64 = client
            .query_one("SELECT version FROM blocklist_version WHERE id = 1", &[])
            .await?
            .get(0);
        if version == self.version.load(Ordering::Acquire) {
            return Ok(false);
        }
        let entries = list(client).await?;
        self.replace(version, &entries);
        tracing::info!(version, entries = entries.len(), "blocklist loaded");
        Ok(true)
    }
}

const COLUMNS: &str = "id, kind, value, reason, created_at, expires_at";

fn entry(r: &Row) -> Option<Entry> {
    Some(Entry {
        id: r.get::<_, i64>(0).unsigned_abs(),
        kind: Kind::parse(r.get(1))?,
        value: r.get(2),
        reason: r.get(3),
        created_at: r.get(4),
        expires_at: r.get(5),
    })
}

/// The entries in force, newest first.
pub(crate) async fn list(
    client: &tokio_postgres::Client,
) -> Result<Vec<Entry>, tokio_postgres::Error> {
    let rows = client
        .query(
            &format!(
                "SELECT {COLUMNS} FROM blocklist WHERE expires_at IS NULL OR expires_at > now()
                 ORDER BY created_at DESC, id"
            ),
            &[],
        )
        .await?;
    Ok(rows.iter().filter_map(entry).collect())
}

/// Add an entry (`value` canonical, see [`NewEntry::canonical`]).
pub(crate) async fn add(
    client: &tokio_postgres::Client,
    kind: Kind,
    value: &str,
    reason: &str,
    ttl_secs: Option<u32>,
) -> Result<Entry, tokio_postgres::Error> {
    let id = (uuid::Uuid::new_v4().as_u64_pair().0 >> 1).max(1) as i64;
    let ttl = ttl_secs.map(f64::from);
    let row = client
        .query_one(
            &format!(
                "INSERT INTO blocklist (id, kind, value, reason, expires_at)
                 VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5::float8))
                 RETURNING {COLUMNS}"
            ),
            &[&id, &kind.as_str(), &value, &reason, &ttl],
        )
        .await?;
    entry(&row).ok_or_else(|| unreachable!("the row was written with a known kind"))
}

/// Remove entry `id`. Returns whether it existed.
pub async fn remove(
    client: &tokio_postgres::Client,
    id: u64,
) -> Result<bool, tokio_postgres::Error> {
    let Ok(id) = i64::try_from(id) else {
        return Ok(false);
    };
    Ok(client
        .execute("DELETE FROM blocklist WHERE id = $1", &[&id])
        .await?
        > 0)
}

/// Delete entries that expired more than a day ago (they no longer count anyway).
pub(crate) async fn purge_expired(
    client: &tokio_postgres::Client,
) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            "DELETE FROM blocklist WHERE expires_at < now() - interval '1 day'",
            &[],
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(kind: Kind, value: serde_json::Value) -> NewEntry {
        NewEntry {
            kind,
            value,
            reason: String::new(),
            ttl_secs: None,
        }
    }

    #[test]
    fn values_are_canonical() {
        use serde_json::json;
        assert_eq!(new(Kind::User, json!("42")).canonical().unwrap(), "42");
        assert_eq!(new(Kind::User, json!(42)).canonical().unwrap(), "42");
        assert!(new(Kind::User, json!("0")).canonical().is_err());
        assert!(new(Kind::User, json!("x")).canonical().is_err());
        assert_eq!(
            new(Kind::Ip, json!("203.0.113.7")).canonical().unwrap(),
            "203.0.113.7"
        );
        assert_eq!(
            new(Kind::Ip, json!("203.0.113.7/24")).canonical().unwrap(),
            "203.0.113.0/24"
        );
        assert_eq!(
            new(Kind::Ip, json!("2001:DB8::1/64")).canonical().unwrap(),
            "2001:db8::/64"
        );
        assert!(new(Kind::Ip, json!("300.1.1.1")).canonical().is_err());
        assert!(new(Kind::Ip, json!(true)).canonical().is_err());
    }

    #[test]
    fn entries_block_until_they_expire() {
        let b = Blocklist::default();
        let at = |ms: i64| DateTime::<Utc>::from_timestamp_millis(ms).unwrap();
        let e = |kind, value: &str, until: Option<i64>| Entry {
            id: 1,
            kind,
            value: value.into(),
            reason: "bots".into(),
            created_at: at(0),
            expires_at: until.map(at),
        };
        b.replace(
            1,
            &[
                e(Kind::User, "42", None),
                e(Kind::User, "43", Some(1_000)),
                e(Kind::Ip, "203.0.113.0/24", None),
            ],
        );
        let user = |u: u64| UserId::parse(u.into()).unwrap();
        assert_eq!(b.user(user(42), 5_000).as_deref(), Some("bots"));
        assert!(b.user(user(43), 999).is_some());
        assert!(b.user(user(43), 1_000).is_none(), "expired");
        assert!(b.user(user(44), 0).is_none());
        assert!(b.ip("203.0.113.200".parse().unwrap(), 0).is_some());
        assert!(b.ip("203.0.114.1".parse().unwrap(), 0).is_none());
        assert!(
            b.ip("203.0.113.7".parse().unwrap(), 0).is_some(),
            "a network"
        );
        b.replace(
            2,
            &[
                e(Kind::User, "42", None),
                e(Kind::Ip, "198.51.100.9", None),
                e(Kind::Ip, "::ffff:192.0.2.1", None),
            ],
        );
        assert!(
            b.ip("198.51.100.9".parse().unwrap(), 0).is_some(),
            "an address"
        );
        assert!(b.ip("198.51.100.10".parse().unwrap(), 0).is_none());
        assert!(
            b.ip("192.0.2.1".parse().unwrap(), 0).is_some(),
            "mapped addresses are IPv4"
        );
        let far = i64::MAX / 2;
        assert!(b.block_user_here(user(44), "auto", far));
        assert!(!b.block_user_here(user(44), "auto", far), "once");
        assert_eq!(b.user(user(44), 0).as_deref(), Some("auto"));
        b.replace(3, &[e(Kind::User, "42", None)]);
        assert_eq!(
            b.user(user(44), 0).as_deref(),
            Some("auto"),
            "a reload does not wipe this node's automatic blocks"
        );
        assert!(b.user(user(42), 0).is_some(), "the others stay");
    }
}
