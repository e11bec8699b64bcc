//! The item group's statements: transaction 1 of the plain path ([`reserve_one`]: the conditional
//! decrement, the per-user limit, the reservation), why a decrement matched nothing, the release of
//! reservations, their marks (ordered, paid), and the stock of sold-out items. The coalesced
//! transaction 1, over several items, is in [`super::batch`]; the user group's statements are in
//! [`super::store`].
//!
//! The conditional decrement comes first: it takes the row lock on the item, so every later
//! statement of the transaction runs while no other buyer of this item can commit. The per-user
//! count is read by a *separate* statement after the lock, which in READ COMMITTED gets a fresh
//! snapshot that includes every purchase committed before we got the lock: that is what makes the
//! per-user limit exact under concurrency.

use crate::db::DbError;
use crate::domain::{ItemId, Quantity, SaleId, UserId};
use deadpool_postgres::ClientWrapper;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

/// What transaction 1 settled for one purchase.
#[derive(Debug, Clone, PartialEq)]
pub struct Reserved {
    pub txn_id: Uuid,
    pub quantity: i32,
    pub price_cents: i64,
    pub payment_window_secs: i32,
    /// The reservation already existed (an earlier attempt with the same request_id).
    pub existing: bool,
    /// This attempt's number on the reservation; compensation releases only while it still holds.
    pub attempt: i32,
}

/// Why an item refused a purchase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    NotFound,
    NotStarted,
    Ended,
    SoldOut {
        remaining: i32,
    },
    LimitExceeded {
        limit: i32,
        already: i64,
    },
    /// The item is fenced by a move ([`crate::moves`]): it is about to live on another group.
    Moving,
    /// The sale is paused by an operator: nothing new is sold until it resumes.
    Paused,
    /// The same purchase (request id) is being made by an earlier ask of the same batch (a double
    /// click): that ask answers it; this one retries later and gets its order as a replay.
    InProgress,
}

/// Find out why the conditional decrement matched no row.
pub(crate) async fn diagnose(
    client: &ClientWrapper,
    sale: SaleId,
    item: ItemId,
) -> Result<Refusal, DbError> {
    let row = client
        .query_opt(
            &client
                .prepare_cached(
                    "SELECT remaining,
                    starts_at <= clock_timestamp() AND (fair_window_ms = 0 OR drawn_at IS NOT NULL),
                    clock_timestamp() < ends_at, fenced_by IS NOT NULL, paused
             FROM sale_items WHERE sale_id = $1 AND item_id = $2",
                )
                .await?,
            &[&sale.db(), &item.db()],
        )
        .await?;
    Ok(match row {
        None => Refusal::NotFound,
        Some(r) if r.get::<_, bool>(3) => Refusal::Moving,
        Some(r) if !r.get::<_, bool>(1) => Refusal::NotStarted,
        Some(r) if !r.get::<_, bool>(2) => Refusal::Ended,
        Some(r) if r.get::<_, bool>(4) => Refusal::Paused,
        Some(r) => Refusal::SoldOut {
            remaining: r.get(0),
        },
    })
}

/// Transaction 1 for one request: conditional decrement, per-user limit, reservation.
///
/// With `resumable` (the txn id was derived from a request_id) a live reservation of the same
/// txn — an earlier attempt of this request — is taken over instead: its `attempt` is bumped (so
/// that attempt can no longer compensate it) and nothing is decremented again.
pub async fn reserve_one(
    client: &mut ClientWrapper,
    sale: SaleId,
    item: ItemId,
    user: UserId,
    quantity: Quantity,
    txn_id: Uuid,
    resumable: bool,
) -> Result<(Result<Reserved, Refusal>, Option<i32>), DbError> {
    if resumable {
        if let Some(resumed) = resume(client, sale, item, txn_id).await? {
            return Ok((Ok(resumed), None));
        }
    }
    let tx = client.transaction().await?;
    let decremented = tx
        .query_opt(
            &tx.prepare_cached(
                "UPDATE sale_items SET remaining = remaining - $3, version = version + 1
             WHERE sale_id = $1 AND item_id = $2 AND remaining >= $3 AND fenced_by IS NULL
               AND starts_at <= clock_timestamp() AND clock_timestamp() < ends_at
               AND (fair_window_ms = 0 OR drawn_at IS NOT NULL) AND NOT paused
             RETURNING per_user_limit, price_cents, payment_window_secs, remaining,
                       clock_timestamp() < ends_at",
            )
            .await?,
            &[&sale.db(), &item.db(), &quantity.db()],
        )
        .await?;
    // The WHERE clause may have been judged before a wait for the row lock; RETURNING is
    // computed with the lock held.
    if decremented.as_ref().is_some_and(|r| !r.get::<_, bool>(4)) {
        tx.rollback().await?;
        return Ok((Err(Refusal::Ended), None));
    }
    let Some(row) = decremented else {
        tx.rollback().await?;
        let refusal = diagnose(client, sale, item).await?;
        let remaining = match refusal {
            Refusal::SoldOut { remaining } => Some(remaining),
            _ => None,
        };
        return Ok((Err(refusal), remaining));
    };
    let (limit, price_cents, window): (i32, i64, i32) = (row.get(0), row.get(1), row.get(2));
    let after: i32 = row.get(3);
    let attempt = match record(&tx, sale, item, user, quantity, txn_id, limit).await {
        Ok(Ok(attempt)) => attempt,
        Ok(Err(refusal)) => {
            tx.rollback().await?;
            return Ok((Err(refusal), None));
        }
        Err(e) => {
            let _ = tx.rollback().await;
            return Err(e);
        }
    };
    tx.commit().await?;
    let reserved = Reserved {
        txn_id,
        quantity: quantity.db(),
        price_cents,
        payment_window_secs: window,
        existing: false,
        attempt,
    };
    Ok((Ok(reserved), Some(after)))
}

