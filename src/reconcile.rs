//! Reconciliation: matching the item-side ledger (reservations) against the user-side orders by
//! txn_id, repairing what crashes and failed follow-ups leave behind, and checking conservation.
//!
//! Repairs, each idempotent so several reconcilers (one per engine node, plus `seckill reconcile`)
//! can run at once without double-releasing:
//! - a live reservation with **no order** on any group, older than the grace period: the reconciler
//!   first writes a `cancelled` tombstone order with that txn_id on the user's group
//!   (`ON CONFLICT DO NOTHING`), which also stops a late transaction 2 from ever creating the order;
//!   only if the tombstone went in is the stock released;
//! - an order that is `pending_payment` whose reservation is still `reserved`: marked `ordered`;
//! - a `paid` order whose reservation is not `paid`: marked `paid`;
//! - a `cancelled`/`expired` order whose reservation is live: released.
//!
//! Conservation per item: `stock = remaining + reserved + ordered + paid`.
//!
//! A full pass ([`reconcile`], what `seckill reconcile` runs) reads every live reservation and
//! audits every item. The background pass of each engine node ([`Reconciler::pass`]) is bounded so
//! that it costs little in the middle of a storm, whatever the history in the tables:
//! - unconfirmed (`reserved`) reservations past the grace period, the ones a crash between the two
//!   transactions leaves, are all checked on every pass;
//! - `ordered` reservations only disagree with their order when a cancel or expiry could not
//!   release them; they are checked [`ORDERED_PAGES_PER_PASS`] pages at a time, continuing where the
//!   previous pass stopped and starting over at the end, so each is seen every few passes;
//! - conservation is audited for the items whose `version` moved since this node last found them
//!   conserved (every decrement and every release moves it; a state change between reserved,
//!   ordered and paid cannot change the sum). An item found in violation is audited again on every
//!   pass, so the error keeps being logged until someone repairs it.
//!
//! Items fenced by a move ([`crate::moves`]) are skipped, reservations and audit alike: the fenced
//! copy is either being filled or the inactive one left behind, and the live copy on the item's
//! group is the one reconciled (never both, so nothing is counted or released twice).

use crate::domain::{ItemId, SaleId, UserId};
use crate::order::reservations::{self, ReservationState};
use crate::order::store::{self, NewOrder, OrderStatus};
use crate::order::OrderService;
use crate::sale::SaleError;
use crate::shard::{GroupError, Work};
use serde::Serialize;
use std::collections::HashMap;
use std::time::Duration;
use uuid::Uuid;

#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct ItemAudit {
    pub sale_id: u64,
    pub item_id: u64,
    pub stock: i64,
    pub remaining: i64,
    pub reserved: i64,
    pub ordered: i64,
    pub paid: i64,
    pub released: i64,
    /// `stock == remaining + reserved + ordered + paid`.
    pub conserved: bool,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct SaleAudit {
    pub sale_id: u64,
    pub conserved: bool,
    pub items: Vec<ItemAudit>,
    /// Changes operators made to the running sale (pauses, its end, restocks), oldest first.
    pub changes: Vec<crate::sale::changes::Change>,
}

/// The audit of items: [`audit_row`] reads its columns. `$from` names the items (`si`).
macro_rules! audit_sql {
    ($from:literal, $tail:literal) => {
        concat!(
            "SELECT si.sale_id, si.item_id, si.stock::bigint, si.remaining::bigint,
        coalesce(sum(r.quantity) FILTER (WHERE r.state = 'reserved' AND r.ordered_at IS NULL), 0)::bigint,
        coalesce(sum(r.quantity) FILTER (WHERE r.state = 'ordered'
                                            OR (r.state = 'reserved' AND r.ordered_at IS NOT NULL)), 0)::bigint,
        coalesce(sum(r.quantity) FILTER (WHERE r.state = 'paid'), 0)::bigint,
        coalesce(sum(r.quantity) FILTER (WHERE r.state = 'released'), 0)::bigint
    FROM ",
            $from,
            "
    LEFT JOIN reservations r ON r.sale_id = si.sale_id AND r.item_id = si.item_id
    GROUP BY si.sale_id, si.item_id, si.stock, si.remaining",
            $tail
        )
    };
}

/// Every item of a group, but for the copies a move keeps fenced (they are audited where they
/// live).
const AUDIT_SQL: &str = audit_sql!(
    "(SELECT * FROM sale_items WHERE fenced_by IS NULL) si",
    " ORDER BY si.sale_id, si.item_id"
);

