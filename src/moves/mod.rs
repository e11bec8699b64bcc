//! Live moves of keys between shard groups, while they sell (docs/dba.md "Moving keys"). The unit
//! moved is one key or one hash slot (every key of that slot), of items (sale items, their
//! reservations, sales by id: [`items`]) or of users (orders, payments, pending stock releases:
//! [`users`]).
//!
//! A move is a persisted state machine in the `moves` table on the config group
//! ([`run`] drives it):
//!
//! 1. **copying**: the unit's rows are copied to the destination, where they stay *fenced*
//!    (inactive);
//! 2. **catching_up**: the rows changed since the last pass are copied again, until a pass finds
//!    few (each kind's module says how "changed since" is exact);
//! 3. **fenced**: the source's rows are fenced: from the fence on, no writer changes them there
//!    (items: the fence is in the rows that every writer locks first; users: every writer checks
//!    the fence and the mover waits out the transactions older than it). The last changes are
//!    copied, then one transaction on the config group writes the route and marks the move
//!    switched — the commit point;
//! 4. **switched**: the destination's copy is unfenced. Writers that met the fence re-read the
//!    route and go on there (buyers, cancels and payments wait up to 2 s, then 503 with
//!    Retry-After). The source keeps its fenced copy: `reverse` moves the unit back from here,
//!    `complete` drops it;
//! 5. **completed** (the source's copy dropped; its fences stay as tombstones that turn away a node
//!    still routing there), or **failed** / **cancelled** (before the switch: the source unfenced,
//!    the destination's copy dropped).
//!
//! Whoever runs a move (the engine node that accepted it, or the CLI) holds a lease on it and
//! renews it every few seconds, steps included; every engine node looks for moves whose lease ran
//! out and resumes them from their phase (each phase is idempotent; the destination only takes
//! rows of keys this move fenced there, so a runner that lost its claim cannot overwrite a live
//! copy). Before the switch a move can always be rolled back; after it, only reversed: a move
//! never stays half-switched. A slot move also fences the slot as a whole (`slot_fences`), so a key
//! of it that has no rows yet (a user's first order, a new sale of an item) is refused on the
//! source too, and copies every row of the slot at each pass (a key may get its first rows between
//! passes).
//!
//! Pre-checks before any copy: both groups writable with their shadows streaming, the same schema
//! version, nothing live for the unit on the destination, no other open move of the key or slot.
//!
//! A key moved alone gets an entry in the router-config table; a slot gets an entry in `slot_map`
//! (and the keys of that slot whose entries named the source lose them). Entries win under every
//! strategy; slots cannot be moved for a kind routed by ranges.
//!
//! Not covered: reads (a sale's stock, a user's orders) on a node that has not re-read the route
//! yet see the source's inactive copy for up to `routing.table_refresh_ms`; marks that do not
//! change stock and are made outside the item's row lock (a reservation marked paid) just before
//! the fence can miss the copy, and the reconciler makes them again from the orders.

pub mod items;
mod run;
pub mod users;

use crate::config::Config;
use crate::db::DbError;
use crate::router::{slot_of, KeyKind, Router};
use crate::shard::{Cluster, GroupError, Role, Work};
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::Client;
use tokio_util::task::TaskTracker;

/// How long a claim on a move holds without being renewed.
const LEASE: &str = "10 seconds";
/// Budget of one step against one group (a copy of a big unit takes a while).
const STEP_BUDGET: Duration = Duration::from_secs(120);

/// Where a move is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Copying,
    CatchingUp,
    Fenced,
    /// Shown, never stored: routed to the destination, whose copy is not live yet (its writes
    /// are still paused; `write_pause_ms` is set when it goes live and the phase shows
    /// `switched`).
    Switching,
    Switched,
    Completed,
    Failed,
    Cancelled,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Copying => "copying",
            Phase::CatchingUp => "catching_up",
            Phase::Fenced => "fenced",
            Phase::Switching => "switching",
            Phase::Switched => "switched",
            Phase::Completed => "completed",
            Phase::Failed => "failed",
            Phase::Cancelled => "cancelled",
        }
    }

    /// The column's text (its CHECK constraint allows nothing else).
    fn from_db(text: &str) -> Self {
        match text {
            "copying" => Phase::Copying,
            "catching_up" => Phase::CatchingUp,
            "fenced" => Phase::Fenced,
            "switched" => Phase::Switched,
            "completed" => Phase::Completed,
            "failed" => Phase::Failed,
            _ => Phase::Cancelled,
        }
    }

    /// Before the switch: the move can still be cancelled (rolled back).
    pub fn before_switch(self) -> bool {
        matches!(self, Phase::Copying | Phase::CatchingUp | Phase::Fenced)
    }
}

