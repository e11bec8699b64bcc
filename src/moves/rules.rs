//! The moves' pure rules, tested on their own: when an open move stands in the way of a new one,
//! and how the slots of a kind are evened out over the groups.

use super::Unit;
use crate::router::slot_of;

/// Whether a move of `unit` clashes with an open move of the same kind whose unit is the key
/// `other_key` or the slot `other_slot` (`slots` hash slots in all): the same key, a slot and a key
/// of that slot, or the same slot. Two keys of one slot do not clash.
pub(super) fn clashes(
    unit: Unit,
    other_key: Option<u64>,
    other_slot: Option<u32>,
    slots: u32,
) -> bool {
    let slot_of_unit = match unit {
        Unit::Key(k) => slot_of(k, slots),
        Unit::Slot(s) => s,
    };
    match (unit, other_key, other_slot) {
        (Unit::Key(k), Some(other), _) => k == other,
        (Unit::Slot(_), Some(other), _) => slot_of(other, slots) == slot_of_unit,
        (_, None, Some(s)) => s == slot_of_unit,
        _ => false,
    }
}

/// The slot moves that even out `owned` (the slots each group holds, by group index) to within
/// one: `(slot, from, to)` in the order to run them, each from the fullest group (the first of
/// equals) to the emptiest (the first of equals), no slot moved twice.
pub(super) fn even_out(mut owned: Vec<Vec<u32>>) -> Vec<(u32, usize, usize)> {
    let mut plan = Vec::new();
    loop {
        let full = owned
            .iter()
            .enumerate()
            .max_by_key(|(g, o)| (o.len(), std::cmp::Reverse(*g)))
            .map(|(g, _)| g);
        let empty = owned
            .iter()
            .enumerate()
            .min_by_key(|(g, o)| (o.len(), *g))
            .map(|(g, _)| g);
        let (Some(full), Some(empty)) = (full, empty) else {
            return plan;
        };
        if owned[full].len() <= owned[empty].len() + 1 {
            return plan;
        }
        let Some(slot) = owned[full].pop() else {
            return plan;
        };
        owned[empty].push(slot);
        plan.push((slot, full, empty));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SLOTS: u32 = 64;

    fn a_key_of_slot(slot: u32) -> u64 {
        (1..).find(|k| slot_of(*k, SLOTS) == slot).unwrap_or(0)
    }

    #[test]
    fn keys_clash_only_with_themselves_and_their_slot() {
        let k = a_key_of_slot(5);
        let other = (k + 1..).find(|o| slot_of(*o, SLOTS) == 5).unwrap_or(0);
        assert!(clashes(Unit::Key(k), Some(k), None, SLOTS));
        assert!(
            !clashes(Unit::Key(k), Some(other), None, SLOTS),
            "two keys of one slot"
        );
        assert!(
            clashes(Unit::Key(k), None, Some(5), SLOTS),
            "a key and its slot"
        );
        assert!(!clashes(Unit::Key(k), None, Some(6), SLOTS));
    }

    #[test]
    fn slots_clash_with_themselves_and_their_keys() {
        assert!(clashes(Unit::Slot(5), None, Some(5), SLOTS));
        assert!(!clashes(Unit::Slot(5), None, Some(6), SLOTS));
        assert!(
            clashes(Unit::Slot(5), Some(a_key_of_slot(5)), None, SLOTS),
            "a slot and its key"
        );
        assert!(!clashes(Unit::Slot(5), Some(a_key_of_slot(6)), None, SLOTS));
        assert!(
            !clashes(Unit::Slot(5), None, None, SLOTS),
            "a row with neither never clashes"
        );
    }

    #[test]
    fn a_new_group_gets_its_share_from_the_fullest() {
        let owned = vec![(0..8).collect(), (8..16).collect(), vec![]];
        let plan = even_out(owned);
        // 16 slots over three groups: 5, 6, 5; of equals, the first group gives first.
        assert_eq!(
            plan,
            vec![(7, 0, 2), (15, 1, 2), (6, 0, 2), (14, 1, 2), (5, 0, 2)]
        );
    }

    #[test]
    fn an_even_layout_plans_nothing() {
        assert!(even_out(vec![(0..4).collect(), (4..7).collect()]).is_empty());
        assert!(even_out(vec![]).is_empty());
        assert!(even_out(vec![vec![], vec![]]).is_empty());
    }

    proptest! {
        #[test]
        fn the_plan_evens_out_within_one_and_moves_each_slot_once(
            sizes in proptest::collection::vec(0usize..40, 1..6)
        ) {
            let mut next = 0u32;
            let owned: Vec<Vec<u32>> = sizes
                .iter()
                .map(|n| (0..*n).map(|_| { next += 1; next }).collect())
                .collect();
            let plan = even_out(owned.clone());
            let mut after = owned.clone();
            let mut moved = std::collections::HashSet::new();
            for (slot, from, to) in &plan {
                prop_assert!(moved.insert(*slot), "slot {} moved twice", slot);
                let at = after[*from].iter().position(|s| s == slot);
                prop_assert!(at.is_some(), "slot {} is not on group {}", slot, from);
                after[*from].retain(|s| s != slot);
                after[*to].push(*slot);
            }
            let counts: Vec<usize> = after.iter().map(Vec::len).collect();
            let (lo, hi) = (counts.iter().min().copied().unwrap_or(0), counts.iter().max().copied().unwrap_or(0));
            prop_assert!(hi <= lo + 1, "uneven after the plan: {:?}", counts);
            // No more moves than the groups over their share hold above it.
            let total: usize = sizes.iter().sum();
            let ceil = total.div_ceil(sizes.len());
            let needed: usize = sizes.iter().map(|n| n.saturating_sub(ceil)).sum();
            prop_assert!(plan.len() <= needed + sizes.len(), "{} moves for {:?}", plan.len(), sizes);
        }
    }
}
