//! The checker: reads a run's history and the state read back at its end, and proves (or names
//! what breaks) the engine's promises, in the spirit of Jepsen's checkers:
//!
//! - every acknowledged order is present exactly once, with its acknowledged state or a later one
//!   (a cancel answered 200 left it cancelled, a payment answered 200 left it paid);
//! - one request id never yields two orders;
//! - no read shows a user's orders without one acknowledged before the read was sent;
//! - nobody holds more than the per-user limit of an item;
//! - stock is conserved per item (stock = remaining + reserved + ordered + paid), and the live
//!   orders of an item never exceed what left its stock;
//! - every paid order was paid once (one applied payment), and every payment answered 200 is
//!   recorded as applied.
//!
//! It also measures availability per fault kind: after each fault, the longest time without an
//! acknowledged purchase, and the refusals by code. A pure function of its inputs: unit-tested.

use super::history::{FaultEvent, Final, FinalOrder, Kind, Op};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};

#[derive(Debug, Clone, Serialize)]
pub struct Violation {
    pub kind: &'static str,
    pub detail: String,
    /// The request ids (or payment refs) involved.
    pub requests: Vec<String>,
}

/// Availability after one kind of fault.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Availability {
    pub fault: String,
    pub dealt: usize,
    /// Per fault of this kind: the longest time without an acknowledged purchase from the fault
    /// until the next fault (or the end), in ms. A sold-out item lengthens it too.
    pub outages_ms: Vec<u64>,
    /// Per fault of this kind: how long purchases were refused (503) or unanswered after it: from
    /// the fault to the answer of the last such attempt sent before the next fault, in ms.
    pub refused_ms: Vec<u64>,
    /// Purchases refused (503) and unanswered, by code, in those windows.
    pub refused: BTreeMap<String, usize>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Report {
    pub violations: Vec<Violation>,
    pub acknowledged_orders: usize,
    pub requests: BTreeMap<String, usize>,
    pub availability: Vec<Availability>,
}

/// An acknowledged purchase.
struct Ack<'a> {
    op: &'a Op,
    order_id: &'a str,
}

pub fn check(ops: &[Op], fin: &Final, faults: &[FaultEvent], end_ms: u64) -> Report {
    let mut report = Report::default();
    let mut v = Vec::new();
    for op in ops {
        let kind = op.kind.map(|k| format!("{k:?}").to_lowercase());
        let status = op.status.map_or("none".to_string(), |s| s.to_string());
        *report
            .requests
            .entry(format!("{} {status}", kind.unwrap_or_default()))
            .or_default() += 1;
    }
    let acks: Vec<Ack> = ops
        .iter()
        .filter(|o| o.acked_buy())
        .filter_map(|o| {
            Some(Ack {
                op: o,
                order_id: o.order_id.as_deref()?,
            })
        })
        .collect();
    let final_by_id = final_index(fin, &mut v);
    one_order_per_request(&acks, &mut v);
    acknowledged_orders_present(&acks, &final_by_id, &mut v);
    acknowledged_changes_hold(ops, &final_by_id, &mut v);
    reads_show_acknowledged_orders(ops, &acks, &mut v);
    limits_and_stock(fin, &mut v);
    paid_once(ops, fin, &final_by_id, &mut v);
    report.acknowledged_orders = acks
        .iter()
        .map(|a| a.order_id)
        .collect::<HashSet<_>>()
        .len();
    report.availability = availability(ops, faults, end_ms);
    report.violations = v;
    report
}

/// order id -> (user, order); duplicates are violations.
fn final_index<'a>(
    fin: &'a Final,
    v: &mut Vec<Violation>,
) -> HashMap<&'a str, (u64, &'a FinalOrder)> {
    let mut index: HashMap<&str, (u64, &FinalOrder)> = HashMap::new();
    for (user, orders) in &fin.orders {
        for o in orders {
            if let Some((other, _)) = index.insert(o.order_id.as_str(), (*user, o)) {
                v.push(Violation {
                    kind: "duplicate order",
                    detail: format!(
                        "order {} is listed twice (users {other} and {user})",
                        o.order_id
                    ),
                    requests: vec![o.order_id.clone()],
                });
            }
        }
    }
    index
}

fn one_order_per_request(acks: &[Ack], v: &mut Vec<Violation>) {
    let mut by_request: HashMap<(u64, &str), HashSet<&str>> = HashMap::new();
    for a in acks {
        if let Some(rid) = a.op.request_id.as_deref() {
            by_request
                .entry((a.op.user, rid))
                .or_default()
                .insert(a.order_id);
        }
    }
    for ((user, rid), ids) in by_request {
        if ids.len() > 1 {
            v.push(Violation {
                kind: "one request, two orders",
                detail: format!("user {user}'s request {rid} was acknowledged with orders {ids:?}"),
                requests: vec![rid.to_string()],
            });
        }
    }
}

