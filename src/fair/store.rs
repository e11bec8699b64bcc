//! Every statement on `draw_entries` and on the draw columns of `sale_items` (migrations/V9), run
//! on the item's group.

use super::rank::{Outcome, Seed};
use crate::db::DbError;
use deadpool_postgres::ClientWrapper;
use uuid::Uuid;

/// An item's fair-start rules, as its row says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// When the sale starts, in ms since the Unix epoch.
    pub starts_ms: i64,
    pub window_ms: i64,
    /// The draw is done: what is left sells first come, first served.
    pub drawn: bool,
    pub per_user_limit: i32,
}

/// An item's fair rules (None: no such item).
pub(crate) async fn rules(
    c: &ClientWrapper,
    sale: i64,
    item: i64,
) -> Result<Option<Rules>, DbError> {
    let stmt = c
        .prepare_cached(
            "SELECT (extract(epoch FROM starts_at) * 1000)::bigint, fair_window_ms, drawn_at IS NOT NULL,
                    per_user_limit
             FROM sale_items WHERE sale_id = $1 AND item_id = $2 AND fenced_by IS NULL",
        )
        .await?;
    Ok(c.query_opt(&stmt, &[&sale, &item]).await?.map(|r| Rules {
        starts_ms: r.get(0),
        window_ms: i64::from(r.get::<_, i32>(1)),
        drawn: r.get(2),
        per_user_limit: r.get(3),
    }))
}

/// An entry as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stored {
    pub user_id: i64,
    pub quantity: i32,
    pub txn_id: Uuid,
    pub outcome: Option<Outcome>,
    /// A winner's order exists on the user's group.
    pub ordered: bool,
}

fn stored(r: &tokio_postgres::Row) -> Stored {
    Stored {
        user_id: r.get(0),
        quantity: r.get(1),
        txn_id: r.get(2),
        outcome: r.get::<_, Option<&str>>(3).and_then(Outcome::parse),
        ordered: r.get(4),
    }
}

const STORED: &str = "user_id, quantity, txn_id, outcome, ordered_at IS NOT NULL AS ordered";
/// The same columns, from a CTE that returned [`STORED`].
const STORED_AGAIN: &str = "user_id, quantity, txn_id, outcome, ordered";

/// Store an entry, unless the user has one for the item already (then that one is returned: a
/// repeat gets the first entry's outcome). None when the item's draw has begun: the window is
/// over, whatever this node's clock said.
pub(crate) async fn enter(
    c: &ClientWrapper,
    sale: i64,
    item: i64,
    user: i64,
    quantity: i32,
    txn_id: Uuid,
) -> Result<Option<Stored>, DbError> {
    let stmt = c
        .prepare_cached(&format!(
            "WITH open AS (
                 SELECT 1 FROM sale_items WHERE sale_id = $1 AND item_id = $2
                   AND fair_window_ms > 0 AND draw_claim IS NULL AND drawn_at IS NULL
             ), ins AS (
                 INSERT INTO draw_entries (sale_id, item_id, user_id, quantity, txn_id)
                 SELECT $1, $2, $3, $4, $5 FROM open
                 ON CONFLICT (sale_id, item_id, user_id) DO NOTHING
                 RETURNING {STORED}
             )
             SELECT {STORED_AGAIN} FROM ins
             UNION ALL
             SELECT {STORED} FROM draw_entries
             WHERE sale_id = $1 AND item_id = $2 AND user_id = $3 AND NOT EXISTS (SELECT 1 FROM ins)"
        ))
        .await?;
    let row = c
        .query_opt(&stmt, &[&sale, &item, &user, &quantity, &txn_id])
        .await?;
    Ok(row.as_ref().map(stored))
}

