//! Signed payment callbacks: `Seckill-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret,
//! "<t>." + raw body)>` (the scheme of Stripe's webhooks). Several `v1=` values may be given
//! (while the payment service rotates its secret); one must match. The timestamp must lie within
//! the tolerance of the engine's clock, so a captured callback cannot be replayed later; the
//! comparison is constant-time.

use crate::config::Secret;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Why a signature was refused (a safe text for the caller).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SignatureError {
    #[error("missing Seckill-Signature header")]
    Missing,
    #[error("malformed Seckill-Signature header (want t=<unix seconds>,v1=<hex>)")]
    Malformed,
    #[error("the signature's timestamp is outside the accepted window")]
    Stale,
    #[error("the signature does not match")]
    Mismatch,
    #[error("payment callbacks are not configured (payments.secret)")]
    NotConfigured,
}

/// Verify `header` over `body` at `now` (unix seconds).
pub(crate) fn verify(
    secret: Option<&Secret>,
    header: Option<&str>,
    body: &[u8],
    now: i64,
    tolerance_secs: u64,
) -> Result<(), SignatureError> {
    let secret = secret.ok_or(SignatureError::NotConfigured)?;
    let header = header.ok_or(SignatureError::Missing)?;
    let mut t: Option<i64> = None;
    let mut sigs = Vec::new();
    if header.split(',').count() > 8 {
        return Err(SignatureError::Malformed);
    }
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = Some(v.parse().map_err(|_| SignatureError::Malformed)?),
            Some(("v1", v)) => sigs.push(hex::decode(v).map_err(|_| SignatureError::Malformed)?),
            Some(_) => {} // other schemes: ignored
            None => return Err(SignatureError::Malformed),
        }
    }
    let t = t.ok_or(SignatureError::Malformed)?;
    if sigs.is_empty() {
        return Err(SignatureError::Malformed);
    }
    if now.abs_diff(t) > tolerance_secs {
        return Err(SignatureError::Stale);
    }
    let expected = mac(secret, t, body).finalize().into_bytes();
    let matches = |sig: &[u8]| {
        sig.len() == expected.len()
            && sig
                .iter()
                .zip(expected.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    };
    // Every entry is compared (no early exit on the first match's position).
    let found = sigs.iter().fold(false, |found, sig| found | matches(sig));
    if found {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

fn mac(secret: &Secret, t: i64, body: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length.
    let mut m = match HmacSha256::new_from_slice(secret.expose().as_bytes()) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    };
    m.update(t.to_string().as_bytes());
    m.update(b".");
    m.update(body);
    m
}

/// The header value for `body` at `t`: what the payment service sends (tests, docs, the bench).
pub fn sign(secret: &Secret, t: i64, body: &[u8]) -> String {
    format!(
        "t={t},v1={}",
        hex::encode(mac(secret, t, body).finalize().into_bytes())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> Secret {
        Secret::new("whsec-0123456789abcdef")
    }

    #[test]
    fn a_signed_body_verifies_within_the_window() {
        let body = br#"{"order_id":"x"}"#;
        let h = sign(&secret(), 1_000, body);
        assert_eq!(verify(Some(&secret()), Some(&h), body, 1_100, 300), Ok(()));
        assert_eq!(
            verify(Some(&secret()), Some(&h), body, 1_301, 300),
            Err(SignatureError::Stale)
        );
        assert_eq!(
            verify(Some(&secret()), Some(&h), b"{}", 1_000, 300),
            Err(SignatureError::Mismatch)
        );
        let other = sign(&Secret::new("another-secret-xx"), 1_000, body);
        assert_eq!(
            verify(Some(&secret()), Some(&other), body, 1_000, 300),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn any_of_several_signatures_may_match() {
        let body = b"{}";
        let good = sign(&secret(), 5, body);
        let v1 = good.split_once("v1=").unwrap().1;
        let h = format!("t=5,v1={},v1={v1}", "00".repeat(32));
        assert_eq!(verify(Some(&secret()), Some(&h), body, 5, 300), Ok(()));
    }

    #[test]
    fn malformed_headers_are_refused() {
        for h in ["", "t=1", "v1=00", "t=x,v1=00", "t=1,v1=zz", "garbage"] {
            assert!(
                verify(Some(&secret()), Some(h), b"{}", 1, 300).is_err(),
                "{h}"
            );
        }
        assert_eq!(
            verify(Some(&secret()), None, b"{}", 1, 300),
            Err(SignatureError::Missing)
        );
        assert_eq!(
            verify(None, Some("t=1,v1=00"), b"{}", 1, 300),
            Err(SignatureError::NotConfigured)
        );
    }
}
