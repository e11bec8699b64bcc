//! Transaction 1 for a coalesced batch of one shard group: several items, one transaction.
//!
//! The [`super::coalesce::Coalescer`] batches per shard group, so the asks of a batch may name any
//! items of that group. One transaction serves them all and commits once (with a synchronous
//! shadow the commit is the expensive part):
//!
//! 1. lock every item row of the batch in `(sale_id, item_id)` order — every batch locks in the
//!    same order, so concurrent batches (on any engine node) never deadlock — and read the live
//!    holdings of the batch's buyers of each item, in one round trip. In READ COMMITTED the
//!    holdings read takes its snapshot after the locks are granted, so it sees every purchase
//!    committed before ours: the per-user limits are exact;
//! 2. allocate each item's stock to its asks in arrival order ([`super::allocate`]): a batch of
//!    several items is exactly its items' batches side by side;
//! 3. one decrement for all items, one plain `INSERT` for the reservations with a fresh random
//!    txn id (a v7 id cannot exist yet, so no speculative `ON CONFLICT`), one
//!    `INSERT .. ON CONFLICT` for the ids derived from a `request_id` (an earlier, released attempt
//!    is revived), one `UPDATE` bumping the attempt of resumed reservations — one round trip —
//!    then one `COMMIT`.
//!
//! The group's reservations whose orders were made since the last batch are marked `ordered` by one
//! more statement of step 3 (their confirmations ride along instead of paying a commit of their
//! own). It runs after the item locks, keeping the lock order of every writer: items, then
//! reservations. (Sent ahead of the locks it measured no faster, and would invert that order.)
//!
//! Outside its sale window an item sells nothing new (nor, in a fair start, before its draw is done:
//! [`crate::fair`] keeps such purchases waiting, and this is the last guard), but a retry still resumes the reservation its
//! earlier attempt holds (and so gets its order). The decrement keeps the window in its condition as
//! a last guard: when an item's window closed while the batch waited for its lock, the transaction
//! runs again with that item closed (nothing new sold, retries still resumed).
//!
//! An item fenced by a move ([`crate::moves`]) is read under its lock like any other and answered
//! [`Refusal::Moving`]: nothing is written for it on this group. Reservations are stamped with
//! `clock_timestamp()` (taken under the lock, not at the transaction's start), which is what lets
//! a move copy only the rows changed since its last pass.
//!
//! One item's trouble (a lock timeout, a failed statement) fails the whole group batch: every buyer
//! in it gets 503 and retries. That is the price of one commit for many items.

use super::allocate::{allocate, by_item, Ask, Decision, Holdings};
use super::reservations::{Refusal, Reserved};
use crate::db::DbError;
use crate::domain::{ItemId, Quantity, SaleId, UserId};
use deadpool_postgres::ClientWrapper;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;
use uuid::Uuid;

/// One request of a coalesced batch.
#[derive(Debug, Clone)]
pub struct BatchAsk {
    pub sale: SaleId,
    pub item: ItemId,
    pub txn_id: Uuid,
    pub user: UserId,
    pub quantity: Quantity,
}

/// An item as the database keys it; also the lock order.
type Key = (i64, i64);

/// What a batch settled: each ask's outcome (in the batch's order) and each found item's remaining
/// stock after the batch.
pub struct Settled {
    pub outcomes: Vec<Result<Reserved, Refusal>>,
    pub remaining: Vec<(SaleId, ItemId, i32)>,
}

/// Run transaction 1 for `asks` (any items of one group), and mark `confirm` (reservations of this
/// group whose orders exist) `ordered` in the same transaction.
pub async fn reserve_batch(
    client: &mut ClientWrapper,
    asks: &[BatchAsk],
    confirm: &[Uuid],
) -> Result<Settled, DbError> {
    let items = by_item(asks.iter().map(|a| (a.sale.db(), a.item.db())));
    let mut closed = BTreeSet::new();
    loop {
        match attempt(client, asks, confirm, &items, &closed).await? {
            Attempt::Settled(settled) => return Ok(settled),
            Attempt::ClosedMeanwhile(keys) => closed.extend(keys),
        }
    }
}

