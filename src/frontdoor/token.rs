//! Order tokens: the per-user part of a protected sale's order URL.
//!
//! A token binds a sale, an item, a user and an expiry, and carries an HMAC-SHA256 over them
//! ([`super::keys`]), so any engine node verifies any token without a database. It is handed out
//! only after the sale starts (and after the sale's challenge), so the order URL cannot be known
//! before; a token copied to another user, item or sale does not verify.
//!
//! Format: `v1.<base64url(key id ‖ sale ‖ item ‖ user ‖ expiry ms)>.<base64url(MAC)>`, every
//! number 8 bytes big-endian: 95 URL-safe characters.

use super::keys::Keys;
use crate::domain::{ItemId, SaleId, UserId};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;

/// What a token grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub sale: SaleId,
    pub item: ItemId,
    pub user: UserId,
    /// Unix milliseconds.
    pub expires_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum TokenError {
    #[error("the order token is not valid: {0}")]
    Invalid(&'static str),
    #[error("the order token has expired: get a new one")]
    Expired,
}

const PAYLOAD: usize = 4 + 8 * 4;

pub fn issue(keys: &Keys, g: &Grant) -> String {
    let mut payload = [0u8; PAYLOAD];
    payload[4..12].copy_from_slice(&g.sale.key().to_be_bytes());
    payload[12..20].copy_from_slice(&g.item.key().to_be_bytes());
    payload[20..28].copy_from_slice(&g.user.key().to_be_bytes());
    payload[28..36].copy_from_slice(&g.expires_ms.to_be_bytes());
    payload[..4].copy_from_slice(&keys.signing_id());
    let (_, mac) = keys.sign_token(&payload);
    format!("v1.{}.{}", B64.encode(payload), B64.encode(mac))
}

/// The grant of `token`, if it verifies and was issued for exactly this sale, item and user and
/// is still valid at `now_ms`.
pub(crate) fn verify(
    keys: &Keys,
    token: &str,
    want: (SaleId, ItemId, UserId),
    now_ms: i64,
) -> Result<Grant, TokenError> {
    let malformed = TokenError::Invalid("malformed");
    let rest = token.strip_prefix("v1.").ok_or(malformed.clone())?;
    let (payload, mac) = rest.split_once('.').ok_or(malformed.clone())?;
    let payload = B64.decode(payload).map_err(|_| malformed.clone())?;
    let mac = B64.decode(mac).map_err(|_| malformed.clone())?;
    let payload: [u8; PAYLOAD] = payload.try_into().map_err(|_| malformed.clone())?;
    let id = [payload[0], payload[1], payload[2], payload[3]];
    if !keys.verify_token(id, &payload, &mac) {
        return Err(TokenError::Invalid("its signature does not verify"));
    }
    let number = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&payload[at..at + 8]);
        b
    };
    let (sale, item, user) = want;
    let bound = u64::from_be_bytes(number(4)) == sale.key()
        && u64::from_be_bytes(number(12)) == item.key()
        && u64::from_be_bytes(number(20)) == user.key();
    if !bound {
        return Err(TokenError::Invalid(
            "it was issued for another user, item or sale",
        ));
    }
    let expires_ms = i64::from_be_bytes(number(28));
    if now_ms >= expires_ms {
        return Err(TokenError::Expired);
    }
    Ok(Grant {
        sale,
        item,
        user,
        expires_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn keys() -> Keys {
        Keys::new(&[Secret::new("a-token-key-a-token-key-a-token-key")])
    }

    fn ids(s: u64, i: u64, u: u64) -> (SaleId, ItemId, UserId) {
        (
            SaleId::parse(s.into()).unwrap(),
            ItemId::parse(i.into()).unwrap(),
            UserId::parse(u.into()).unwrap(),
        )
    }

    fn grant() -> Grant {
        let (sale, item, user) = ids(7, 1001, 42);
        Grant {
            sale,
            item,
            user,
            expires_ms: 10_000,
        }
    }

    #[test]
    fn a_token_verifies_for_its_grant_only() {
        let k = keys();
        let t = issue(&k, &grant());
        assert!(
            t.len() < 100
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        );
        assert_eq!(verify(&k, &t, ids(7, 1001, 42), 9_999), Ok(grant()));
        for other in [ids(7, 1001, 43), ids(7, 1002, 42), ids(8, 1001, 42)] {
            assert!(matches!(
                verify(&k, &t, other, 0),
                Err(TokenError::Invalid(_))
            ));
        }
        assert_eq!(
            verify(&k, &t, ids(7, 1001, 42), 10_000),
            Err(TokenError::Expired)
        );
    }

    #[test]
    fn any_flipped_character_breaks_a_token() {
        let k = keys();
        let t = issue(&k, &grant());
        for at in 3..t.len() {
            let mut b = t.clone().into_bytes();
            if b[at] == b'.' {
                continue;
            }
            b[at] = if b[at] == b'A' { b'B' } else { b'A' };
            let flipped = String::from_utf8(b).unwrap();
            if flipped == t {
                continue;
            }
            assert!(
                verify(&k, &flipped, ids(7, 1001, 42), 0).is_err(),
                "flipped at {at}: {flipped}"
            );
        }
        assert!(verify(&k, "", ids(7, 1001, 42), 0).is_err());
        assert!(verify(&k, "v1..", ids(7, 1001, 42), 0).is_err());
        let other = Keys::new(&[Secret::new("another-key-another-key-another-key")]);
        assert!(verify(&other, &t, ids(7, 1001, 42), 0).is_err());
    }
}
