//! The SQL of a move of item keys: what is read on the source, written on the destination, and
//! how the fence is set and lifted. Every function is idempotent, so a resumed move simply runs
//! its phase again.
//!
//! What an item key holds on its group: its `sale_items` rows (one per sale it is part of), their
//! reservations, and the sale whose id is the key, if any (sales route with the items' router).
//! The fence is `sale_items.fenced_by`: transaction 1 and releases lock those rows first, so the
//! fence's commit is the last moment anything changes them.

use super::{column, Holdings, CHUNK};
use crate::db::DbError;
use chrono::{DateTime, Utc};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row};
use uuid::Uuid;

/// The instant from which a later pass copies: read while holding the item's rows (`FOR SHARE`),
/// so every writer that changes a reservation afterwards got the row lock after this instant and
/// stamps its change later (writers stamp `clock_timestamp()` under the lock).
pub(crate) async fn watermark(src: &mut Client, keys: &[i64]) -> Result<DateTime<Utc>, DbError> {
    let tx = src.transaction().await?;
    tx.execute(
        "SELECT 1 FROM sale_items WHERE item_id = ANY($1) ORDER BY sale_id, item_id FOR SHARE",
        &[&keys],
    )
    .await?;
    let at: DateTime<Utc> = tx.query_one("SELECT clock_timestamp()", &[]).await?.get(0);
    tx.commit().await?;
    Ok(at)
}

/// Every item key with rows on a group that are live or fenced by `move_id` (the keys a slot
/// move may have to carry; the caller keeps those of its slot).
pub(crate) async fn candidates(client: &Client, move_id: i64) -> Result<Vec<i64>, DbError> {
    Ok(client
        .query(
            "SELECT item_id FROM sale_items WHERE fenced_by IS NULL OR fenced_by = $1
             UNION
             SELECT sale_id FROM sales WHERE fenced_by IS NULL OR fenced_by = $1",
            &[&move_id],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

const RESERVATION_COLUMNS: &str =
    "txn_id, sale_id, item_id, user_id, quantity, state, created_at, updated_at, attempt,
     ordered_at";

/// Copy the key's rows from `src` to `dst`: the sale row, the `sale_items` rows (written fenced
/// by `move_id`: the copy stays inactive until the switch), and the reservations changed at or
/// after `since` (all of them when None). Returns how many rows were written.
pub(crate) async fn copy(
    src: &Client,
    dst: &mut Client,
    move_id: i64,
    keys: &[i64],
    since: Option<DateTime<Utc>>,
) -> Result<u64, DbError> {
    // Sales are immutable once made; a new one may appear under a slot's keys meanwhile.
    let mut written = copy_sales(src, dst, move_id, keys).await?;
    let items = src
        .query(
            "SELECT sale_id, item_id, stock, remaining, price_cents, per_user_limit, starts_at,
                    ends_at, payment_window_secs, version, protection, fair_window_ms, fair_seed,
                    draw_stock, drawn_at, paused
             FROM sale_items WHERE item_id = ANY($1)",
            &[&keys],
        )
        .await?;
    for r in &items {
        written += dst
            .execute(
                "INSERT INTO sale_items (sale_id, item_id, stock, remaining, price_cents,
                     per_user_limit, starts_at, ends_at, payment_window_secs, version, protection,
                     fenced_by, fair_window_ms, fair_seed, draw_stock, drawn_at, paused)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16,
                         $17)
                 ON CONFLICT (sale_id, item_id) DO UPDATE
                    SET stock = EXCLUDED.stock, remaining = EXCLUDED.remaining,
                        price_cents = EXCLUDED.price_cents, per_user_limit = EXCLUDED.per_user_limit,
                        starts_at = EXCLUDED.starts_at, ends_at = EXCLUDED.ends_at,
                        payment_window_secs = EXCLUDED.payment_window_secs,
                        version = EXCLUDED.version, protection = EXCLUDED.protection,
                        fenced_by = EXCLUDED.fenced_by, paused = EXCLUDED.paused
                    WHERE sale_items.fenced_by IS NOT NULL",
                &[
                    &r.get::<_, i64>(0),
                    &r.get::<_, i64>(1),
                    &r.get::<_, i32>(2),
                    &r.get::<_, i32>(3),
                    &r.get::<_, i64>(4),
                    &r.get::<_, i32>(5),
                    &r.get::<_, DateTime<Utc>>(6),
                    &r.get::<_, DateTime<Utc>>(7),
                    &r.get::<_, i32>(8),
                    &r.get::<_, i64>(9),
                    &r.get::<_, Option<serde_json::Value>>(10),
                    &move_id,
                    &r.get::<_, i32>(11),
                    &r.get::<_, Option<Vec<u8>>>(12),
                    &r.get::<_, Option<i32>>(13),
                    &r.get::<_, Option<DateTime<Utc>>>(14),
                    &r.get::<_, bool>(15),
                ],
            )
            .await?;
    }
    let (sales, item_ids): (Vec<i64>, Vec<i64>) = items
        .iter()
        .map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1)))
        .unzip();
    let rows = src
        .query(
            "SELECT r.txn_id, r.sale_id, r.item_id, r.user_id, r.quantity, r.state,
                    r.created_at, r.updated_at, r.attempt, r.ordered_at
             FROM unnest($1::bigint[], $2::bigint[]) AS k(s, i)
             JOIN reservations r ON r.sale_id = k.s AND r.item_id = k.i
             WHERE $3::timestamptz IS NULL OR r.updated_at >= $3 OR r.ordered_at >= $3",
            &[&sales, &item_ids, &since],
        )
        .await?;
    for chunk in rows.chunks(CHUNK) {
        written += write_reservations(dst, move_id, chunk).await?;
    }
    written += copy_draw_entries(src, dst, &sales, &item_ids).await?;
    written += copy_changes(src, dst, keys).await?;
    Ok(written)
}