/// One move, as `GET /v1/admin/moves/{id}` shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Move {
    pub move_id: u64,
    #[schema(example = "items")]
    pub kind: String,
    /// The key moved, or
    pub key: Option<u64>,
    /// the hash slot moved (all its keys).
    pub slot: Option<u32>,
    #[schema(example = "g0")]
    pub from: String,
    #[schema(example = "g1")]
    pub to: String,
    pub phase: Phase,
    /// Rows written to the destination so far (re-copies of changed rows included).
    pub rows_copied: i64,
    /// How long the unit's writes were fenced (from the source's fence to the destination's copy
    /// going live); set at the switch.
    pub write_pause_ms: Option<i64>,
    /// Why it failed, or the last error of a step that is being retried.
    pub error: Option<String>,
    pub cancel_requested: bool,
    pub complete_requested: bool,
    /// The destination's copy is live (the move switched and unfenced it).
    pub dest_live: bool,
    /// A failed or cancelled move whose clean-up (unfence the source, drop the copy) is not done.
    pub cleanup_pending: bool,
    /// The move this one reverses, and the move that reversed this one.
    pub reverse_of: Option<u64>,
    pub reversed_by: Option<u64>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub fenced_at: Option<DateTime<Utc>>,
    pub switched_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

const MOVE_COLUMNS: &str = "move_id, kind, key, from_group, to_group, phase, rows_copied,
    write_pause_ms, error, cancel_requested, complete_requested, dest_live, cleanup_pending,
    reverse_of, reversed_by, created_at, updated_at, fenced_at, switched_at, finished_at,
    watermark, slot";

impl Move {
    fn from_row(r: &tokio_postgres::Row) -> Self {
        let id = |v: i64| v.unsigned_abs();
        Move {
            move_id: id(r.get(0)),
            kind: r.get(1),
            key: r.get::<_, Option<i64>>(2).map(id),
            slot: r.get::<_, Option<i32>>(21).map(|s| s.unsigned_abs()),
            from: r.get(3),
            to: r.get(4),
            phase: Phase::from_db(r.get(5)),
            rows_copied: r.get(6),
            write_pause_ms: r.get(7),
            error: r.get(8),
            cancel_requested: r.get(9),
            complete_requested: r.get(10),
            dest_live: r.get(11),
            cleanup_pending: r.get(12),
            reverse_of: r.get::<_, Option<i64>>(13).map(id),
            reversed_by: r.get::<_, Option<i64>>(14).map(id),
            created_at: r.get(15),
            updated_at: r.get(16),
            fenced_at: r.get(17),
            switched_at: r.get(18),
            finished_at: r.get(19),
        }
    }

    /// What it moves.
    pub fn unit(&self) -> Unit {
        match (self.key, self.slot) {
            (Some(k), _) => Unit::Key(k),
            (None, s) => Unit::Slot(s.unwrap_or_default()),
        }
    }

    /// The key, or `slot N`, for listings.
    pub fn unit_label(&self) -> String {
        match self.unit() {
            Unit::Key(k) => k.to_string(),
            Unit::Slot(s) => format!("slot {s}"),
        }
    }

    fn key_kind(&self) -> Result<KeyKind, MoveError> {
        KeyKind::parse(&self.kind).ok_or_else(|| MoveError::Unsupported(self.kind.clone()))
    }

    /// The move as operators see it: `switching` until the destination's copy is live, so
    /// `switched` always means writes flow again and `write_pause_ms` is known.
    pub fn shown(mut self) -> Self {
        if self.phase == Phase::Switched && !self.dest_live {
            self.phase = Phase::Switching;
        }
        self
    }

    /// Nothing left to do until someone asks for more (complete, reverse).
    pub fn at_rest(&self) -> bool {
        match self.phase {
            Phase::Switched => self.dest_live && !self.complete_requested,
            Phase::Completed | Phase::Failed | Phase::Cancelled => !self.cleanup_pending,
            _ => false,
        }
    }
}

/// What a move would do, and the checks it passed (`dry_run`).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Plan {
    #[schema(example = "items")]
    pub kind: String,
    pub key: Option<u64>,
    pub slot: Option<u32>,
    pub from: String,
    pub to: String,
    /// Keys the move carries (for a slot: those with rows on the source now).
    pub keys: usize,
    /// Rows the first pass copies.
    pub rows_to_copy: i64,
    pub source: Holdings,
    pub destination: Holdings,
    /// The pre-checks, all passed.
    pub checks: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    #[error("unknown group {0:?}")]
    UnknownGroup(String),
    #[error("{what} already lives on group {group}")]
    SameGroup { what: String, group: String },
    #[error("cannot move {0}")]
    Unsupported(String),
    #[error("move {0} not found")]
    NotFound(u64),
    /// Another open move of the key, or an action the move's phase does not allow.
    #[error("{0}")]
    Conflict(String),
    /// A pre-check failed: nothing was copied.
    #[error("pre-check failed: {0}")]
    Precheck(String),
    #[error("{what} has live rows on the destination group {group}")]
    HasData { what: String, group: String },
    /// Work on a group failed.
    #[error(transparent)]
    Group(#[from] GroupError),
}

impl From<DbError> for MoveError {
    fn from(e: DbError) -> Self {
        MoveError::Group(e.into())
    }
}

