//! The SQL of a move of one item key: what is read on the source, written on the destination, and
//! how the fence is set and lifted. Every function is idempotent, so a resumed move simply runs
//! its phase again.
//!
//! What an item key holds on its group: its `sale_items` rows (one per sale it is part of), their
//! reservations, and the sale whose id is the key, if any (sales route with the items' router).

use crate::db::DbError;
use chrono::{DateTime, Utc};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row};
use uuid::Uuid;

/// Rows written per statement.
const CHUNK: usize = 5_000;

/// The instant from which a later pass copies: read while holding the item's rows (`FOR SHARE`),
/// so every writer that changes a reservation afterwards got the row lock after this instant and
/// stamps its change later (writers stamp `clock_timestamp()` under the lock).
pub async fn watermark(src: &mut Client, key: i64) -> Result<DateTime<Utc>, DbError> {
    let tx = src.transaction().await?;
    tx.execute(
        "SELECT 1 FROM sale_items WHERE item_id = $1 ORDER BY sale_id FOR SHARE",
        &[&key],
    )
    .await?;
    let at: DateTime<Utc> = tx.query_one("SELECT clock_timestamp()", &[]).await?.get(0);
    tx.commit().await?;
    Ok(at)
}

/// The sales of the key's `sale_items` rows on a group (for index-friendly reservation reads).
async fn sales_of(client: &Client, key: i64) -> Result<Vec<i64>, DbError> {
    Ok(client
        .query("SELECT sale_id FROM sale_items WHERE item_id = $1", &[&key])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

const RESERVATION_COLUMNS: &str =
    "txn_id, sale_id, item_id, user_id, quantity, state, created_at, updated_at, attempt";

/// Copy the key's rows from `src` to `dst`: the sale row, the `sale_items` rows (written fenced
/// by `move_id`: the copy stays inactive until the switch), and the reservations changed at or
/// after `since` (all of them when None). Returns how many rows were written.
pub async fn copy(
    src: &Client,
    dst: &mut Client,
    move_id: i64,
    key: i64,
    since: Option<DateTime<Utc>>,
) -> Result<u64, DbError> {
    let mut written = 0;
    if since.is_none() {
        written += copy_sale(src, dst, key).await?;
    }
    let items = src
        .query(
            "SELECT sale_id, item_id, stock, remaining, price_cents, per_user_limit, starts_at,
                    ends_at, payment_window_secs, version, protection
             FROM sale_items WHERE item_id = $1",
            &[&key],
        )
        .await?;
    for r in &items {
        written += dst
            .execute(
                "INSERT INTO sale_items (sale_id, item_id, stock, remaining, price_cents,
                     per_user_limit, starts_at, ends_at, payment_window_secs, version, protection,
                     fenced_by)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
                 ON CONFLICT (sale_id, item_id) DO UPDATE
                    SET stock = EXCLUDED.stock, remaining = EXCLUDED.remaining,
                        price_cents = EXCLUDED.price_cents, per_user_limit = EXCLUDED.per_user_limit,
                        starts_at = EXCLUDED.starts_at, ends_at = EXCLUDED.ends_at,
                        payment_window_secs = EXCLUDED.payment_window_secs,
                        version = EXCLUDED.version, protection = EXCLUDED.protection,
                        fenced_by = EXCLUDED.fenced_by
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
                ],
            )
            .await?;
    }
    let sales: Vec<i64> = items.iter().map(|r| r.get(0)).collect();
    let rows = src
        .query(
            &format!(
                "SELECT {RESERVATION_COLUMNS} FROM reservations
                 WHERE sale_id = ANY($1) AND item_id = $2
                   AND ($3::timestamptz IS NULL OR updated_at >= $3)"
            ),
            &[&sales, &key, &since],
        )
        .await?;
    for chunk in rows.chunks(CHUNK) {
        written += write_reservations(dst, chunk).await?;
    }
    Ok(written)
}

/// The sale whose id is the key (immutable once created, so written once).
async fn copy_sale(src: &Client, dst: &Client, key: i64) -> Result<u64, DbError> {
    let Some(r) = src
        .query_opt(
            "SELECT sale_id, name, starts_at, ends_at, item_ids, payment_window_secs, protection,
                    created_at
             FROM sales WHERE sale_id = $1",
            &[&key],
        )
        .await?
    else {
        return Ok(0);
    };
    Ok(dst
        .execute(
            "INSERT INTO sales (sale_id, name, starts_at, ends_at, item_ids, payment_window_secs,
                 protection, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (sale_id) DO NOTHING",
            &[
                &r.get::<_, i64>(0),
                &r.get::<_, String>(1),
                &r.get::<_, DateTime<Utc>>(2),
                &r.get::<_, DateTime<Utc>>(3),
                &r.get::<_, Vec<i64>>(4),
                &r.get::<_, i32>(5),
                &r.get::<_, Option<serde_json::Value>>(6),
                &r.get::<_, DateTime<Utc>>(7),
            ],
        )
        .await?)
}