/// A list of (sale, item) pairs. (Not one statement with optional filters: a prepared
/// `$1 IS NULL OR sale_id = $1` gets a generic plan that aggregates every sale.)
const AUDIT_ITEMS_SQL: &str = audit_sql!(
    "unnest($1::bigint[], $2::bigint[]) AS k(s, i)
    JOIN sale_items si ON si.sale_id = k.s AND si.item_id = k.i",
    ""
);

fn audit_row(r: &tokio_postgres::Row) -> ItemAudit {
    let (stock, remaining, reserved, ordered, paid): (i64, i64, i64, i64, i64) =
        (r.get(2), r.get(3), r.get(4), r.get(5), r.get(6));
    ItemAudit {
        sale_id: r.get::<_, i64>(0).unsigned_abs(),
        item_id: r.get::<_, i64>(1).unsigned_abs(),
        stock,
        remaining,
        reserved,
        ordered,
        paid,
        released: r.get(7),
        conserved: stock == remaining + reserved + ordered + paid,
    }
}

/// The per-item conservation report of one sale.
pub(crate) async fn audit_sale(
    orders: &OrderService,
    sale: SaleId,
) -> Result<SaleAudit, SaleError> {
    let sales = crate::sale::SaleService {
        cluster: &orders.cluster,
        router: &orders.router,
        timeout: orders.timeout,
        default_window: 900,
    };
    let Some((_, item_ids)) = sales.header(sale).await? else {
        return Err(SaleError::NotFound(sale));
    };
    let mut by_group: HashMap<usize, Vec<i64>> = HashMap::new();
    for item in &item_ids {
        by_group
            .entry(orders.router.item_group(*item))
            .or_default()
            .push(item.db());
    }
    let mut items = Vec::new();
    for (g, ids) in by_group {
        let sales = vec![sale.db(); ids.len()];
        let rows = orders
            .cluster
            .group(g)
            .run(Work::Read, orders.timeout, async |client| {
                Ok(client
                    .query(
                        &client.prepare_cached(AUDIT_ITEMS_SQL).await?,
                        &[&sales, &ids],
                    )
                    .await?)
            })
            .await?;
        items.extend(rows.iter().map(audit_row));
    }
    items.sort_by_key(|i| i.item_id);
    let changes = sales.changes(sale, &item_ids).await?;
    Ok(SaleAudit {
        sale_id: sale.key(),
        conserved: items.iter().all(|i| i.conserved),
        items,
        changes,
    })
}

/// What one reconciliation pass did and found.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ReconcileReport {
    pub checked: u64,
    pub orphans_released: u64,
    pub(crate) marked_ordered: u64,
    pub(crate) marked_paid: u64,
    pub dead_orders_released: u64,
    /// Items breaking conservation after the pass.
    pub violations: Vec<ItemAudit>,
    /// Groups that could not be read (the pass is incomplete for them).
    pub(crate) unreachable_groups: Vec<String>,
}

impl ReconcileReport {
    pub fn repairs(&self) -> u64 {
        self.orphans_released + self.marked_ordered + self.marked_paid + self.dead_orders_released
    }
}

const PAGE: i64 = 500;

/// One full pass over every group.
pub async fn reconcile(orders: &OrderService, grace: Duration) -> ReconcileReport {
    Reconciler::default().run(orders, grace, false).await
}

/// How many pages of `ordered` reservations a background pass checks per group.
pub(crate) const ORDERED_PAGES_PER_PASS: usize = 4;

/// The background reconciler of one engine node: what it remembers between passes.
#[derive(Default)]
pub struct Reconciler {
    /// Per group: the txn id the last pass stopped at among `ordered` reservations.
    ordered_cursor: HashMap<usize, Uuid>,
    /// Per group and item: the version at which the item was last found conserved.
    audited: HashMap<(usize, i64, i64), i64>,
}

impl Reconciler {
    /// One bounded pass (module docs).
    pub async fn pass(&mut self, orders: &OrderService, grace: Duration) -> ReconcileReport {
        self.run(orders, grace, true).await
    }

