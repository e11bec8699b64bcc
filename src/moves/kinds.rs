//! Each kind's statements on the moved data, behind one set of names: the copy, the fences, the
//! guard a writer meets, the drop of a copy ([`super::items`] and [`super::users`] hold the SQL).

use super::{items, users, Holdings};
use crate::db::DbError;
use crate::router::KeyKind;
use chrono::{DateTime, Utc};
use std::time::Duration;
use tokio_postgres::Client;

pub(super) async fn candidates(
    kind: KeyKind,
    c: &Client,
    move_id: i64,
) -> Result<Vec<i64>, DbError> {
    match kind {
        KeyKind::Items => items::candidates(c, move_id).await,
        KeyKind::Users => users::candidates(c, move_id).await,
    }
}

pub(super) async fn watermark(
    kind: KeyKind,
    c: &mut Client,
    keys: &[i64],
) -> Result<DateTime<Utc>, DbError> {
    match kind {
        KeyKind::Items => items::watermark(c, keys).await,
        KeyKind::Users => users::watermark(c, keys).await,
    }
}

pub(super) async fn copy(
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

pub(super) async fn fence(
    kind: KeyKind,
    c: &mut Client,
    move_id: i64,
    keys: &[i64],
) -> Result<u64, DbError> {
    match kind {
        KeyKind::Items => items::fence(c, move_id, keys).await,
        KeyKind::Users => users::fence(c, move_id, keys).await,
    }
}

/// Lift this move's fences from a group (its slot fence too).
pub(super) async fn unfence(kind: KeyKind, c: &Client, move_id: i64) -> Result<u64, DbError> {
    lift_fences(kind, c, move_id).await
}

pub(super) async fn lift_fences(
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
pub(super) async fn guard(
    tx: &tokio_postgres::Transaction<'_>,
    move_id: i64,
) -> Result<(), DbError> {
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
pub(super) async fn fence_slot(
    kind: KeyKind,
    c: &mut Client,
    move_id: i64,
    slot: u32,
) -> Result<(), DbError> {
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
pub(super) async fn clear_slot_tombstone(
    kind: KeyKind,
    c: &Client,
    slot: u32,
) -> Result<(), DbError> {
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
pub(super) async fn expire_slot_fence(c: &Client, move_id: i64) -> Result<(), DbError> {
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
pub(super) async fn wait_out_older(c: &Client) -> Result<(), DbError> {
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
pub(super) async fn drop_copy(
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

pub(super) async fn holdings(kind: KeyKind, c: &Client, keys: &[i64]) -> Result<Holdings, DbError> {
    match kind {
        KeyKind::Items => items::holdings(c, keys).await,
        KeyKind::Users => users::holdings(c, keys).await,
    }
}

/// Rows a copy writes per statement.
pub(super) const CHUNK: usize = 5_000;

/// One column of rows read from the source, for an `unnest` insert on the destination.
pub(super) fn column<'a, T: tokio_postgres::types::FromSql<'a>>(
    rows: &'a [tokio_postgres::Row],
    i: usize,
) -> Vec<T> {
    rows.iter().map(|r| r.get(i)).collect()
}

pub(super) fn db_key(key: u64) -> i64 {
    i64::try_from(key).unwrap_or(i64::MAX)
}