enum Attempt {
    Settled(Settled),
    /// These items' windows closed while the batch waited for their locks: rolled back.
    ClosedMeanwhile(Vec<Key>),
}

/// An item's row, read under its lock.
struct ItemRow {
    remaining: i32,
    limit: i32,
    price_cents: i64,
    window: i32,
    closed: Option<Refusal>,
    /// Fenced by a move ([`crate::moves`]): nothing is written for it here.
    moving: bool,
}

impl ItemRow {
    fn from_row(row: &Row) -> Self {
        let closed = if !row.get::<_, bool>(6) {
            Some(Refusal::NotStarted)
        } else if !row.get::<_, bool>(7) {
            Some(Refusal::Ended)
        } else if row.get::<_, bool>(9) {
            Some(Refusal::Paused)
        } else {
            None
        };
        Self {
            remaining: row.get(2),
            limit: row.get(3),
            price_cents: row.get(4),
            window: row.get(5),
            closed,
            moving: row.get(8),
        }
    }
}

/// What the allocation decided for every item of the batch, ready to be written.
#[derive(Default)]
struct Writes {
    decrements: (Vec<i64>, Vec<i64>, Vec<i32>),
    fresh: Reservations,
    revivable: Reservations,
    resumed: Vec<Uuid>,
}

#[derive(Default)]
struct Reservations {
    txn: Vec<Uuid>,
    sale: Vec<i64>,
    item: Vec<i64>,
    user: Vec<i64>,
    quantity: Vec<i32>,
}

impl Reservations {
    fn push(&mut self, (sale, item): Key, a: &BatchAsk, quantity: i32) {
        self.txn.push(a.txn_id);
        self.sale.push(sale);
        self.item.push(item);
        self.user.push(a.user.db());
        self.quantity.push(quantity);
    }
}

impl Writes {
    fn is_empty(&self) -> bool {
        self.decrements.0.is_empty() && self.resumed.is_empty()
    }
}

async fn attempt(
    client: &mut ClientWrapper,
    asks: &[BatchAsk],
    confirm: &[Uuid],
    items: &BTreeMap<Key, Vec<usize>>,
    closed: &BTreeSet<Key>,
) -> Result<Attempt, DbError> {
    let keys: Vec<Key> = items.keys().copied().collect();
    let tx = client.transaction().await?;
    let (mut rows, held) = lock_and_read(&tx, asks, items, &keys).await?;
    // Closed meanwhile: nothing new is sold, but retries still resume what they hold.
    for key in closed {
        if let Some(row) = rows.get_mut(key) {
            row.closed.get_or_insert(Refusal::Ended);
        }
    }

    let Plan {
        decisions,
        in_progress,
        writes,
        remaining,
    } = plan(asks, items, &rows, &held);

    let attempts = if writes.is_empty() && confirm.is_empty() {
        tx.rollback().await?;
        Attempts::default()
    } else {
        match write(&tx, &writes, confirm).await? {
            Ok(attempts) => {
                tx.commit().await?;
                attempts
            }
            Err(closed_meanwhile) => {
                tx.rollback().await?;
                return Ok(Attempt::ClosedMeanwhile(closed_meanwhile));
            }
        }
    };

    let outcomes = asks
        .iter()
        .zip(decisions)
        .enumerate()
        .map(|(p, (a, d))| {
            if in_progress.contains(&p) {
                return Err(Refusal::InProgress);
            }
            let key = (a.sale.db(), a.item.db());
            let Some(row) = rows.get(&key) else {
                return Err(Refusal::NotFound);
            };
            if row.moving {
                return Err(Refusal::Moving);
            }
            outcome(
                a,
                row,
                d.unwrap_or(Decision::SoldOut { remaining: 0 }),
                &attempts,
            )
        })
        .collect();
    Ok(Attempt::Settled(Settled {
        outcomes,
        remaining,
    }))
}