/// A fair start's entries (immutable once drawn, and a move waits for the draw): the audit and the
/// verifier read them where the item lives.
async fn copy_draw_entries(
    src: &Client,
    dst: &Client,
    sales: &[i64],
    items: &[i64],
) -> Result<u64, DbError> {
    let rows = src
        .query(
            "SELECT e.sale_id, e.item_id, e.user_id, e.quantity, e.txn_id, e.entered_at,
                    e.rank_key, e.outcome, e.decided_at, e.ordered_at
             FROM unnest($1::bigint[], $2::bigint[]) AS k(s, i)
             JOIN draw_entries e ON e.sale_id = k.s AND e.item_id = k.i",
            &[&sales, &items],
        )
        .await?;
    let mut written = 0;
    for r in &rows {
        written += dst
            .execute(
                "INSERT INTO draw_entries (sale_id, item_id, user_id, quantity, txn_id, entered_at,
                     rank_key, outcome, decided_at, ordered_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                 ON CONFLICT (sale_id, item_id, user_id) DO NOTHING",
                &[
                    &r.get::<_, i64>(0),
                    &r.get::<_, i64>(1),
                    &r.get::<_, i64>(2),
                    &r.get::<_, i32>(3),
                    &r.get::<_, Uuid>(4),
                    &r.get::<_, DateTime<Utc>>(5),
                    &r.get::<_, Option<Vec<u8>>>(6),
                    &r.get::<_, Option<String>>(7),
                    &r.get::<_, Option<DateTime<Utc>>>(8),
                    &r.get::<_, Option<DateTime<Utc>>>(9),
                ],
            )
            .await?;
    }
    Ok(written)
}

/// The recorded changes of the sales among the keys and of the items among them (restocks): the
/// audit reads them where the sale and the item live. Ids are UUIDs, so a catch-up pass copies
/// each once.
async fn copy_changes(src: &Client, dst: &Client, keys: &[i64]) -> Result<u64, DbError> {
    let rows = src
        .query(
            "SELECT change_id, sale_id, item_id, change, detail, request_id, made_at
             FROM sale_changes
             WHERE (item_id IS NULL AND sale_id = ANY($1)) OR item_id = ANY($1)",
            &[&keys],
        )
        .await?;
    let mut written = 0;
    for r in &rows {
        written += dst
            .execute(
                "INSERT INTO sale_changes (change_id, sale_id, item_id, change, detail,
                     request_id, made_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (change_id) DO NOTHING",
                &[
                    &r.get::<_, Uuid>(0),
                    &r.get::<_, i64>(1),
                    &r.get::<_, Option<i64>>(2),
                    &r.get::<_, String>(3),
                    &r.get::<_, serde_json::Value>(4),
                    &r.get::<_, Option<String>>(5),
                    &r.get::<_, DateTime<Utc>>(6),
                ],
            )
            .await?;
    }
    Ok(written)
}

