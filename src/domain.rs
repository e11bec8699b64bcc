//! Domain newtypes, built only from valid input ("parse, don't validate").
//!
//! Keys are u64 in the routing layer but are stored as PostgreSQL `bigint`, so every id
//! the API accepts lies in `1..=i64::MAX`; a larger or zero id is refused at the edge with
//! `invalid_request` instead of wrapping around in the database.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Largest quantity one buy request may ask for. Far above any sane per-user limit; it exists so a
/// request for `u32::MAX` units is refused as malformed rather than reaching the database.
pub(crate) const MAX_QUANTITY: u32 = 1_000;
/// Longest accepted `request_id`.
pub(crate) const MAX_REQUEST_ID_LEN: usize = 128;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DomainError {
    #[error("{field} must be between 1 and {max}, got {value}")]
    OutOfRange {
        field: &'static str,
        max: u64,
        value: i128,
    },
    #[error("request_id must be 1 to {MAX_REQUEST_ID_LEN} printable ASCII characters")]
    BadRequestId,
}

macro_rules! id_type {
    ($name:ident, $field:literal) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[serde(into = "u64")]
        pub struct $name(u64);

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                Self::parse(integer(d)?).map_err(serde::de::Error::custom)
            }
        }

        impl $name {
            pub fn parse(value: i128) -> Result<Self, DomainError> {
                if value >= 1 && value <= i64::MAX as i128 {
                    Ok(Self(value as u64))
                } else {
                    Err(DomainError::OutOfRange {
                        field: $field,
                        max: i64::MAX as u64,
                        value,
                    })
                }
            }
            /// The routing key (keys are u64).
            pub fn key(self) -> u64 {
                self.0
            }
            /// The database representation; lossless because of the range check.
            pub fn db(self) -> i64 {
                self.0 as i64
            }
            /// Rebuild from a database value that a constraint already guarantees to be positive.
            pub fn from_db(value: i64) -> Self {
                Self(value.unsigned_abs())
            }
        }

        impl TryFrom<i64> for $name {
            type Error = DomainError;
            fn try_from(value: i64) -> Result<Self, DomainError> {
                Self::parse(value.into())
            }
        }

        impl From<$name> for u64 {
            fn from(id: $name) -> u64 {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

/// A JSON integer, also when written as an integral number such as `3.0` (JSON has one number
/// type; JSON Schema counts `3.0` as an integer, and JavaScript clients may send it). A fraction is
/// an error.
pub(crate) fn integer<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i128, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = i128;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an integer")
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<i128, E> {
            Ok(v.into())
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<i128, E> {
            Ok(v.into())
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<i128, E> {
            if v.fract() == 0.0 && v.abs() < 1e20 {
                Ok(v as i128)
            } else {
                Err(E::custom(format!("expected an integer, got {v}")))
            }
        }
    }
    d.deserialize_any(V)
}

/// [`integer`] into an `i64` field.
pub(crate) fn integer_i64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    let v = integer(d)?;
    i64::try_from(v).map_err(|_| serde::de::Error::custom(format!("{v} is out of range")))
}

/// [`integer`] into a `u32` field.
pub(crate) fn integer_u32<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let v = integer(d)?;
    u32::try_from(v).map_err(|_| serde::de::Error::custom(format!("{v} is out of range")))
}

/// [`integer`] into an optional `u32` field.
pub(crate) fn integer_opt_u32<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<u32>, D::Error> {
    let v = integer(d)?;
    u32::try_from(v)
        .map(Some)
        .map_err(|_| serde::de::Error::custom(format!("{v} is out of range")))
}

id_type!(SaleId, "sale_id");
id_type!(ItemId, "item_id");
id_type!(UserId, "user_id");

/// Units asked for in one buy request: `1..=MAX_QUANTITY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(into = "u32")]
pub struct Quantity(u32);

impl<'de> Deserialize<'de> for Quantity {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Self::parse(integer(d)?).map_err(serde::de::Error::custom)
    }
}

impl Quantity {
    pub fn parse(value: i128) -> Result<Self, DomainError> {
        if value >= 1 && value <= MAX_QUANTITY as i128 {
            Ok(Self(value as u32))
        } else {
            Err(DomainError::OutOfRange {
                field: "quantity",
                max: MAX_QUANTITY as u64,
                value,
            })
        }
    }
    pub fn get(self) -> u32 {
        self.0
    }
    pub fn db(self) -> i32 {
        self.0 as i32
    }
}

