//! The user group's statements: the order and its life. Transaction 2 of a purchase is a single
//! idempotent insert ([`insert_orders`]: an existing id is skipped); then the reads,
//! the status transitions (pay, cancel, expiry) with the user's slot fence, and the release
//! outbox they fill. The item group's statements are in [`super::reservations`].

use crate::db::DbError;
use crate::domain::{ItemId, SaleId, UserId};
use chrono::{DateTime, Utc};
use deadpool_postgres::ClientWrapper;
use serde::Serialize;

use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;
use uuid::Uuid;

/// Where an order is in its life (docs/dba.md "Order lifecycle"); the text is what the `orders.status`
/// column and the API carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    PendingPayment,
    Paid,
    Cancelled,
    Expired,
}

impl OrderStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::PendingPayment => "pending_payment",
            OrderStatus::Paid => "paid",
            OrderStatus::Cancelled => "cancelled",
            OrderStatus::Expired => "expired",
        }
    }

    /// The column's text; the table's CHECK constraint allows nothing else, so anything else is
    /// read as cancelled (it is certainly not payable).
    pub fn from_db(text: &str) -> Self {
        match text {
            "pending_payment" => OrderStatus::PendingPayment,
            "paid" => OrderStatus::Paid,
            "expired" => OrderStatus::Expired,
            _ => OrderStatus::Cancelled,
        }
    }

    /// Cancelled or expired: its stock went (or goes) back to the item.
    pub(crate) fn is_dead(self) -> bool {
        matches!(self, OrderStatus::Cancelled | OrderStatus::Expired)
    }
}

impl std::fmt::Display for OrderStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An order as the API shows it.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Order {
    pub order_id: Uuid,
    pub user_id: u64,
    pub sale_id: u64,
    pub item_id: u64,
    pub quantity: i32,
    pub amount_cents: i64,
    pub status: OrderStatus,
    #[serde(serialize_with = "crate::domain::utc_time::serialize")]
    pub(crate) created_at: DateTime<Utc>,
    #[serde(serialize_with = "crate::domain::utc_time::serialize")]
    pub expires_at: DateTime<Utc>,
    #[serde(serialize_with = "crate::domain::utc_time::option::serialize")]
    pub paid_at: Option<DateTime<Utc>>,
}

macro_rules! order_columns {
    () => {
        "order_id, user_id, sale_id, item_id, quantity, amount_cents, status, created_at, expires_at, paid_at"
    };
}

pub(crate) const ORDER_COLUMNS: &str = order_columns!();

/// A status change of a pending order, made on the user's group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transition {
    /// pending_payment -> cancelled.
    Cancel,
}

/// Whether a user is fenced by a move on this group ([`crate::moves`]), by its own fence or by
/// its slot's (`slot` is the user's slot; a slot's fence outlives the switch by a while, for the
/// nodes that still route the slot here): first statement of every transaction that changes the
/// user's orders or payments here. (The mover waits for the transactions that began before its
/// fence, so a check that passed is never overtaken.)
pub(crate) async fn check_user_fence(
    tx: &deadpool_postgres::Transaction<'_>,
    user: UserId,
    slot: i32,
) -> Result<(), DbError> {
    let stmt = tx
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM user_fences WHERE user_id = $1)
                 OR EXISTS (SELECT 1 FROM slot_fences WHERE kind = 'users' AND slot = $2
                            AND (until IS NULL OR until > now()))",
        )
        .await?;
    if tx
        .query_one(&stmt, &[&user.db(), &slot])
        .await?
        .get::<_, bool>(0)
    {
        return Err(DbError::Moving(format!("user {}", user.key())));
    }
    Ok(())
}