/// The sales whose ids are among the keys, fenced by the move on the destination like the items;
/// a catch-up pass carries the changes operators made meanwhile (their end, a pause).
async fn copy_sales(
    src: &Client,
    dst: &Client,
    move_id: i64,
    keys: &[i64],
) -> Result<u64, DbError> {
    let mut written = 0;
    for r in src
        .query(
            "SELECT sale_id, name, starts_at, ends_at, item_ids, payment_window_secs, protection,
                    created_at, fair_window_ms, fair_commitment, paused
             FROM sales WHERE sale_id = ANY($1)",
            &[&keys],
        )
        .await?
    {
        written += dst
        .execute(
            "INSERT INTO sales (sale_id, name, starts_at, ends_at, item_ids, payment_window_secs,
                 protection, created_at, fenced_by, fair_window_ms, fair_commitment, paused)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
             ON CONFLICT (sale_id) DO UPDATE
                SET fenced_by = EXCLUDED.fenced_by, ends_at = EXCLUDED.ends_at,
                    paused = EXCLUDED.paused
                WHERE sales.fenced_by IS NOT NULL",
            &[
                &r.get::<_, i64>(0),
                &r.get::<_, String>(1),
                &r.get::<_, DateTime<Utc>>(2),
                &r.get::<_, DateTime<Utc>>(3),
                &r.get::<_, Vec<i64>>(4),
                &r.get::<_, i32>(5),
                &r.get::<_, Option<serde_json::Value>>(6),
                &r.get::<_, DateTime<Utc>>(7),
                &move_id,
                &r.get::<_, i32>(8),
                &r.get::<_, Option<Vec<u8>>>(9),
                &r.get::<_, bool>(10),
            ],
        )
        .await?;
    }
    Ok(written)
}

/// Upsert reservations as read on the source, all columns; only those of items this move fenced on
/// the destination (a runner that lost its claim never overwrites a live copy).
async fn write_reservations(dst: &Client, move_id: i64, rows: &[Row]) -> Result<u64, DbError> {
    let txn: Vec<Uuid> = column(rows, 0);
    let (sale, item, user): (Vec<i64>, Vec<i64>, Vec<i64>) =
        (column(rows, 1), column(rows, 2), column(rows, 3));
    let (quantity, state): (Vec<i32>, Vec<String>) = (column(rows, 4), column(rows, 5));
    let (created, updated): (Vec<DateTime<Utc>>, Vec<DateTime<Utc>>) =
        (column(rows, 6), column(rows, 7));
    let attempt: Vec<i32> = column(rows, 8);
    let ordered: Vec<Option<DateTime<Utc>>> = column(rows, 9);
    let params: [&(dyn ToSql + Sync); 11] = [
        &txn, &sale, &item, &user, &quantity, &state, &created, &updated, &attempt, &ordered,
        &move_id,
    ];
    Ok(dst
        .execute(
            &format!(
                "INSERT INTO reservations ({RESERVATION_COLUMNS})
                 SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::bigint[], $4::bigint[],
                     $5::int[], $6::text[], $7::timestamptz[], $8::timestamptz[], $9::int[],
                     $10::timestamptz[]) AS x(t, s, i, u, q, st, c, up, a, o)
                 WHERE EXISTS (SELECT 1 FROM sale_items f WHERE f.sale_id = x.s AND f.item_id = x.i
                               AND f.fenced_by = $11)
                 ON CONFLICT (txn_id) DO UPDATE
                    SET user_id = EXCLUDED.user_id, quantity = EXCLUDED.quantity,
                        state = EXCLUDED.state, created_at = EXCLUDED.created_at,
                        updated_at = EXCLUDED.updated_at, attempt = EXCLUDED.attempt,
                        ordered_at = EXCLUDED.ordered_at"
            ),
            &params,
        )
        .await?)
}