/// The entries of `users` for an item, as they stand.
pub(crate) async fn entries_of(
    c: &ClientWrapper,
    sale: i64,
    item: i64,
    users: &[i64],
) -> Result<Vec<Stored>, DbError> {
    let stmt = c
        .prepare_cached(&format!(
            "SELECT {STORED} FROM draw_entries
             WHERE sale_id = $1 AND item_id = $2 AND user_id = ANY($3)"
        ))
        .await?;
    Ok(c.query(&stmt, &[&sale, &item, &users])
        .await?
        .iter()
        .map(stored)
        .collect())
}

/// Items whose window is over and whose draw is not done, on this group.
pub(crate) async fn due(c: &ClientWrapper) -> Result<Vec<(i64, i64)>, DbError> {
    let stmt = c
        .prepare_cached(
            "SELECT sale_id, item_id FROM sale_items
             WHERE fair_window_ms > 0 AND drawn_at IS NULL AND fenced_by IS NULL
               AND starts_at + fair_window_ms * interval '1 millisecond' <= clock_timestamp()",
        )
        .await?;
    Ok(c.query(&stmt, &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// What a draw needs from its item's row.
#[derive(Debug, Clone)]
pub(crate) struct Claimed {
    pub seed: Seed,
    pub stock: i64,
    pub limit: i64,
    pub price_cents: i64,
    pub payment_window_secs: i32,
}

/// Claim an item's draw for `node` for `lease_ms` (renewing its own claim; taking over one that
/// lapsed). None when another node holds it, the draw is done, or the item is not due.
pub(crate) async fn claim(
    c: &ClientWrapper,
    sale: i64,
    item: i64,
    node: Uuid,
    lease_ms: i64,
) -> Result<Option<Claimed>, DbError> {
    let stmt = c
        .prepare_cached(
            "UPDATE sale_items
             SET draw_claim = $3,
                 draw_claimed_until = clock_timestamp() + $4::bigint * interval '1 millisecond',
                 draw_stock = coalesce(draw_stock, remaining)
             WHERE sale_id = $1 AND item_id = $2 AND fair_window_ms > 0 AND drawn_at IS NULL
               AND fenced_by IS NULL
               AND starts_at + fair_window_ms * interval '1 millisecond' <= clock_timestamp()
               AND (draw_claim IS NULL OR draw_claim = $3 OR draw_claimed_until < clock_timestamp())
             RETURNING fair_seed, draw_stock, per_user_limit, price_cents, payment_window_secs",
        )
        .await?;
    let Some(r) = c
        .query_opt(&stmt, &[&sale, &item, &node, &lease_ms])
        .await?
    else {
        return Ok(None);
    };
    let seed: Vec<u8> = r.get(0);
    let Ok(seed) = Seed::try_from(seed.as_slice()) else {
        return Err(DbError::Rejected {
            code: "seckill".into(),
            message: format!("item {item} of sale {sale} has no 32-byte draw seed"),
        });
    };
    Ok(Some(Claimed {
        seed,
        stock: i64::from(r.get::<_, i32>(1)),
        limit: i64::from(r.get::<_, i32>(2)),
        price_cents: r.get(3),
        payment_window_secs: r.get(4),
    }))
}

/// Every entry of an item not decided yet, and every winner whose order is not made yet.
pub(crate) async fn pending(
    c: &ClientWrapper,
    sale: i64,
    item: i64,
) -> Result<Vec<Stored>, DbError> {
    let stmt = c
        .prepare_cached(&format!(
            "SELECT {STORED} FROM draw_entries
             WHERE sale_id = $1 AND item_id = $2
               AND (outcome IS NULL OR (outcome = 'won' AND ordered_at IS NULL))"
        ))
        .await?;
    Ok(c.query(&stmt, &[&sale, &item])
        .await?
        .iter()
        .map(stored)
        .collect())
}

/// One step of a draw, in one transaction under the item's row lock, while `node` holds the
/// claim: serve `chunk` (undecided entries, in draw order) from the stock left ([`super::rank`]),
/// take the winners' stock, write their reservations, record every outcome and rank key. The
/// outcomes, in the chunk's order. [`DbError::Moving`] when the claim was lost.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn decide(
    c: &mut ClientWrapper,
    sale: i64,
    item: i64,
    node: Uuid,
    chunk: &[(Stored, [u8; 32])],
    limit: i64,
    lease_ms: i64,
) -> Result<Vec<Outcome>, DbError> {
    let tx = c.transaction().await?;
    let lock = tx
        .prepare_cached(
            "UPDATE sale_items
             SET draw_claimed_until = clock_timestamp() + $4::bigint * interval '1 millisecond'
             WHERE sale_id = $1 AND item_id = $2 AND draw_claim = $3 AND drawn_at IS NULL
               AND fenced_by IS NULL
             RETURNING remaining",
        )
        .await?;
    let Some(row) = tx
        .query_opt(&lock, &[&sale, &item, &node, &lease_ms])
        .await?
    else {
        return Err(DbError::Moving(format!(
            "the draw of item {item} is no longer this node's"
        )));
    };
    let remaining = i64::from(row.get::<_, i32>(0));
    let asks: Vec<super::rank::Entry> = chunk
        .iter()
        .map(|(e, _)| super::rank::Entry {
            user_id: e.user_id as u64,
            quantity: i64::from(e.quantity),
        })
        .collect();
    let (outcomes, left) = super::rank::serve(&asks, remaining, limit);
    let taken = (remaining - left) as i32;
    let take = tx
        .prepare_cached(
            "UPDATE sale_items SET remaining = remaining - $3, version = version + 1
             WHERE sale_id = $1 AND item_id = $2",
        )
        .await?;
    tx.execute(&take, &[&sale, &item, &taken]).await?;
    let won: Vec<&(Stored, [u8; 32])> = chunk
        .iter()
        .zip(&outcomes)
        .filter(|(_, o)| **o == Outcome::Won)
        .map(|(e, _)| e)
        .collect();
    let reserve = tx
        .prepare_cached(
            "INSERT INTO reservations (txn_id, sale_id, item_id, user_id, quantity, state, updated_at)
             SELECT t, $1, $2, u, q, 'reserved', clock_timestamp()
             FROM unnest($3::uuid[], $4::bigint[], $5::int[]) AS w(t, u, q)
             ON CONFLICT (txn_id) DO NOTHING",
        )
        .await?;
    let ids: Vec<Uuid> = won.iter().map(|(e, _)| e.txn_id).collect();
    let users: Vec<i64> = won.iter().map(|(e, _)| e.user_id).collect();
    let qty: Vec<i32> = won.iter().map(|(e, _)| e.quantity).collect();
    tx.execute(&reserve, &[&sale, &item, &ids, &users, &qty])
        .await?;
    let record = tx
        .prepare_cached(
            "UPDATE draw_entries e SET outcome = d.o, rank_key = d.k, decided_at = clock_timestamp()
             FROM unnest($3::bigint[], $4::text[], $5::bytea[]) AS d(u, o, k)
             WHERE e.sale_id = $1 AND e.item_id = $2 AND e.user_id = d.u AND e.outcome IS NULL",
        )
        .await?;
    let all_users: Vec<i64> = chunk.iter().map(|(e, _)| e.user_id).collect();
    let texts: Vec<&str> = outcomes.iter().map(|o| o.as_str()).collect();
    let keys: Vec<Vec<u8>> = chunk.iter().map(|(_, k)| k.to_vec()).collect();
    tx.execute(&record, &[&sale, &item, &all_users, &texts, &keys])
        .await?;
    tx.commit().await?;
    Ok(outcomes)
}

/// Winners whose orders are made now.
pub(crate) async fn ordered(
    c: &ClientWrapper,
    sale: i64,
    item: i64,
    users: &[i64],
) -> Result<(), DbError> {
    let stmt = c
        .prepare_cached(
            "UPDATE draw_entries SET ordered_at = clock_timestamp()
             WHERE sale_id = $1 AND item_id = $2 AND user_id = ANY($3) AND outcome = 'won'",
        )
        .await?;
    c.execute(&stmt, &[&sale, &item, &users]).await?;
    Ok(())
}

/// The draw is done: what is left of the item sells first come, first served from now on.
pub(crate) async fn done(
    c: &ClientWrapper,
    sale: i64,
    item: i64,
    node: Uuid,
) -> Result<bool, DbError> {
    let stmt = c
        .prepare_cached(
            "UPDATE sale_items SET drawn_at = clock_timestamp(), draw_claim = NULL,
                                   draw_claimed_until = NULL
             WHERE sale_id = $1 AND item_id = $2 AND draw_claim = $3 AND drawn_at IS NULL
               AND NOT EXISTS (SELECT 1 FROM draw_entries
                               WHERE sale_id = $1 AND item_id = $2
                                 AND (outcome IS NULL OR (outcome = 'won' AND ordered_at IS NULL)))",
        )
        .await?;
    Ok(c.execute(&stmt, &[&sale, &item, &node]).await? == 1)
}

/// An entry as the audit lists it.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub(crate) struct Listed {
    /// 1 for the first served.
    pub rank: usize,
    pub user_id: u64,
    pub quantity: i32,
    /// hex(HMAC-SHA256(seed, "<sale_id>:<item_id>:<user_id>")), once drawn.
    pub(crate) rank_key: Option<String>,
    /// `won`, `sold_out` or `limit_exceeded`; null before the draw.
    pub outcome: Option<String>,
    /// A winner's order id.
    pub order_id: Option<Uuid>,
    pub(crate) entered_at: chrono::DateTime<chrono::Utc>,
}

/// An item's draw as the audit shows it (`GET /v1/admin/sales/{sale_id}/items/{item_id}/draw`).
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub(crate) struct Listing {
    pub sale_id: u64,
    pub item_id: u64,
    pub window_ms: i32,
    /// The stock the draw served from (null before it began).
    pub stock: Option<i32>,
    pub per_user_limit: i32,
    /// The draw is done.
    pub drawn: bool,
    /// Every entry, in the order the draw served them once drawn (by arrival before).
    pub entries: Vec<Listed>,
}

/// An item's draw (None: no such item on this group).
pub(crate) async fn listing(
    c: &ClientWrapper,
    sale: i64,
    item: i64,
) -> Result<Option<Listing>, DbError> {
    let head = c
        .query_opt(
            "SELECT draw_stock, per_user_limit, fair_window_ms, drawn_at IS NOT NULL FROM sale_items
             WHERE sale_id = $1 AND item_id = $2 AND fenced_by IS NULL",
            &[&sale, &item],
        )
        .await?;
    let Some(head) = head else {
        return Ok(None);
    };
    let stmt = c
        .prepare_cached(
            "SELECT user_id, quantity, rank_key, outcome, txn_id, entered_at FROM draw_entries
             WHERE sale_id = $1 AND item_id = $2
             ORDER BY rank_key NULLS LAST, entered_at, user_id",
        )
        .await?;
    let rows = c.query(&stmt, &[&sale, &item]).await?;
    let entries = rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let outcome: Option<String> = r.get(3);
            Listed {
                rank: i + 1,
                user_id: r.get::<_, i64>(0).unsigned_abs(),
                quantity: r.get(1),
                rank_key: r.get::<_, Option<Vec<u8>>>(2).map(hex::encode),
                order_id: (outcome.as_deref() == Some("won")).then(|| r.get(4)),
                outcome,
                entered_at: r.get(5),
            }
        })
        .collect();
    Ok(Some(Listing {
        sale_id: sale.unsigned_abs(),
        item_id: item.unsigned_abs(),
        stock: head.get(0),
        per_user_limit: head.get(1),
        window_ms: head.get(2),
        drawn: head.get(3),
        entries,
    }))
}
