//! The SQL of a move of user keys: a user's orders, payments and pending stock releases (the
//! release outbox) move from one user group to another.
//!
//! The fence is a row per user in `user_fences`. Every transaction that changes a user's rows
//! checks it first (order inserts in the same statement; cancels and payments as their first
//! statement; the expiry sweep skips fenced users), and after fencing the mover waits for the
//! transactions that began before the fence: from then on nothing changes the users' rows. The
//! destination's copy is fenced the same way until the switch, so its sweeper leaves it alone.
//!
//! "Changed since" is judged by `orders.updated_at` and `payments.received_at` (the writing
//! transaction's start): a pass's watermark is the start of the oldest transaction still running
//! on the source when the pass begins (sessions of the engine's own role, which does all the
//! writing), so a change committed after the pass read its rows is stamped later. Outbox entries
//! are copied whole every pass (there are few); one the source forgets afterwards is released
//! once more from the destination, which is harmless (a release is idempotent).

use super::{column, Holdings, CHUNK};
use crate::db::DbError;
use chrono::{DateTime, Utc};
use tokio_postgres::types::ToSql;
use tokio_postgres::Client;
use uuid::Uuid;

type Ts = DateTime<Utc>;

/// Every user with rows on a group that are live or fenced by `move_id`.
pub(crate) async fn candidates(client: &Client, move_id: i64) -> Result<Vec<i64>, DbError> {
    Ok(client
        .query(
            "SELECT k FROM (SELECT user_id AS k FROM orders UNION SELECT user_id FROM payments) u
             WHERE NOT EXISTS (SELECT 1 FROM user_fences f WHERE f.user_id = u.k
                               AND f.move_id <> $1)",
            &[&move_id],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// The start of the oldest transaction running on the server now (or now).
pub(crate) async fn watermark(src: &mut Client, _keys: &[i64]) -> Result<DateTime<Utc>, DbError> {
    Ok(src
        .query_one(
            "SELECT least(clock_timestamp(), min(xact_start)) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()
               AND usename = current_user AND backend_type = 'client backend'
               AND xact_start IS NOT NULL",
            &[],
        )
        .await?
        .get(0))
}

/// Fence `keys` on a group for `move_id`: the source at the fence, or the destination before it
/// is copied to (`copy_target`: there only users without live rows, so a runner that lost its
/// claim can never fence a destination that went live).
async fn add_fences(
    client: &Client,
    move_id: i64,
    keys: &[i64],
    copy_target: bool,
) -> Result<u64, DbError> {
    Ok(client
        .execute(
            "INSERT INTO user_fences (user_id, move_id)
             SELECT u, $2 FROM unnest($1::bigint[]) AS k(u)
             WHERE NOT $3
                OR EXISTS (SELECT 1 FROM user_fences f WHERE f.user_id = k.u)
                OR NOT (EXISTS (SELECT 1 FROM orders o WHERE o.user_id = k.u)
                        OR EXISTS (SELECT 1 FROM payments p WHERE p.user_id = k.u))
             ON CONFLICT (user_id) DO UPDATE SET move_id = EXCLUDED.move_id",
            &[&keys, &move_id, &copy_target],
        )
        .await?)
}

/// Copy the users' orders and payments changed at or after `since` (all when None) and their
/// outbox entries from `src` to `dst`, fencing them on `dst` first. Returns the rows written.
pub(crate) async fn copy(
    src: &Client,
    dst: &mut Client,
    move_id: i64,
    keys: &[i64],
    since: Option<DateTime<Utc>>,
) -> Result<u64, DbError> {
    add_fences(dst, move_id, keys, true).await?;
    Ok(copy_orders(src, dst, move_id, keys, since).await?
        + copy_payments(src, dst, move_id, keys, since).await?
        + copy_outbox(src, dst, move_id, keys).await?)
}

/// The orders changed at or after `since` (all when None), onto the fenced users only.
async fn copy_orders(
    src: &Client,
    dst: &Client,
    move_id: i64,
    keys: &[i64],
    since: Option<DateTime<Utc>>,
) -> Result<u64, DbError> {
    let mut written = 0;
    let orders = src
        .query(
            "SELECT order_id, user_id, sale_id, item_id, quantity, amount_cents, status,
                    created_at, expires_at, paid_at, updated_at
             FROM orders WHERE user_id = ANY($1)
               AND ($2::timestamptz IS NULL OR updated_at >= $2)",
            &[&keys, &since],
        )
        .await?;
    for rows in orders.chunks(CHUNK) {
        let (id, user, sale, item): (Vec<Uuid>, Vec<i64>, Vec<i64>, Vec<i64>) = (
            column(rows, 0),
            column(rows, 1),
            column(rows, 2),
            column(rows, 3),
        );
        let (quantity, amount, status): (Vec<i32>, Vec<i64>, Vec<String>) =
            (column(rows, 4), column(rows, 5), column(rows, 6));
        let (created, expires, paid, updated): (Vec<Ts>, Vec<Ts>, Vec<Option<Ts>>, Vec<Ts>) = (
            column(rows, 7),
            column(rows, 8),
            column(rows, 9),
            column(rows, 10),
        );
        let params: [&(dyn ToSql + Sync); 12] = [
            &id, &user, &sale, &item, &quantity, &amount, &status, &created, &expires, &paid,
            &updated, &move_id,
        ];
        written += dst
            .execute(
                "INSERT INTO orders (order_id, user_id, sale_id, item_id, quantity, amount_cents,
                     status, created_at, expires_at, paid_at, updated_at)
                 SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::bigint[], $4::bigint[],
                     $5::int[], $6::bigint[], $7::text[], $8::timestamptz[], $9::timestamptz[],
                     $10::timestamptz[], $11::timestamptz[]) AS x(o, u, s, i, q, a, st, c, e, p, up)
                 WHERE EXISTS (SELECT 1 FROM user_fences f WHERE f.user_id = x.u AND f.move_id = $12)
                 ON CONFLICT (order_id) DO UPDATE
                    SET status = EXCLUDED.status, paid_at = EXCLUDED.paid_at,
                        expires_at = EXCLUDED.expires_at, updated_at = EXCLUDED.updated_at",
                &params,
            )
            .await?;
    }
    Ok(written)
}

/// The payments received at or after `since` (all when None), onto the fenced users only.
async fn copy_payments(
    src: &Client,
    dst: &Client,
    move_id: i64,
    keys: &[i64],
    since: Option<DateTime<Utc>>,
) -> Result<u64, DbError> {
    let mut written = 0;
    let payments = src
        .query(
            "SELECT payment_ref, order_id, user_id, sale_id, amount_cents, state, reason,
                    received_at
             FROM payments WHERE user_id = ANY($1)
               AND ($2::timestamptz IS NULL OR received_at >= $2)",
            &[&keys, &since],
        )
        .await?;
    for rows in payments.chunks(CHUNK) {
        let (payment, order, user, sale): (Vec<String>, Vec<Uuid>, Vec<i64>, Vec<Option<i64>>) = (
            column(rows, 0),
            column(rows, 1),
            column(rows, 2),
            column(rows, 3),
        );
        let (amount, state, reason, received): (
            Vec<i64>,
            Vec<String>,
            Vec<Option<String>>,
            Vec<Ts>,
        ) = (
            column(rows, 4),
            column(rows, 5),
            column(rows, 6),
            column(rows, 7),
        );
        let params: [&(dyn ToSql + Sync); 9] = [
            &payment, &order, &user, &sale, &amount, &state, &reason, &received, &move_id,
        ];
        written += dst
            .execute(
                "INSERT INTO payments (payment_ref, order_id, user_id, sale_id, amount_cents, state,
                     reason, received_at)
                 SELECT * FROM unnest($1::text[], $2::uuid[], $3::bigint[], $4::bigint[],
                     $5::bigint[], $6::text[], $7::text[], $8::timestamptz[])
                     AS x(r, o, u, s, a, st, re, rc)
                 WHERE EXISTS (SELECT 1 FROM user_fences f WHERE f.user_id = x.u AND f.move_id = $9)
                 ON CONFLICT (payment_ref) DO NOTHING",
                &params,
            )
            .await?;
    }
    Ok(written)
}