/// Transaction 1's second half, under the item's row lock: the user's holdings against the limit,
/// then the reservation. The attempt number, a refusal, or `Busy` when a concurrent attempt of
/// the same request holds the reservation (the caller rolls back).
async fn record(
    tx: &deadpool_postgres::Transaction<'_>,
    sale: SaleId,
    item: ItemId,
    user: UserId,
    quantity: Quantity,
    txn_id: Uuid,
    limit: i32,
) -> Result<Result<i32, Refusal>, DbError> {
    let prior = tx
        .query_one(
            &tx.prepare_cached("SELECT coalesce(sum(quantity) FILTER (WHERE txn_id <> $4 AND state <> 'released'), 0)::bigint,
                    bool_or(state <> 'released') FILTER (WHERE txn_id = $4)
             FROM reservations WHERE sale_id = $1 AND item_id = $2 AND user_id = $3").await?,
            &[&sale.db(), &item.db(), &user.db(), &txn_id],
        )
        .await?;
    let already: i64 = prior.get(0);
    if prior.get::<_, Option<bool>>(1) == Some(true) {
        // A concurrent attempt of this same request made the reservation live after our resume
        // check: undo our decrement; the retry will resume it.
        return Err(DbError::Busy(
            "a concurrent attempt of this request is in progress".into(),
        ));
    }
    if already + i64::from(quantity.db()) > i64::from(limit) {
        return Ok(Err(Refusal::LimitExceeded { limit, already }));
    }
    let attempt = tx
        .query_opt(
            &tx.prepare_cached("INSERT INTO reservations (txn_id, sale_id, item_id, user_id, quantity, state, updated_at)
         VALUES ($1, $2, $3, $4, $5, 'reserved', clock_timestamp())
         ON CONFLICT (txn_id) DO UPDATE
            SET state = 'reserved', quantity = EXCLUDED.quantity, attempt = reservations.attempt + 1,
                created_at = now(), updated_at = clock_timestamp(), ordered_at = NULL
            WHERE reservations.state = 'released'
         RETURNING attempt").await?,
            &[&txn_id, &sale.db(), &item.db(), &user.db(), &quantity.db()],
        )
        .await?;
    attempt
        .map(|r| Ok(r.get::<_, i32>(0)))
        .ok_or_else(|| DbError::Busy("a concurrent attempt of this request is in progress".into()))
}

/// Take over a live reservation of `txn_id` (an earlier attempt of the same request), bumping its
/// attempt. None when there is none, or when the item is fenced by a move (transaction 1 then
/// says so). The bump is made under the item's row lock, like every write of transaction 1, so a
/// move copies it; a first attempt (no live reservation) takes no lock.
pub(crate) async fn resume(
    client: &mut ClientWrapper,
    sale: SaleId,
    item: ItemId,
    txn_id: Uuid,
) -> Result<Option<Reserved>, DbError> {
    let exists = client
        .prepare_cached("SELECT 1 FROM reservations WHERE txn_id = $1 AND state <> 'released'")
        .await?;
    if client.query_opt(&exists, &[&txn_id]).await?.is_none() {
        return Ok(None);
    }
    let tx = client.transaction().await?;
    let lock = tx
        .prepare_cached(
            "SELECT fenced_by IS NULL, price_cents, payment_window_secs FROM sale_items
             WHERE sale_id = $1 AND item_id = $2 FOR UPDATE",
        )
        .await?;
    let Some(item_row) = tx.query_opt(&lock, &[&sale.db(), &item.db()]).await? else {
        tx.rollback().await?;
        return Ok(None);
    };
    if !item_row.get::<_, bool>(0) {
        tx.rollback().await?;
        return Ok(None);
    }
    let bump = tx
        .prepare_cached(
            "UPDATE reservations SET attempt = attempt + 1, updated_at = clock_timestamp()
             WHERE txn_id = $1 AND sale_id = $2 AND item_id = $3 AND state <> 'released'
             RETURNING quantity, attempt",
        )
        .await?;
    let row = tx
        .query_opt(&bump, &[&txn_id, &sale.db(), &item.db()])
        .await?;
    tx.commit().await?;
    Ok(row.map(|r| {
        tracing::debug!(%txn_id, "reservation exists; resuming it");
        Reserved {
            txn_id,
            quantity: r.get(0),
            attempt: r.get(1),
            price_cents: item_row.get(1),
            payment_window_secs: item_row.get(2),
            existing: true,
        }
    }))
}

/// The stock and version of a sold-out item, as [`stock_versions`] reads it.
pub(crate) struct StockVersion {
    pub sale: i64,
    pub item: i64,
    pub remaining: i32,
    pub version: i64,
    /// The sale window is over: nothing can be bought any more.
    pub ended: bool,
}

/// Stock, version and end of the given items (parallel arrays of sale and item ids).
pub(crate) async fn stock_versions(
    client: &ClientWrapper,
    sales: &[i64],
    items: &[i64],
) -> Result<Vec<StockVersion>, DbError> {
    let stmt = client
        .prepare_cached(
            "SELECT si.sale_id, si.item_id, si.remaining, si.version, si.ends_at <= now()
             FROM sale_items si
             JOIN unnest($1::bigint[], $2::bigint[]) AS k(s, i) ON si.sale_id = k.s AND si.item_id = k.i",
        )
        .await?;
    let rows = client.query(&stmt, &[&sales, &items]).await?;
    Ok(rows
        .iter()
        .map(|r| StockVersion {
            sale: r.get(0),
            item: r.get(1),
            remaining: r.get(2),
            version: r.get(3),
            ended: r.get(4),
        })
        .collect())
}

/// An item's remaining stock, version and the txn ids of its live reservations (at most
/// `limit`), all from one snapshot. None when the item does not exist.
pub(crate) async fn holders(
    client: &ClientWrapper,
    sale: SaleId,
    item: ItemId,
    limit: i64,
) -> Result<Option<(i32, i64, Vec<Uuid>)>, DbError> {
    let stmt = client
        .prepare_cached(
            "SELECT si.remaining, si.version,
                    ARRAY(SELECT r.txn_id FROM reservations r
                          WHERE r.sale_id = si.sale_id AND r.item_id = si.item_id
                            AND r.state <> 'released' LIMIT $3)
             FROM sale_items si WHERE si.sale_id = $1 AND si.item_id = $2",
        )
        .await?;
    let row = client
        .query_opt(&stmt, &[&sale.db(), &item.db(), &limit])
        .await?;
    Ok(row.map(|r| (r.get(0), r.get(1), r.get(2))))
}

/// Return the stock of live reservations (`reserved` or `ordered`) to their items, in one atomic
/// statement. A reservation already released or paid is left alone, so a release can never happen
/// twice, whoever (compensation, cancel, sweeper, reconciler) asks for it and however often.
/// `attempts[i]`, when given, restricts the release of `txn_ids[i]` to that attempt (compensation).
///
/// Reservations of an item fenced by a move are left alone (read under the item's lock, so a move
/// never misses a release): [`Released::moving`] counts them, and the caller retries them on the
/// item's new group.
pub async fn release(
    client: &mut ClientWrapper,
    txn_ids: &[Uuid],
    attempts: &[Option<i32>],
) -> Result<Released, DbError> {
    let attempts: Vec<Option<i32>> = if attempts.is_empty() {
        vec![None; txn_ids.len()]
    } else {
        attempts.to_vec()
    };
    let tx = client.transaction().await?;
    // Lock order: the items' rows first (in key order), then the reservations, as transaction 1
    // does; the other way round a release and a retry's transaction 1 on the same txn could
    // deadlock.
    let lock = tx
        .prepare_cached(
            "SELECT fenced_by IS NOT NULL FROM sale_items WHERE (sale_id, item_id) IN
                 (SELECT sale_id, item_id FROM reservations WHERE txn_id = ANY($1))
             ORDER BY sale_id, item_id FOR UPDATE",
        )
        .await?;
    let stmt = tx
        .prepare_cached(
            "WITH k AS (SELECT * FROM unnest($1::uuid[], $2::int[]) AS k(t, a)),
             r AS (
                 UPDATE reservations res SET state = 'released', updated_at = clock_timestamp()
                 FROM k
                 WHERE res.txn_id = k.t AND (k.a IS NULL OR res.attempt = k.a)
                   AND res.state IN ('reserved', 'ordered')
                   AND NOT EXISTS (SELECT 1 FROM sale_items f WHERE f.sale_id = res.sale_id
                                   AND f.item_id = res.item_id AND f.fenced_by IS NOT NULL)
                 RETURNING res.sale_id, res.item_id, res.quantity),
             s AS (SELECT sale_id, item_id, sum(quantity)::int AS q FROM r GROUP BY 1, 2)
             UPDATE sale_items si SET remaining = si.remaining + s.q, version = si.version + 1
             FROM s WHERE si.sale_id = s.sale_id AND si.item_id = s.item_id
             RETURNING si.sale_id, si.item_id, si.remaining",
        )
        .await?;
    let lock_params: [&(dyn ToSql + Sync); 1] = [&txn_ids];
    let params: [&(dyn ToSql + Sync); 2] = [&txn_ids, &attempts];
    let (locked, rows) =
        futures::try_join!(tx.query(&lock, &lock_params), tx.query(&stmt, &params))?;
    tx.commit().await?;
    Ok(Released {
        back: rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect(),
        moving: locked.iter().filter(|r| r.get::<_, bool>(0)).count(),
    })
}

/// What [`release`] did.
#[derive(Debug)]
pub struct Released {
    /// `(sale_id, item_id, remaining_after)` for every item that got stock back.
    pub back: Vec<(i64, i64, i32)>,
    /// How many of the items asked about are fenced by a move (their reservations untouched).
    pub moving: usize,
}

/// Where a reservation is: the item-side ledger's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReservationState {
    Reserved,
    Ordered,
    Paid,
    Released,
}

impl ReservationState {
    pub fn as_str(self) -> &'static str {
        match self {
            ReservationState::Reserved => "reserved",
            ReservationState::Ordered => "ordered",
            ReservationState::Paid => "paid",
            ReservationState::Released => "released",
        }
    }

    /// The column's text (the table's CHECK constraint allows nothing else).
    pub fn from_db(text: &str) -> Self {
        match text {
            "reserved" => ReservationState::Reserved,
            "ordered" => ReservationState::Ordered,
            "paid" => ReservationState::Paid,
            _ => ReservationState::Released,
        }
    }
}