/// Apply a transition if the order is in a state that allows it; None when it is not (or the
/// order does not exist): the caller then reads the order to tell which. [`DbError::Moving`] when
/// the user is being moved to another group.
pub(crate) async fn transition_order(
    client: &mut ClientWrapper,
    user: UserId,
    slot: i32,
    order_id: Uuid,
    transition: Transition,
) -> Result<Option<Order>, DbError> {
    let sql = match transition {
        // The stock to return is recorded with the status change (migrations/V3).
        Transition::Cancel => concat!(
            "WITH o AS (
                 UPDATE orders SET status = 'cancelled', updated_at = now()
                 WHERE order_id = $1 AND user_id = $2 AND status = 'pending_payment'
                 RETURNING ",
            order_columns!(),
            "), ob AS (INSERT INTO release_outbox (order_id, item_id) SELECT order_id, item_id FROM o)
             SELECT * FROM o"
        ),
    };
    let tx = client.transaction().await?;
    check_user_fence(&tx, user, slot).await?;
    let stmt = tx.prepare_cached(sql).await?;
    let order = tx
        .query_opt(&stmt, &[&order_id, &user.db()])
        .await?
        .as_ref()
        .map(Order::from_row);
    tx.commit().await?;
    Ok(order)
}

impl Order {
    pub(crate) fn from_row(row: &Row) -> Self {
        Self::from_row_at(row, 0)
    }

    /// The order's columns from column `at` on.
    pub(crate) fn from_row_at(row: &Row, at: usize) -> Self {
        Self {
            order_id: row.get(at),
            user_id: row.get::<_, i64>(at + 1).unsigned_abs(),
            sale_id: row.get::<_, i64>(at + 2).unsigned_abs(),
            item_id: row.get::<_, i64>(at + 3).unsigned_abs(),
            quantity: row.get(at + 4),
            amount_cents: row.get(at + 5),
            status: OrderStatus::from_db(row.get(at + 6)),
            created_at: row.get(at + 7),
            expires_at: row.get(at + 8),
            paid_at: row.get(at + 9),
        }
    }
}

/// A new order for transaction 2.
#[derive(Debug, Clone, PartialEq)]
pub struct NewOrder {
    pub order_id: Uuid,
    pub user: UserId,
    pub sale: SaleId,
    pub item: ItemId,
    pub quantity: i32,
    pub amount_cents: i64,
    pub payment_window_secs: i32,
    pub status: OrderStatus,
}

/// Transaction 2: insert orders on one user group in one statement. Returns the orders this call
/// inserted; an id missing from the answer existed already (a retry, or a reconciler tombstone).
///
/// Orders of users fenced by a move are not inserted but reported ([`Inserted::moving`]): a user
/// fenced on its own, or any user of a slot being moved (`slot_count`: the users' hash slots).
///
/// An existing id is skipped by a probe of the primary key, not by `ON CONFLICT`: a speculative
/// insertion writes a second WAL record for every row (`HEAP_CONFIRM`, one in five records of a
/// user group's WAL in a hot run) and takes a lock for it, all to guard against a race that needs
/// two attempts of one request in flight at once. When that race happens (a unique violation: a
/// concurrent attempt, or the reconciler's tombstone, committed the id meanwhile), the statement
/// failed as a whole and wrote nothing, and it runs again with `ON CONFLICT DO NOTHING`.
pub async fn insert_orders(
    client: &ClientWrapper,
    orders: &[NewOrder],
    slot_count: u32,
) -> Result<Inserted, DbError> {
    let slots: Vec<i32> = orders
        .iter()
        .map(|o| crate::router::slot_of(o.user.key(), slot_count) as i32)
        .collect();
    let ids: Vec<Uuid> = orders.iter().map(|o| o.order_id).collect();
    let users: Vec<i64> = orders.iter().map(|o| o.user.db()).collect();
    let sales: Vec<i64> = orders.iter().map(|o| o.sale.db()).collect();
    let items: Vec<i64> = orders.iter().map(|o| o.item.db()).collect();
    let qty: Vec<i32> = orders.iter().map(|o| o.quantity).collect();
    let amount: Vec<i64> = orders.iter().map(|o| o.amount_cents).collect();
    let window: Vec<i32> = orders.iter().map(|o| o.payment_window_secs).collect();
    let status: Vec<&str> = orders.iter().map(|o| o.status.as_str()).collect();
    // `OFFSET 0` keeps the probe a subplan run per row: as a join, a stale row count of `orders`
    // (a sale's first minutes) could make the planner read the whole table for each batch.
    const PROBE: &str = "AND NOT EXISTS (SELECT 1 FROM orders x WHERE x.order_id = t.o OFFSET 0)";
    const SPECULATE: &str = "ON CONFLICT (order_id) DO NOTHING";
    let params: [&(dyn ToSql + Sync); 9] = [
        &ids, &users, &sales, &items, &qty, &amount, &status, &window, &slots,
    ];
    let rows = match insert_statement(client, PROBE, &params).await {
        Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
            insert_statement(client, SPECULATE, &params).await?
        }
        rows => rows?,
    };
    let (mut inserted, mut moving) = (Vec::new(), Vec::new());
    for r in &rows {
        if r.get::<_, bool>(0) {
            moving.push(r.get::<_, Uuid>(1));
        } else {
            inserted.push(Order::from_row_at(r, 1));
        }
    }
    Ok(Inserted {
        orders: inserted,
        moving,
    })
}