/// The release outbox entries of the users' orders, onto the fenced users only.
async fn copy_outbox(
    src: &Client,
    dst: &Client,
    move_id: i64,
    keys: &[i64],
) -> Result<u64, DbError> {
    let mut written = 0;
    let outbox = src
        .query(
            "SELECT ob.order_id, ob.item_id, ob.created_at, o.user_id FROM release_outbox ob
             JOIN orders o ON o.order_id = ob.order_id WHERE o.user_id = ANY($1)",
            &[&keys],
        )
        .await?;
    for rows in outbox.chunks(CHUNK) {
        let (order, item, created, user): (Vec<Uuid>, Vec<i64>, Vec<Ts>, Vec<i64>) = (
            column(rows, 0),
            column(rows, 1),
            column(rows, 2),
            column(rows, 3),
        );
        let params: [&(dyn ToSql + Sync); 5] = [&order, &item, &created, &user, &move_id];
        written += dst
            .execute(
                "INSERT INTO release_outbox (order_id, item_id, created_at)
                 SELECT o, i, c FROM unnest($1::uuid[], $2::bigint[], $3::timestamptz[], $4::bigint[])
                     AS x(o, i, c, u)
                 WHERE EXISTS (SELECT 1 FROM user_fences f WHERE f.user_id = x.u AND f.move_id = $5)
                 ON CONFLICT (order_id) DO NOTHING",
                &params,
            )
            .await?;
    }
    Ok(written)
}

