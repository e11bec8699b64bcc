//! Live moves of an item key from its shard group to another, while it sells (README "Moving
//! keys").
//!
//! A move is a persisted state machine in the `moves` table on the config group:
//!
//! 1. **copying**: the key's rows (its `sale_items` rows, their reservations, the sale whose id is
//!    the key) are copied to the destination, where they stay *fenced* (inactive);
//! 2. **catching_up**: the rows changed since the last pass are copied again, until a pass finds
//!    few (writers stamp reservations with `clock_timestamp()` under the item's row lock, and each
//!    pass reads its watermark under that lock, so "changed since" is exact);
//! 3. **fenced**: the source's `sale_items` rows are fenced (`fenced_by` = the move). Every writer
//!    of an item's stock locks those rows first (transaction 1, releases), so from the fence's
//!    commit nothing changes there: the last changes are copied, then one transaction on the config
//!    group writes the key's route and marks the move switched — the commit point;
//! 4. **switched**: the destination's copy is unfenced. Buyers that met the fence re-read the route
//!    and go on there (they wait up to 2 s, then get 503 with Retry-After). The source keeps its
//!    fenced copy: `reverse` moves the key back from here, `complete` drops it;
//! 5. **completed** (the source's reservations and sale row dropped; its fenced `sale_items` rows
//!    stay as tombstones that turn away a node still routing there), or **failed** / **cancelled**
//!    (before the switch: the source unfenced, the destination's copy dropped).
//!
//! Whoever runs a move (the engine node that accepted it, or the CLI) holds a lease on it and
//! renews it at every step; every engine node looks for moves whose lease ran out and resumes them
//! from their phase (each phase is idempotent). Before the switch a move can always be rolled back;
//! after it, only reversed: a move never stays half-switched.
//!
//! Pre-checks before any copy: both groups writable with their shadows streaming, the same schema
//! version, nothing live for the key on the destination, no other open move of the key.
//!
//! Not covered: a sale created for the item while it moves (between the fence and the switch) —
//! create sales before moving their items. Users' keys are not movable yet (their orders and
//! payments would move the same way, fenced by the order rows).

pub mod copy;

use crate::config::Config;
use crate::db::DbError;
use crate::order::OrderError;
use crate::router::{KeyKind, Router};
use crate::shard::{Cluster, Role, Work};
use chrono::{DateTime, Utc};
use copy::Holdings;
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::Client;
use tokio_util::task::TaskTracker;

/// How long a claim on a move holds without being renewed.
const LEASE: &str = "10 seconds";
/// Budget of one step against one group (a copy of a big item takes a while).
const STEP_BUDGET: Duration = Duration::from_secs(120);
/// Fence once a catch-up pass copies fewer rows than this, or after [`CATCH_UP_PASSES`] passes.
const CATCH_UP_ROWS: u64 = 500;
const CATCH_UP_PASSES: u32 = 5;
/// Failed attempts at a step before the move is rolled back (and marked failed).
const STEP_ATTEMPTS: u32 = 3;

/// Where a move is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Copying,
    CatchingUp,
    Fenced,
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
    pub key: u64,
    #[schema(example = "g0")]
    pub from: String,
    #[schema(example = "g1")]
    pub to: String,
    pub phase: Phase,
    /// Rows written to the destination so far (re-copies of changed rows included).
    pub rows_copied: i64,
    /// How long the item's writes were fenced (from the source's fence to the destination's copy
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
    watermark";