/// [`insert_orders`]'s statement, skipping existing ids with `skip_existing`.
async fn insert_statement(
    client: &ClientWrapper,
    skip_existing: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<Row>, tokio_postgres::Error> {
    // One statement (one snapshot): the users fenced by a move are skipped and reported.
    let sql = format!(
        "WITH t AS (
             SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::bigint[], $4::bigint[], $5::int[],
                                  $6::bigint[], $7::text[], $8::int[]) AS t(o, u, s, i, q, a, st, w)),
         f AS (SELECT user_id FROM user_fences WHERE user_id = ANY($2)
               UNION
               SELECT u FROM unnest($2::bigint[], $9::int[]) AS us(u, sl)
               WHERE sl IN (SELECT slot FROM slot_fences WHERE kind = 'users'
                            AND (until IS NULL OR until > now()))),
         ins AS (
             INSERT INTO orders (order_id, user_id, sale_id, item_id, quantity, amount_cents, status, expires_at)
             SELECT o, u, s, i, q, a, st, now() + make_interval(secs => w)
             FROM t WHERE u NOT IN (SELECT user_id FROM f)
               {skip_existing}
             RETURNING {ORDER_COLUMNS})
         SELECT false, * FROM ins
         UNION ALL
         SELECT true, o, u, s, i, q, a, st, now(), now(), NULL::timestamptz
         FROM t WHERE u IN (SELECT user_id FROM f)"
    );
    client
        .query(&client.prepare_cached(&sql).await?, params)
        .await
}

/// What [`insert_orders`] did.
#[derive(Debug, Default)]
pub struct Inserted {
    /// The orders inserted (an order that existed already is not among them).
    pub orders: Vec<Order>,
    /// The ids of orders not inserted because their user is being moved to another group.
    pub moving: Vec<Uuid>,
}

pub(crate) async fn get_order(
    client: &ClientWrapper,
    user: UserId,
    order_id: Uuid,
) -> Result<Option<Order>, DbError> {
    let sql = format!("SELECT {ORDER_COLUMNS} FROM orders WHERE order_id = $1 AND user_id = $2");
    Ok(client
        .query_opt(
            &client.prepare_cached(&sql).await?,
            &[&order_id, &user.db()],
        )
        .await?
        .as_ref()
        .map(Order::from_row))
}

/// The order, but only once the shadow holds it too: the lookup runs in a transaction that takes
/// a transaction id, so its COMMIT waits for synchronous replication like any write, and that
/// commit comes after the order's own. A replay must never report an order that a failover could
/// still lose (e.g. one whose commit waited for the shadow and was cancelled by a DBA).
pub(crate) async fn get_order_durable(
    client: &mut ClientWrapper,
    user: UserId,
    order_id: Uuid,
) -> Result<Option<Order>, DbError> {
    let sql = format!("SELECT {ORDER_COLUMNS}, pg_current_xact_id() FROM orders WHERE order_id = $1 AND user_id = $2");
    let tx = client.transaction().await?;
    let stmt = tx.prepare_cached(&sql).await?;
    let order = tx.query_opt(&stmt, &[&order_id, &user.db()]).await?;
    tx.commit().await?;
    Ok(order.as_ref().map(Order::from_row))
}