fn acknowledged_orders_present(
    acks: &[Ack],
    final_by_id: &HashMap<&str, (u64, &FinalOrder)>,
    v: &mut Vec<Violation>,
) {
    for a in acks {
        match final_by_id.get(a.order_id) {
            None => v.push(Violation {
                kind: "acknowledged order lost",
                detail: format!(
                    "order {} of user {} was acknowledged ({} at {} ms) but is absent",
                    a.order_id,
                    a.op.user,
                    a.op.status.unwrap_or(0),
                    a.op.done_ms
                ),
                requests: a.op.request_id.iter().cloned().collect(),
            }),
            Some((user, o)) => {
                let wrong = *user != a.op.user
                    || Some(o.item) != a.op.item
                    || Some(o.qty) != a.op.qty.map(i64::from)
                    || !["pending_payment", "paid", "cancelled", "expired"]
                        .contains(&o.status.as_str());
                if wrong {
                    v.push(Violation {
                        kind: "acknowledged order changed",
                        detail: format!(
                            "order {} was acknowledged for user {} item {:?} x{:?}, reads back as user {user} item {} x{} {}",
                            a.order_id, a.op.user, a.op.item, a.op.qty, o.item, o.qty, o.status
                        ),
                        requests: a.op.request_id.iter().cloned().collect(),
                    });
                }
            }
        }
    }
}

/// A cancel answered 200 leaves its order cancelled; a payment answered 200 leaves it paid.
fn acknowledged_changes_hold(
    ops: &[Op],
    final_by_id: &HashMap<&str, (u64, &FinalOrder)>,
    v: &mut Vec<Violation>,
) {
    let mut promised: HashMap<&str, HashSet<&str>> = HashMap::new();
    for op in ops.iter().filter(|o| o.ok()) {
        let want = match op.kind {
            Some(Kind::Cancel) => "cancelled",
            Some(Kind::Pay) => "paid",
            _ => continue,
        };
        if let Some(id) = op.order_id.as_deref() {
            promised.entry(id).or_default().insert(want);
        }
    }
    for (id, states) in promised {
        let now = final_by_id.get(id).map(|(_, o)| o.status.as_str());
        if states.len() > 1 || now.is_none_or(|s| !states.contains(s)) {
            v.push(Violation {
                kind: "acknowledged change undone",
                detail: format!("order {id} was acknowledged {states:?}, reads back as {now:?}"),
                requests: vec![id.to_string()],
            });
        }
    }
}

/// Every read of a user's orders lists every order of theirs acknowledged before it was sent.
fn reads_show_acknowledged_orders(ops: &[Op], acks: &[Ack], v: &mut Vec<Violation>) {
    let mut by_user: HashMap<u64, Vec<&Ack>> = HashMap::new();
    for a in acks {
        by_user.entry(a.op.user).or_default().push(a);
    }
    for read in ops.iter().filter(|o| o.kind == Some(Kind::Read) && o.ok()) {
        let Some(seen) = &read.seen else { continue };
        let listed: HashSet<&str> = seen.iter().map(|(id, _)| id.as_str()).collect();
        for a in by_user.get(&read.user).into_iter().flatten() {
            if a.op.done_ms < read.sent_ms && !listed.contains(a.order_id) {
                v.push(Violation {
                    kind: "acknowledged order missing from a later read",
                    detail: format!(
                        "order {} of user {} acknowledged at {} ms, not listed by the read sent at {} ms",
                        a.order_id, read.user, a.op.done_ms, read.sent_ms
                    ),
                    requests: a.op.request_id.iter().cloned().collect(),
                });
            }
        }
    }
}

fn live(status: &str) -> bool {
    status == "pending_payment" || status == "paid"
}

fn limits_and_stock(fin: &Final, v: &mut Vec<Violation>) {
    let mut live_per_item: HashMap<u64, i64> = HashMap::new();
    for (user, orders) in &fin.orders {
        let mut held: HashMap<u64, i64> = HashMap::new();
        for o in orders.iter().filter(|o| live(&o.status)) {
            *held.entry(o.item).or_default() += o.qty;
            *live_per_item.entry(o.item).or_default() += o.qty;
        }
        for (item, n) in held {
            if n > fin.per_user_limit {
                v.push(Violation {
                    kind: "per-user limit exceeded",
                    detail: format!(
                        "user {user} holds {n} of item {item} (limit {})",
                        fin.per_user_limit
                    ),
                    requests: Vec::new(),
                });
            }
        }
    }
    for a in &fin.items {
        let sum = a.remaining + a.reserved + a.ordered + a.paid;
        if !a.conserved || sum != a.stock || a.remaining < 0 {
            v.push(Violation {
                kind: "stock not conserved",
                detail: format!(
                    "item {}: stock {} != remaining {} + reserved {} + ordered {} + paid {}",
                    a.item, a.stock, a.remaining, a.reserved, a.ordered, a.paid
                ),
                requests: Vec::new(),
            });
        }
        let sold = live_per_item.get(&a.item).copied().unwrap_or(0);
        if sold > a.stock - a.remaining {
            v.push(Violation {
                kind: "oversold",
                detail: format!(
                    "item {}: live orders hold {sold}, but only {} left the stock",
                    a.item,
                    a.stock - a.remaining
                ),
                requests: Vec::new(),
            });
        }
    }
}

