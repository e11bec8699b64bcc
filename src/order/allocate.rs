//! Allocation of one item's stock to a batch of buy requests: pure logic, property-tested.
//!
//! The batch is served in arrival order (FIFO), exactly as if each request had run its own
//! conditional decrement one after the other: a request that does not fit is refused and later,
//! smaller ones may still fit (partial fill). Per-user limits count what the user already holds
//! (live reservations read under the item's row lock) plus what earlier requests of the same batch
//! got, so duplicates inside one batch are exact too. A request whose txn_id already holds a live
//! reservation (a retry) allocates nothing and resumes that reservation; the same txn_id twice in one
//! batch gets the first one's outcome.

use std::collections::{BTreeMap, HashMap};
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ask {
    pub txn_id: Uuid,
    pub user: u64,
    pub quantity: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Newly reserved: take `quantity` from the stock.
    Reserve {
        quantity: i32,
    },
    /// The txn already holds a live reservation of `quantity`; nothing new is taken.
    Existing {
        quantity: i32,
    },
    SoldOut {
        remaining: i32,
    },
    LimitExceeded {
        limit: i32,
        already: i64,
    },
}

/// What the batch transaction read under the row lock.
#[derive(Debug, Clone, Default)]
pub(crate) struct Holdings {
    /// Live (not released) units per user for this item.
    pub by_user: HashMap<u64, i64>,
    /// Live reservations by txn_id: their quantity.
    pub(crate) live_txns: HashMap<Uuid, i32>,
}

/// Decide every ask in order. Returns the decisions and the units taken in total.
pub(crate) fn allocate(
    remaining: i32,
    limit: i32,
    asks: &[Ask],
    holdings: &Holdings,
) -> (Vec<Decision>, i32) {
    let mut remaining = remaining;
    let mut by_user = holdings.by_user.clone();
    let mut seen: HashMap<Uuid, Decision> = HashMap::new();
    let mut taken = 0;
    let decisions = asks
        .iter()
        .map(|ask| {
            if let Some(&quantity) = holdings.live_txns.get(&ask.txn_id) {
                return Decision::Existing { quantity };
            }
            if let Some(first) = seen.get(&ask.txn_id) {
                return match *first {
                    Decision::Reserve { quantity } => Decision::Existing { quantity },
                    other => other,
                };
            }
            let already = by_user.get(&ask.user).copied().unwrap_or(0);
            let decision = if already + i64::from(ask.quantity) > i64::from(limit) {
                Decision::LimitExceeded { limit, already }
            } else if remaining < ask.quantity {
                Decision::SoldOut { remaining }
            } else {
                remaining -= ask.quantity;
                taken += ask.quantity;
                *by_user.entry(ask.user).or_default() += i64::from(ask.quantity);
                Decision::Reserve {
                    quantity: ask.quantity,
                }
            };
            seen.insert(ask.txn_id, decision);
            decision
        })
        .collect();
    (decisions, taken)
}