/// What the allocation decided: each ask's decision (None: its item was not found or closed
/// meanwhile), the writes, and each found item's stock after the batch.
struct Plan {
    decisions: Vec<Option<Decision>>,
    /// Asks whose purchase an earlier ask of the batch is making (the same txn id).
    in_progress: HashSet<usize>,
    writes: Writes,
    remaining: Vec<(SaleId, ItemId, i32)>,
}

/// Step 2: allocate each item's stock to its asks; what to write, each ask's decision (None:
/// its item was not found or closed meanwhile), and each found item's stock after the batch.
fn plan(
    asks: &[BatchAsk],
    items: &BTreeMap<Key, Vec<usize>>,
    rows: &HashMap<Key, ItemRow>,
    held: &HashMap<Key, Holdings>,
) -> Plan {
    let mut decisions: Vec<Option<Decision>> = vec![None; asks.len()];
    let mut in_progress = HashSet::new();
    let mut reserved_here = HashSet::new();
    let mut writes = Writes::default();
    let mut remaining_after = Vec::new();
    for key in items.keys() {
        let Some(row) = rows.get(key).filter(|r| !r.moving) else {
            continue;
        };
        let positions = &items[key];
        let plan: Vec<Ask> = positions
            .iter()
            .map(|&p| Ask {
                txn_id: asks[p].txn_id,
                user: asks[p].user.key(),
                quantity: asks[p].quantity.db(),
            })
            .collect();
        let stock = if row.closed.is_some() {
            0
        } else {
            row.remaining
        };
        let empty = Holdings::default();
        let (item_decisions, taken) =
            allocate(stock, row.limit, &plan, held.get(key).unwrap_or(&empty));
        if taken > 0 {
            writes.decrements.0.push(key.0);
            writes.decrements.1.push(key.1);
            writes.decrements.2.push(taken);
        }
        for (&p, d) in positions.iter().zip(item_decisions) {
            let txn = asks[p].txn_id;
            match d {
                // Only a txn id derived from a request_id can exist already.
                Decision::Reserve { quantity } if txn.get_version_num() == 7 => {
                    reserved_here.insert(txn);
                    writes.fresh.push(*key, &asks[p], quantity)
                }
                Decision::Reserve { quantity } => {
                    reserved_here.insert(txn);
                    writes.revivable.push(*key, &asks[p], quantity)
                }
                // A double click in one batch: resuming here would take the reservation from the
                // first ask (a resume bumps the attempt), which could then no longer return the
                // stock if its order fails. The first ask answers; this one is told to retry.
                Decision::Existing { .. } if reserved_here.contains(&txn) => {
                    in_progress.insert(p);
                }
                Decision::Existing { .. } => writes.resumed.push(txn),
                _ => {}
            }
            decisions[p] = Some(d);
        }
        let first = &asks[positions[0]];
        remaining_after.push((first.sale, first.item, row.remaining - taken));
    }

    Plan {
        decisions,
        in_progress,
        writes,
        remaining: remaining_after,
    }
}