/// Fence the keys' rows on the source: from the commit on, transaction 1 and releases refuse the
/// items there. Waits for the writers holding the rows (the UPDATE queues for their locks; rows
/// are taken in the order every writer takes them).
pub async fn fence(src: &mut Client, move_id: i64, keys: &[i64]) -> Result<u64, DbError> {
    let tx = src.transaction().await?;
    super::guard(&tx, move_id).await?;
    // The keys themselves: a sale created for one while it moves gets no rows here.
    tx.execute(
        "INSERT INTO item_fences (item_id, move_id) SELECT k, $2 FROM unnest($1::bigint[]) AS k
         ON CONFLICT (item_id) DO UPDATE SET move_id = EXCLUDED.move_id, until = NULL",
        &[&keys, &move_id],
    )
    .await?;
    tx.execute(
        "SELECT 1 FROM sale_items WHERE item_id = ANY($1) ORDER BY sale_id, item_id FOR UPDATE",
        &[&keys],
    )
    .await?;
    let n = tx
        .execute(
            "UPDATE sale_items SET fenced_by = $1
             WHERE item_id = ANY($2) AND (fenced_by IS NULL OR fenced_by = $1)",
            &[&move_id, &keys],
        )
        .await?;
    tx.execute(
        "UPDATE sales SET fenced_by = $1
         WHERE sale_id = ANY($2) AND (fenced_by IS NULL OR fenced_by = $1)",
        &[&move_id, &keys],
    )
    .await?;
    tx.commit().await?;
    Ok(n)
}

/// Lift this move's fence from a group (the destination at the switch, or the source when a move
/// is rolled back).
pub async fn unfence(
    client: &impl tokio_postgres::GenericClient,
    move_id: i64,
) -> Result<u64, DbError> {
    let n = client
        .execute(
            "UPDATE sale_items SET fenced_by = NULL WHERE fenced_by = $1",
            &[&move_id],
        )
        .await?;
    client
        .execute(
            "UPDATE sales SET fenced_by = NULL WHERE fenced_by = $1",
            &[&move_id],
        )
        .await?;
    client
        .execute("DELETE FROM item_fences WHERE move_id = $1", &[&move_id])
        .await?;
    Ok(n)
}

/// Drop this move's inactive copy from a group: the reservations of the items it fenced here, the
/// sales it fenced, and the `sale_items` rows too when `tombstones` is false. Only what this move
/// fenced is touched: a live copy is never dropped. With `tombstones` (completing a move: the
/// source) the fenced `sale_items` rows stay, so a node that still routes a key here is told it
/// moved.
pub(crate) async fn drop_copy(
    client: &mut Client,
    move_id: i64,
    tombstones: bool,
) -> Result<u64, DbError> {
    let tx = client.transaction().await?;
    let fenced = tx
        .query(
            "SELECT sale_id, item_id FROM sale_items WHERE fenced_by = $1
             ORDER BY sale_id, item_id FOR UPDATE",
            &[&move_id],
        )
        .await?;
    let (sales, items): (Vec<i64>, Vec<i64>) = fenced
        .iter()
        .map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1)))
        .unzip();
    let mut dropped = tx
        .execute(
            "DELETE FROM reservations r USING unnest($1::bigint[], $2::bigint[]) AS k(s, i)
             WHERE r.sale_id = k.s AND r.item_id = k.i",
            &[&sales, &items],
        )
        .await?;
    dropped += tx
        .execute("DELETE FROM sales WHERE fenced_by = $1", &[&move_id])
        .await?;
    if !tombstones {
        dropped += tx
            .execute("DELETE FROM sale_items WHERE fenced_by = $1", &[&move_id])
            .await?;
    }
    tx.commit().await?;
    Ok(dropped)
}

/// What a group holds of the keys.
pub(crate) async fn holdings(client: &Client, keys: &[i64]) -> Result<Holdings, DbError> {
    let r = client
        .query_one(
            "WITH si AS (SELECT * FROM sale_items WHERE item_id = ANY($1)),
                  live AS (SELECT item_id AS k FROM si WHERE fenced_by IS NULL
                           UNION
                           SELECT sale_id FROM sales WHERE sale_id = ANY($1)
                             AND fenced_by IS NULL),
                  held AS (SELECT item_id AS k FROM si
                           UNION SELECT sale_id FROM sales WHERE sale_id = ANY($1))
             SELECT (SELECT count(*) FROM si)
                    + (SELECT count(*) FROM sales WHERE sale_id = ANY($1))
                    + (SELECT count(*) FROM si JOIN reservations r
                           ON r.sale_id = si.sale_id AND r.item_id = si.item_id),
                    (SELECT count(*) FROM held),
                    (SELECT count(*) FROM live)",
            &[&keys],
        )
        .await?;
    let (rows, held, live): (i64, i64, i64) = (r.get(0), r.get(1), r.get(2));
    Ok(Holdings {
        rows,
        keys: held,
        live,
    })
}
