//! The trust boundary: who a caller is, and whether a payment callback is genuine. Pure logic,
//! no database and no network: every engine node verifies on its own.
//!
//! - [`users`]: user identity from a signed JWT (`sub` = the user id), verified locally with a
//!   shared HS256 secret or the identity provider's public keys (PEM or JWKS: RS256, ES256,
//!   EdDSA). `exp` is required (with a small leeway); `iss` and `aud` are checked when configured.
//!   `seckill token` mints HS256 tokens for the dev cluster and the bench.
//! - [`signature`]: the payment service signs its callbacks like Stripe's webhooks:
//!   `Seckill-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + raw body)>`,
//!   rejected outside a time window, compared in constant time.

pub mod signature;
pub mod users;