impl From<crate::shard::ShardError> for MoveError {
    fn from(e: crate::shard::ShardError) -> Self {
        MoveError::Group(e.into())
    }
}

/// The unit a move carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Key(u64),
    Slot(u32),
}

impl Unit {
    fn describe(self, kind: KeyKind) -> String {
        match self {
            Unit::Key(k) => format!("{} {k}", kind.as_str()),
            Unit::Slot(s) => format!("{} slot {s}", kind.as_str()),
        }
    }
}

/// What a group holds of a move's keys.
#[derive(Debug, Clone, Copy, Default, Serialize, utoipa::ToSchema)]
pub struct Holdings {
    /// Rows (items: sale items, reservations, sales; users: orders, payments).
    pub rows: i64,
    /// Keys with rows here.
    pub keys: i64,
    /// Of which live (not fenced: neither a copy being filled nor one left behind).
    pub live: i64,
}

// Each kind's SQL, behind one set of names.

async fn candidates(kind: KeyKind, c: &Client, move_id: i64) -> Result<Vec<i64>, DbError> {
    match kind {
        KeyKind::Items => items::candidates(c, move_id).await,
        KeyKind::Users => users::candidates(c, move_id).await,
    }
}

async fn watermark(kind: KeyKind, c: &mut Client, keys: &[i64]) -> Result<DateTime<Utc>, DbError> {
    match kind {
        KeyKind::Items => items::watermark(c, keys).await,
        KeyKind::Users => users::watermark(c, keys).await,
    }
}

async fn copy(
    kind: KeyKind,
    src: &Client,
    dst: &mut Client,
    move_id: i64,
    keys: &[i64],
    since: Option<DateTime<Utc>>,
) -> Result<u64, DbError> {
    match kind {
        KeyKind::Items => items::copy(src, dst, move_id, keys, since).await,
        KeyKind::Users => users::copy(src, dst, move_id, keys, since).await,
    }
}

async fn fence(kind: KeyKind, c: &mut Client, move_id: i64, keys: &[i64]) -> Result<u64, DbError> {
    match kind {
        KeyKind::Items => items::fence(c, move_id, keys).await,
        KeyKind::Users => users::fence(c, move_id, keys).await,
    }
}

/// Lift this move's fences from a group (its slot fence too).
async fn unfence(kind: KeyKind, c: &Client, move_id: i64) -> Result<u64, DbError> {
    lift_fences(kind, c, move_id).await
}

async fn lift_fences(
    kind: KeyKind,
    c: &impl tokio_postgres::GenericClient,
    move_id: i64,
) -> Result<u64, DbError> {
    let n = match kind {
        KeyKind::Items => items::unfence(c, move_id).await?,
        KeyKind::Users => users::unfence(c, move_id).await?,
    };
    c.execute("DELETE FROM slot_fences WHERE move_id = $1", &[&move_id])
        .await?;
    Ok(n)
}

/// **Guards.** A runner that lost its claim on a move may still be fencing for it (a COMMIT
/// already sent completes on the server whatever the client does) while the new runner rolls the
/// move back. So every fence and the roll-back's unfencing of the source take the move's advisory
/// lock on the group, one after the other: the roll-back records the move as ended there
/// (`ended_moves`), and a fence that comes later finds the record and is refused.
async fn guard(tx: &tokio_postgres::Transaction<'_>, move_id: i64) -> Result<(), DbError> {
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended('seckill move', $1))",
        &[&move_id],
    )
    .await?;
    let ended: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM ended_moves WHERE move_id = $1)",
            &[&move_id],
        )
        .await?
        .get(0);
    if ended {
        return Err(DbError::Rejected {
            code: "move_ended".into(),
            message: format!("move {move_id} was rolled back on this group: no fence for it"),
        });
    }
    Ok(())
}

/// Roll a move back on its source ([`guard`]): record it as ended, lift its fences.
pub async fn end_on_source(kind: KeyKind, c: &mut Client, move_id: i64) -> Result<u64, DbError> {
    let tx = c.transaction().await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended('seckill move', $1))",
        &[&move_id],
    )
    .await?;
    tx.execute(
        "INSERT INTO ended_moves (move_id) VALUES ($1) ON CONFLICT DO NOTHING",
        &[&move_id],
    )
    .await?;
    let n = lift_fences(kind, &tx, move_id).await?;
    tx.commit().await?;
    Ok(n)
}