/// Fence the users on the source, then wait until every transaction that began before the fence
/// has ended: from then on nothing changes their rows there.
pub async fn fence(src: &mut Client, move_id: i64, keys: &[i64]) -> Result<u64, DbError> {
    let tx = src.transaction().await?;
    super::guard(&tx, move_id).await?;
    let n = tx
        .execute(
            "INSERT INTO user_fences (user_id, move_id) SELECT u, $2 FROM unnest($1::bigint[]) AS u
             ON CONFLICT (user_id) DO UPDATE SET move_id = EXCLUDED.move_id",
            &[&keys, &move_id],
        )
        .await?;
    tx.commit().await?;
    super::wait_out_older(src).await?;
    Ok(n)
}

/// Lift this move's fence from a group.
pub async fn unfence(
    client: &impl tokio_postgres::GenericClient,
    move_id: i64,
) -> Result<u64, DbError> {
    Ok(client
        .execute("DELETE FROM user_fences WHERE move_id = $1", &[&move_id])
        .await?)
}

/// Drop this move's inactive copy of the users from a group (only users this move fenced here);
/// with `tombstones` their fences stay, so a node still routing them here is told they moved.
pub(crate) async fn drop_copy(
    client: &mut Client,
    move_id: i64,
    tombstones: bool,
) -> Result<u64, DbError> {
    let tx = client.transaction().await?;
    let users: Vec<i64> = tx
        .query(
            "SELECT user_id FROM user_fences WHERE move_id = $1 FOR UPDATE",
            &[&move_id],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut dropped = tx
        .execute(
            "DELETE FROM release_outbox ob USING orders o
             WHERE o.order_id = ob.order_id AND o.user_id = ANY($1)",
            &[&users],
        )
        .await?;
    dropped += tx
        .execute("DELETE FROM payments WHERE user_id = ANY($1)", &[&users])
        .await?;
    dropped += tx
        .execute("DELETE FROM orders WHERE user_id = ANY($1)", &[&users])
        .await?;
    if !tombstones {
        dropped += tx
            .execute("DELETE FROM user_fences WHERE move_id = $1", &[&move_id])
            .await?;
    }
    tx.commit().await?;
    Ok(dropped)
}

/// What a group holds of the users.
pub(crate) async fn holdings(client: &Client, keys: &[i64]) -> Result<Holdings, DbError> {
    let r = client
        .query_one(
            "WITH held AS (SELECT user_id AS k FROM orders WHERE user_id = ANY($1)
                           UNION SELECT user_id FROM payments WHERE user_id = ANY($1))
             SELECT (SELECT count(*) FROM orders WHERE user_id = ANY($1))
                    + (SELECT count(*) FROM payments WHERE user_id = ANY($1)),
                    (SELECT count(*) FROM held),
                    (SELECT count(*) FROM held
                     WHERE NOT EXISTS (SELECT 1 FROM user_fences f WHERE f.user_id = held.k))",
            &[&keys],
        )
        .await?;
    Ok(Holdings {
        rows: r.get(0),
        keys: r.get(1),
        live: r.get(2),
    })
}
