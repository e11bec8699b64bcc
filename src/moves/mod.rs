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
mod kinds;
mod ledger;
mod model;
mod rules;
mod run;
pub mod users;

pub use kinds::end_on_source;
pub(crate) use ledger::open_moves;

use kinds::{candidates, column, db_key, guard, holdings, wait_out_older, CHUNK};
use ledger::open_clash;
pub(crate) use model::{Holdings, MoveError};
pub use model::{Move, Phase, Plan, Unit};

use crate::config::Config;
use crate::db::DbError;
use crate::router::{slot_of, KeyKind, Router};
use crate::shard::{Cluster, GroupError, Role, Work};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::task::TaskTracker;

/// How long a claim on a move holds without being renewed.
const LEASE: &str = "10 seconds";
/// Budget of one step against one group (a copy of a big unit takes a while).
const STEP_BUDGET: Duration = Duration::from_secs(120);

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
        self.on_config(async |c| ledger::get(c, id).await)
            .await?
            .ok_or(MoveError::NotFound(id))
    }

    /// Every move, newest first (at most `limit`).
    pub async fn list(&self, limit: i64) -> Result<Vec<Move>, MoveError> {
        self.on_config(async |c| ledger::list(c, limit).await).await
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
        checks.push(self.check_same_schema(from_idx, to_idx).await?);
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

    /// Both groups at the same schema version (the copy writes the same columns on both).
    async fn check_same_schema(&self, from: usize, to: usize) -> Result<String, MoveError> {
        let (a, b) = (self.cluster.group(from), self.cluster.group(to));
        let versions = (
            crate::migrate::applied_version(a).await,
            crate::migrate::applied_version(b).await,
        );
        match versions {
            (Ok(x), Ok(y)) if x == y => Ok(format!("same schema version ({x})")),
            (Ok(x), Ok(y)) => Err(MoveError::Precheck(format!(
                "schema versions differ: {} has {x}, {} has {y}",
                a.name, b.name
            ))),
            (Err(e), _) | (_, Err(e)) => Err(MoveError::Precheck(format!(
                "cannot read the schema version: {e}"
            ))),
        }
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
        let slots = self.router.kind(kind).slot_count();
        let inserted = self
            .on_config(async |c| {
                ledger::insert(c, kind, plan, slots, complete, reverses, &self.owner).await
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
        self.on_config(async |c| ledger::request(c, id, flag).await)
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
        Ok(rules::even_out(owned)
            .into_iter()
            .map(|(slot, from, to)| {
                let name = |g: usize| self.cluster.group(g).name.clone();
                (slot, name(from), name(to))
            })
            .collect())
    }

    /// Resume every move whose runner died (its lease ran out) and that has work left.
    pub(crate) async fn resume_pending(self: &Arc<Self>) {
        let pending = self.on_config(async |c| ledger::resumable(c).await).await;
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