/// Expire due unpaid orders of one group (at most `batch`; `only` restricts it to one order),
/// recording the stock each must return in the release outbox in the same statement. Rows are
/// claimed with `FOR UPDATE SKIP LOCKED` and the status change is conditional, so several sweepers
/// expire each order once. Returns `(order_id, item_id)` of each.
pub(crate) async fn expire_due(
    client: &ClientWrapper,
    only: Option<Uuid>,
    batch: i64,
) -> Result<Vec<(Uuid, i64)>, DbError> {
    let stmt = client
        .prepare_cached(
            "WITH due AS (
                 SELECT order_id FROM orders
                 WHERE status = 'pending_payment' AND expires_at <= now()
                   AND ($1::uuid IS NULL OR order_id = $1)
                   AND NOT EXISTS (SELECT 1 FROM user_fences f WHERE f.user_id = orders.user_id)
                 ORDER BY expires_at LIMIT $2
                 FOR UPDATE SKIP LOCKED),
             o AS (
                 UPDATE orders o SET status = 'expired', updated_at = now()
                 FROM due WHERE o.order_id = due.order_id
                 RETURNING o.order_id, o.item_id),
             ob AS (INSERT INTO release_outbox (order_id, item_id) SELECT order_id, item_id FROM o)
             SELECT order_id, item_id FROM o",
        )
        .await?;
    let rows = client.query(&stmt, &[&only, &batch]).await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Releases recorded in the outbox that are due (recorded, or last tried, at least `min_age` ago:
/// a younger one is still being done by the request that recorded it): `(order_id, item_id)`,
/// the longest-waiting first.
pub(crate) async fn pending_releases(
    client: &ClientWrapper,
    min_age: std::time::Duration,
    limit: i64,
) -> Result<Vec<(Uuid, i64)>, DbError> {
    let stmt = client
        .prepare_cached(
            "SELECT order_id, item_id FROM release_outbox
             WHERE next_attempt_at <= now() - make_interval(secs => $1)
             ORDER BY next_attempt_at LIMIT $2",
        )
        .await?;
    let rows = client
        .query(&stmt, &[&min_age.as_secs_f64(), &limit])
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Outbox entries whose release failed go to the back of the queue.
pub(crate) async fn postpone_releases(
    client: &ClientWrapper,
    order_ids: &[Uuid],
) -> Result<(), DbError> {
    let stmt = client
        .prepare_cached(
            "UPDATE release_outbox SET next_attempt_at = now() WHERE order_id = ANY($1)",
        )
        .await?;
    client.execute(&stmt, &[&order_ids]).await?;
    Ok(())
}

/// Forget outbox entries whose release is done.
pub(crate) async fn forget_releases(
    client: &ClientWrapper,
    order_ids: &[Uuid],
) -> Result<(), DbError> {
    let stmt = client
        .prepare_cached("DELETE FROM release_outbox WHERE order_id = ANY($1)")
        .await?;
    client.execute(&stmt, &[&order_ids]).await?;
    Ok(())
}

pub(crate) async fn get_orders_by_id(
    client: &ClientWrapper,
    ids: &[Uuid],
) -> Result<Vec<Order>, DbError> {
    let sql = format!("SELECT {ORDER_COLUMNS} FROM orders WHERE order_id = ANY($1)");
    Ok(client
        .query(&client.prepare_cached(&sql).await?, &[&ids])
        .await?
        .iter()
        .map(Order::from_row)
        .collect())
}

pub(crate) async fn list_orders(
    client: &ClientWrapper,
    user: UserId,
    limit: i64,
) -> Result<Vec<Order>, DbError> {
    let sql = format!(
        "SELECT {ORDER_COLUMNS} FROM orders WHERE user_id = $1 ORDER BY created_at DESC, order_id LIMIT $2"
    );
    Ok(client
        .query(&client.prepare_cached(&sql).await?, &[&user.db(), &limit])
        .await?
        .iter()
        .map(Order::from_row)
        .collect())
}
