//! The front door's HTTP side: the client-address gate every guarded request passes first, and
//! the challenge and order-token endpoints of protected sales. (Refusals become problem+json in
//! [`super::error`]: 403 with their codes, 429 with `Retry-After`.)

use super::error::{ApiError, Code};
use super::extract::{Json, Params};
use super::identity::Caller;
use crate::domain::{ChallengeKind, Protection, UserId};
use crate::frontdoor::challenge::{Binding, Challenge, Solution};
use crate::frontdoor::token::Grant;
use crate::frontdoor::{now_ms, Refusal};
use crate::state::AppState;
use axum::extract::{Query, State};
use axum::http::{header, request::Parts, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The first gate of a guarded request: the client address (see
/// [`crate::frontdoor::limits::client_ip`]) against the IP blocklist and the IP limit. An
/// extractor placed before the user's token, so a blocked or flooding address costs not even a
/// token verification.
pub(crate) struct Door;

impl axum::extract::FromRequestParts<Arc<AppState>> for Door {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, s: &Arc<AppState>) -> Result<Self, ApiError> {
        // Every header line, in order; bytes that are not text stay in as junk, which ends the
        // right-to-left walk there rather than vanish.
        let forwarded: Vec<String> = parts
            .headers
            .get_all("x-forwarded-for")
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect();
        let forwarded = (!forwarded.is_empty()).then(|| forwarded.join(","));
        let peer = super::server::peer(parts).map(|a| a.ip());
        let ip = s.frontdoor.client_ip(peer, forwarded.as_deref());
        s.frontdoor.check_ip(ip).map_err(|r| {
            let e = ApiError::from(r);
            if parts
                .extensions
                .get::<axum::extract::MatchedPath>()
                .is_some_and(|m| super::observe::is_buy_route(m.as_str()))
            {
                super::observe::count_outcome(e.code.as_str());
            }
            e
        })?;
        Ok(Door)
    }
}

/// `?user_id=` for deployments without user tokens (`auth.users = "none"`).
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct AsUser {
    /// Only with `auth.users = "none"`; with tokens it must be the token's user if given.
    #[param(value_type = Option<u64>, minimum = 1, maximum = 9223372036854775807_u64)]
    user_id: Option<UserId>,
}

fn no_store(mut resp: Response) -> Response {
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// The item's protection, when it uses order tokens; with its window and whether it is sold out.
/// `exact_stock`: read the remaining stock (at most 250 ms old) rather than trust only what this
/// node knows from memory; the challenge, which anyone may fetch, costs no database work.
async fn protected(
    s: &AppState,
    p: &Params,
    exact_stock: bool,
) -> Result<(Protection, DateTime<Utc>, DateTime<Utc>, bool), ApiError> {
    let (sale, item) = (p.sale()?, p.item()?);
    let missing = || ApiError::not_found(format!("sale {sale} has no item {item}"));
    let (rules, remaining) = if exact_stock {
        let (rules, remaining) = s
            .frontdoor
            .rules
            .with_remaining(sale, item)
            .await?
            .ok_or_else(missing)?;
        (rules, Some(remaining))
    } else {
        (
            s.frontdoor
                .rules
                .get(sale, item)
                .await?
                .ok_or_else(missing)?,
            None,
        )
    };
    let protection = rules.protection.filter(|p| p.order_token).ok_or_else(|| {
        ApiError::not_found(format!(
            "sale {sale} does not use order tokens: buy at /v1/sales/{sale}/items/{item}/orders"
        ))
    })?;
    let sold_out = s.orders.known_sold_out(sale, item) || remaining.is_some_and(|r| r <= 0);
    Ok((protection, rules.starts_at, rules.ends_at, sold_out))
}

fn conflict(code: Code, detail: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::CONFLICT, code, detail)
}

fn window_closed(ends_at: DateTime<Utc>, sold_out: bool) -> Result<(), ApiError> {
    if Utc::now() >= ends_at {
        return Err(conflict(Code::Ended, "the sale has ended"));
    }
    if sold_out {
        return Err(conflict(Code::SoldOut, "sold out: no more order tokens"));
    }
    Ok(())
}

#[utoipa::path(
    get,
    path = "/v1/sales/{sale_id}/items/{item_id}/challenge",
    tag = "orders",
    summary = "A protected item's challenge for the token's user (served from starts_at - challenge_lead_secs)",
    params(
        ("sale_id" = u64, Path, minimum = 1, maximum = 9223372036854775807_u64),
        ("item_id" = u64, Path, minimum = 1, maximum = 9223372036854775807_u64),
        AsUser,
    ),
    responses(
        (status = 200, description = "the challenge (never cached)", body = Challenge),
        (status = 401, response = super::responses::UserTokenRefused),
        (status = 403, description = "blocked, or the user id is not the token's", body = super::error::Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such sale or item, or the sale has no challenge", body = super::error::Problem, content_type = "application/problem+json"),
        (status = 409, description = "not_started (before the lead window), ended or sold_out", body = super::error::Problem, content_type = "application/problem+json"),
        (status = 422, description = "an id is out of range", body = super::error::Problem, content_type = "application/problem+json"),
        (status = 429, description = "rate_limited: retry after Retry-After seconds", body = super::error::Problem, content_type = "application/problem+json"),
        (status = 503, response = super::responses::Unavailable),
    ),
    security(("user_token" = []))
)]
pub(crate) async fn challenge(
    State(s): State<Arc<AppState>>,
    _: Door,
    caller: Caller,
    p: Params,
    query: Result<Query<AsUser>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    let user = caller.acting_as(q.user_id)?;
    s.frontdoor.check_user(user)?;
    s.frontdoor.limit_user(user)?;
    let (protection, starts_at, ends_at, sold_out) = protected(&s, &p, false).await?;
    if protection.challenge == ChallengeKind::None {
        return Err(ApiError::not_found(
            "this sale has no challenge: ask for the order token directly",
        ));
    }
    let opens = starts_at - chrono::Duration::seconds(protection.challenge_lead_secs.into());
    if Utc::now() < opens {
        return Err(conflict(
            Code::NotStarted,
            format!("challenges are served from {}", opens.to_rfc3339()),
        ));
    }
    window_closed(ends_at, sold_out)?;
    let binding = Binding {
        sale: p.sale()?,
        item: p.item()?,
        user,
    };
    let challenge = s
        .frontdoor
        .challenge(&protection, &binding, starts_at)
        .ok_or_else(|| ApiError::not_found("this sale has no challenge"))?;
    Ok(no_store(axum::Json(challenge).into_response()))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct OrderTokenBody {
    /// The solved challenge; leave out when the sale has none.
    #[serde(default)]
    solution: Option<Solution>,
    /// Optional: the token's user (must match it when given).
    #[serde(default)]
    #[schema(value_type = Option<u64>, minimum = 1, maximum = 9223372036854775807_u64)]
    user_id: Option<UserId>,
}

/// An order token and the order URL it opens.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct OrderToken {
    pub token: String,
    pub expires_at: DateTime<Utc>,
    /// Where to buy: `POST` here with the usual buy body.
    #[schema(example = "/v1/sales/1/items/1001/orders/v1.AAAA...")]
    pub order_url: String,
}

