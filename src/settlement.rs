//! Settlement reconciliation: the payment provider's settlement file against the payments the
//! engine recorded (`seckill reconcile --payments settlement.csv`).
//!
//! The file is CSV, one settled payment per line: `payment_ref,order_id,amount_cents` (a header
//! line naming those columns is allowed; blank lines are skipped). Every settled payment is
//! classified once:
//! - `settled_unknown`: settled, but the engine never recorded this payment;
//! - `amount_differs`: settled with another amount than the engine recorded;
//! - `paid_twice`: a second payment for an order someone had already paid (recorded as
//!   refund due, reason `order_paid`), or one `payment_ref` settled on several lines or recorded
//!   more than once (on different groups: a ref is unique per group, where the order's user
//!   lives);
//! - `refund_due`: settled, but it paid nothing here (late after expiry, for a cancelled order,
//!   with a wrong amount, for an unknown order): the money must go back;
//!
//! and every payment the engine applied but the file does not list is `paid_not_settled`.

use crate::order::payments::{Payment, PaymentState, Refused};
use crate::order::OrderService;
use crate::shard::{GroupError, Work};
use serde::Serialize;
use std::collections::HashMap;
use uuid::Uuid;

/// One line of the settlement file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    pub payment_ref: String,
    pub order_id: Uuid,
    pub amount_cents: i64,
}

/// A disagreement between the file and the engine.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Mismatch {
    pub kind: &'static str,
    pub payment_ref: String,
    pub order_id: Uuid,
    pub(crate) settled_cents: Option<i64>,
    pub(crate) recorded_cents: Option<i64>,
    pub detail: String,
}

/// Parse the settlement file; an error names the line.
pub fn parse(text: &str) -> Result<Vec<Settled>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line
            .split(',')
            .map(|f| f.trim().trim_matches('"'))
            .collect();
        if n == 0 && fields.first() == Some(&"payment_ref") {
            continue;
        }
        let [r, o, a] = fields[..] else {
            return Err(format!(
                "line {}: want payment_ref,order_id,amount_cents",
                n + 1
            ));
        };
        let order_id = o
            .parse()
            .map_err(|_| format!("line {}: order_id {o:?} is not a UUID", n + 1))?;
        let amount_cents = a
            .parse()
            .map_err(|_| format!("line {}: amount_cents {a:?} is not an integer", n + 1))?;
        if r.is_empty() {
            return Err(format!("line {}: empty payment_ref", n + 1));
        }
        out.push(Settled {
            payment_ref: r.to_string(),
            order_id,
            amount_cents,
        });
    }
    Ok(out)
}

/// Compare (module docs). Pure.
// Long on purpose: one pass over the settlement file, each kind of mismatch decided where the
// line is read.
pub fn compare(settled: &[Settled], recorded: &[Payment]) -> Vec<Mismatch> {
    let mut by_ref: HashMap<&str, Vec<&Payment>> = HashMap::new();
    for p in recorded {
        by_ref.entry(p.payment_ref.as_str()).or_default().push(p);
    }
    let mut lines: HashMap<&str, usize> = HashMap::new();
    for s in settled {
        *lines.entry(s.payment_ref.as_str()).or_default() += 1;
    }
    let mut out = Vec::new();
    let mismatch = |kind, s: &Settled, recorded: Option<&Payment>, detail: String| Mismatch {
        kind,
        payment_ref: s.payment_ref.clone(),
        order_id: s.order_id,
        settled_cents: Some(s.amount_cents),
        recorded_cents: recorded.map(|p| p.amount_cents),
        detail,
    };
    let mut reported = std::collections::HashSet::new();
    for s in settled {
        let Some(found) = by_ref.get(s.payment_ref.as_str()) else {
            out.push(mismatch(
                "settled_unknown",
                s,
                None,
                "the engine never recorded this payment".into(),
            ));
            continue;
        };
        let p = found[0];
        let copies = lines[s.payment_ref.as_str()];
        if copies > 1 || found.len() > 1 {
            if reported.insert(s.payment_ref.as_str()) {
                out.push(mismatch(
                    "paid_twice",
                    s,
                    Some(p),
                    format!(
                        "this payment_ref was settled {copies} time(s) and recorded {} time(s)",
                        found.len()
                    ),
                ));
            }
        } else if p.amount_cents != s.amount_cents || p.order_id != s.order_id {
            out.push(mismatch(
                "amount_differs",
                s,
                Some(p),
                format!(
                    "recorded for order {} with {} cents",
                    p.order_id, p.amount_cents
                ),
            ));
        } else if p.reason == Some(Refused::OrderPaid) {
            out.push(mismatch(
                "paid_twice",
                s,
                Some(p),
                "the order was already paid by another payment: refund this one".into(),
            ));
        } else if let Some(reason) = p.reason {
            out.push(mismatch(
                "refund_due",
                s,
                Some(p),
                format!("refused by the engine ({}): refund it", reason.as_str()),
            ));
        }
    }
    for p in recorded {
        if p.state == PaymentState::Applied && !lines.contains_key(p.payment_ref.as_str()) {
            out.push(Mismatch {
                kind: "paid_not_settled",
                payment_ref: p.payment_ref.clone(),
                order_id: p.order_id,
                settled_cents: None,
                recorded_cents: Some(p.amount_cents),
                detail: "the engine marked the order paid, the provider settled nothing".into(),
            });
        }
    }
    out
}