impl Move {
    fn from_row(r: &tokio_postgres::Row) -> Self {
        let id = |v: i64| v.unsigned_abs();
        Move {
            move_id: id(r.get(0)),
            kind: r.get(1),
            key: id(r.get(2)),
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
    pub key: u64,
    pub from: String,
    pub to: String,
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
    #[error("{kind} {key} already lives on group {group}")]
    SameGroup {
        kind: &'static str,
        key: u64,
        group: String,
    },
    #[error("moving {0} keys is not supported yet (only items)")]
    Unsupported(&'static str),
    #[error("move {0} not found")]
    NotFound(u64),
    /// Another open move of the key, or an action the move's phase does not allow.
    #[error("{0}")]
    Conflict(String),
    /// A pre-check failed: nothing was copied.
    #[error("pre-check failed: {0}")]
    Precheck(String),
    #[error("{kind} {key} has live rows on the destination group {group}")]
    HasData {
        kind: &'static str,
        key: u64,
        group: String,
    },
    #[error(transparent)]
    Order(#[from] OrderError),
}

impl From<DbError> for MoveError {
    fn from(e: DbError) -> Self {
        MoveError::Order(e.into())
    }
}

impl From<crate::shard::ShardError> for MoveError {
    fn from(e: crate::shard::ShardError) -> Self {
        MoveError::Order(e.into())
    }
}

/// Runs moves: starts them, drives them through their phases, resumes the ones whose runner died.
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
        let g = self.group_idx(self.config.config_group())?;
        Ok(self
            .cluster
            .group(g)
            .run::<_, OrderError>(Work::Settle, self.budget(), work)
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
            .run::<_, OrderError>(Work::Settle, STEP_BUDGET, work)
            .await?)
    }

    /// Re-read the router-config table now.
    async fn refresh_routes(&self) -> Result<(), MoveError> {
        let table = self.router.table().clone();
        self.on_config(async |c| Ok(table.refresh(c).await?))
            .await
            .map(|_| ())
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

    /// The pre-checks of a move of `key` to `to`, and what it would copy. Changes nothing.
    pub async fn plan(&self, kind: KeyKind, key: u64, to: &str) -> Result<Plan, MoveError> {
        if kind != KeyKind::Items {
            return Err(MoveError::Unsupported(kind.as_str()));
        }
        let to_idx = self.group_idx(to)?;
        self.refresh_routes().await?;
        let from_idx = self.router.route(kind, key);
        let from = self.cluster.group(from_idx).name.clone();
        if from_idx == to_idx {
            return Err(MoveError::SameGroup {
                kind: kind.as_str(),
                key,
                group: from,
            });
        }
        let mut checks = Vec::new();
        let db = db_key(key);
        let open = self
            .on_config(async |c| {
                Ok(c.query_opt(
                    "SELECT move_id, phase FROM moves WHERE kind = $1 AND key = $2
                       AND (phase IN ('copying', 'catching_up', 'fenced', 'switched')
                            OR cleanup_pending)",
                    &[&kind.as_str(), &db],
                )
                .await?
                .map(|r| (r.get::<_, i64>(0), r.get::<_, String>(1))))
            })
            .await?;
        if let Some((id, phase)) = open {
            return Err(MoveError::Conflict(format!(
                "move {id} of {} {key} is {phase}: complete, reverse or cancel it first",
                kind.as_str()
            )));
        }
        checks.push("no other open move of the key".to_string());
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
        let source = self
            .on_group(&from, async |c| copy::holdings(c, db).await)
            .await?;
        let destination = self
            .on_group(to, async |c| copy::holdings(c, db).await)
            .await?;
        if !destination.nothing_live() {
            return Err(MoveError::HasData {
                kind: kind.as_str(),
                key,
                group: to.to_string(),
            });
        }
        checks.push("nothing live for the key on the destination".to_string());
        Ok(Plan {
            kind: kind.as_str().to_string(),
            key,
            from,
            to: to.to_string(),
            rows_to_copy: source.rows(),
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

    /// Check, record and start a move; it runs in the background ([`Self::run`]).
    pub async fn start(
        self: &Arc<Self>,
        kind: KeyKind,
        key: u64,
        to: &str,
        complete: bool,
    ) -> Result<Move, MoveError> {
        let plan = self.plan(kind, key, to).await?;
        let id = self.record(&plan, complete, None).await?;
        tracing::info!(move_id = id, kind = %plan.kind, key, from = %plan.from, to = %plan.to,
            rows = plan.rows_to_copy, "move started");
        self.spawn(id);
        self.get(id).await
    }

    /// Insert the move, claimed by this runner. `reverses`: the switched or completed move it
    /// undoes, whose phase becomes `cancelled` (when switched) in the same transaction.
    async fn record(
        &self,
        plan: &Plan,
        complete: bool,
        reverses: Option<i64>,
    ) -> Result<u64, MoveError> {
        let key = db_key(plan.key);
        let inserted = self
            .on_config(async |c| {
                let tx = c.transaction().await?;
                if let Some(old) = reverses {
                    tx.execute(
                        "UPDATE moves SET phase = CASE WHEN phase = 'switched' THEN 'cancelled'
                                                       ELSE phase END,
                             finished_at = coalesce(finished_at, now()), updated_at = now()
                         WHERE move_id = $1",
                        &[&old],
                    )
                    .await?;
                }
                let id: i64 = tx
                    .query_one(
                        &format!(
                            "INSERT INTO moves (move_id, kind, key, from_group, to_group,
                                     phase, complete_requested, reverse_of, owner, lease_until)
                         SELECT coalesce(max(move_id), 0) + 1, $1, $2, $3, $4, 'copying', $5, $6,
                                $7, now() + interval '{LEASE}'
                         FROM moves
                         RETURNING move_id"
                        ),
                        &[
                            &plan.kind,
                            &key,
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
                Ok(id)
            })
            .await;
        match inserted {
            Ok(id) => Ok(id.unsigned_abs()),
            // The unique index on open moves (or a concurrent id): another move won the race.
            Err(MoveError::Order(OrderError::Db(DbError::Rejected { code, .. })))
                if code == "23505" =>
            {
                Err(MoveError::Conflict(format!(
                    "another move of {} {} started meanwhile",
                    plan.kind, plan.key
                )))
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

    /// Ask a switched move to drop the source's copy.
    pub async fn complete(self: &Arc<Self>, id: u64) -> Result<Move, MoveError> {
        let m = self.get(id).await?;
        match m.phase {
            Phase::Completed => return Ok(m),
            Phase::Switched => {}
            Phase::Copying | Phase::CatchingUp | Phase::Fenced => {}
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

    /// Move the key of a switched (or completed) move back where it came from: a new move, which
    /// overwrites the inactive copy left there.
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
        let kind = KeyKind::parse(&m.kind).ok_or(MoveError::Unsupported("unknown"))?;
        if m.phase == Phase::Switched && !m.dest_live {
            return Err(MoveError::Conflict(format!(
                "move {id} is still switching; retry in a moment"
            )));
        }
        // The open switched move is closed by `record`, so the pre-check's "other open move"
        // must not count it.
        let plan = match self.plan(kind, m.key, &m.from).await {
            Err(MoveError::Conflict(_)) if m.phase == Phase::Switched => {
                self.plan_ignoring_open(kind, m.key, &m.from).await?
            }
            other => other?,
        };
        let new = self.record(&plan, complete, Some(db_key(id))).await?;
        tracing::info!(move_id = new, reverses = id, "move reversed");
        self.spawn(new);
        self.get(new).await
    }

    /// [`Self::plan`] for a reverse of a switched move: the same checks but the open-move one
    /// (the move being reversed is that open move).
    async fn plan_ignoring_open(
        &self,
        kind: KeyKind,
        key: u64,
        to: &str,
    ) -> Result<Plan, MoveError> {
        let to_idx = self.group_idx(to)?;
        let from_idx = self.router.route(kind, key);
        let from = self.cluster.group(from_idx).name.clone();
        for g in [from_idx, to_idx] {
            self.check_group(g)?;
        }
        let db = db_key(key);
        let source = self
            .on_group(&from, async |c| copy::holdings(c, db).await)
            .await?;
        let destination = self
            .on_group(to, async |c| copy::holdings(c, db).await)
            .await?;
        if !destination.nothing_live() {
            return Err(MoveError::HasData {
                kind: kind.as_str(),
                key,
                group: to.to_string(),
            });
        }
        Ok(Plan {
            kind: kind.as_str().to_string(),
            key,
            from,
            to: to.to_string(),
            rows_to_copy: source.rows(),
            source,
            destination,
            checks: vec!["both groups writable, their shadows streaming".to_string()],
        })
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

    /// Run the move here if nobody holds it.
    async fn kick(self: &Arc<Self>, id: u64) -> Result<(), MoveError> {
        if self.claim(id).await? {
            self.spawn(id);
        }
        Ok(())
    }

    /// Take the move if its lease ran out (or it has none, or it is already ours).
    async fn claim(&self, id: u64) -> Result<bool, MoveError> {
        let db_id = db_key(id);
        let owner = self.owner.clone();
        self.on_config(async |c| {
            Ok(c.execute(
                &format!(
                    "UPDATE moves SET owner = $2, lease_until = now() + interval '{LEASE}'
                     WHERE move_id = $1
                       AND (owner IS NULL OR owner = $2 OR lease_until < now())"
                ),
                &[&db_id, &owner],
            )
            .await?
                == 1)
        })
        .await
    }

    /// Keep the claim; false when another runner took the move over.
    async fn renew(&self, id: u64) -> Result<bool, MoveError> {
        let db_id = db_key(id);
        let owner = self.owner.clone();
        self.on_config(async |c| {
            Ok(c.execute(
                &format!(
                    "UPDATE moves SET lease_until = now() + interval '{LEASE}'
                     WHERE move_id = $1 AND owner = $2"
                ),
                &[&db_id, &owner],
            )
            .await?
                == 1)
        })
        .await
    }

    async fn let_go(&self, id: u64) {
        let db_id = db_key(id);
        let owner = self.owner.clone();
        let done = self
            .on_config(async |c| {
                c.execute(
                    "UPDATE moves SET owner = NULL, lease_until = NULL
                     WHERE move_id = $1 AND owner = $2",
                    &[&db_id, &owner],
                )
                .await?;
                Ok(())
            })
            .await;
        if let Err(e) = done {
            tracing::debug!(move_id = id, error = %e, "lease not released; it runs out");
        }
    }

    fn spawn(self: &Arc<Self>, id: u64) {
        let this = self.clone();
        self.tasks.spawn(async move {
            if let Err(e) = this.run(id).await {
                tracing::warn!(move_id = id, error = %e, "move paused; it resumes when its lease runs out");
            }
        });
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

    /// Drive a claimed move until it rests (switched and live, or finished), then let it go.
    pub async fn run(&self, id: u64) -> Result<Move, MoveError> {
        let mut passes = 0;
        let mut failures = 0;
        loop {
            let m = self.get(id).await?;
            if m.at_rest() {
                self.let_go(id).await;
                return Ok(m);
            }
            if !self.renew(id).await? {
                return Ok(m);
            }
            match self.step(&m, &mut passes).await {
                Ok(()) => failures = 0,
                Err(e) => {
                    failures += 1;
                    tracing::warn!(move_id = id, phase = m.phase.as_str(), failures, error = %e,
                        "move step failed");
                    self.note_error(id, &e.to_string()).await;
                    if failures >= STEP_ATTEMPTS && m.phase.before_switch() && !m.cleanup_pending {
                        self.abandon(&m, Phase::Failed, &e.to_string()).await?;
                        failures = 0;
                    } else if failures >= STEP_ATTEMPTS * 3 {
                        // Leave it to a later resume (the lease runs out).
                        return Err(e);
                    }
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(failures))).await;
                }
            }
        }
    }

    /// One step of the state machine ([module docs](self)).
    async fn step(&self, m: &Move, passes: &mut u32) -> Result<(), MoveError> {
        let key = db_key(m.key);
        let id = db_key(m.move_id);
        if m.cleanup_pending {
            return self.clean_up(m).await;
        }
        if m.cancel_requested && m.phase.before_switch() {
            return self.abandon(m, Phase::Cancelled, "cancelled").await;
        }
        match m.phase {
            Phase::Copying => {
                let (at, n) = self.pass(m, None).await?;
                self.advance(id, Phase::CatchingUp, Some(at), n).await
            }
            Phase::CatchingUp => {
                let (at, n) = self.pass(m, self.watermark(id).await?).await?;
                *passes += 1;
                let next = if n < CATCH_UP_ROWS || *passes >= CATCH_UP_PASSES {
                    Phase::Fenced
                } else {
                    Phase::CatchingUp
                };
                self.advance(id, next, Some(at), n).await
            }
            Phase::Fenced => {
                self.on_group(&m.from, async |c| copy::fence(c, id, key).await)
                    .await?;
                self.on_config(async |c| {
                    c.execute(
                        "UPDATE moves SET fenced_at = coalesce(fenced_at, clock_timestamp())
                         WHERE move_id = $1",
                        &[&id],
                    )
                    .await?;
                    Ok(())
                })
                .await?;
                let n = self.copy_since(m, self.watermark(id).await?).await?;
                self.switch(m, n).await
            }
            Phase::Switched if !m.dest_live => {
                self.on_group(&m.to, async |c| copy::unfence(c, id, key).await)
                    .await?;
                self.on_config(async |c| {
                    c.execute(
                        "UPDATE moves SET dest_live = true, updated_at = now(),
                             write_pause_ms = (extract(epoch FROM clock_timestamp() - fenced_at)
                                               * 1000)::bigint
                         WHERE move_id = $1",
                        &[&id],
                    )
                    .await?;
                    Ok(())
                })
                .await?;
                let m = self.get(m.move_id).await?;
                tracing::info!(
                    move_id = m.move_id,
                    write_pause_ms = m.write_pause_ms,
                    rows = m.rows_copied,
                    "move switched"
                );
                Ok(())
            }
            Phase::Switched if m.complete_requested => {
                self.on_group(&m.from, async |c| copy::drop_copy(c, id, key, true).await)
                    .await?;
                self.on_config(async |c| {
                    c.execute(
                        "UPDATE moves SET phase = 'completed', finished_at = now(),
                             updated_at = now()
                         WHERE move_id = $1 AND phase = 'switched'",
                        &[&id],
                    )
                    .await?;
                    Ok(())
                })
                .await?;
                tracing::info!(move_id = m.move_id, "move completed");
                Ok(())
            }
            _ => Ok(()),
        }
    }

    async fn watermark(&self, id: i64) -> Result<Option<DateTime<Utc>>, MoveError> {
        self.on_config(async |c| {
            Ok(
                c.query_one("SELECT watermark FROM moves WHERE move_id = $1", &[&id])
                    .await?
                    .get(0),
            )
        })
        .await
    }

    /// One copy pass (all rows when `since` is None); returns its watermark and the rows written.
    async fn pass(
        &self,
        m: &Move,
        since: Option<DateTime<Utc>>,
    ) -> Result<(DateTime<Utc>, u64), MoveError> {
        let key = db_key(m.key);
        let at = self
            .on_group(&m.from, async |c| copy::watermark(c, key).await)
            .await?;
        let n = self.copy_since(m, since).await?;
        Ok((at, n))
    }

    /// Copy what changed since `since` (everything when None) from the source to the
    /// destination; returns the rows written.
    async fn copy_since(&self, m: &Move, since: Option<DateTime<Utc>>) -> Result<u64, MoveError> {
        let (key, id) = (db_key(m.key), db_key(m.move_id));
        let src = self.cluster.group(self.group_idx(&m.from)?);
        let dst = self.cluster.group(self.group_idx(&m.to)?);
        Ok(src
            .run::<_, OrderError>(Work::Settle, STEP_BUDGET, async |s| {
                dst.run::<_, OrderError>(Work::Settle, STEP_BUDGET, async |d| {
                    copy::copy(s, d, id, key, since).await
                })
                .await
                // Copying is idempotent: whatever went wrong, the step runs again.
                .map_err(|e| DbError::Lost(e.to_string()))
            })
            .await?)
    }

    async fn advance(
        &self,
        id: i64,
        next: Phase,
        watermark: Option<DateTime<Utc>>,
        copied: u64,
    ) -> Result<(), MoveError> {
        let copied = i64::try_from(copied).unwrap_or(i64::MAX);
        self.on_config(async |c| {
            c.execute(
                "UPDATE moves SET phase = $2, watermark = coalesce($3, watermark),
                     rows_copied = rows_copied + $4, updated_at = now(), error = NULL
                 WHERE move_id = $1 AND phase IN ('copying', 'catching_up', 'fenced')",
                &[&id, &next.as_str(), &watermark, &copied],
            )
            .await?;
            Ok(())
        })
        .await
    }

    /// The commit point: the key's route and the move's phase, in one transaction on the config
    /// group (only while this runner holds the move and nobody asked to cancel it).
    async fn switch(&self, m: &Move, copied: u64) -> Result<(), MoveError> {
        let (key, id) = (db_key(m.key), db_key(m.move_id));
        let kind = KeyKind::parse(&m.kind).ok_or(MoveError::Unsupported("unknown"))?;
        let to = self.group_idx(&m.to)?;
        // Back to the group its rule names: no entry needed.
        let by_rule = self.router.kind(kind).by_rule(m.key) == to;
        let copied = i64::try_from(copied).unwrap_or(i64::MAX);
        let owner = self.owner.clone();
        self.on_config(async |c| {
            let tx = c.transaction().await?;
            let switched = tx
                .execute(
                    "UPDATE moves SET phase = 'switched', switched_at = now(), updated_at = now(),
                         rows_copied = rows_copied + $3, error = NULL
                     WHERE move_id = $1 AND phase = 'fenced' AND owner = $2
                       AND NOT cancel_requested",
                    &[&id, &owner, &copied],
                )
                .await?;
            if switched == 0 {
                tx.rollback().await?;
                return Ok(());
            }
            if by_rule {
                tx.execute(
                    "DELETE FROM shard_map WHERE kind = $1 AND key = $2",
                    &[&m.kind, &key],
                )
                .await?;
            } else {
                tx.execute(
                    "INSERT INTO shard_map (kind, key, group_name) VALUES ($1, $2, $3)
                     ON CONFLICT (kind, key) DO UPDATE
                        SET group_name = EXCLUDED.group_name, updated_at = now()",
                    &[&m.kind, &key, &m.to],
                )
                .await?;
            }
            tx.commit().await?;
            Ok(())
        })
        .await?;
        self.refresh_routes().await
    }

    /// Give up a move that has not switched: mark it `to` (failed or cancelled) with clean-up
    /// pending, then clean up. Only this runner, and only before the switch.
    async fn abandon(&self, m: &Move, to: Phase, why: &str) -> Result<(), MoveError> {
        let id = db_key(m.move_id);
        let owner = self.owner.clone();
        let marked = self
            .on_config(async |c| {
                Ok(c.execute(
                    "UPDATE moves SET phase = $3, error = $4, cleanup_pending = true,
                         finished_at = now(), updated_at = now()
                     WHERE move_id = $1 AND owner = $2
                       AND phase IN ('copying', 'catching_up', 'fenced')",
                    &[&id, &owner, &to.as_str(), &why],
                )
                .await?)
            })
            .await?;
        if marked == 0 {
            return Ok(());
        }
        tracing::warn!(
            move_id = m.move_id,
            phase = to.as_str(),
            reason = why,
            "move rolled back"
        );
        self.clean_up(m).await
    }

    /// Undo a move that did not switch: unfence the source, drop the destination's copy.
    async fn clean_up(&self, m: &Move) -> Result<(), MoveError> {
        let (key, id) = (db_key(m.key), db_key(m.move_id));
        self.on_group(&m.from, async |c| copy::unfence(c, id, key).await)
            .await?;
        self.on_group(&m.to, async |c| copy::drop_copy(c, id, key, false).await)
            .await?;
        self.on_config(async |c| {
            c.execute(
                "UPDATE moves SET cleanup_pending = false, updated_at = now() WHERE move_id = $1",
                &[&id],
            )
            .await?;
            Ok(())
        })
        .await
    }

    async fn note_error(&self, id: u64, error: &str) {
        let db_id = db_key(id);
        let _ = self
            .on_config(async |c| {
                c.execute(
                    "UPDATE moves SET error = $2, updated_at = now() WHERE move_id = $1",
                    &[&db_id, &error],
                )
                .await?;
                Ok(())
            })
            .await;
    }
}

fn db_key(key: u64) -> i64 {
    i64::try_from(key).unwrap_or(i64::MAX)
}
