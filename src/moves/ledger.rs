//! The moves ledger: every statement on the `moves` table of the config group (the state machine's
//! persisted rows), and how a row reads back as a [`Move`].

use super::kinds::db_key;
use super::{rules, Move, Phase, Plan, Unit, LEASE};
use crate::db::DbError;
use crate::router::KeyKind;
use chrono::{DateTime, Utc};
use tokio_postgres::{Client, Transaction};

pub(super) const MOVE_COLUMNS: &str =
    "move_id, kind, key, from_group, to_group, phase, rows_copied,
    write_pause_ms, error, cancel_requested, complete_requested, dest_live, cleanup_pending,
    reverse_of, reversed_by, created_at, updated_at, fenced_at, switched_at, finished_at,
    watermark, slot";

impl Move {
    pub(super) fn from_row(r: &tokio_postgres::Row) -> Self {
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
}

/// The advisory lock starts of moves take.
pub(super) const START_LOCK: i64 = 0x0073_6b6d_6f76_6573;

/// Why an open move (other than `except`) stands in the way of a move of `unit`, if one does: a
/// move of the same key, of its slot, of the slot, or of a key of the slot.
pub(super) async fn open_clash(
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
    for r in &open {
        let (id, phase): (i64, String) = (r.get(0), r.get(1));
        let key = r.get::<_, Option<i64>>(2).map(|k| k.unsigned_abs());
        let slot = r.get::<_, Option<i32>>(3).map(|s| s.unsigned_abs());
        let clash = rules::clashes(unit, key, slot, slots);
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

/// The open moves (not completed, failed or cancelled), for the shard map's listing.
pub(crate) async fn open_moves(client: &Client) -> Result<Vec<Move>, DbError> {
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

/// One move, by id.
pub(super) async fn get(c: &Client, id: u64) -> Result<Option<Move>, DbError> {
    Ok(c.query_opt(
        &format!("SELECT {MOVE_COLUMNS} FROM moves WHERE move_id = $1"),
        &[&db_key(id)],
    )
    .await?
    .map(|r| Move::from_row(&r)))
}

/// Every move, newest first (at most `limit`).
pub(super) async fn list(c: &Client, limit: i64) -> Result<Vec<Move>, DbError> {
    Ok(c.query(
        &format!("SELECT {MOVE_COLUMNS} FROM moves ORDER BY move_id DESC LIMIT $1"),
        &[&limit],
    )
    .await?
    .iter()
    .map(Move::from_row)
    .collect())
}

/// Record a new move of `plan` (in phase copying, claimed by `owner`), unless an open move clashes
/// with it (`Err(why)`); a reverse also marks the move it reverses. One start at a time (an
/// advisory lock), so the clash check cannot race another start; the unique index on open moves
/// is the last word.
pub(super) async fn insert(
    c: &mut Client,
    kind: KeyKind,
    plan: &Plan,
    slots: u32,
    complete: bool,
    reverses: Option<i64>,
    owner: &str,
) -> Result<Result<i64, String>, DbError> {
    let unit = match (plan.key, plan.slot) {
        (Some(k), _) => Unit::Key(k),
        (None, s) => Unit::Slot(s.unwrap_or_default()),
    };
    let key = plan.key.map(db_key);
    let slot = plan.slot.map(|s| i32::try_from(s).unwrap_or(i32::MAX));
    let tx = c.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&START_LOCK])
        .await?;
    if let Some(why) =
        open_clash(&tx, kind, unit, reverses.map(|r| r.unsigned_abs()), slots).await?
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
                &plan.kind, &key, &slot, &plan.from, &plan.to, &complete, &reverses, &owner,
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
}

/// Raise one of a move's request flags (`cancel_requested`, `complete_requested`).
pub(super) async fn request(c: &Client, id: u64, flag: &'static str) -> Result<(), DbError> {
    c.execute(
        &format!("UPDATE moves SET {flag} = true, updated_at = now() WHERE move_id = $1"),
        &[&db_key(id)],
    )
    .await?;
    Ok(())
}

/// The moves whose runner died (no owner, or its lease ran out) and that have work left.
pub(super) async fn resumable(c: &Client) -> Result<Vec<u64>, DbError> {
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
    .collect())
}

/// Take the move if its lease ran out (or it has none, or it is already `owner`'s).
pub(super) async fn claim(c: &Client, id: u64, owner: &str) -> Result<bool, DbError> {
    Ok(c.execute(
        &format!(
            "UPDATE moves SET owner = $2, lease_until = now() + interval '{LEASE}'
                 WHERE move_id = $1
                   AND (owner IS NULL OR owner = $2 OR lease_until < now())"
        ),
        &[&db_key(id), &owner],
    )
    .await?
        == 1)
}

/// Keep `owner`'s claim; false when another runner took the move over.
pub(super) async fn renew(c: &Client, id: u64, owner: &str) -> Result<bool, DbError> {
    Ok(c.execute(
        &format!(
            "UPDATE moves SET lease_until = now() + interval '{LEASE}'
                 WHERE move_id = $1 AND owner = $2"
        ),
        &[&db_key(id), &owner],
    )
    .await?
        == 1)
}

/// Release `owner`'s claim.
pub(super) async fn let_go(c: &Client, id: u64, owner: &str) -> Result<(), DbError> {
    c.execute(
        "UPDATE moves SET owner = NULL, lease_until = NULL WHERE move_id = $1 AND owner = $2",
        &[&db_key(id), &owner],
    )
    .await?;
    Ok(())
}

/// The last pass's watermark.
pub(super) async fn watermark(c: &Client, id: i64) -> Result<Option<DateTime<Utc>>, DbError> {
    Ok(
        c.query_one("SELECT watermark FROM moves WHERE move_id = $1", &[&id])
            .await?
            .get(0),
    )
}

/// A step done before the switch: the next phase, the pass's watermark and rows.
pub(super) async fn advance(
    c: &Client,
    id: i64,
    next: Phase,
    watermark: Option<DateTime<Utc>>,
    copied: u64,
) -> Result<(), DbError> {
    let copied = i64::try_from(copied).unwrap_or(i64::MAX);
    c.execute(
        "UPDATE moves SET phase = $2, watermark = coalesce($3, watermark),
             rows_copied = rows_copied + $4, updated_at = now(), error = NULL
         WHERE move_id = $1 AND phase IN ('copying', 'catching_up', 'fenced')",
        &[&id, &next.as_str(), &watermark, &copied],
    )
    .await?;
    Ok(())
}

/// When the source's fence went up (the first time: the write pause counts from it).
pub(super) async fn mark_fenced(c: &Client, id: i64) -> Result<(), DbError> {
    c.execute(
        "UPDATE moves SET fenced_at = coalesce(fenced_at, clock_timestamp()) WHERE move_id = $1",
        &[&id],
    )
    .await?;
    Ok(())
}

/// The commit point's mark, in the switch's transaction: only while `owner` holds the move and
/// nobody asked to cancel it. False when it did not apply.
pub(super) async fn mark_switched(
    tx: &Transaction<'_>,
    id: i64,
    owner: &str,
    copied: u64,
) -> Result<bool, DbError> {
    let copied = i64::try_from(copied).unwrap_or(i64::MAX);
    Ok(tx
        .execute(
            "UPDATE moves SET phase = 'switched', switched_at = now(), updated_at = now(),
                 rows_copied = rows_copied + $3, error = NULL
             WHERE move_id = $1 AND phase = 'fenced' AND owner = $2 AND NOT cancel_requested",
            &[&id, &owner, &copied],
        )
        .await?
        == 1)
}

/// The switched move that a reverse undid, marked cancelled (in the reverse's switch).
pub(super) async fn mark_reversed(tx: &Transaction<'_>, old: i64) -> Result<(), DbError> {
    tx.execute(
        "UPDATE moves SET phase = 'cancelled', finished_at = now(), updated_at = now()
         WHERE move_id = $1 AND phase = 'switched'",
        &[&old],
    )
    .await?;
    Ok(())
}

/// The destination's copy is live: the write pause ends here.
pub(super) async fn mark_live(c: &Client, id: i64) -> Result<(), DbError> {
    c.execute(
        "UPDATE moves SET dest_live = true, updated_at = now(),
             write_pause_ms = (extract(epoch FROM clock_timestamp() - fenced_at) * 1000)::bigint
         WHERE move_id = $1",
        &[&id],
    )
    .await?;
    Ok(())
}

/// The source's copy is dropped.
pub(super) async fn mark_completed(c: &Client, id: i64) -> Result<(), DbError> {
    c.execute(
        "UPDATE moves SET phase = 'completed', finished_at = now(), updated_at = now()
         WHERE move_id = $1 AND phase = 'switched'",
        &[&id],
    )
    .await?;
    Ok(())
}

/// Give up a move before its switch (`to`: failed or cancelled) with its clean-up pending; only
/// `owner`. False when it did not apply.
pub(super) async fn mark_abandoned(
    tx: &Transaction<'_>,
    id: i64,
    owner: &str,
    to: Phase,
    why: &str,
) -> Result<bool, DbError> {
    Ok(tx
        .execute(
            "UPDATE moves SET phase = $3, error = $4, cleanup_pending = true,
                 finished_at = now(), updated_at = now()
             WHERE move_id = $1 AND owner = $2 AND phase IN ('copying', 'catching_up', 'fenced')",
            &[&id, &owner, &to.as_str(), &why],
        )
        .await?
        == 1)
}

/// The move `old` that the abandoned move `id` would have reversed stands again.
pub(super) async fn unmark_reversed(
    tx: &Transaction<'_>,
    old: i64,
    id: i64,
) -> Result<(), DbError> {
    tx.execute(
        "UPDATE moves SET reversed_by = NULL WHERE move_id = $1 AND reversed_by = $2",
        &[&old, &id],
    )
    .await?;
    Ok(())
}

/// A rolled-back move's clean-up is done.
pub(super) async fn cleaned_up(c: &Client, id: i64) -> Result<(), DbError> {
    c.execute(
        "UPDATE moves SET cleanup_pending = false, updated_at = now() WHERE move_id = $1",
        &[&id],
    )
    .await?;
    Ok(())
}

/// The last error a step met (the move goes on, or is rolled back after its attempts).
pub(super) async fn note_error(c: &Client, id: u64, error: &str) -> Result<(), DbError> {
    c.execute(
        "UPDATE moves SET error = $2, updated_at = now() WHERE move_id = $1",
        &[&db_key(id), &error],
    )
    .await?;
    Ok(())
}