/// Step 1: lock the items' rows in key order and read their buyers' live holdings, in one
/// round trip.
async fn lock_and_read(
    tx: &deadpool_postgres::Transaction<'_>,
    asks: &[BatchAsk],
    items: &BTreeMap<Key, Vec<usize>>,
    keys: &[Key],
) -> Result<(HashMap<Key, ItemRow>, HashMap<Key, Holdings>), DbError> {
    // `ORDER BY` under `FOR UPDATE`: the rows are locked as the sort hands them out.
    let lock_stmt = tx
        .prepare_cached(
            "SELECT s.sale_id, s.item_id, s.remaining, s.per_user_limit, s.price_cents,
                    s.payment_window_secs,
                    s.starts_at <= clock_timestamp() AND (s.fair_window_ms = 0 OR s.drawn_at IS NOT NULL),
                    clock_timestamp() < s.ends_at, s.fenced_by IS NOT NULL, s.paused
             FROM unnest($1::bigint[], $2::bigint[]) AS k(sale_id, item_id)
             JOIN sale_items s ON s.sale_id = k.sale_id AND s.item_id = k.item_id
             ORDER BY s.sale_id, s.item_id
             FOR UPDATE OF s",
        )
        .await?;
    // One index probe per (item, buyer) on all three columns of `reservations_by_buyer`. A sale's
    // ids are new to the table statistics, so a plainer `user_id = ANY(...)` lets the planner keep
    // the array as a filter over every reservation of the item: each batch would read the item's
    // whole history under the row lock. `OFFSET 0` keeps the subquery from being flattened.
    let held_stmt = tx
        .prepare_cached(
            "SELECT u.sale_id, u.item_id, r.txn_id, r.user_id, r.quantity
             FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS u(sale_id, item_id, user_id)
             CROSS JOIN LATERAL (
                 SELECT x.txn_id, x.user_id, x.quantity FROM reservations x
                 WHERE x.sale_id = u.sale_id AND x.item_id = u.item_id AND x.user_id = u.user_id
                   AND x.state <> 'released'
                 OFFSET 0) AS r",
        )
        .await?;
    let (lock_sales, lock_items): (Vec<i64>, Vec<i64>) = keys.iter().copied().unzip();
    let buyers: BTreeSet<(i64, i64, i64)> = keys
        .iter()
        .flat_map(|key| {
            items[key]
                .iter()
                .map(|&p| (key.0, key.1, asks[p].user.db()))
        })
        .collect();
    let (mut held_sales, mut held_items, mut held_users) = (Vec::new(), Vec::new(), Vec::new());
    for (s, i, u) in buyers {
        held_sales.push(s);
        held_items.push(i);
        held_users.push(u);
    }
    let lock_params: [&(dyn ToSql + Sync); 2] = [&lock_sales, &lock_items];
    let held_params: [&(dyn ToSql + Sync); 3] = [&held_sales, &held_items, &held_users];
    // Pipelined: the server runs them in this order.
    let (locked, held) = futures::try_join!(
        tx.query(&lock_stmt, &lock_params),
        tx.query(&held_stmt, &held_params),
    )?;
    let rows = locked
        .iter()
        .map(|r| ((r.get(0), r.get(1)), ItemRow::from_row(r)))
        .collect();
    let mut holdings: HashMap<Key, Holdings> = HashMap::new();
    for r in &held {
        let key: Key = (r.get(0), r.get(1));
        let (txn, user, q): (Uuid, i64, i32) = (r.get(2), r.get(3), r.get(4));
        let h = holdings.entry(key).or_default();
        *h.by_user.entry(user.unsigned_abs()).or_default() += i64::from(q);
        h.live_txns.insert(txn, q);
    }
    Ok((rows, holdings))
}

/// The attempt numbers the batch gave: of the reservations it revived, and of those it resumed
/// (earlier attempts of the same requests, which can then no longer compensate them). A fresh
/// reservation is attempt 1.
#[derive(Default)]
struct Attempts {
    created: HashMap<Uuid, i32>,
    resumed: HashMap<Uuid, i32>,
}