#[utoipa::path(
    post,
    path = "/v1/sales/{sale_id}/items/{item_id}/order-token",
    tag = "orders",
    summary = "Exchange a solved challenge for an order token and URL (only after the start)",
    params(
        ("sale_id" = u64, Path, minimum = 1, maximum = 9223372036854775807_u64),
        ("item_id" = u64, Path, minimum = 1, maximum = 9223372036854775807_u64),
    ),
    request_body = OrderTokenBody,
    responses(
        (status = 201, description = "the token (never cached)", body = OrderToken),
        (status = 400, response = super::responses::BadJson),
        (status = 401, response = super::responses::UserTokenRefused),
        (status = 403, description = "challenge_failed (wrong, forged, another buyer's, expired, used before, too fast), blocked, or the user id is not the token's", body = super::error::Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such sale or item, or the sale does not use order tokens", body = super::error::Problem, content_type = "application/problem+json"),
        (status = 409, description = "not_started, ended or sold_out", body = super::error::Problem, content_type = "application/problem+json"),
        (status = 413, response = super::responses::BodyTooLarge),
        (status = 422, response = super::responses::FieldOutOfRange),
        (status = 429, description = "rate_limited: retry after Retry-After seconds", body = super::error::Problem, content_type = "application/problem+json"),
        (status = 503, response = super::responses::Unavailable),
    ),
    security(("user_token" = []))
)]
pub(crate) async fn order_token(
    State(s): State<Arc<AppState>>,
    _: Door,
    caller: Caller,
    p: Params,
    Json(body): Json<OrderTokenBody>,
) -> Result<Response, ApiError> {
    let user = caller.acting_as(body.user_id)?;
    s.frontdoor.check_user(user)?;
    s.frontdoor.limit_user(user)?;
    let (protection, starts_at, ends_at, sold_out) = protected(&s, &p, true).await?;
    if Utc::now() < starts_at {
        return Err(conflict(
            Code::NotStarted,
            format!(
                "order tokens are handed out from {}",
                starts_at.to_rfc3339()
            ),
        ));
    }
    window_closed(ends_at, sold_out)?;
    let binding = Binding {
        sale: p.sale()?,
        item: p.item()?,
        user,
    };
    if protection.challenge != ChallengeKind::None {
        let solution = body.solution.as_ref().ok_or(Refusal::ChallengeFailed(
            crate::frontdoor::challenge::Failed("solve the challenge first (`solution`)"),
        ))?;
        s.frontdoor
            .accept_solution(&protection, &binding, solution, starts_at)
            .await??;
    }
    let expires_ms =
        (now_ms() + i64::from(protection.token_ttl_secs) * 1000).min(ends_at.timestamp_millis());
    let grant = Grant {
        sale: binding.sale,
        item: binding.item,
        user,
        expires_ms,
    };
    let token = s.frontdoor.issue_token(&grant);
    let body = OrderToken {
        order_url: format!(
            "/v1/sales/{}/items/{}/orders/{token}",
            binding.sale, binding.item
        ),
        token,
        expires_at: DateTime::<Utc>::from_timestamp_millis(expires_ms).unwrap_or(ends_at),
    };
    Ok(no_store(
        (StatusCode::CREATED, axum::Json(body)).into_response(),
    ))
}
