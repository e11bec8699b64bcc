//! Payments: the payment service's callbacks, applied to orders and recorded, accepted or not.
//!
//! A callback names an order, its user, an amount and the provider's `payment_ref`. On the
//! user's group, in one transaction with the order's row locked: if the `payment_ref` was seen
//! before, the recorded answer is given again (idempotent); otherwise [`decide`] says what the
//! payment does, the order changes accordingly, and the payment is recorded — `applied`, or
//! `refund_due` with the reason (wrong amount, order already paid by another payment, cancelled,
//! expired, unknown). The transaction takes a transaction id, so its commit waits for the
//! synchronous shadow: an answer, replays included, never reports a payment a failover could lose.

use super::store::{Order, OrderStatus};
use crate::db::DbError;
use crate::domain::UserId;
use chrono::{DateTime, Utc};
use deadpool_postgres::ClientWrapper;
use serde::Serialize;
use uuid::Uuid;

/// A payment callback after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Notice {
    pub order_id: Uuid,
    pub user: UserId,
    pub amount_cents: i64,
    pub payment_ref: String,
}

/// What became of a recorded payment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PaymentState {
    /// It paid its order.
    Applied,
    /// It paid nothing (see its reason): the money goes back.
    RefundDue,
}

impl PaymentState {
    pub fn as_str(self) -> &'static str {
        match self {
            PaymentState::Applied => "applied",
            PaymentState::RefundDue => "refund_due",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "applied" => Some(PaymentState::Applied),
            "refund_due" => Some(PaymentState::RefundDue),
            _ => None,
        }
    }
}

/// Why a payment did not pay its order (recorded as `refund_due`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Refused {
    AmountMismatch,
    OrderPaid,
    OrderCancelled,
    OrderExpired,
    OrderNotFound,
}

impl Refused {
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::AmountMismatch => "amount_mismatch",
            Refused::OrderPaid => "order_paid",
            Refused::OrderCancelled => "order_cancelled",
            Refused::OrderExpired => "order_expired",
            Refused::OrderNotFound => "order_not_found",
        }
    }

    fn from_db(text: &str) -> Self {
        match text {
            "amount_mismatch" => Refused::AmountMismatch,
            "order_paid" => Refused::OrderPaid,
            "order_cancelled" => Refused::OrderCancelled,
            "order_expired" => Refused::OrderExpired,
            _ => Refused::OrderNotFound,
        }
    }
}

/// What a payment does to its order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Pay the order.
    Apply,
    /// The order is pending but past its window: expire it (its stock returns), refuse.
    ExpireAndRefuse,
    Refuse(Refused),
}

/// The decision for a new payment (pure; the order as read under its row lock, and whether its
/// window had passed by the database's clock).
pub(crate) fn decide(order: Option<&Order>, amount_cents: i64, past_window: bool) -> Decision {
    let Some(order) = order else {
        return Decision::Refuse(Refused::OrderNotFound);
    };
    match order.status {
        OrderStatus::Paid => Decision::Refuse(Refused::OrderPaid),
        OrderStatus::Cancelled => Decision::Refuse(Refused::OrderCancelled),
        OrderStatus::Expired => Decision::Refuse(Refused::OrderExpired),
        // The amount first: a wrong amount leaves the order as it is, even a late one.
        OrderStatus::PendingPayment if order.amount_cents != amount_cents => {
            Decision::Refuse(Refused::AmountMismatch)
        }
        OrderStatus::PendingPayment if past_window => Decision::ExpireAndRefuse,
        OrderStatus::PendingPayment => Decision::Apply,
    }
}

/// A recorded payment, as the admin API and the settlement reconciliation see it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Payment {
    pub payment_ref: String,
    pub order_id: Uuid,
    pub user_id: u64,
    pub sale_id: Option<u64>,
    pub amount_cents: i64,
    pub state: PaymentState,
    pub reason: Option<Refused>,
    pub(crate) received_at: DateTime<Utc>,
}

impl Payment {
    fn from_row(r: &tokio_postgres::Row) -> Self {
        Self {
            payment_ref: r.get(0),
            order_id: r.get(1),
            user_id: r.get::<_, i64>(2).unsigned_abs(),
            sale_id: r.get::<_, Option<i64>>(3).map(i64::unsigned_abs),
            amount_cents: r.get(4),
            state: PaymentState::parse(r.get(5)).unwrap_or(PaymentState::RefundDue),
            reason: r.get::<_, Option<&str>>(6).map(Refused::from_db),
            received_at: r.get(7),
        }
    }
}