    async fn run(
        &mut self,
        orders: &OrderService,
        grace: Duration,
        bounded: bool,
    ) -> ReconcileReport {
        let mut report = ReconcileReport::default();
        for (g, group) in orders.cluster.groups.iter().enumerate() {
            let checked = if bounded {
                self.reconcile_bounded(orders, g, grace, &mut report).await
            } else {
                reconcile_group(orders, g, grace, LiveSet::All, None, None, &mut report)
                    .await
                    .map(|_| ())
            };
            if let Err(e) = checked {
                tracing::warn!(group = %group.name, error = %e, "reconciliation incomplete for a group");
                report.unreachable_groups.push(group.name.clone());
                continue;
            }
            let audited = if bounded {
                self.conservation_of_changed(orders, g).await
            } else {
                conservation(orders, g).await
            };
            match audited {
                Ok(bad) => report.violations.extend(bad),
                Err(e) => {
                    tracing::warn!(group = %group.name, error = %e, "conservation check failed");
                    report.unreachable_groups.push(group.name.clone());
                }
            }
        }
        for v in &report.violations {
            tracing::error!(
                sale_id = v.sale_id,
                item_id = v.item_id,
                stock = v.stock,
                remaining = v.remaining,
                reserved = v.reserved,
                ordered = v.ordered,
                paid = v.paid,
                "conservation violated"
            );
        }
        if report.repairs() > 0 {
            tracing::warn!(?report, "reconciler repaired mismatches");
        }
        for (kind, n) in [
            ("orphan_released", report.orphans_released),
            ("marked_ordered", report.marked_ordered),
            ("marked_paid", report.marked_paid),
            ("dead_order_released", report.dead_orders_released),
        ] {
            metrics::counter!(crate::telemetry::REPAIRS, "kind" => kind).increment(n);
        }
        metrics::gauge!(crate::telemetry::VIOLATIONS).set(report.violations.len() as f64);
        report
    }

    async fn reconcile_bounded(
        &mut self,
        orders: &OrderService,
        g: usize,
        grace: Duration,
        report: &mut ReconcileReport,
    ) -> Result<(), GroupError> {
        reconcile_group(orders, g, grace, LiveSet::Reserved, None, None, report).await?;
        let from = self.ordered_cursor.get(&g).copied();
        let stopped = reconcile_group(
            orders,
            g,
            grace,
            LiveSet::Ordered,
            from,
            Some(ORDERED_PAGES_PER_PASS),
            report,
        )
        .await?;
        match stopped {
            Some(cursor) => self.ordered_cursor.insert(g, cursor),
            None => self.ordered_cursor.remove(&g),
        };
        Ok(())
    }

    async fn conservation_of_changed(
        &mut self,
        orders: &OrderService,
        g: usize,
    ) -> Result<Vec<ItemAudit>, GroupError> {
        let group = orders.cluster.group(g);
        // Items whose sale ended long ago (window and payment window over, plus an hour) no
        // longer change: they are not audited, and forgotten, so this map does not grow with
        // history.
        let versions = group
            .run(Work::Settle, orders.timeout, async |client| {
                Ok(client
                    .query(
                        &client
                            .prepare_cached(
                                "SELECT sale_id, item_id, version FROM sale_items
                                 WHERE ends_at + make_interval(secs => payment_window_secs)
                                       > now() - interval '1 hour'
                                   AND fenced_by IS NULL",
                            )
                            .await?,
                        &[],
                    )
                    .await?)
            })
            .await?;
        let current: std::collections::HashSet<(i64, i64)> =
            versions.iter().map(|r| (r.get(0), r.get(1))).collect();
        self.audited
            .retain(|(gg, s, i), _| *gg != g || current.contains(&(*s, *i)));
        let mut sales = Vec::new();
        let mut items = Vec::new();
        let mut seen_at = HashMap::new();
        for r in &versions {
            let (sale, item, version): (i64, i64, i64) = (r.get(0), r.get(1), r.get(2));
            if self.audited.get(&(g, sale, item)) != Some(&version) {
                sales.push(sale);
                items.push(item);
                seen_at.insert((sale, item), version);
            }
        }
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let rows = group
            .run(Work::Settle, orders.timeout, async |client| {
                Ok(client
                    .query(
                        &client.prepare_cached(AUDIT_ITEMS_SQL).await?,
                        &[&sales, &items],
                    )
                    .await?)
            })
            .await?;
        let mut bad = Vec::new();
        for audit in rows.iter().map(audit_row) {
            let key = (audit.sale_id as i64, audit.item_id as i64);
            if audit.conserved {
                if let Some(v) = seen_at.get(&key) {
                    self.audited.insert((g, key.0, key.1), *v);
                }
            } else {
                self.audited.remove(&(g, key.0, key.1));
                bad.push(audit);
            }
        }
        Ok(bad)
    }
}