/// Step 3: the batch's writes in one round trip. The attempt numbers; or the items whose window
/// closed while the batch waited.
// Long on purpose: the batch's statements are prepared and pipelined in the order they must
// run (the decrement takes the item locks first); one function keeps that order in sight.
async fn write(
    tx: &deadpool_postgres::Transaction<'_>,
    w: &Writes,
    confirm: &[Uuid],
) -> Result<Result<Attempts, Vec<Key>>, DbError> {
    let decrement_stmt = tx
        .prepare_cached(
            "UPDATE sale_items s SET remaining = s.remaining - d.taken, version = s.version + 1
             FROM unnest($1::bigint[], $2::bigint[], $3::int[]) AS d(sale_id, item_id, taken)
             WHERE s.sale_id = d.sale_id AND s.item_id = d.item_id AND s.remaining >= d.taken
               AND s.fenced_by IS NULL AND NOT s.paused
               AND s.starts_at <= clock_timestamp() AND clock_timestamp() < s.ends_at
             RETURNING s.sale_id, s.item_id",
        )
        .await?;
    let fresh_stmt = tx
        .prepare_cached(
            "INSERT INTO reservations (txn_id, sale_id, item_id, user_id, quantity, state, updated_at)
             SELECT t, s, i, u, q, 'reserved', clock_timestamp()
             FROM unnest($1::uuid[], $2::bigint[], $3::bigint[], $4::bigint[], $5::int[])
                  AS x(t, s, i, u, q)",
        )
        .await?;
    let revive_stmt = tx
        .prepare_cached(
            "INSERT INTO reservations (txn_id, sale_id, item_id, user_id, quantity, state, updated_at)
             SELECT t, s, i, u, q, 'reserved', clock_timestamp()
             FROM unnest($1::uuid[], $2::bigint[], $3::bigint[], $4::bigint[], $5::int[])
                  AS x(t, s, i, u, q)
             ON CONFLICT (txn_id) DO UPDATE
                SET state = 'reserved', quantity = EXCLUDED.quantity,
                    attempt = reservations.attempt + 1, created_at = now(),
                    updated_at = clock_timestamp(), ordered_at = NULL
                WHERE reservations.state = 'released'
             RETURNING txn_id, attempt",
        )
        .await?;
    let resume_stmt = tx
        .prepare_cached(
            "UPDATE reservations SET attempt = attempt + 1, updated_at = clock_timestamp()
             WHERE txn_id = ANY($1) AND state <> 'released'
             RETURNING txn_id, attempt",
        )
        .await?;
    let (d, f, r) = (&w.decrements, &w.fresh, &w.revivable);
    let decrement_params: [&(dyn ToSql + Sync); 3] = [&d.0, &d.1, &d.2];
    let fresh_params: [&(dyn ToSql + Sync); 5] = [&f.txn, &f.sale, &f.item, &f.user, &f.quantity];
    let revive_params: [&(dyn ToSql + Sync); 5] = [&r.txn, &r.sale, &r.item, &r.user, &r.quantity];
    let resume_params: [&(dyn ToSql + Sync); 1] = [&w.resumed];
    let confirm_stmt = tx.prepare_cached(super::reservations::CONFIRM_SQL).await?;
    let confirm_params: [&(dyn ToSql + Sync); 1] = [&confirm];
    // A statement with nothing to write is not sent: most batches revive and resume nothing, and
    // an empty statement still costs the server a bind, an executor start and an end.
    let (decremented, _, revived, bumped, _) = futures::try_join!(
        tx.query(&decrement_stmt, &decrement_params),
        unless_empty(&f.txn, tx.execute(&fresh_stmt, &fresh_params), 0),
        unless_empty(&r.txn, tx.query(&revive_stmt, &revive_params), Vec::new()),
        unless_empty(
            &w.resumed,
            tx.query(&resume_stmt, &resume_params),
            Vec::new()
        ),
        unless_empty(confirm, tx.execute(&confirm_stmt, &confirm_params), 0),
    )?;
    // Every revivable id was inserted or revived, every resumed one bumped; otherwise a concurrent
    // attempt of the same request made it live meanwhile: undo, the retry resumes it.
    let resumed: BTreeSet<&Uuid> = w.resumed.iter().collect();
    if revived.len() != r.txn.len() || bumped.len() != resumed.len() {
        return Err(DbError::Busy(
            "a concurrent attempt of this request is in progress".into(),
        ));
    }
    if decremented.len() != d.0.len() {
        // The stock cannot change under our locks: these items' windows closed meanwhile.
        let done: BTreeSet<Key> = decremented.iter().map(|r| (r.get(0), r.get(1))).collect();
        let missed =
            d.0.iter()
                .zip(&d.1)
                .map(|(&s, &i)| (s, i))
                .filter(|k| !done.contains(k))
                .collect();
        return Ok(Err(missed));
    }
    let numbers = |rows: &[Row]| {
        rows.iter()
            .map(|r| (r.get::<_, Uuid>(0), r.get::<_, i32>(1)))
            .collect()
    };
    Ok(Ok(Attempts {
        created: numbers(&revived),
        resumed: numbers(&bumped),
    }))
}

