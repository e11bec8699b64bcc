//! Driving one move through its phases ([module docs](super)): the lease, the steps, the switch,
//! the roll-back.

use super::kinds::{
    clear_slot_tombstone, copy, drop_copy, end_on_source, expire_slot_fence, fence, fence_slot,
    unfence, wait_out_older, watermark,
};
use super::{ledger, Move, MoveError, Mover, Phase, Unit, STEP_BUDGET};
use crate::db::DbError;
use crate::router::{slot_of, KeyKind};
use crate::shard::Work;
use chrono::{DateTime, Utc};
use std::sync::Arc;
use std::time::Duration;

/// Fence once a catch-up pass copies fewer rows than this, or after [`CATCH_UP_PASSES`] passes.
const CATCH_UP_ROWS: u64 = 500;
const CATCH_UP_PASSES: u32 = 5;
/// Failed attempts at a step before the move is rolled back (and marked failed).
const STEP_ATTEMPTS: u32 = 3;
/// How often a runner renews its claim while a step runs (well inside [`LEASE`]).
const HEARTBEAT: Duration = Duration::from_secs(3);
/// A runner that could not renew its claim for this long stops (another may have taken it over).
const CLAIM_TRUST: Duration = Duration::from_secs(7);

impl Mover {
    /// Run the move here if nobody holds it.
    pub(super) async fn kick(self: &Arc<Self>, id: u64) -> Result<(), MoveError> {
        if self.claim(id).await? {
            self.spawn(id);
        }
        Ok(())
    }

    /// Take the move if its lease ran out (or it has none, or it is already ours).
    pub(super) async fn claim(&self, id: u64) -> Result<bool, MoveError> {
        self.on_config(async |c| ledger::claim(c, id, &self.owner).await)
            .await
    }

    /// Keep the claim; false when another runner took the move over.
    async fn renew(&self, id: u64) -> Result<bool, MoveError> {
        self.on_config(async |c| ledger::renew(c, id, &self.owner).await)
            .await
    }

    async fn let_go(&self, id: u64) {
        let done = self
            .on_config(async |c| ledger::let_go(c, id, &self.owner).await)
            .await;
        if let Err(e) = done {
            tracing::debug!(move_id = id, error = %e, "lease not released; it runs out");
        }
    }