/// Fence a whole slot on a group: writers refuse keys of it that have no rows yet (a user's first
/// order, a new sale), which no key fence covers.
async fn fence_slot(kind: KeyKind, c: &mut Client, move_id: i64, slot: u32) -> Result<(), DbError> {
    let slot = i32::try_from(slot).unwrap_or(i32::MAX);
    let tx = c.transaction().await?;
    guard(&tx, move_id).await?;
    tx.execute(
        "INSERT INTO slot_fences (kind, slot, move_id) VALUES ($1, $2, $3)
         ON CONFLICT (kind, slot) DO UPDATE SET move_id = EXCLUDED.move_id, until = NULL",
        &[&kind.as_str(), &slot, &move_id],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Drop what an earlier, completed move of a slot left fenced on a group (the slot comes back
/// there, or one of its keys does).
async fn clear_slot_tombstone(kind: KeyKind, c: &Client, slot: u32) -> Result<(), DbError> {
    let slot = i32::try_from(slot).unwrap_or(i32::MAX);
    c.execute(
        "DELETE FROM slot_fences WHERE kind = $1 AND slot = $2 AND until IS NOT NULL",
        &[&kind.as_str(), &slot],
    )
    .await?;
    Ok(())
}

/// A completed move's slot fence stays on its source as a tombstone for a minute: long after
/// every node has re-read the routes (`routing.table_refresh_ms`), short enough not to stand in
/// the way of a later move back.
async fn expire_slot_fence(c: &Client, move_id: i64) -> Result<(), DbError> {
    c.execute(
        "UPDATE slot_fences SET until = now() + interval '1 minute' WHERE move_id = $1",
        &[&move_id],
    )
    .await?;
    c.execute(
        "UPDATE item_fences SET until = now() + interval '1 minute' WHERE move_id = $1",
        &[&move_id],
    )
    .await?;
    Ok(())
}

/// Wait until every transaction of the engine's role that began before now has ended (up to 10 s):
/// what a fence that writers check without a row lock needs before the last copy.
async fn wait_out_older(c: &Client) -> Result<(), DbError> {
    let since: DateTime<Utc> = c.query_one("SELECT clock_timestamp()", &[]).await?.get(0);
    let started = std::time::Instant::now();
    loop {
        let older: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND pid <> pg_backend_pid()
                   AND usename = current_user AND backend_type = 'client backend'
                   AND xact_start < $1",
                &[&since],
            )
            .await?
            .get(0);
        if older == 0 {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(10) {
            return Err(DbError::Busy(format!(
                "{older} transaction(s) older than the fence are still running"
            )));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Drop this move's inactive copy from a group (only what the move fenced there); with
/// `tombstones` the fences stay, turning away a node that still routes the keys here.
async fn drop_copy(
    kind: KeyKind,
    c: &mut Client,
    move_id: i64,
    tombstones: bool,
) -> Result<u64, DbError> {
    match kind {
        KeyKind::Items => items::drop_copy(c, move_id, tombstones).await,
        KeyKind::Users => users::drop_copy(c, move_id, tombstones).await,
    }
}

async fn holdings(kind: KeyKind, c: &Client, keys: &[i64]) -> Result<Holdings, DbError> {
    match kind {
        KeyKind::Items => items::holdings(c, keys).await,
        KeyKind::Users => users::holdings(c, keys).await,
    }
}

/// The advisory lock starts of moves take.
const START_LOCK: i64 = 0x0073_6b6d_6f76_6573;

/// Why an open move (other than `except`) stands in the way of a move of `unit`, if one does: a
/// move of the same key, of its slot, of the slot, or of a key of the slot.
async fn open_clash(
    c: &impl tokio_postgres::GenericClient,
    kind: KeyKind,
    unit: Unit,
    except: Option<u64>,
    slots: u32,
) -> Result<Option<String>, DbError> {
    let except = except.map(db_key).unwrap_or(0);
    let open = c
        .query(
            "SELECT move_id, phase, key, slot FROM moves WHERE kind = $1 AND move_id <> $2
               AND (phase IN ('copying', 'catching_up', 'fenced', 'switched') OR cleanup_pending)",
            &[&kind.as_str(), &except],
        )
        .await?;
    let slot_of_unit = match unit {
        Unit::Key(k) => slot_of(k, slots),
        Unit::Slot(s) => s,
    };
    for r in &open {
        let (id, phase): (i64, String) = (r.get(0), r.get(1));
        let key = r.get::<_, Option<i64>>(2).map(|k| k.unsigned_abs());
        let slot = r.get::<_, Option<i32>>(3).map(|s| s.unsigned_abs());
        let clash = match (unit, key, slot) {
            (Unit::Key(k), Some(other), _) => k == other,
            (Unit::Slot(_), Some(other), _) => slot_of(other, slots) == slot_of_unit,
            (_, None, Some(s)) => s == slot_of_unit,
            _ => false,
        };
        if clash {
            let what = match (key, slot) {
                (Some(k), _) => format!("{} {k}", kind.as_str()),
                (_, s) => format!("{} slot {}", kind.as_str(), s.unwrap_or_default()),
            };
            return Ok(Some(format!(
                "move {id} ({what}) is {phase}: complete, reverse or cancel it first"
            )));
        }
    }
    Ok(None)
}

/// Rows a copy writes per statement.
const CHUNK: usize = 5_000;

/// One column of rows read from the source, for an `unnest` insert on the destination.
fn column<'a, T: tokio_postgres::types::FromSql<'a>>(
    rows: &'a [tokio_postgres::Row],
    i: usize,
) -> Vec<T> {
    rows.iter().map(|r| r.get(i)).collect()
}

fn db_key(key: u64) -> i64 {
    i64::try_from(key).unwrap_or(i64::MAX)
}

/// Runs moves: starts them, drives them through their phases ([`run`]), resumes the ones whose
/// runner died.
pub struct Mover {
    config: Arc<Config>,
    cluster: Arc<Cluster>,
    router: Arc<Router>,
    tasks: TaskTracker,
    /// This runner's name in `moves.owner`.
    owner: String,
}

/// The open moves (not completed, failed or cancelled), for the shard map's listing.
pub async fn open_moves(client: &Client) -> Result<Vec<Move>, DbError> {
    Ok(client
        .query(
            &format!(
                "SELECT {MOVE_COLUMNS} FROM moves
                 WHERE phase IN ('copying', 'catching_up', 'fenced', 'switched') OR cleanup_pending
                 ORDER BY move_id"
            ),
            &[],
        )
        .await?
        .iter()
        .map(Move::from_row)
        .collect())
}

impl Mover {
    pub fn new(
        config: Arc<Config>,
        cluster: Arc<Cluster>,
        router: Arc<Router>,
        tasks: TaskTracker,
    ) -> Arc<Self> {
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
        let owner = format!(
            "{}-{}-{:08x}",
            host.trim(),
            std::process::id(),
            uuid::Uuid::new_v4().as_u64_pair().0 as u32
        );
        Arc::new(Self {
            config,
            cluster,
            router,
            tasks,
            owner,
        })
    }

    fn budget(&self) -> Duration {
        self.config.request_timeout()
    }

    fn group_idx(&self, name: &str) -> Result<usize, MoveError> {
        self.cluster
            .by_name(name)
            .map(|(g, _)| g)
            .ok_or_else(|| MoveError::UnknownGroup(name.to_string()))
    }

    /// Work on the config group, where the moves and the routes are.
    async fn on_config<T>(
        &self,
        work: impl AsyncFnOnce(&mut deadpool_postgres::Object) -> Result<T, DbError>,
    ) -> Result<T, MoveError> {
        Ok(self
            .cluster
            .group(self.cluster.config_group())
            .run(Work::Settle, self.budget(), work)
            .await?)
    }

    /// Work on one group, with a step's budget.
    async fn on_group<T>(
        &self,
        name: &str,
        work: impl AsyncFnOnce(&mut deadpool_postgres::Object) -> Result<T, DbError>,
    ) -> Result<T, MoveError> {
        let g = self.group_idx(name)?;
        Ok(self
            .cluster
            .group(g)
            .run(Work::Settle, STEP_BUDGET, work)
            .await?)
    }

    /// Re-read the router-config table now.
    async fn refresh_routes(&self) -> Result<(), MoveError> {
        self.router
            .table()
            .refresh_from(&self.cluster, Work::Settle, self.budget())
            .await?;
        Ok(())
    }

    pub async fn get(&self, id: u64) -> Result<Move, MoveError> {
        let db_id = db_key(id);
        self.on_config(async |c| {
            Ok(c.query_opt(
                &format!("SELECT {MOVE_COLUMNS} FROM moves WHERE move_id = $1"),
                &[&db_id],
            )
            .await?
            .map(|r| Move::from_row(&r)))
        })
        .await?
        .ok_or(MoveError::NotFound(id))
    }

    /// Every move, newest first (at most `limit`).
    pub async fn list(&self, limit: i64) -> Result<Vec<Move>, MoveError> {
        self.on_config(async |c| {
            Ok(c.query(
                &format!("SELECT {MOVE_COLUMNS} FROM moves ORDER BY move_id DESC LIMIT $1"),
                &[&limit],
            )
            .await?
            .iter()
            .map(Move::from_row)
            .collect())
        })
        .await
    }

    /// The group a unit lives on now.
    fn home(&self, kind: KeyKind, unit: Unit) -> Result<usize, MoveError> {
        match unit {
            Unit::Key(k) => Ok(self.router.route(kind, k)),
            Unit::Slot(s) => {
                let rules = self.router.kind(kind);
                if rules.strategy() == crate::config::Strategy::Range {
                    return Err(MoveError::Unsupported(format!(
                        "slots of {}: they are routed by ranges",
                        kind.as_str()
                    )));
                }
                if s >= rules.slot_count() {
                    return Err(MoveError::Unsupported(format!(
                        "slot {s}: there are {} slots",
                        rules.slot_count()
                    )));
                }
                Ok(self
                    .router
                    .table()
                    .slot(kind, s)
                    .or_else(|| self.router.slot_home(kind, s))
                    .unwrap_or_default())
            }
        }
    }

    /// The keys a move of `unit` carries from group `from` (a slot's: the keys of that slot with
    /// rows there, live or fenced by this move, that route there).
    async fn keys(
        &self,
        kind: KeyKind,
        unit: Unit,
        from: &str,
        move_id: i64,
        routed: bool,
    ) -> Result<Vec<i64>, MoveError> {
        let slot = match unit {
            Unit::Key(k) => return Ok(vec![db_key(k)]),
            Unit::Slot(s) => s,
        };
        let from_idx = self.group_idx(from)?;
        let slots = self.router.kind(kind).slot_count();
        let all = self
            .on_group(from, async |c| candidates(kind, c, move_id).await)
            .await?;
        Ok(all
            .into_iter()
            .filter(|&k| {
                let k = k.unsigned_abs();
                slot_of(k, slots) == slot && (!routed || self.router.route(kind, k) == from_idx)
            })
            .collect())
    }

    /// No other open move of the key, its slot, the slot, or a key of the slot (`except`: the move
    /// a reverse closes).
    async fn check_no_open(
        &self,
        kind: KeyKind,
        unit: Unit,
        except: Option<u64>,
    ) -> Result<(), MoveError> {
        let slots = self.router.kind(kind).slot_count();
        self.on_config(async |c| open_clash(&***c, kind, unit, except, slots).await)
            .await?
            .map_or(Ok(()), |why| Err(MoveError::Conflict(why)))
    }

    /// The pre-checks of a move of `unit` to `to`, and what it would copy. Changes nothing.
    pub async fn plan(&self, kind: KeyKind, unit: Unit, to: &str) -> Result<Plan, MoveError> {
        self.plan_except(kind, unit, to, None).await
    }

    async fn plan_except(
        &self,
        kind: KeyKind,
        unit: Unit,
        to: &str,
        except: Option<u64>,
    ) -> Result<Plan, MoveError> {
        let to_idx = self.group_idx(to)?;
        self.refresh_routes().await?;
        let from_idx = self.home(kind, unit)?;
        let from = self.cluster.group(from_idx).name.clone();
        let what = unit.describe(kind);
        if from_idx == to_idx {
            return Err(MoveError::SameGroup { what, group: from });
        }
        let mut checks = Vec::new();
        self.check_no_open(kind, unit, except).await?;
        checks.push("no other open move of the key or its slot".to_string());
        for g in [from_idx, to_idx] {
            self.check_group(g)?;
        }
        checks.push("both groups writable, their shadows streaming".to_string());
        let versions = (
            crate::migrate::applied_version(self.cluster.group(from_idx)).await,
            crate::migrate::applied_version(self.cluster.group(to_idx)).await,
        );
        match versions {
            (Ok(a), Ok(b)) if a == b => checks.push(format!("same schema version ({a})")),
            (Ok(a), Ok(b)) => {
                return Err(MoveError::Precheck(format!(
                    "schema versions differ: {from} has {a}, {to} has {b}"
                )))
            }
            (Err(e), _) | (_, Err(e)) => {
                return Err(MoveError::Precheck(format!(
                    "cannot read the schema version: {e}"
                )))
            }
        }
        let keys = self.keys(kind, unit, &from, 0, true).await?;
        let source = self
            .on_group(&from, async |c| holdings(kind, c, &keys).await)
            .await?;
        let destination = self
            .on_group(to, async |c| holdings(kind, c, &keys).await)
            .await?;
        if destination.live > 0 {
            return Err(MoveError::HasData {
                what,
                group: to.to_string(),
            });
        }
        checks.push("nothing live for it on the destination".to_string());
        if kind == crate::router::KeyKind::Items {
            let pending = self
                .on_group(&from, async |c| draws_pending(c, &keys).await)
                .await?;
            if pending > 0 {
                return Err(MoveError::Precheck(format!(
                    "{pending} item row(s) of it belong to a fair start whose draw is not done; \
                     move it after the draw"
                )));
            }
            checks.push("no fair-start draw pending".to_string());
        }
        let (key, slot) = match unit {
            Unit::Key(k) => (Some(k), None),
            Unit::Slot(s) => (None, Some(s)),
        };
        Ok(Plan {
            kind: kind.as_str().to_string(),
            key,
            slot,
            from,
            to: to.to_string(),
            keys: keys.len(),
            rows_to_copy: source.rows,
            source,
            destination,
            checks,
        })
    }

    /// Writable, and every other member a healthy streaming shadow.
    fn check_group(&self, g: usize) -> Result<(), MoveError> {
        let group = self.cluster.group(g);
        let Some(writer) = group.writer_index() else {
            return Err(MoveError::Precheck(format!(
                "group {} has no writable master",
                group.name
            )));
        };
        for (i, s) in group.status().iter().enumerate() {
            if i != writer && !(s.healthy && s.role == Role::Shadow) {
                return Err(MoveError::Precheck(format!(
                    "group {}: member {} is not a healthy shadow ({:?})",
                    group.name, group.members[i].endpoint, s.role
                )));
            }
        }
        Ok(())
    }

    /// Check, record and start a move; it runs in the background ([`run`]).
    pub async fn start(
        self: &Arc<Self>,
        kind: KeyKind,
        unit: Unit,
        to: &str,
        complete: bool,
    ) -> Result<Move, MoveError> {
        let plan = self.plan(kind, unit, to).await?;
        let id = self.record(&plan, complete, None).await?;
        tracing::info!(move_id = id, unit = %unit.describe(kind), from = %plan.from,
            to = %plan.to, keys = plan.keys, rows = plan.rows_to_copy, "move started");
        self.spawn(id);
        self.get(id).await
    }

    /// Insert the move, claimed by this runner, if no other open move clashes with it (checked
    /// again under a lock). `reverses`: the switched or completed move it undoes (which is marked
    /// cancelled when this one switches).
    async fn record(
        &self,
        plan: &Plan,
        complete: bool,
        reverses: Option<i64>,
    ) -> Result<u64, MoveError> {
        let kind =
            KeyKind::parse(&plan.kind).ok_or_else(|| MoveError::Unsupported(plan.kind.clone()))?;
        let unit = match (plan.key, plan.slot) {
            (Some(k), _) => Unit::Key(k),
            (None, s) => Unit::Slot(s.unwrap_or_default()),
        };
        let slots = self.router.kind(kind).slot_count();
        let key = plan.key.map(db_key);
        let slot = plan.slot.map(|s| i32::try_from(s).unwrap_or(i32::MAX));
        let inserted = self
            .on_config(async |c| {
                let tx = c.transaction().await?;
                // One start at a time, so the open-move check below cannot race another start.
                tx.execute("SELECT pg_advisory_xact_lock($1)", &[&START_LOCK])
                    .await?;
                if let Some(why) =
                    open_clash(&*tx, kind, unit, reverses.map(|r| r.unsigned_abs()), slots).await?
                {
                    tx.rollback().await?;
                    return Ok(Err(why));
                }
                let id: i64 = tx
                    .query_one(
                        &format!(
                            "INSERT INTO moves (move_id, kind, key, slot, from_group, to_group,
                                 phase, complete_requested, reverse_of, owner, lease_until)
                             SELECT coalesce(max(move_id), 0) + 1, $1, $2, $3, $4, $5, 'copying',
                                    $6, $7, $8, now() + interval '{LEASE}'
                             FROM moves
                             RETURNING move_id"
                        ),
                        &[
                            &plan.kind,
                            &key,
                            &slot,
                            &plan.from,
                            &plan.to,
                            &complete,
                            &reverses,
                            &self.owner,
                        ],
                    )
                    .await?
                    .get(0);
                if let Some(old) = reverses {
                    tx.execute(
                        "UPDATE moves SET reversed_by = $2 WHERE move_id = $1",
                        &[&old, &id],
                    )
                    .await?;
                }
                tx.commit().await?;
                Ok(Ok(id))
            })
            .await;
        match inserted {
            Ok(Ok(id)) => Ok(id.unsigned_abs()),
            Ok(Err(why)) => Err(MoveError::Conflict(why)),
            // The unique index on open moves (or a concurrent id): another move won the race.
            Err(MoveError::Group(GroupError::Db(DbError::Rejected { code, .. })))
                if code == "23505" =>
            {
                Err(MoveError::Conflict(
                    "another move of the same key or slot started meanwhile".to_string(),
                ))
            }
            Err(e) => Err(e),
        }
    }

    /// Ask a move that has not switched yet to roll back.
    pub async fn cancel(self: &Arc<Self>, id: u64) -> Result<Move, MoveError> {
        let m = self.get(id).await?;
        if !m.phase.before_switch() {
            return Err(MoveError::Conflict(format!(
                "move {id} is {}: only a move that has not switched can be cancelled{}",
                m.phase.as_str(),
                if m.phase == Phase::Switched {
                    " (reverse it instead)"
                } else {
                    ""
                }
            )));
        }
        self.request(id, "cancel_requested").await?;
        self.kick(id).await?;
        self.get(id).await
    }

    /// Ask a move to drop the source's copy once it has switched.
    pub async fn complete(self: &Arc<Self>, id: u64) -> Result<Move, MoveError> {
        let m = self.get(id).await?;
        if let Some(by) = m.reversed_by {
            return Err(MoveError::Conflict(format!(
                "move {id} was reversed by move {by}: its source copy is the live one again"
            )));
        }
        match m.phase {
            Phase::Completed => return Ok(m),
            Phase::Switched | Phase::Copying | Phase::CatchingUp | Phase::Fenced => {}
            _ => {
                return Err(MoveError::Conflict(format!(
                    "move {id} is {}: nothing to complete",
                    m.phase.as_str()
                )))
            }
        }
        self.request(id, "complete_requested").await?;
        self.kick(id).await?;
        self.get(id).await
    }

    /// Move the unit of a switched (or completed) move back where it came from: a new move,
    /// which overwrites the inactive copy left there.
    pub async fn reverse(self: &Arc<Self>, id: u64, complete: bool) -> Result<Move, MoveError> {
        let m = self.get(id).await?;
        if !matches!(m.phase, Phase::Switched | Phase::Completed) || m.reversed_by.is_some() {
            return Err(MoveError::Conflict(format!(
                "move {id} is {}{}: only a switched or completed move can be reversed",
                m.phase.as_str(),
                m.reversed_by
                    .map(|r| format!(" (reversed by move {r})"))
                    .unwrap_or_default()
            )));
        }
        if m.phase == Phase::Switched && (!m.dest_live || m.complete_requested) {
            return Err(MoveError::Conflict(format!(
                "move {id} is still switching or completing; retry in a moment"
            )));
        }
        let plan = self
            .plan_except(m.key_kind()?, m.unit(), &m.from, Some(id))
            .await?;
        let new = self.record(&plan, complete, Some(db_key(id))).await?;
        tracing::info!(move_id = new, reverses = id, "move reversed");
        self.spawn(new);
        self.get(new).await
    }

    async fn request(&self, id: u64, flag: &'static str) -> Result<(), MoveError> {
        let db_id = db_key(id);
        self.on_config(async |c| {
            c.execute(
                &format!("UPDATE moves SET {flag} = true, updated_at = now() WHERE move_id = $1"),
                &[&db_id],
            )
            .await?;
            Ok(())
        })
        .await
    }

    /// The slot moves that even out how many hash slots of `kind` each group holds (to within
    /// one), taking slots from the fullest groups for the emptiest: `(slot, from, to)`, in the
    /// order to run them. A group just added with no slots gets its share.
    pub async fn rebalance_plan(
        &self,
        kind: KeyKind,
    ) -> Result<Vec<(u32, String, String)>, MoveError> {
        let rules = self.router.kind(kind);
        if rules.strategy() == crate::config::Strategy::Range {
            return Err(MoveError::Unsupported(format!(
                "slots of {}: they are routed by ranges",
                kind.as_str()
            )));
        }
        self.refresh_routes().await?;
        let groups = self.cluster.groups.len();
        let mut owned: Vec<Vec<u32>> = vec![Vec::new(); groups];
        for s in 0..rules.slot_count() {
            owned[self.home(kind, Unit::Slot(s))?].push(s);
        }
        let mut plan = Vec::new();
        loop {
            let (full, _) = owned
                .iter()
                .enumerate()
                .max_by_key(|(g, o)| (o.len(), std::cmp::Reverse(*g)))
                .map(|(g, o)| (g, o.len()))
                .unwrap_or_default();
            let (empty, _) = owned
                .iter()
                .enumerate()
                .min_by_key(|(g, o)| (o.len(), *g))
                .map(|(g, o)| (g, o.len()))
                .unwrap_or_default();
            if owned[full].len() <= owned[empty].len() + 1 {
                return Ok(plan);
            }
            let Some(slot) = owned[full].pop() else {
                return Ok(plan);
            };
            owned[empty].push(slot);
            plan.push((
                slot,
                self.cluster.group(full).name.clone(),
                self.cluster.group(empty).name.clone(),
            ));
        }
    }

    /// Resume every move whose runner died (its lease ran out) and that has work left.
    pub async fn resume_pending(self: &Arc<Self>) {
        let pending = self
            .on_config(async |c| {
                Ok(c.query(
                    "SELECT move_id FROM moves
                     WHERE (phase IN ('copying', 'catching_up', 'fenced') OR cleanup_pending
                            OR (phase = 'switched' AND (NOT dest_live OR complete_requested)))
                       AND (owner IS NULL OR lease_until < now())",
                    &[],
                )
                .await?
                .iter()
                .map(|r| r.get::<_, i64>(0).unsigned_abs())
                .collect::<Vec<u64>>())
            })
            .await;
        let pending = match pending {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(error = %e, "moves not read");
                return;
            }
        };
        for id in pending {
            match self.claim(id).await {
                Ok(true) => {
                    tracing::info!(move_id = id, "resuming a move whose runner stopped");
                    self.spawn(id);
                }
                Ok(false) => {}
                Err(e) => tracing::debug!(move_id = id, error = %e, "move not claimed"),
            }
        }
    }
}

/// Item rows among `keys` whose fair-start draw is not done ([`crate::fair`]): their entries and
/// claim live with the row, so they stay put until the draw is over.
async fn draws_pending(
    c: &deadpool_postgres::Object,
    keys: &[i64],
) -> Result<i64, crate::db::DbError> {
    Ok(c.query_one(
        "SELECT count(*) FROM sale_items
         WHERE item_id = ANY($1) AND fair_window_ms > 0 AND drawn_at IS NULL",
        &[&keys],
    )
    .await?
    .get(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_move_shows_switched_only_once_writes_flow_again() {
        let now = Utc::now();
        let routed = Move {
            move_id: 1,
            kind: "items".into(),
            key: Some(7),
            slot: None,
            from: "g0".into(),
            to: "g1".into(),
            phase: Phase::Switched,
            rows_copied: 3,
            write_pause_ms: None,
            error: None,
            cancel_requested: false,
            complete_requested: false,
            dest_live: false,
            cleanup_pending: false,
            reverse_of: None,
            reversed_by: None,
            created_at: now,
            updated_at: now,
            fenced_at: Some(now),
            switched_at: Some(now),
            finished_at: None,
        };
        assert_eq!(routed.clone().shown().phase, Phase::Switching);
        let live = Move {
            dest_live: true,
            write_pause_ms: Some(12),
            ..routed
        };
        assert_eq!(live.shown().phase, Phase::Switched);
    }
}