/// `statement`'s answer, or `nothing` without sending it when it has no `rows` to write. The
/// statement's future is only polled, and so sent, when there are rows: the pipeline keeps its
/// order.
async fn unless_empty<T, R>(
    rows: &[R],
    statement: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
    nothing: T,
) -> Result<T, tokio_postgres::Error> {
    if rows.is_empty() {
        return Ok(nothing);
    }
    statement.await
}

/// One ask's outcome from its item's decision.
fn outcome(
    a: &BatchAsk,
    row: &ItemRow,
    d: Decision,
    attempts: &Attempts,
) -> Result<Reserved, Refusal> {
    match d {
        Decision::Reserve { quantity } | Decision::Existing { quantity } => {
            let existing = matches!(d, Decision::Existing { .. });
            let numbers = if existing {
                &attempts.resumed
            } else {
                &attempts.created
            };
            Ok(Reserved {
                txn_id: a.txn_id,
                quantity,
                price_cents: row.price_cents,
                payment_window_secs: row.window,
                existing,
                attempt: numbers.get(&a.txn_id).copied().unwrap_or(1),
            })
        }
        _ if row.closed.is_some() => Err(row.closed.clone().unwrap_or(Refusal::Ended)),
        Decision::SoldOut { remaining } => Err(Refusal::SoldOut { remaining }),
        Decision::LimitExceeded { limit, already } => {
            Err(Refusal::LimitExceeded { limit, already })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A double click in one batch: the first ask reserves; the second must not resume the
    /// reservation (a resume bumps its attempt, and the first ask could then no longer return the
    /// stock if its order fails): it is told to retry, and nothing is written for it.
    #[test]
    fn a_double_click_in_one_batch_leaves_the_first_ask_its_reservation() {
        let (sale, item) = (SaleId::from_db(1), ItemId::from_db(2));
        let click = crate::domain::RequestId::parse("click".into()).expect("request id");
        let txn = crate::domain::txn_id_for(sale, item, UserId::from_db(3), Some(&click));
        let ask = |txn| BatchAsk {
            sale,
            item,
            txn_id: txn,
            user: UserId::from_db(3),
            quantity: Quantity::parse(1).expect("quantity"),
        };
        let asks = [ask(txn), ask(txn), ask(Uuid::now_v7())];
        let items = by_item(asks.iter().map(|a| (a.sale.db(), a.item.db())));
        let row = ItemRow {
            remaining: 5,
            limit: 5,
            price_cents: 1,
            window: 60,
            closed: None,
            moving: false,
        };
        let rows = HashMap::from([((1, 2), row)]);
        let p = plan(&asks, &items, &rows, &HashMap::new());
        assert_eq!(
            p.in_progress,
            HashSet::from([1]),
            "the second click waits its turn"
        );
        assert!(
            p.writes.resumed.is_empty(),
            "the first ask's attempt stands"
        );
        assert_eq!(p.writes.revivable.txn, vec![txn]);
        assert_eq!(
            p.writes.decrements.2,
            vec![2],
            "one unit per purchase, not per click"
        );
    }
}