async fn conservation(orders: &OrderService, g: usize) -> Result<Vec<ItemAudit>, GroupError> {
    let rows = orders
        .cluster
        .group(g)
        .run(Work::Settle, orders.timeout, async |client| {
            Ok(client
                .query(&client.prepare_cached(AUDIT_SQL).await?, &[])
                .await?)
        })
        .await?;
    Ok(rows
        .iter()
        .map(audit_row)
        .filter(|a| !a.conserved)
        .collect())
}

struct Live {
    txn_id: Uuid,
    sale: SaleId,
    item: ItemId,
    user: UserId,
    quantity: i32,
    state: ReservationState,
}

/// Which live reservations a sweep of [`reconcile_group`] reads. The states are spelled out in
/// the SQL so the planner can use the partial index on live reservations.
#[derive(Clone, Copy)]
enum LiveSet {
    All,
    Reserved,
    Ordered,
}

/// The page query of [`reconcile_group`] for one state condition.
macro_rules! live_page_sql {
    ($states:literal) => {
        concat!(
            "SELECT txn_id, sale_id, item_id, user_id, quantity,
                    CASE WHEN state = 'reserved' AND ordered_at IS NOT NULL THEN 'ordered'
                         ELSE state END
             FROM reservations
             WHERE ",
            $states,
            " AND updated_at < now() - make_interval(secs => $1)
               AND ($2::uuid IS NULL OR txn_id > $2)
               AND NOT EXISTS (SELECT 1 FROM sale_items f WHERE f.sale_id = reservations.sale_id
                               AND f.item_id = reservations.item_id AND f.fenced_by IS NOT NULL)
             ORDER BY txn_id LIMIT $3"
        )
    };
}

impl LiveSet {
    fn sql(self) -> &'static str {
        match self {
            LiveSet::All => live_page_sql!("state IN ('reserved', 'ordered')"),
            LiveSet::Reserved => live_page_sql!("state = 'reserved' AND ordered_at IS NULL"),
            LiveSet::Ordered => live_page_sql!(
                "(state = 'ordered' OR (state = 'reserved' AND ordered_at IS NOT NULL))"
            ),
        }
    }
}

/// Check live reservations of one group page by page, from after `from`, for at most `max_pages`
/// pages. Returns where it stopped, or None when it reached the end.
async fn reconcile_group(
    orders: &OrderService,
    g: usize,
    grace: Duration,
    which: LiveSet,
    from: Option<Uuid>,
    max_pages: Option<usize>,
    report: &mut ReconcileReport,
) -> Result<Option<Uuid>, GroupError> {
    let grace_secs = grace.as_secs_f64();
    let mut cursor: Option<Uuid> = from;
    let mut pages = 0;
    loop {
        if max_pages.is_some_and(|max| pages >= max) {
            return Ok(cursor);
        }
        pages += 1;
        let rows = orders
            .cluster
            .group(g)
            .run(Work::Settle, orders.timeout, async |client| {
                Ok(client
                    .query(
                        &client.prepare_cached(which.sql()).await?,
                        &[&grace_secs, &cursor, &PAGE],
                    )
                    .await?)
            })
            .await?;
        let page: Vec<Live> = rows
            .iter()
            .map(|r| Live {
                txn_id: r.get(0),
                sale: SaleId::from_db(r.get(1)),
                item: ItemId::from_db(r.get(2)),
                user: UserId::from_db(r.get(3)),
                quantity: r.get(4),
                state: ReservationState::from_db(r.get(5)),
            })
            .collect();
        let Some(last) = page.last() else {
            return Ok(None);
        };
        cursor = Some(last.txn_id);
        report.checked += page.len() as u64;
        repair_page(orders, g, &page, report).await?;
        if (page.len() as i64) < PAGE {
            return Ok(None);
        }
    }
}

/// Read orders by id on one group.
async fn orders_on(
    orders: &OrderService,
    group: usize,
    ids: &[Uuid],
) -> Result<Vec<store::Order>, GroupError> {
    orders
        .cluster
        .group(group)
        .run(Work::Settle, orders.timeout, async |c| {
            store::get_orders_by_id(c, ids).await
        })
        .await
}