/// Every recorded payment of every group; of a user moved to another group, the copy where the
/// user routes now only (a move leaves an inactive copy behind until it is completed).
pub async fn recorded(orders: &OrderService) -> Result<Vec<Payment>, GroupError> {
    const PAGE: i64 = 1000;
    let mut all = Vec::new();
    for (idx, g) in orders.cluster.groups.iter().enumerate() {
        let mut after = String::new();
        loop {
            let page = g
                .run(Work::Settle, orders.timeout, async |c| {
                    crate::order::payments::all_after(c, &after, PAGE).await
                })
                .await?;
            let Some(last) = page.last() else { break };
            after = last.payment_ref.clone();
            let full = page.len() as i64 == PAGE;
            all.extend(page.into_iter().filter(|p| {
                orders
                    .router
                    .route(crate::router::KeyKind::Users, p.user_id)
                    == idx
            }));
            if !full {
                break;
            }
        }
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payment(r: &str, order: u128, cents: i64, reason: Option<Refused>) -> Payment {
        Payment {
            payment_ref: r.into(),
            order_id: Uuid::from_u128(order),
            user_id: 1,
            sale_id: Some(1),
            amount_cents: cents,
            state: if reason.is_some() {
                PaymentState::RefundDue
            } else {
                PaymentState::Applied
            },
            reason,
            received_at: chrono::Utc::now(),
        }
    }

    fn settled(r: &str, order: u128, cents: i64) -> Settled {
        Settled {
            payment_ref: r.into(),
            order_id: Uuid::from_u128(order),
            amount_cents: cents,
        }
    }

    #[test]
    fn one_of_each_kind() {
        let recorded = vec![
            payment("ok", 1, 100, None),
            payment("short", 2, 90, None),
            payment("second", 1, 100, Some(Refused::OrderPaid)),
            payment("late", 3, 100, Some(Refused::OrderExpired)),
            payment("unsettled", 4, 100, None),
        ];
        let file = vec![
            settled("ok", 1, 100),
            settled("short", 2, 100),
            settled("second", 1, 100),
            settled("late", 3, 100),
            settled("ghost", 5, 100),
        ];
        let kinds: Vec<(&str, String)> = compare(&file, &recorded)
            .into_iter()
            .map(|m| (m.kind, m.payment_ref))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("amount_differs", "short".to_string()),
                ("paid_twice", "second".to_string()),
                ("refund_due", "late".to_string()),
                ("settled_unknown", "ghost".to_string()),
                ("paid_not_settled", "unsettled".to_string()),
            ]
        );
        assert!(compare(&file[..1], &recorded[..1]).is_empty());
    }

    #[test]
    fn a_reference_settled_or_recorded_twice_is_flagged_once() {
        let recorded = vec![payment("dup", 1, 100, None), payment("dup", 2, 100, None)];
        let file = vec![settled("dup", 1, 100)];
        let kinds: Vec<&str> = compare(&file, &recorded).iter().map(|m| m.kind).collect();
        assert_eq!(kinds, vec!["paid_twice"]);
        let file = vec![settled("once", 1, 100), settled("once", 1, 100)];
        let kinds: Vec<&str> = compare(&file, &[payment("once", 1, 100, None)])
            .iter()
            .map(|m| m.kind)
            .collect();
        assert_eq!(kinds, vec!["paid_twice"]);
    }

    #[test]
    fn the_file_parses_with_or_without_a_header_and_names_bad_lines() {
        let id = Uuid::from_u128(7);
        let text = format!("payment_ref,order_id,amount_cents\n\npay-1,{id},250\n");
        assert_eq!(parse(&text).unwrap(), vec![settled("pay-1", 7, 250)]);
        assert_eq!(parse(&format!("pay-1,{id},250")).unwrap().len(), 1);
        assert!(parse("a,b").unwrap_err().contains("line 1"));
        assert!(parse(&format!("x,{id},2.5"))
            .unwrap_err()
            .contains("amount_cents"));
        assert!(parse("x,notauuid,1").unwrap_err().contains("order_id"));
    }
}
