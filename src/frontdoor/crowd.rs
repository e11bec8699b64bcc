//! How big the crowd at a protected item is, for the proof of work's difficulty: challenges served
//! per item on this node, counted per second. With `frontdoor.pow_crowd_step` = N, an item that
//! served k challenges in the last whole second hands out proofs of work `1 + k / N` times as
//! hard as its sale's `pow_difficulty` (at most 8 times): a bot farm that asks for challenges in
//! bulk makes each one dearer for itself, while a buyer of a quiet item pays the base. A person's
//! browser solves the base difficulty in well under a second; eight times it, in a few.

use crate::domain::{ItemId, SaleId};
use std::collections::HashMap;
use std::sync::Mutex;

/// Most items counted; beyond, the counts start over (a flood of made-up items).
const MAX_ITEMS: usize = 100_000;
/// The largest multiple of the base difficulty.
pub(crate) const MAX_FACTOR: u32 = 8;

#[derive(Default)]
struct Count {
    second: i64,
    this: u32,
    last: u32,
}

pub(crate) struct Crowd {
    step: u32,
    counts: Mutex<HashMap<(SaleId, ItemId), Count>>,
}

impl Crowd {
    /// `step` 0: the difficulty never rises.
    pub fn new(step: u32) -> Self {
        Self {
            step,
            counts: Mutex::new(HashMap::new()),
        }
    }

    /// Count a challenge served for the item at `now_ms`; the factor its difficulty takes.
    pub fn serve(&self, sale: SaleId, item: ItemId, now_ms: i64) -> u32 {
        if self.step == 0 {
            return 1;
        }
        let second = now_ms.div_euclid(1000);
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if counts.len() >= MAX_ITEMS && !counts.contains_key(&(sale, item)) {
            counts.retain(|_, c| c.second >= second - 1);
            if counts.len() >= MAX_ITEMS {
                counts.clear();
            }
        }
        let c = counts.entry((sale, item)).or_default();
        if c.second != second {
            c.last = if c.second == second - 1 { c.this } else { 0 };
            c.this = 0;
            c.second = second;
        }
        c.this = c.this.saturating_add(1);
        (1 + c.last / self.step).min(MAX_FACTOR)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_difficulty_rises_with_last_seconds_crowd_and_falls_when_it_leaves() {
        let crowd = Crowd::new(100);
        let (s, i) = (SaleId::from_db(1), ItemId::from_db(2));
        for _ in 0..350 {
            assert_eq!(
                crowd.serve(s, i, 10_000),
                1,
                "the first second is at the base"
            );
        }
        assert_eq!(crowd.serve(s, i, 11_000), 4, "350 last second: 1 + 3");
        assert_eq!(
            crowd.serve(s, i, 13_000),
            1,
            "a quiet second later: the base again"
        );
        for _ in 0..5_000 {
            crowd.serve(s, i, 14_000);
        }
        assert_eq!(crowd.serve(s, i, 15_000), MAX_FACTOR, "capped");
        assert_eq!(crowd.serve(s, ItemId::from_db(3), 15_000), 1, "per item");
        assert_eq!(Crowd::new(0).serve(s, i, 1), 1, "off");
    }
}