/// A shard group's batch split by item: each item's positions in the batch, in arrival order, and
/// the items in key order (the order their rows are locked in). Allocation then runs per item, so a
/// batch of several items is exactly its items' batches side by side.
pub(crate) fn by_item<K: Ord>(keys: impl IntoIterator<Item = K>) -> BTreeMap<K, Vec<usize>> {
    let mut items: BTreeMap<K, Vec<usize>> = BTreeMap::new();
    for (i, k) in keys.into_iter().enumerate() {
        items.entry(k).or_default().push(i);
    }
    items
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ask(n: u128, user: u64, quantity: i32) -> Ask {
        Ask {
            txn_id: Uuid::from_u128(n),
            user,
            quantity,
        }
    }

    #[test]
    fn partial_fill_serves_the_earliest() {
        let asks = [ask(1, 1, 2), ask(2, 2, 2), ask(3, 3, 2), ask(4, 4, 1)];
        let (d, taken) = allocate(5, 3, &asks, &Holdings::default());
        assert_eq!(taken, 5);
        assert_eq!(d[0], Decision::Reserve { quantity: 2 });
        assert_eq!(d[1], Decision::Reserve { quantity: 2 });
        assert_eq!(d[2], Decision::SoldOut { remaining: 1 });
        assert_eq!(d[3], Decision::Reserve { quantity: 1 });
    }

    #[test]
    fn duplicates_of_one_user_in_a_batch_respect_the_limit() {
        let asks = [ask(1, 7, 1), ask(2, 7, 1), ask(3, 7, 1)];
        let (d, taken) = allocate(10, 2, &asks, &Holdings::default());
        assert_eq!(taken, 2);
        assert_eq!(
            d[2],
            Decision::LimitExceeded {
                limit: 2,
                already: 2
            }
        );
    }

    #[test]
    fn prior_holdings_count_against_the_limit() {
        let mut h = Holdings::default();
        h.by_user.insert(7, 1);
        let (d, taken) = allocate(10, 1, &[ask(1, 7, 1)], &h);
        assert_eq!(taken, 0);
        assert_eq!(
            d[0],
            Decision::LimitExceeded {
                limit: 1,
                already: 1
            }
        );
    }

    #[test]
    fn a_retry_resumes_its_reservation() {
        let mut h = Holdings::default();
        h.by_user.insert(7, 2);
        h.live_txns.insert(Uuid::from_u128(1), 2);
        let asks = [ask(1, 7, 2), ask(1, 7, 2)];
        let (d, taken) = allocate(0, 2, &asks, &h);
        assert_eq!(taken, 0);
        assert_eq!(d, vec![Decision::Existing { quantity: 2 }; 2]);
    }

    #[test]
    fn same_txn_twice_in_a_batch_reserves_once() {
        let asks = [ask(1, 7, 1), ask(1, 7, 1)];
        let (d, taken) = allocate(5, 5, &asks, &Holdings::default());
        assert_eq!(taken, 1);
        assert_eq!(d[1], Decision::Existing { quantity: 1 });
    }

    /// The reference: the plain path, one conditional decrement per request, in order.
    fn one_by_one(remaining: i32, limit: i32, asks: &[Ask]) -> Vec<bool> {
        let mut remaining = remaining;
        let mut held: HashMap<u64, i64> = HashMap::new();
        asks.iter()
            .map(|a| {
                let h = held.entry(a.user).or_default();
                if *h + i64::from(a.quantity) <= i64::from(limit) && remaining >= a.quantity {
                    remaining -= a.quantity;
                    *h += i64::from(a.quantity);
                    true
                } else {
                    false
                }
            })
            .collect()
    }

    /// A group batch the way the store runs one: split by item, each item allocated on its own,
    /// the decisions put back in arrival order.
    fn allocate_group(stock: &[(i32, i32)], asks: &[(usize, Ask)]) -> (Vec<Decision>, Vec<i32>) {
        let mut decisions = vec![None; asks.len()];
        let mut taken = vec![0; stock.len()];
        for (item, positions) in by_item(asks.iter().map(|(item, _)| *item)) {
            let item_asks: Vec<Ask> = positions.iter().map(|&p| asks[p].1).collect();
            let (remaining, limit) = stock[item];
            let (d, t) = allocate(remaining, limit, &item_asks, &Holdings::default());
            taken[item] = t;
            for (p, d) in positions.into_iter().zip(d) {
                decisions[p] = Some(d);
            }
        }
        (
            decisions
                .into_iter()
                .map(|d| d.expect("every ask decided"))
                .collect(),
            taken,
        )
    }

    proptest! {
        #[test]
        fn a_group_batch_equals_one_by_one_per_item(
            stock in proptest::collection::vec((0i32..20, 1i32..4), 1..5),
            raw in proptest::collection::vec((0usize..5, 0u64..8, 1i32..4), 0..120),
        ) {
            let asks: Vec<(usize, Ask)> = raw.iter().enumerate()
                .map(|(i, &(item, u, q))| (item % stock.len(), ask(i as u128 + 1, u, q))).collect();
            let (d, taken) = allocate_group(&stock, &asks);
            prop_assert_eq!(d.len(), asks.len());
            for (item, &(remaining, limit)) in stock.iter().enumerate() {
                // Per item: no oversell, nobody above the limit, the plain path's outcome.
                let mine: Vec<(Ask, Decision)> = asks.iter().zip(&d)
                    .filter(|((i, _), _)| *i == item).map(|((_, a), d)| (*a, *d)).collect();
                let reserved: i32 = mine.iter().map(|(_, d)| match d { Decision::Reserve { quantity } => *quantity, _ => 0 }).sum();
                prop_assert!(reserved <= remaining);
                prop_assert_eq!(reserved, taken[item]);
                let mut per_user: HashMap<u64, i64> = HashMap::new();
                for (a, d) in &mine {
                    if let Decision::Reserve { quantity } = d { *per_user.entry(a.user).or_default() += i64::from(*quantity); }
                }
                prop_assert!(per_user.values().all(|&v| v <= i64::from(limit)));
                let only: Vec<Ask> = mine.iter().map(|(a, _)| *a).collect();
                let served: Vec<bool> = mine.iter().map(|(_, d)| matches!(d, Decision::Reserve { .. })).collect();
                prop_assert_eq!(served, one_by_one(remaining, limit, &only));
            }
        }

        #[test]
        fn batch_equals_one_by_one_and_keeps_invariants(
            remaining in 0i32..40,
            limit in 1i32..5,
            raw in proptest::collection::vec((0u64..12, 1i32..4), 0..80),
        ) {
            let asks: Vec<Ask> = raw.iter().enumerate()
                .map(|(i, &(u, q))| ask(i as u128 + 1, u, q)).collect();
            let (d, taken) = allocate(remaining, limit, &asks, &Holdings::default());
            // No oversell.
            prop_assert!(taken <= remaining);
            let reserved: i32 = d.iter().map(|d| match d { Decision::Reserve { quantity } => *quantity, _ => 0 }).sum();
            prop_assert_eq!(reserved, taken);
            // Nobody above the limit.
            let mut per_user: HashMap<u64, i64> = HashMap::new();
            for (a, d) in asks.iter().zip(&d) {
                if let Decision::Reserve { quantity } = d { *per_user.entry(a.user).or_default() += i64::from(*quantity); }
            }
            prop_assert!(per_user.values().all(|&v| v <= i64::from(limit)));
            // Same outcome as the plain path in arrival order.
            let served: Vec<bool> = d.iter().map(|d| matches!(d, Decision::Reserve { .. })).collect();
            prop_assert_eq!(served, one_by_one(remaining, limit, &asks));
        }
    }
}