impl TryFrom<i64> for Quantity {
    type Error = DomainError;
    fn try_from(value: i64) -> Result<Self, DomainError> {
        Self::parse(value.into())
    }
}

impl From<Quantity> for u32 {
    fn from(q: Quantity) -> u32 {
        q.0
    }
}

/// A client's idempotency key: the same key for the same (sale, item, user) returns the same order.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RequestId(String);

impl RequestId {
    pub fn parse(value: String) -> Result<Self, DomainError> {
        let ok = !value.is_empty()
            && value.len() <= MAX_REQUEST_ID_LEN
            && value.bytes().all(|b| b.is_ascii_graphic());
        if ok {
            Ok(Self(value))
        } else {
            Err(DomainError::BadRequestId)
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for RequestId {
    type Error = DomainError;
    fn try_from(value: String) -> Result<Self, DomainError> {
        Self::parse(value)
    }
}

impl From<RequestId> for String {
    fn from(r: RequestId) -> String {
        r.0
    }
}

/// How a sale guards its buy path against bots (`"protection"` at sale creation). Opt-in per sale:
/// without it the plain buy path serves. Immutable once the sale exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Protection {
    /// Buy only through an order URL whose per-user token is handed out after the start.
    pub order_token: bool,
    /// What a buyer solves before getting the token.
    pub challenge: ChallengeKind,
    /// Proof of work: the largest `number` (ALTCHA `maxnumber`); a solver tries half of it on
    /// average. 1000 to 10000000. Default 50000.
    #[schema(minimum = 1000, maximum = 10000000)]
    #[serde(deserialize_with = "integer_u32")]
    pub pow_difficulty: u32,
    /// How long an order token (and a challenge, counted from the start) stays valid, in seconds.
    /// 5 to 3600. Default 60.
    #[schema(minimum = 5, maximum = 3600)]
    #[serde(deserialize_with = "integer_u32")]
    pub token_ttl_secs: u32,
    /// Challenges are served from this many seconds before the start, so buyers solve during the
    /// countdown. 0 to 3600. Default 60.
    #[schema(maximum = 3600)]
    #[serde(deserialize_with = "integer_u32")]
    pub challenge_lead_secs: u32,
    /// A question answered sooner than this after it was served is refused (a human reads first).
    /// 0 to 60000. Default 1000.
    #[schema(maximum = 60000)]
    #[serde(deserialize_with = "integer_u32")]
    pub min_answer_ms: u32,
}

impl Default for Protection {
    fn default() -> Self {
        Self {
            order_token: true,
            challenge: ChallengeKind::None,
            pow_difficulty: 50_000,
            token_ttl_secs: 60,
            challenge_lead_secs: 60,
            min_answer_ms: 1_000,
        }
    }
}

impl Protection {
    /// A protection as stored with a sale. Fields this engine does not know (written by a newer
    /// one) are ignored; one it cannot read at all guards the item as strictly as it can (order
    /// tokens behind a proof of work) rather than leave it open.
    pub(crate) fn from_stored(stored: serde_json::Value) -> Self {
        let known = serde_json::to_value(Self::default())
            .ok()
            .and_then(|v| v.as_object().cloned())
            .unwrap_or_default();
        let value = match stored {
            serde_json::Value::Object(fields) => serde_json::Value::Object(
                fields
                    .into_iter()
                    .filter(|(k, _)| known.contains_key(k))
                    .collect(),
            ),
            other => other,
        };
        serde_json::from_value(value).unwrap_or_else(|e| {
            tracing::error!(error = %e, "unreadable sale protection: guarding with a proof of work");
            Self {
                challenge: ChallengeKind::Pow,
                ..Self::default()
            }
        })
    }

    /// Everything the type system could not say: the offending field and why.
    pub fn check(&self) -> Result<(), (&'static str, &'static str)> {
        if !(1_000..=10_000_000).contains(&self.pow_difficulty) {
            return Err(("pow_difficulty", "must be between 1000 and 10000000"));
        }
        if !(5..=3_600).contains(&self.token_ttl_secs) {
            return Err(("token_ttl_secs", "must be between 5 and 3600"));
        }
        if self.challenge_lead_secs > 3_600 {
            return Err(("challenge_lead_secs", "must be between 0 and 3600"));
        }
        if self.min_answer_ms > 60_000 {
            return Err(("min_answer_ms", "must be between 0 and 60000"));
        }
        if self.challenge != ChallengeKind::None && !self.order_token {
            return Err((
                "challenge",
                "a challenge gates the order token: it needs order_token = true",
            ));
        }
        Ok(())
    }
}

/// The challenge of a protected sale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum ChallengeKind {
    /// The order token is handed out on request.
    #[default]
    None,
    /// An ALTCHA-compatible proof of work (SHA-256).
    Pow,
    /// A question a human answers.
    Question,
}

/// The transaction id that follows a purchase from the click to payment; it is the reservation's
/// primary key on the item's group and the order's `order_id` on the user's group.
///
/// With a `request_id` it is derived (UUID v5) from sale, item, user and request id, so a retry on any
/// engine node lands on the same reservation and the same order; without one it is random with a
/// time prefix (UUID v7), so the primary keys of both tables grow at their right edge: under a storm
/// each insert then lands on the index's last page instead of a random one.
pub fn txn_id_for(
    sale: SaleId,
    item: ItemId,
    user: UserId,
    request: Option<&RequestId>,
) -> uuid::Uuid {
    match request {
        Some(r) => {
            let name = format!("{sale}/{item}/{user}/{}", r.as_str());
            uuid::Uuid::new_v5(&TXN_NAMESPACE, name.as_bytes())
        }
        None => uuid::Uuid::now_v7(),
    }
}

/// Fixed namespace for derived transaction ids; changing it would break idempotency of in-flight retries.
const TXN_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x5ec1_11e0_7a5c_4d1b_9c3e_0f1a_2b3c_4d5e);