/// Mark reservations ordered (their orders exist): `ordered_at`, only on `reserved` ones not marked
/// yet. No indexed column changes, so it is a HOT update (migrations/V8): the mark costs a heap
/// tuple, not three index entries.
///
/// `(state = 'reserved') IS TRUE` means `state = 'reserved'`, written so that the planner cannot
/// prove the partial indexes `reservations_live` and `reservations_unconfirmed` apply: on a table
/// growing faster than autoanalyze follows (every sale's first minutes) it took their stale,
/// tiny row counts at their word and scanned the whole of `reservations_live` for each batch of
/// marks (a BitmapAnd with the primary key), a cost growing with every reservation ever made.
/// Measured: the masters' CPU per hot order swung between 50 and 190 µs from run to run.
pub(crate) const CONFIRM_SQL: &str = "UPDATE reservations SET ordered_at = clock_timestamp()
     WHERE txn_id = ANY($1) AND (state = 'reserved') IS TRUE AND ordered_at IS NULL";

/// Move live reservations forward to ordered ([`CONFIRM_SQL`]) or `paid` (never backwards, never
/// out of released).
pub(crate) async fn advance_reservations(
    client: &ClientWrapper,
    txn_ids: &[Uuid],
    to: ReservationState,
) -> Result<u64, DbError> {
    if to == ReservationState::Ordered {
        return Ok(client
            .execute(&client.prepare_cached(CONFIRM_SQL).await?, &[&txn_ids])
            .await?);
    }
    let from: &[&str] = match to {
        ReservationState::Paid => &["reserved", "ordered"],
        _ => &["reserved"],
    };
    let to = to.as_str();
    Ok(client
        .execute(
            &client
                .prepare_cached(
                    "UPDATE reservations SET state = $2, updated_at = now()
             WHERE txn_id = ANY($1) AND state = ANY($3)",
                )
                .await?,
            &[&txn_ids, &to, &from],
        )
        .await?)
}
