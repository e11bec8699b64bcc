//! The rules of a fair draw as pure functions: what anyone can recompute from the revealed seed.
//!
//! - The commitment is SHA-256 of the seed's 32 raw bytes, shown from the sale's creation on.
//! - An entry's rank key is HMAC-SHA256(key = the seed's 32 raw bytes, message = ASCII
//!   `"<sale_id>:<item_id>:<user_id>"`, ids in decimal), the 32-byte MAC read as a big-endian
//!   number: entries are served in ascending order of it.
//! - Served in that order, an entry whose quantity is above the item's per-user limit is refused
//!   `limit_exceeded`; one whose quantity no longer fits the stock left is refused `sold_out`, and
//!   the next entry is tried; every other entry wins its quantity.
//!
//! The draw runner ([`super::run`]) and the verifier (`seckill verify-draw`) use the same functions.

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

/// The secret drawn at a sale's creation.
pub type Seed = [u8; 32];

/// A fresh seed from the operating system's secure random source.
pub(crate) fn fresh_seed() -> Result<Seed, getrandom::Error> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed)?;
    Ok(seed)
}

/// SHA-256 of the raw seed: what a sale shows before its draw.
pub fn commitment(seed: &Seed) -> [u8; 32] {
    Sha256::digest(seed).into()
}

/// The rank key of a user's entry for an item (module docs); compare keys as byte strings.
pub(crate) fn rank_key(seed: &Seed, sale_id: u64, item_id: u64, user_id: u64) -> [u8; 32] {
    let mut mac = match <Hmac<Sha256> as KeyInit>::new_from_slice(seed) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    };
    mac.update(format!("{sale_id}:{item_id}:{user_id}").as_bytes());
    mac.finalize().into_bytes().into()
}

/// What an entry came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Won,
    SoldOut,
    LimitExceeded,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Won => "won",
            Outcome::SoldOut => "sold_out",
            Outcome::LimitExceeded => "limit_exceeded",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "won" => Outcome::Won,
            "sold_out" => Outcome::SoldOut,
            "limit_exceeded" => Outcome::LimitExceeded,
            _ => return None,
        })
    }
}

/// An entry to be served: who asked, and for how much.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub user_id: u64,
    pub quantity: i64,
}

/// Order `entries` as the draw serves them: ascending rank key (ties, which need a SHA-256
/// collision, by user id).
pub(crate) fn order(seed: &Seed, sale_id: u64, item_id: u64, entries: &mut [Entry]) {
    entries.sort_by_cached_key(|e| (rank_key(seed, sale_id, item_id, e.user_id), e.user_id));
}

/// Serve entries already in draw order from `stock` units with a per-user `limit`: each entry's
/// outcome, and the stock left.
pub(crate) fn serve(entries: &[Entry], stock: i64, limit: i64) -> (Vec<Outcome>, i64) {
    let mut left = stock;
    let outcomes = entries
        .iter()
        .map(|e| {
            if e.quantity > limit {
                Outcome::LimitExceeded
            } else if e.quantity <= left {
                left -= e.quantity;
                Outcome::Won
            } else {
                Outcome::SoldOut
            }
        })
        .collect();
    (outcomes, left)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pinned vectors: a refactor must never change who wins a published draw.
    #[test]
    fn rank_keys_and_commitments_are_pinned() {
        let seed: Seed = core::array::from_fn(|i| i as u8);
        assert_eq!(
            hex::encode(commitment(&seed)),
            "630dcd2966c4336691125448bbb25b4ff412a49c732db2c8abc1b8581bd710dd"
        );
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&seed).unwrap();
        mac.update(b"7:1001:42");
        let want: [u8; 32] = mac.finalize().into_bytes().into();
        assert_eq!(rank_key(&seed, 7, 1001, 42), want);
        assert_ne!(rank_key(&seed, 7, 1001, 42), rank_key(&seed, 7, 1001, 43));
        assert_ne!(rank_key(&seed, 7, 1001, 42), rank_key(&seed, 7, 1002, 42));
    }

    #[test]
    fn entries_that_do_not_fit_are_skipped_and_the_next_tried() {
        let e = |user_id, quantity| Entry { user_id, quantity };
        let (outcomes, left) = serve(&[e(1, 2), e(2, 3), e(3, 1), e(4, 5)], 4, 3);
        assert_eq!(
            outcomes,
            vec![
                Outcome::Won,
                Outcome::SoldOut,
                Outcome::Won,
                Outcome::LimitExceeded
            ]
        );
        assert_eq!(left, 1);
    }

    #[test]
    fn the_order_is_by_rank_key_whatever_the_arrival() {
        let seed = fresh_seed().unwrap();
        let mut a: Vec<Entry> = (1..=50)
            .map(|u| Entry {
                user_id: u,
                quantity: 1,
            })
            .collect();
        let mut b = a.clone();
        b.reverse();
        order(&seed, 9, 8, &mut a);
        order(&seed, 9, 8, &mut b);
        assert_eq!(a, b);
        assert!(a
            .windows(2)
            .all(|w| rank_key(&seed, 9, 8, w[0].user_id) < rank_key(&seed, 9, 8, w[1].user_id)));
    }

    #[test]
    fn fresh_seeds_differ() {
        assert_ne!(fresh_seed().unwrap(), fresh_seed().unwrap());
    }
}