/// Upsert reservations as read on the source, all columns.
async fn write_reservations(dst: &Client, rows: &[Row]) -> Result<u64, DbError> {
    let txn: Vec<Uuid> = rows.iter().map(|r| r.get(0)).collect();
    let sale: Vec<i64> = rows.iter().map(|r| r.get(1)).collect();
    let item: Vec<i64> = rows.iter().map(|r| r.get(2)).collect();
    let user: Vec<i64> = rows.iter().map(|r| r.get(3)).collect();
    let quantity: Vec<i32> = rows.iter().map(|r| r.get(4)).collect();
    let state: Vec<String> = rows.iter().map(|r| r.get(5)).collect();
    let created: Vec<DateTime<Utc>> = rows.iter().map(|r| r.get(6)).collect();
    let updated: Vec<DateTime<Utc>> = rows.iter().map(|r| r.get(7)).collect();
    let attempt: Vec<i32> = rows.iter().map(|r| r.get(8)).collect();
    let params: [&(dyn ToSql + Sync); 9] = [
        &txn, &sale, &item, &user, &quantity, &state, &created, &updated, &attempt,
    ];
    Ok(dst
        .execute(
            &format!(
                "INSERT INTO reservations ({RESERVATION_COLUMNS})
                 SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::bigint[], $4::bigint[],
                     $5::int[], $6::text[], $7::timestamptz[], $8::timestamptz[], $9::int[])
                 ON CONFLICT (txn_id) DO UPDATE
                    SET user_id = EXCLUDED.user_id, quantity = EXCLUDED.quantity,
                        state = EXCLUDED.state, created_at = EXCLUDED.created_at,
                        updated_at = EXCLUDED.updated_at, attempt = EXCLUDED.attempt"
            ),
            &params,
        )
        .await?)
}

/// Fence the key's rows on the source: from the commit on, transaction 1 and releases refuse the
/// item there. Waits for the writers holding the rows (the UPDATE queues for their locks).
pub async fn fence(src: &Client, move_id: i64, key: i64) -> Result<u64, DbError> {
    Ok(src
        .execute(
            "UPDATE sale_items SET fenced_by = $1
             WHERE item_id = $2 AND (fenced_by IS NULL OR fenced_by = $1)",
            &[&move_id, &key],
        )
        .await?)
}

/// Lift this move's fence from a group's rows of the key (the destination at the switch, or the
/// source when a move is rolled back).
pub async fn unfence(client: &Client, move_id: i64, key: i64) -> Result<u64, DbError> {
    Ok(client
        .execute(
            "UPDATE sale_items SET fenced_by = NULL WHERE item_id = $2 AND fenced_by = $1",
            &[&move_id, &key],
        )
        .await?)
}

/// Drop this move's inactive copy of the key from a group: the reservations and the sale row,
/// and the `sale_items` rows too when `tombstones` is false. Only rows fenced by this move are
/// touched: a live copy is never dropped. With `tombstones` (completing a move: the source) the
/// fenced `sale_items` rows stay, so a node that still routes the key here is told it moved.
pub async fn drop_copy(
    client: &mut Client,
    move_id: i64,
    key: i64,
    tombstones: bool,
) -> Result<u64, DbError> {
    let tx = client.transaction().await?;
    let fenced: Vec<i64> = tx
        .query(
            "SELECT sale_id FROM sale_items WHERE item_id = $1 AND fenced_by = $2 FOR UPDATE",
            &[&key, &move_id],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let live = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM sale_items WHERE item_id = $1
                            AND fenced_by IS DISTINCT FROM $2)",
            &[&key, &move_id],
        )
        .await?
        .get::<_, bool>(0);
    if live {
        // Another copy of the key lives here (not ours to drop): leave everything.
        tx.rollback().await?;
        return Ok(0);
    }
    let mut dropped = tx
        .execute(
            "DELETE FROM reservations WHERE sale_id = ANY($1) AND item_id = $2",
            &[&fenced, &key],
        )
        .await?;
    dropped += tx
        .execute("DELETE FROM sales WHERE sale_id = $1", &[&key])
        .await?;
    if !tombstones {
        dropped += tx
            .execute(
                "DELETE FROM sale_items WHERE item_id = $1 AND fenced_by = $2",
                &[&key, &move_id],
            )
            .await?;
    }
    tx.commit().await?;
    Ok(dropped)
}

/// What a group holds of the key: (sale_items rows, of which fenced, reservations, sale row).
pub async fn holdings(client: &Client, key: i64) -> Result<Holdings, DbError> {
    let sales = sales_of(client, key).await?;
    let r = client
        .query_one(
            "SELECT (SELECT count(*) FROM sale_items WHERE item_id = $2),
                    (SELECT count(*) FROM sale_items WHERE item_id = $2 AND fenced_by IS NOT NULL),
                    (SELECT count(*) FROM reservations WHERE sale_id = ANY($1) AND item_id = $2),
                    EXISTS (SELECT 1 FROM sales WHERE sale_id = $2)",
            &[&sales, &key],
        )
        .await?;
    Ok(Holdings {
        items: r.get(0),
        fenced: r.get(1),
        reservations: r.get(2),
        sale: r.get(3),
    })
}

/// What a group holds of one item key.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, utoipa::ToSchema)]
pub struct Holdings {
    /// `sale_items` rows (one per sale the item is part of).
    pub items: i64,
    /// Of which fenced by a move (a copy being filled, or an inactive one left behind).
    pub fenced: i64,
    pub reservations: i64,
    /// Whether the sale whose id is the key lives here.
    pub sale: bool,
}

impl Holdings {
    /// Rows a move would copy.
    pub fn rows(&self) -> i64 {
        self.items + self.reservations + i64::from(self.sale)
    }

    /// Nothing live: no rows, or only an inactive copy (every `sale_items` row fenced).
    pub fn nothing_live(&self) -> bool {
        if self.items > 0 {
            self.fenced == self.items
        } else {
            self.reservations == 0 && !self.sale
        }
    }
}
