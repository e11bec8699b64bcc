//! FNV-1a 64 over a key's 8 big-endian bytes, and the slot of a key.
//!
//! The pinned vectors below guard the hash: a refactor must never move existing keys, since every
//! row in every shard group was placed by it.

use std::hash::Hasher;

/// FNV-1a 64 of `key.to_be_bytes()`.
pub(crate) fn fnv1a64(key: u64) -> u64 {
    let mut h = fnv::FnvHasher::default();
    h.write(&key.to_be_bytes());
    h.finish()
}

/// The hash slot of `key` among `slots` slots.
pub fn slot_of(key: u64, slots: u32) -> u32 {
    (fnv1a64(key) % u64::from(slots.max(1))) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Computed independently of this crate (plain FNV-1a 64 in Python over the big-endian bytes).
    const PINNED: &[(u64, u64, u32)] = &[
        (0, 0xa8c7f832281a39c5, 453),
        (1, 0xa8c7f732281a3812, 18),
        (42, 0xa8c7de32281a0d97, 407),
        (1000, 0xa8cbb632281db276, 630),
        (123456789, 0xa7d8201a3583d921, 289),
        (9223372036854775807, 0x2338a5f81f5ba4bd, 189),
    ];

    #[test]
    fn pinned_vectors_never_move() {
        for &(key, hash, slot) in PINNED {
            assert_eq!(fnv1a64(key), hash, "hash of {key}");
            assert_eq!(slot_of(key, 1024), slot, "slot of {key}");
        }
    }
}