    pub(super) fn spawn(self: &Arc<Self>, id: u64) {
        let this = self.clone();
        self.tasks.spawn(async move {
            if let Err(e) = this.run(id).await {
                tracing::warn!(move_id = id, error = %e, "move paused; it resumes when its lease runs out");
            }
        });
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
            // The claim is renewed while the step runs (a copy can outlast the lease); a runner
            // that loses it stops at once, mid-step (every step can run again).
            let step = self.step(&m, &mut passes);
            tokio::pin!(step);
            let mut heartbeat = tokio::time::interval(HEARTBEAT);
            heartbeat.tick().await;
            let mut renewed = std::time::Instant::now();
            let outcome = loop {
                tokio::select! {
                    // The claim first: a runner waking from a stall checks it before writing more.
                    biased;
                    _ = heartbeat.tick() => match self.renew(id).await {
                        Ok(true) => renewed = std::time::Instant::now(),
                        Ok(false) => {
                            tracing::warn!(move_id = id, "another runner took the move over; stopping");
                            return Ok(m.clone());
                        }
                        Err(e) if renewed.elapsed() > CLAIM_TRUST => {
                            tracing::warn!(move_id = id, error = %e, "claim not renewed for too long; stopping");
                            return Ok(m.clone());
                        }
                        Err(e) => tracing::debug!(move_id = id, error = %e, "claim not renewed; retrying"),
                    },
                    done = &mut step => break done,
                }
            };
            match outcome {
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

    /// The keys the move carries now (after the switch: the slot's keys left on the source).
    async fn move_keys(&self, m: &Move) -> Result<Vec<i64>, MoveError> {
        let routed = m.phase.before_switch() && !m.cleanup_pending;
        self.keys(
            m.key_kind()?,
            m.unit(),
            &m.from,
            super::db_key(m.move_id),
            routed,
        )
        .await
    }

    /// What a pass copies from: a key's changes since the watermark; a slot's rows all (a key of
    /// the slot may have got its first rows after the last pass read the slot's keys).
    fn since(m: &Move, watermark: Option<DateTime<Utc>>) -> Option<DateTime<Utc>> {
        match m.unit() {
            Unit::Key(_) => watermark,
            Unit::Slot(_) => None,
        }
    }

    /// One step of the state machine ([module docs](super)).
    async fn step(&self, m: &Move, passes: &mut u32) -> Result<(), MoveError> {
        if m.cleanup_pending {
            return self.clean_up(m).await;
        }
        if m.cancel_requested && m.phase.before_switch() {
            return self.abandon(m, Phase::Cancelled, "cancelled").await;
        }
        match m.phase {
            Phase::Copying => self.first_pass(m).await,
            Phase::CatchingUp => self.catch_up(m, passes).await,
            Phase::Fenced => self.fence_and_switch(m).await,
            Phase::Switched if !m.dest_live => self.go_live(m).await,
            Phase::Switched if m.complete_requested => self.drop_source(m).await,
            _ => Ok(()),
        }
    }

    /// Copying: the first pass copies everything, then the destination's statistics are refreshed.
    async fn first_pass(&self, m: &Move) -> Result<(), MoveError> {
        let kind = m.key_kind()?;
        let id = super::db_key(m.move_id);
        if let Unit::Slot(slot) = m.unit() {
            // The slot comes back to a group an earlier move of it left a tombstone on.
            self.on_group(&m.to, async |c| clear_slot_tombstone(kind, c, slot).await)
                .await?;
        }
        let keys = self.move_keys(m).await?;
        let (at, n) = self.pass(m, &keys, None).await?;
        // The destination's tables just grew by the copy: without fresh statistics its
        // first batches after the switch could be planned for empty tables.
        let tables: &[&str] = match kind {
            crate::router::KeyKind::Items => &["sale_items", "reservations"],
            crate::router::KeyKind::Users => &["orders", "payments"],
        };
        if let Err(e) =
            crate::migrate::analyze(self.cluster.group(self.group_idx(&m.to)?), tables).await
        {
            tracing::warn!(move_id = m.move_id, error = %e, "statistics not refreshed on the destination");
        }
        self.advance(id, Phase::CatchingUp, Some(at), n).await
    }

    /// Catching up: a pass over what changed since the last; fenced once a pass finds few rows.
    async fn catch_up(&self, m: &Move, passes: &mut u32) -> Result<(), MoveError> {
        let id = super::db_key(m.move_id);
        let keys = self.move_keys(m).await?;
        let since = Self::since(m, self.watermark_of(id).await?);
        let (at, n) = self.pass(m, &keys, since).await?;
        *passes += 1;
        let next = if n < CATCH_UP_ROWS || *passes >= CATCH_UP_PASSES {
            Phase::Fenced
        } else {
            Phase::CatchingUp
        };
        self.advance(id, next, Some(at), n).await
    }

    /// Fenced: the source's fences up, the last changes copied, then the switch (the commit point).
    async fn fence_and_switch(&self, m: &Move) -> Result<(), MoveError> {
        let id = super::db_key(m.move_id);
        let keys = self.fence_all(m).await?;
        self.on_config(async |c| ledger::mark_fenced(c, id).await)
            .await?;
        let since = Self::since(m, self.watermark_of(id).await?);
        let n = self.copy_since(m, &keys, since).await?;
        self.switch(m, &keys, n).await
    }

    /// Switched, not live yet: the destination's copy unfenced; the write pause ends here.
    async fn go_live(&self, m: &Move) -> Result<(), MoveError> {
        let kind = m.key_kind()?;
        let id = super::db_key(m.move_id);
        let slot = match m.unit() {
            Unit::Key(k) => slot_of(k, self.router.kind(kind).slot_count()),
            Unit::Slot(s) => s,
        };
        let key = match m.unit() {
            Unit::Key(k) => Some(super::db_key(k)),
            Unit::Slot(_) => None,
        };
        self.on_group(&m.to, async |c| {
            unfence(kind, c, id).await?;
            // A key of a slot that left this group earlier lives here again.
            clear_slot_tombstone(kind, c, slot).await?;
            if let (Some(k), KeyKind::Items) = (key, kind) {
                c.execute("DELETE FROM item_fences WHERE item_id = $1", &[&k])
                    .await?;
            }
            Ok(())
        })
        .await?;
        self.on_config(async |c| ledger::mark_live(c, id).await)
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

    /// Switched, asked to complete: the source's copy dropped, its fences left as tombstones.
    async fn drop_source(&self, m: &Move) -> Result<(), MoveError> {
        let kind = m.key_kind()?;
        let id = super::db_key(m.move_id);
        self.on_group(&m.from, async |c| {
            drop_copy(kind, c, id, true).await?;
            expire_slot_fence(c, id).await
        })
        .await?;
        self.on_config(async |c| ledger::mark_completed(c, id).await)
            .await?;
        tracing::info!(move_id = m.move_id, "move completed");
        Ok(())
    }

    /// Fence the move's keys on the source; for a slot, the slot first (no key of it gets its
    /// first rows there from then on), then its keys, read again until no new one shows up.
    async fn fence_all(&self, m: &Move) -> Result<Vec<i64>, MoveError> {
        let kind = m.key_kind()?;
        let id = super::db_key(m.move_id);
        if let Unit::Slot(slot) = m.unit() {
            // Writers check the slot fence without a row lock: wait out those that began before.
            self.on_group(&m.from, async |c| {
                fence_slot(kind, c, id, slot).await?;
                wait_out_older(c).await
            })
            .await?;
        }
        let mut keys = self.move_keys(m).await?;
        for _ in 0..5 {
            self.on_group(&m.from, async |c| fence(kind, c, id, &keys).await)
                .await?;
            let again = self.move_keys(m).await?;
            if again.iter().all(|k| keys.contains(k)) {
                if let (Unit::Key(_), KeyKind::Items) = (m.unit(), kind) {
                    // A new sale checks the key's fence without a row lock: wait out the
                    // statements that began before it, so the last copy sees what they wrote.
                    self.on_group(&m.from, async |c| wait_out_older(c).await)
                        .await?;
                }
                return Ok(keys);
            }
            keys.extend(
                again
                    .into_iter()
                    .filter(|k| !keys.contains(k))
                    .collect::<Vec<_>>(),
            );
        }
        Err(MoveError::Conflict(
            "the slot's keys kept changing while it was fenced".to_string(),
        ))
    }

    async fn watermark_of(&self, id: i64) -> Result<Option<DateTime<Utc>>, MoveError> {
        self.on_config(async |c| ledger::watermark(c, id).await)
            .await
    }

    /// One copy pass (all rows when `since` is None); returns its watermark and the rows written.
    async fn pass(
        &self,
        m: &Move,
        keys: &[i64],
        since: Option<DateTime<Utc>>,
    ) -> Result<(DateTime<Utc>, u64), MoveError> {
        let kind = m.key_kind()?;
        let at = self
            .on_group(&m.from, async |c| watermark(kind, c, keys).await)
            .await?;
        let n = self.copy_since(m, keys, since).await?;
        Ok((at, n))
    }

    /// Copy what changed since `since` (everything when None) from the source to the
    /// destination; returns the rows written.
    async fn copy_since(
        &self,
        m: &Move,
        keys: &[i64],
        since: Option<DateTime<Utc>>,
    ) -> Result<u64, MoveError> {
        let kind = m.key_kind()?;
        let id = super::db_key(m.move_id);
        let src = self.cluster.group(self.group_idx(&m.from)?);
        let dst = self.cluster.group(self.group_idx(&m.to)?);
        Ok(src
            .run(Work::Settle, STEP_BUDGET, async |s| {
                dst.run(Work::Settle, STEP_BUDGET, async |d| {
                    copy(kind, s, d, id, keys, since).await
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
        self.on_config(async |c| ledger::advance(c, id, next, watermark, copied).await)
            .await
    }

    /// The commit point: the route and the move's phase, in one transaction on the config group
    /// (only while this runner holds the move and nobody asked to cancel it).
    // Long on purpose: the commit point is one transaction; its statements read in the order
    // they run.
    async fn switch(&self, m: &Move, keys: &[i64], copied: u64) -> Result<(), MoveError> {
        let kind = m.key_kind()?;
        let id = super::db_key(m.move_id);
        let (from, to) = (self.group_idx(&m.from)?, self.group_idx(&m.to)?);
        // Decide on the table as stored, not as this runner last cached it.
        self.refresh_routes().await?;
        let rules = self.router.kind(kind);
        let reverses = m.reverse_of.map(super::db_key);
        let route = match m.unit() {
            // Back to the group its rule names: no entry needed.
            Unit::Key(k) => Route::Key(
                super::db_key(k),
                rules.by_rule(k) == to && {
                    let slot = slot_of(k, rules.slot_count());
                    self.router.table().slot(kind, slot).is_none()
                },
            ),
            Unit::Slot(s) => {
                // Keys of the slot whose own entries named the source moved with it.
                let stale: Vec<i64> = self
                    .router
                    .table()
                    .keys_on(kind, from)
                    .into_iter()
                    .filter(|&k| slot_of(k, rules.slot_count()) == s)
                    .map(super::db_key)
                    .filter(|k| keys.contains(k))
                    .collect();
                Route::Slot(
                    i32::try_from(s).unwrap_or(i32::MAX),
                    self.router.slot_home(kind, s) == Some(to),
                    stale,
                )
            }
        };
        self.on_config(async |c| {
            let tx = c.transaction().await?;
            if !ledger::mark_switched(&tx, id, &self.owner, copied).await? {
                tx.rollback().await?;
                return Ok(());
            }
            if let Some(old) = reverses {
                // The move this one reverses is undone now (it stays as it was if this one fails).
                ledger::mark_reversed(&tx, old).await?;
            }
            match &route {
                Route::Key(key, by_rule) => {
                    let to = (!by_rule).then_some(m.to.as_str());
                    crate::router::table::write_entry(&*tx, kind, *key, to).await?;
                }
                Route::Slot(slot, home, stale) => {
                    if *home {
                        tx.execute(
                            "DELETE FROM slot_map WHERE kind = $1 AND slot = $2",
                            &[&m.kind, slot],
                        )
                        .await?;
                    } else {
                        tx.execute(
                            "INSERT INTO slot_map (kind, slot, group_name) VALUES ($1, $2, $3)
                             ON CONFLICT (kind, slot) DO UPDATE
                                SET group_name = EXCLUDED.group_name, updated_at = now()",
                            &[&m.kind, slot, &m.to],
                        )
                        .await?;
                    }
                    tx.execute(
                        "DELETE FROM shard_map WHERE kind = $1 AND key = ANY($2)",
                        &[&m.kind, stale],
                    )
                    .await?;
                }
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
        let id = super::db_key(m.move_id);
        let reverses = m.reverse_of.map(super::db_key);
        let marked = self
            .on_config(async |c| {
                let tx = c.transaction().await?;
                let marked = ledger::mark_abandoned(&tx, id, &self.owner, to, why).await?;
                if let (true, Some(old)) = (marked, reverses) {
                    // The move this one would have reversed stands again: it may be reversed or
                    // completed later.
                    ledger::unmark_reversed(&tx, old, id).await?;
                }
                tx.commit().await?;
                Ok(marked)
            })
            .await?;
        if !marked {
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
        let kind = m.key_kind()?;
        let id = super::db_key(m.move_id);
        self.on_group(&m.from, async |c| end_on_source(kind, c, id).await)
            .await?;
        self.on_group(&m.to, async |c| drop_copy(kind, c, id, false).await)
            .await?;
        self.on_group(&m.to, async |c| unfence(kind, c, id).await)
            .await?;
        self.on_config(async |c| ledger::cleaned_up(c, id).await)
            .await
    }

    async fn note_error(&self, id: u64, error: &str) {
        let _ = self
            .on_config(async |c| ledger::note_error(c, id, error).await)
            .await;
    }
}

/// What the switch writes to the router-config table.
enum Route {
    /// A key's entry: (key, back on the group its rule names: the entry is removed).
    Key(i64, bool),
    /// A slot's entry: (slot, back on its configured group: removed), and the keys of the slot
    /// whose own entries named the source (removed: they moved with the slot).
    Slot(i32, bool, Vec<i64>),
}