fn paid_once(
    ops: &[Op],
    fin: &Final,
    final_by_id: &HashMap<&str, (u64, &FinalOrder)>,
    v: &mut Vec<Violation>,
) {
    let mut applied: HashMap<&str, Vec<&str>> = HashMap::new();
    for p in fin.payments.iter().filter(|p| p.state == "applied") {
        applied
            .entry(p.order_id.as_str())
            .or_default()
            .push(p.payment_ref.as_str());
    }
    for (id, refs) in &applied {
        if refs.len() > 1 {
            v.push(Violation {
                kind: "paid twice",
                detail: format!("order {id} has {} applied payments", refs.len()),
                requests: refs.iter().map(|r| r.to_string()).collect(),
            });
        }
    }
    for (id, (_, o)) in final_by_id {
        if o.status == "paid" && !applied.contains_key(id) {
            v.push(Violation {
                kind: "paid without a payment",
                detail: format!("order {id} is paid but no payment is applied to it"),
                requests: vec![id.to_string()],
            });
        }
    }
    for op in ops.iter().filter(|o| o.kind == Some(Kind::Pay) && o.ok()) {
        let (Some(id), Some(r)) = (op.order_id.as_deref(), op.payment_ref.as_deref()) else {
            continue;
        };
        let recorded = applied.get(id).is_some_and(|refs| refs.contains(&r));
        if !recorded {
            v.push(Violation {
                kind: "acknowledged payment not recorded",
                detail: format!("payment {r} of order {id} was answered 200 but is not applied"),
                requests: vec![r.to_string()],
            });
        }
    }
}

