//! The front door's signing keys: newest first, the first signs, all verify.
//!
//! Each configured key yields two keys of its own by HMAC-SHA256 with a fixed label, one for order
//! tokens and one for challenges, so a signature made for one purpose never verifies as the other.
//! A token names its key by a short id (the first 4 bytes of the token key's SHA-256), so verifying
//! costs one HMAC whatever the number of keys.

use crate::config::Secret;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

struct Key {
    id: [u8; 4],
    token: [u8; 32],
    challenge: [u8; 32],
}

pub struct Keys {
    keys: Vec<Key>,
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> HmacSha256 {
    let mut m = match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    };
    for p in parts {
        m.update(p);
    }
    m
}

fn derive(secret: &[u8], label: &[u8]) -> [u8; 32] {
    hmac(secret, &[label]).finalize().into_bytes().into()
}

impl Keys {
    /// The configured keys (newest first), or one random key when none is configured.
    pub fn new(configured: &[Secret]) -> Self {
        let secrets: Vec<Vec<u8>> = if configured.is_empty() {
            let random: Vec<u8> = (0..2)
                .flat_map(|_| uuid::Uuid::new_v4().into_bytes())
                .collect();
            vec![random]
        } else {
            configured
                .iter()
                .map(|s| s.expose().as_bytes().to_vec())
                .collect()
        };
        let keys = secrets
            .iter()
            .map(|s| {
                let token = derive(s, b"seckill order token v1");
                let digest = Sha256::digest(token);
                Key {
                    id: [digest[0], digest[1], digest[2], digest[3]],
                    token,
                    challenge: derive(s, b"seckill challenge v1"),
                }
            })
            .collect();
        Self { keys }
    }

    fn signer(&self) -> &Key {
        match self.keys.first() {
            Some(k) => k,
            None => unreachable!("Keys::new always makes at least one key"),
        }
    }

    /// The id of the key that signs.
    pub(crate) fn signing_id(&self) -> [u8; 4] {
        self.signer().id
    }

    /// `(key id, MAC)` of an order token's payload, with the newest key.
    pub(crate) fn sign_token(&self, payload: &[u8]) -> ([u8; 4], [u8; 32]) {
        let k = self.signer();
        (
            k.id,
            hmac(&k.token, &[payload]).finalize().into_bytes().into(),
        )
    }

    /// Whether `mac` is the MAC of `payload` under the key `id` names (constant-time).
    pub(crate) fn verify_token(&self, id: [u8; 4], payload: &[u8], mac: &[u8]) -> bool {
        self.keys
            .iter()
            .find(|k| k.id == id)
            .is_some_and(|k| hmac(&k.token, &[payload]).verify_slice(mac).is_ok())
    }

    /// Hex HMAC-SHA256 of `parts` under the newest challenge key (ALTCHA's `signature`).
    pub(crate) fn sign_challenge(&self, parts: &[&[u8]]) -> String {
        hex::encode(
            hmac(&self.signer().challenge, parts)
                .finalize()
                .into_bytes(),
        )
    }

    /// Whether the hex `signature` is the challenge MAC of `parts` under any key (constant-time
    /// per key).
    pub(crate) fn verify_challenge(&self, parts: &[&[u8]], signature: &str) -> bool {
        let Ok(mac) = hex::decode(signature) else {
            return false;
        };
        self.keys
            .iter()
            .any(|k| hmac(&k.challenge, parts).verify_slice(&mac).is_ok())
    }

    /// Like [`Keys::verify_challenge`] for a MAC cut to its first bytes (constant-time per key).
    pub(crate) fn verify_challenge_prefix(&self, parts: &[&[u8]], prefix: &str) -> bool {
        let Ok(mac) = hex::decode(prefix) else {
            return false;
        };
        !mac.is_empty()
            && self.keys.iter().any(|k| {
                hmac(&k.challenge, parts)
                    .verify_truncated_left(&mac)
                    .is_ok()
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(names: &[&str]) -> Keys {
        Keys::new(&names.iter().map(|n| Secret::new(*n)).collect::<Vec<_>>())
    }

    #[test]
    fn the_first_key_signs_and_every_key_verifies() {
        let old = keys(&["old-key-old-key-old-key-old-key-0"]);
        let (id, mac) = old.sign_token(b"payload");
        let rotated = keys(&[
            "new-key-new-key-new-key-new-key-1",
            "old-key-old-key-old-key-old-key-0",
        ]);
        assert!(
            rotated.verify_token(id, b"payload", &mac),
            "old tokens verify"
        );
        let (new_id, new_mac) = rotated.sign_token(b"payload");
        assert_ne!(new_id, id, "the new key signs");
        assert!(!old.verify_token(new_id, b"payload", &new_mac));
        assert!(!rotated.verify_token(id, b"payloaD", &mac));
        let dropped = keys(&["new-key-new-key-new-key-new-key-1"]);
        assert!(
            !dropped.verify_token(id, b"payload", &mac),
            "a dropped key no longer verifies"
        );
    }

    #[test]
    fn token_and_challenge_signatures_are_apart() {
        let k = keys(&["one-key-one-key-one-key-one-key-1"]);
        let (_, token_mac) = k.sign_token(b"x");
        assert!(!k.verify_challenge(&[b"x"], &hex::encode(token_mac)));
        let sig = k.sign_challenge(&[b"x"]);
        assert!(k.verify_challenge(&[b"x"], &sig));
        assert!(!k.verify_challenge(&[b"y"], &sig));
        assert!(!k.verify_challenge(&[b"x"], "not hex"));
    }

    #[test]
    fn without_configured_keys_a_random_one_signs() {
        let (a, b) = (Keys::new(&[]), Keys::new(&[]));
        let (id, mac) = a.sign_token(b"p");
        assert!(a.verify_token(id, b"p", &mac));
        assert!(!b.verify_token(id, b"p", &mac));
    }
}
