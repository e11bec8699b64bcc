//! Who is calling: an admin (the admin token) or a user (a JWT, [`crate::auth::users`]).
//!
//! Both are extractors that run before a body is read, so an anonymous caller learns nothing
//! about the schema. A missing or invalid token is 401 `unauthorized` with `WWW-Authenticate:
//! Bearer`; a user id in the path or body that is not the token's is 403 `forbidden`.

use super::error::ApiError;
use crate::config::UsersAuth;
use crate::domain::UserId;
use crate::state::AppState;
use axum::http::{header, request::Parts, HeaderMap};
use std::sync::Arc;

/// A request that carries the admin token.
pub struct Admin;

impl axum::extract::FromRequestParts<Arc<AppState>> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, s: &Arc<AppState>) -> Result<Self, ApiError> {
        check_admin(s, &parts.headers)?;
        Ok(Admin)
    }
}

/// The admin token check of [`Admin`], for handlers that need it only sometimes.
pub(crate) fn check_admin(s: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = s.admin_token.as_ref() else {
        return Err(ApiError::unauthorized(
            "the admin API is disabled: set server.admin_token or SECKILL_ADMIN_TOKEN",
        ));
    };
    let given = bearer(headers)
        .ok_or_else(|| ApiError::unauthorized("missing `Authorization: Bearer <admin token>`"))?;
    if !constant_time_eq(given.as_bytes(), expected.expose().as_bytes()) {
        return Err(ApiError::unauthorized("wrong admin token"));
    }
    Ok(())
}

/// The user a request acts for. With `auth.users = "jwt"` it is the token's `sub`; with
/// `"none"` the engine trusts the `user_id` the request names.
pub(crate) struct Caller(Option<UserId>);

impl axum::extract::FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, s: &Arc<AppState>) -> Result<Self, ApiError> {
        if s.users.mode() == UsersAuth::None {
            return Ok(Caller(None));
        }
        let token = bearer(&parts.headers).ok_or_else(|| {
            ApiError::unauthorized(crate::auth::users::TokenError::Missing.to_string())
        })?;
        let user = s
            .users
            .verify(token)
            .map_err(|e| ApiError::unauthorized(e.to_string()))?;
        let user = UserId::parse(user.into()).map_err(|e| ApiError::unauthorized(e.to_string()))?;
        Ok(Caller(Some(user)))
    }
}

impl Caller {
    /// The user to act for, given the id the request names (path or body), if any: it must be
    /// the token's (403 otherwise). Without tokens (`users = "none"`) the named id, which is
    /// then required.
    pub(crate) fn acting_as(&self, named: Option<UserId>) -> Result<UserId, ApiError> {
        match (self.0, named) {
            (Some(me), Some(n)) if n != me => Err(ApiError::forbidden(
                "the user id in the request is not the token's",
            )),
            (Some(me), _) => Ok(me),
            (None, Some(n)) => Ok(n),
            (None, None) => Err(ApiError::invalid("user_id is required")),
        }
    }
}

/// The token of `Authorization: Bearer <token>`.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Compares SHA-256 digests, so neither the contents nor the length of the token leak through
/// timing.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use sha2::{Digest, Sha256};
    let (x, y) = (Sha256::digest(a), Sha256::digest(b));
    x.iter()
        .zip(y.iter())
        .fold(0u8, |acc, (p, q)| acc | (p ^ q))
        == 0
}