fn availability(ops: &[Op], faults: &[FaultEvent], end_ms: u64) -> Vec<Availability> {
    let mut acked: Vec<u64> = ops
        .iter()
        .filter(|o| o.acked_buy())
        .map(|o| o.done_ms)
        .collect();
    acked.sort_unstable();
    let dealt: Vec<&FaultEvent> = faults.iter().filter(|f| f.refused.is_none()).collect();
    let mut per_kind: BTreeMap<String, Availability> = BTreeMap::new();
    for (i, f) in dealt.iter().enumerate() {
        let until = dealt.get(i + 1).map_or(end_ms, |n| n.at_ms);
        let mut last = f.at_ms;
        let mut longest = 0;
        for &t in acked.iter().filter(|&&t| t >= f.at_ms && t < until) {
            longest = longest.max(t - last);
            last = t;
        }
        longest = longest.max(if last == f.at_ms { until - f.at_ms } else { 0 });
        let a = per_kind
            .entry(f.kind.clone())
            .or_insert_with(|| Availability {
                fault: f.kind.clone(),
                ..Default::default()
            });
        a.dealt += 1;
        a.outages_ms.push(longest);
        let mut refused_until = f.at_ms;
        for op in ops.iter().filter(|o| {
            o.kind == Some(Kind::Buy) && !o.abandoned && o.sent_ms >= f.at_ms && o.sent_ms < until
        }) {
            let code = match op.status {
                None => Some("no answer".to_string()),
                Some(503) => Some(op.code.clone().unwrap_or_else(|| "503".into())),
                _ => None,
            };
            if let Some(c) = code {
                *a.refused.entry(c).or_default() += 1;
                refused_until = refused_until.max(op.done_ms);
            }
        }
        a.refused_ms.push(refused_until - f.at_ms);
    }
    per_kind.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nemesis::history::{ItemAudit, PaymentRow};

    fn buy(user: u64, rid: &str, id: &str, status: u16, sent: u64, done: u64) -> Op {
        Op {
            kind: Some(Kind::Buy),
            user,
            item: Some(1),
            qty: Some(1),
            request_id: Some(rid.into()),
            order_id: (status == 201 || status == 200).then(|| id.into()),
            sent_ms: sent,
            done_ms: done,
            status: Some(status),
            ..Default::default()
        }
    }

    fn order(id: &str, status: &str) -> FinalOrder {
        FinalOrder {
            order_id: id.into(),
            item: 1,
            qty: 1,
            status: status.into(),
        }
    }

    fn fin(orders: Vec<(u64, FinalOrder)>, remaining: i64) -> Final {
        let mut f = Final {
            per_user_limit: 2,
            ..Default::default()
        };
        let mut ordered = 0;
        for (u, o) in orders {
            if live(&o.status) {
                ordered += o.qty;
            }
            f.orders.entry(u).or_default().push(o);
        }
        f.items.push(ItemAudit {
            item: 1,
            stock: 10,
            remaining,
            reserved: 0,
            ordered,
            paid: 0,
            conserved: true,
        });
        f
    }

    fn kinds(r: &Report) -> Vec<&'static str> {
        r.violations.iter().map(|v| v.kind).collect()
    }

    #[test]
    fn a_clean_history_passes() {
        let ops = vec![buy(7, "r1", "a", 201, 0, 5), buy(7, "r1", "a", 200, 10, 12)];
        let r = check(
            &ops,
            &fin(vec![(7, order("a", "pending_payment"))], 9),
            &[],
            100,
        );
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        assert_eq!(r.acknowledged_orders, 1);
    }

    #[test]
    fn a_lost_acknowledged_order_is_named_with_its_request() {
        let ops = vec![buy(7, "r1", "a", 201, 0, 5)];
        let r = check(&ops, &fin(vec![], 10), &[], 100);
        assert_eq!(kinds(&r), vec!["acknowledged order lost"]);
        assert_eq!(r.violations[0].requests, vec!["r1".to_string()]);
    }

    #[test]
    fn a_read_after_the_ack_must_list_the_order() {
        let mut read = Op {
            kind: Some(Kind::Read),
            user: 7,
            sent_ms: 10,
            done_ms: 11,
            status: Some(200),
            seen: Some(vec![]),
            ..Default::default()
        };
        let ops = vec![buy(7, "r1", "a", 201, 0, 5), read.clone()];
        let f = fin(vec![(7, order("a", "pending_payment"))], 9);
        assert_eq!(
            kinds(&check(&ops, &f, &[], 100)),
            vec!["acknowledged order missing from a later read"]
        );
        // A read sent before the acknowledgement arrived may miss it.
        read.sent_ms = 3;
        let ops = vec![buy(7, "r1", "a", 201, 0, 5), read];
        assert!(check(&ops, &f, &[], 100).violations.is_empty());
    }

    #[test]
    fn limits_stock_and_changes_are_checked() {
        let orders = vec![
            (7, order("a", "pending_payment")),
            (7, order("b", "paid")),
            (7, order("c", "paid")),
        ];
        let mut f = fin(orders, 8);
        f.payments = vec![
            PaymentRow {
                order_id: "b".into(),
                payment_ref: "p1".into(),
                state: "applied".into(),
            },
            PaymentRow {
                order_id: "b".into(),
                payment_ref: "p2".into(),
                state: "applied".into(),
            },
        ];
        let cancel = Op {
            kind: Some(Kind::Cancel),
            user: 7,
            order_id: Some("a".into()),
            status: Some(200),
            ..Default::default()
        };
        let r = check(&[cancel], &f, &[], 100);
        let k = kinds(&r);
        for want in [
            "per-user limit exceeded",
            "oversold",
            "acknowledged change undone",
            "paid twice",
            "paid without a payment",
        ] {
            assert!(k.contains(&want), "{want} in {k:?}");
        }
    }

    #[test]
    fn one_request_never_makes_two_orders() {
        let ops = vec![buy(7, "r1", "a", 201, 0, 5), buy(7, "r1", "b", 201, 6, 9)];
        let f = fin(
            vec![
                (7, order("a", "pending_payment")),
                (7, order("b", "pending_payment")),
            ],
            8,
        );
        assert_eq!(
            kinds(&check(&ops, &f, &[], 100)),
            vec!["one request, two orders"]
        );
    }

    #[test]
    fn availability_is_the_longest_gap_after_each_fault() {
        let ops = vec![
            buy(1, "a", "a", 201, 0, 100),
            buy(2, "b", "b", 503, 150, 160),
            buy(3, "c", "c", 201, 0, 900),
            buy(4, "d", "d", 201, 0, 1000),
        ];
        let faults = vec![FaultEvent {
            kind: "SIGKILL of a master".into(),
            target: "g0".into(),
            at_ms: 200,
            done_ms: 200,
            refused: None,
        }];
        let a = availability(&ops, &faults, 2000);
        assert_eq!(a.len(), 1);
        assert_eq!(
            a[0].outages_ms,
            vec![700],
            "700 ms from the fault to the first ack"
        );
        assert_eq!(a[0].refused_ms, vec![0], "the 503 came before the fault");
        let a = availability(&ops[..2], &faults, 2000);
        assert_eq!(
            a[0].outages_ms,
            vec![1800],
            "no ack after the fault: the whole window"
        );
    }
}