const PAYMENT_COLUMNS: &str =
    "payment_ref, order_id, user_id, sale_id, amount_cents, state, reason, received_at";

/// The outcome of a callback.
#[derive(Debug, Clone)]
pub struct Settled {
    /// The order as it is now (None when it does not exist).
    pub order: Option<Order>,
    pub payment: Payment,
    /// The same `payment_ref` was seen before: this is its recorded answer.
    pub replayed: bool,
    /// The order was expired by this callback: its stock must go back.
    pub(crate) expired_now: bool,
}

/// Apply one callback on the user's group (module docs). `Ok(None)`: another callback with the
/// same `payment_ref` was being recorded at the same moment; try again.
pub(crate) async fn settle(
    client: &mut ClientWrapper,
    notice: &Notice,
    slot: i32,
) -> Result<Option<Settled>, DbError> {
    let tx = client.transaction().await?;
    super::store::check_user_fence(&tx, notice.user, slot).await?;
    // The database's clock judges the window, as the sweeper's does.
    let order_sql = format!(
        "SELECT {}, expires_at <= now(), pg_current_xact_id() FROM orders
         WHERE order_id = $1 AND user_id = $2 FOR UPDATE",
        super::store::ORDER_COLUMNS
    );
    let order_stmt = tx.prepare_cached(&order_sql).await?;
    let row = tx
        .query_opt(&order_stmt, &[&notice.order_id, &notice.user.db()])
        .await?;
    let past_window = row.as_ref().is_some_and(|r| r.get::<_, bool>(10));
    let order = row.as_ref().map(Order::from_row);
    // After the order's lock, so a concurrent callback with the same ref has committed by now.
    let seen_sql = format!("SELECT {PAYMENT_COLUMNS} FROM payments WHERE payment_ref = $1");
    let seen_stmt = tx.prepare_cached(&seen_sql).await?;
    if let Some(row) = tx.query_opt(&seen_stmt, &[&notice.payment_ref]).await? {
        tx.commit().await?;
        return Ok(Some(Settled {
            order,
            payment: Payment::from_row(&row),
            replayed: true,
            expired_now: false,
        }));
    }
    let decision = decide(order.as_ref(), notice.amount_cents, past_window);
    let (state, reason) = match decision {
        Decision::Apply => (PaymentState::Applied, None),
        Decision::ExpireAndRefuse => (PaymentState::RefundDue, Some(Refused::OrderExpired)),
        Decision::Refuse(r) => (PaymentState::RefundDue, Some(r)),
    };
    let order = match (decision, order) {
        (Decision::Apply, Some(_)) => Some(change_status(&tx, notice, OrderStatus::Paid).await?),
        (Decision::ExpireAndRefuse, Some(_)) => {
            Some(change_status(&tx, notice, OrderStatus::Expired).await?)
        }
        (_, order) => order,
    };
    let insert_sql = format!(
        "INSERT INTO payments (payment_ref, order_id, user_id, sale_id, amount_cents, state, reason)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (payment_ref) DO NOTHING
         RETURNING {PAYMENT_COLUMNS}"
    );
    let insert = tx.prepare_cached(&insert_sql).await?;
    let sale = order.as_ref().map(|o| o.sale_id as i64);
    let recorded = tx
        .query_opt(
            &insert,
            &[
                &notice.payment_ref,
                &notice.order_id,
                &notice.user.db(),
                &sale,
                &notice.amount_cents,
                &state.as_str(),
                &reason.map(Refused::as_str),
            ],
        )
        .await?;
    let Some(row) = recorded else {
        // The same ref was recorded meanwhile by a callback that locked no order row.
        tx.rollback().await?;
        return Ok(None);
    };
    tx.commit().await?;
    Ok(Some(Settled {
        order,
        payment: Payment::from_row(&row),
        replayed: false,
        expired_now: decision == Decision::ExpireAndRefuse,
    }))
}