/// Timestamps in answers, written as chrono's serde writes them (RFC 3339 in UTC with `Z`, the
/// fraction in 0, 3, 6 or 9 digits as the value needs: `SecondsFormat::AutoSi`), into a buffer on
/// the stack. chrono's goes through a `Display` that serde_json escapes piece by piece: about
/// 3,500 instructions a timestamp (callgrind), two in every order answer. A year outside
/// 0000-9999 or a leap second is left to chrono.
pub(crate) mod utc_time {
    use chrono::{DateTime, Datelike, Timelike, Utc};
    use serde::{Serialize, Serializer};

    /// Longest text: `9999-12-31T23:59:59.999999999Z`.
    const LONGEST: usize = 30;

    pub(crate) fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        let mut buf = [0u8; LONGEST];
        match write(t, &mut buf).and_then(|n| std::str::from_utf8(&buf[..n]).ok()) {
            Some(text) => s.serialize_str(text),
            None => t.serialize(s),
        }
    }

    /// For `Option<DateTime<Utc>>` fields.
    pub(crate) mod option {
        use chrono::{DateTime, Utc};
        use serde::Serializer;

        pub(crate) fn serialize<S: Serializer>(
            t: &Option<DateTime<Utc>>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match t {
                Some(t) => super::serialize(t, s),
                None => s.serialize_none(),
            }
        }
    }

    /// `t` as text into `buf`; its length, or None where chrono's own writer must do it.
    fn write(t: &DateTime<Utc>, buf: &mut [u8; LONGEST]) -> Option<usize> {
        let year = u32::try_from(t.year()).ok().filter(|y| *y <= 9999)?;
        let nano = t.nanosecond();
        if nano >= 1_000_000_000 {
            return None;
        }
        let (fraction, digits) = match nano {
            0 => (0, 0),
            n if n % 1_000_000 == 0 => (n / 1_000_000, 3),
            n if n % 1_000 == 0 => (n / 1_000, 6),
            n => (n, 9),
        };
        let mut at = 0;
        // Each number zero-padded to its width, then its separator.
        let parts = [
            (year, 4, b'-'),
            (t.month(), 2, b'-'),
            (t.day(), 2, b'T'),
            (t.hour(), 2, b':'),
            (t.minute(), 2, b':'),
            (t.second(), 2, if digits > 0 { b'.' } else { b'Z' }),
            (fraction, digits, b'Z'),
        ];
        for (value, width, then) in parts.into_iter().take(if digits > 0 { 7 } else { 6 }) {
            let mut v = value;
            for i in (0..width).rev() {
                buf[at + i] = b'0' + (v % 10) as u8;
                v /= 10;
            }
            buf[at + width] = then;
            at += width + 1;
        }
        Some(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Order answers' timestamps read exactly as chrono's serde writes them, whatever the value.
    mod utc_time_text {
        use chrono::{DateTime, Utc};
        use proptest::prelude::*;

        #[derive(serde::Serialize)]
        struct Ours(#[serde(serialize_with = "super::super::utc_time::serialize")] DateTime<Utc>);

        fn same_as_chrono(t: DateTime<Utc>) {
            let ours = serde_json::to_string(&Ours(t)).unwrap();
            assert_eq!(ours, serde_json::to_string(&t).unwrap(), "{t:?}");
        }

        proptest! {
            #[test]
            fn any_time(secs in -100_000_000_000i64..300_000_000_000, nanos in 0u32..2_000_000_000, kind in 0u8..4) {
                // Whole seconds, milliseconds, microseconds (what PostgreSQL keeps), nanoseconds;
                // a leap second now and then (nanos past one second).
                let nanos = match kind {
                    0 => 0,
                    1 => nanos / 1_000_000 * 1_000_000,
                    2 => nanos / 1_000 * 1_000,
                    _ => nanos,
                };
                if let Some(t) = DateTime::from_timestamp(secs, nanos) {
                    same_as_chrono(t);
                }
            }
        }

        #[test]
        fn edges() {
            for text in [
                "0000-01-01T00:00:00Z",
                "9999-12-31T23:59:59.999999999Z",
                "2026-12-07T06:30:00.100Z",
                "2026-12-07T06:30:00.000100Z",
                "2026-12-07T06:30:00.000000100Z",
                "1970-01-01T00:00:00Z",
            ] {
                let t: DateTime<Utc> = text.parse().unwrap();
                same_as_chrono(t);
            }
            let leap = chrono::NaiveDate::from_ymd_opt(2016, 12, 31)
                .unwrap()
                .and_hms_nano_opt(23, 59, 59, 1_500_000_000)
                .unwrap()
                .and_utc();
            same_as_chrono(leap);
            same_as_chrono(DateTime::<Utc>::MAX_UTC);
            same_as_chrono(DateTime::<Utc>::MIN_UTC);
        }
    }

    #[test]
    fn ids_reject_zero_negative_and_too_large() {
        assert!(ItemId::parse(0).is_err());
        assert!(ItemId::parse(-5).is_err());
        assert!(ItemId::parse(i64::MAX as i128 + 1).is_err());
        assert_eq!(ItemId::parse(i64::MAX as i128).unwrap().db(), i64::MAX);
    }

    #[test]
    fn integral_numbers_count_as_integers_fractions_do_not() {
        assert_eq!(serde_json::from_str::<Quantity>("3.0").unwrap().get(), 3);
        assert!(serde_json::from_str::<Quantity>("3.5").is_err());
        assert!(serde_json::from_str::<Quantity>("\"3\"").is_err());
        assert!(serde_json::from_str::<UserId>("1e30").is_err());
        assert_eq!(serde_json::from_str::<UserId>("42").unwrap().key(), 42);
    }

    #[test]
    fn stored_protections_are_read_leniently_and_fail_closed() {
        let p =
            Protection::from_stored(serde_json::json!({"challenge": "question", "new_field": 1}));
        assert_eq!(
            p.challenge,
            ChallengeKind::Question,
            "unknown fields are ignored"
        );
        let p = Protection::from_stored(serde_json::json!({"challenge": "captcha-v9"}));
        assert!(
            p.order_token && p.challenge == ChallengeKind::Pow,
            "unreadable: strictest"
        );
        let p = Protection::from_stored(serde_json::json!("garbage"));
        assert!(p.order_token && p.challenge == ChallengeKind::Pow);
    }

    #[test]
    fn quantity_bounds() {
        assert!(Quantity::parse(0).is_err());
        assert!(Quantity::parse(MAX_QUANTITY as i128 + 1).is_err());
        assert_eq!(Quantity::parse(3).unwrap().get(), 3);
    }

    #[test]
    fn request_id_rules() {
        assert!(RequestId::parse(String::new()).is_err());
        assert!(RequestId::parse("a b".into()).is_err());
        assert!(RequestId::parse("x".repeat(MAX_REQUEST_ID_LEN + 1)).is_err());
        assert!(RequestId::parse("req-1".into()).is_ok());
    }

    #[test]
    fn derived_txn_ids_are_stable_and_scoped() {
        let (s, i, u) = (
            SaleId::parse(1).unwrap(),
            ItemId::parse(2).unwrap(),
            UserId::parse(3).unwrap(),
        );
        let r = RequestId::parse("abc".into()).unwrap();
        assert_eq!(txn_id_for(s, i, u, Some(&r)), txn_id_for(s, i, u, Some(&r)));
        let other_user = UserId::parse(4).unwrap();
        assert_ne!(
            txn_id_for(s, i, u, Some(&r)),
            txn_id_for(s, i, other_user, Some(&r))
        );
        assert_ne!(txn_id_for(s, i, u, None), txn_id_for(s, i, u, None));
    }
}