/// The status of each live reservation's order: on the user's group, else on any other group
/// (a router-config change may have moved the user; rows are not moved). If a group cannot be
/// asked, the error ends the pass, so nothing is ever called orphaned on partial knowledge.
async fn order_status(
    orders: &OrderService,
    user_group: usize,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, OrderStatus>, GroupError> {
    let mut status: HashMap<Uuid, OrderStatus> = orders_on(orders, user_group, ids)
        .await?
        .into_iter()
        .map(|o| (o.order_id, o.status))
        .collect();
    let unseen: Vec<Uuid> = ids
        .iter()
        .filter(|id| !status.contains_key(id))
        .copied()
        .collect();
    if unseen.is_empty() {
        return Ok(status);
    }
    for (other, group) in orders.cluster.groups.iter().enumerate() {
        if other == user_group {
            continue;
        }
        for o in orders_on(orders, other, &unseen).await? {
            tracing::warn!(order_id = %o.order_id, user_id = o.user_id, group = %group.name,
                "order lives on a group its user no longer routes to");
            status.insert(o.order_id, o.status);
        }
    }
    Ok(status)
}

/// Tombstone (a `cancelled` order) every reservation of `lives` that has no order; returns the
/// txn ids whose tombstone went in: only those are surely order-less.
async fn tombstone(
    orders: &OrderService,
    user_group: usize,
    lives: &[&Live],
    status: &HashMap<Uuid, OrderStatus>,
) -> Result<Vec<Uuid>, GroupError> {
    let missing: Vec<NewOrder> = lives
        .iter()
        .filter(|l| !status.contains_key(&l.txn_id))
        .map(|l| NewOrder {
            order_id: l.txn_id,
            user: l.user,
            sale: l.sale,
            item: l.item,
            quantity: l.quantity,
            amount_cents: 0,
            payment_window_secs: 1,
            status: OrderStatus::Cancelled,
        })
        .collect();
    if missing.is_empty() {
        return Ok(Vec::new());
    }
    let inserted = orders
        .cluster
        .group(user_group)
        .run(Work::Settle, orders.timeout, async |c| {
            let slots = orders
                .router
                .kind(crate::router::KeyKind::Users)
                .slot_count();
            store::insert_orders(c, &missing, slots).await
        })
        .await?;
    let inserted = inserted.orders;
    for o in &inserted {
        tracing::warn!(txn_id = %o.order_id, item_id = o.item_id, user_id = o.user_id,
            "reservation without an order: tombstoned and released");
    }
    Ok(inserted.iter().map(|o| o.order_id).collect())
}

async fn repair_page(
    orders: &OrderService,
    item_group: usize,
    page: &[Live],
    report: &mut ReconcileReport,
) -> Result<(), GroupError> {
    let mut by_user_group: HashMap<usize, Vec<&Live>> = HashMap::new();
    for l in page {
        by_user_group
            .entry(orders.router.user_group(l.user))
            .or_default()
            .push(l);
    }
    let mut release = Vec::new();
    let mut to_ordered = Vec::new();
    let mut to_paid = Vec::new();
    for (ug, lives) in by_user_group {
        let ids: Vec<Uuid> = lives.iter().map(|l| l.txn_id).collect();
        let status = order_status(orders, ug, &ids).await?;
        let orphans = tombstone(orders, ug, &lives, &status).await?;
        report.orphans_released += orphans.len() as u64;
        release.extend(orphans);
        for l in &lives {
            match status.get(&l.txn_id) {
                Some(OrderStatus::PendingPayment) if l.state == ReservationState::Reserved => {
                    to_ordered.push(l.txn_id)
                }
                Some(OrderStatus::Paid) => to_paid.push(l.txn_id),
                Some(OrderStatus::Cancelled | OrderStatus::Expired) => {
                    report.dead_orders_released += 1;
                    release.push(l.txn_id);
                }
                _ => {}
            }
        }
    }
    if !release.is_empty() {
        orders.release_on(item_group, &release, &[]).await?;
    }
    for (txns, to, count) in [
        (
            to_ordered,
            ReservationState::Ordered,
            &mut report.marked_ordered,
        ),
        (to_paid, ReservationState::Paid, &mut report.marked_paid),
    ] {
        if txns.is_empty() {
            continue;
        }
        *count += orders
            .cluster
            .group(item_group)
            .run(Work::Settle, orders.timeout, async |c| {
                reservations::advance_reservations(c, &txns, to).await
            })
            .await?;
    }
    Ok(())
}

/// Expire every due order on every group, in bounded batches. A group that fails is logged and
/// skipped; the others are swept regardless. Returns how many orders expired.
pub async fn sweep(orders: &OrderService, batch: i64) -> usize {
    let mut total = 0;
    for g in 0..orders.cluster.groups.len() {
        loop {
            match orders.expire_orders(g, None, batch).await {
                Ok(n) => {
                    total += n;
                    if (n as i64) < batch {
                        break;
                    }
                }
                Err(e) => {
                    tracing::debug!(group = %orders.cluster.group(g).name, error = %e, "sweep incomplete");
                    break;
                }
            }
        }
    }
    total
}