/// Move the (locked, pending) order to `paid` or `expired`; an expiry records its release in the
/// outbox, as the sweeper's does.
async fn change_status(
    tx: &deadpool_postgres::Transaction<'_>,
    notice: &Notice,
    to: OrderStatus,
) -> Result<Order, DbError> {
    let to = to.as_str();
    let sql = format!(
        "WITH o AS (
             UPDATE orders SET status = $3,
                 paid_at = CASE WHEN $3 = 'paid' THEN now() ELSE paid_at END, updated_at = now()
             WHERE order_id = $1 AND user_id = $2
             RETURNING {cols}),
         ob AS (INSERT INTO release_outbox (order_id, item_id)
                SELECT order_id, item_id FROM o WHERE $3 = 'expired')
         SELECT {cols} FROM o",
        cols = super::store::ORDER_COLUMNS
    );
    let stmt = tx.prepare_cached(&sql).await?;
    let row = tx
        .query_one(&stmt, &[&notice.order_id, &notice.user.db(), &to])
        .await?;
    Ok(Order::from_row(&row))
}

/// Recorded payments of one group, newest first: of one sale and/or in one state.
pub(crate) async fn list(
    client: &ClientWrapper,
    sale: Option<i64>,
    state: Option<PaymentState>,
    limit: i64,
) -> Result<Vec<Payment>, DbError> {
    let state = state.map(PaymentState::as_str);
    // Two shapes, not one with optional filters: a generic plan would read every payment.
    let rows = match sale {
        Some(sale) => {
            let sql = format!(
                "SELECT {PAYMENT_COLUMNS} FROM payments WHERE sale_id = $1 AND ($2::text IS NULL OR state = $2)
                 ORDER BY received_at DESC LIMIT $3"
            );
            let stmt = client.prepare_cached(&sql).await?;
            client.query(&stmt, &[&sale, &state, &limit]).await?
        }
        None => {
            let sql = format!(
                "SELECT {PAYMENT_COLUMNS} FROM payments WHERE ($1::text IS NULL OR state = $1)
                 ORDER BY received_at DESC LIMIT $2"
            );
            let stmt = client.prepare_cached(&sql).await?;
            client.query(&stmt, &[&state, &limit]).await?
        }
    };
    Ok(rows.iter().map(Payment::from_row).collect())
}

/// Every recorded payment of one group, for the settlement reconciliation (paged by ref).
pub(crate) async fn all_after(
    client: &ClientWrapper,
    after: &str,
    limit: i64,
) -> Result<Vec<Payment>, DbError> {
    let sql = format!(
        "SELECT {PAYMENT_COLUMNS} FROM payments WHERE payment_ref > $1 ORDER BY payment_ref LIMIT $2"
    );
    let stmt = client.prepare_cached(&sql).await?;
    Ok(client
        .query(&stmt, &[&after, &limit])
        .await?
        .iter()
        .map(Payment::from_row)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(status: OrderStatus, amount: i64, expires_in_secs: i64) -> Order {
        let now = Utc::now();
        Order {
            order_id: Uuid::from_u128(1),
            user_id: 1,
            sale_id: 1,
            item_id: 1,
            quantity: 1,
            amount_cents: amount,
            status,
            created_at: now,
            expires_at: now + chrono::Duration::seconds(expires_in_secs),
            paid_at: None,
        }
    }

    #[test]
    fn every_case_has_its_decision() {
        let pending = order(OrderStatus::PendingPayment, 500, 60);
        assert_eq!(decide(Some(&pending), 500, false), Decision::Apply);
        assert_eq!(
            decide(Some(&pending), 499, false),
            Decision::Refuse(Refused::AmountMismatch)
        );
        assert_eq!(decide(Some(&pending), 500, true), Decision::ExpireAndRefuse);
        assert_eq!(
            decide(Some(&pending), 1, true),
            Decision::Refuse(Refused::AmountMismatch),
            "a wrong amount leaves even a late order alone"
        );
        for (s, r) in [
            (OrderStatus::Paid, Refused::OrderPaid),
            (OrderStatus::Cancelled, Refused::OrderCancelled),
            (OrderStatus::Expired, Refused::OrderExpired),
        ] {
            assert_eq!(
                decide(Some(&order(s, 500, 60)), 500, false),
                Decision::Refuse(r)
            );
        }
        assert_eq!(
            decide(None, 500, false),
            Decision::Refuse(Refused::OrderNotFound)
        );
    }
}
