//! A user's purchases: buy, list, read, cancel. Every one acts for the authenticated user.

use super::error::ApiError;
use super::extract::{Json, Params};
use super::frontdoor::Door;
use super::identity::Caller;
use crate::domain::{Quantity, RequestId, UserId};
use crate::frontdoor::Refusal;
use crate::order::BuyRequest;
use crate::state::AppState;
use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use std::sync::Arc;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct BuyBody {
    /// Optional: the token's user (must match it when given).
    #[serde(default)]
    #[schema(value_type = Option<u64>, minimum = 1, maximum = 9223372036854775807_u64)]
    user_id: Option<UserId>,
    /// 1 to 1000; default 1.
    #[serde(default = "one")]
    #[schema(value_type = u32, minimum = 1, maximum = 1000, default = 1)]
    quantity: Quantity,
    /// The purchase's idempotency key: the same request_id again returns the same order.
    #[serde(default)]
    #[schema(value_type = Option<String>, min_length = 1, max_length = 128, pattern = "^[\\x21-\\x7e]+$")]
    request_id: Option<RequestId>,
}

fn one() -> Quantity {
    Quantity::parse(1).unwrap_or_else(|_| unreachable!("1 is a valid quantity"))
}

#[utoipa::path(
    post,
    path = "/v1/sales/{sale_id}/items/{item_id}/orders",
    tag = "orders",
    summary = "Buy (the token's user)",
    params(
        ("sale_id" = u64, Path, minimum = 1, maximum = 9223372036854775807_u64),
        ("item_id" = u64, Path, minimum = 1, maximum = 9223372036854775807_u64),
    ),
    request_body = BuyBody,
    responses(
        (status = 201, description = "the order (header idempotent-replayed: true when the request_id had one already)", body = crate::order::store::Order),
        (status = 400, response = super::responses::BadJson),
        (status = 401, response = super::responses::UserTokenRefused),
        (status = 403, description = "token_required (a protected sale: buy through the order URL), blocked, or the user id is not the token's (forbidden)", body = super::error::Problem, content_type = "application/problem+json"),
        (status = 404, response = super::responses::NoSuchSaleOrItem),
        (status = 409, description = "not_started, ended, sold_out, limit_exceeded, or a replayed purchase whose order was cancelled or expired (order_cancelled / order_expired, the order in the body)", body = super::error::Problem, content_type = "application/problem+json"),
        (status = 413, response = super::responses::BodyTooLarge),
        (status = 422, response = super::responses::FieldOutOfRange),
        (status = 429, description = "rate_limited: retry (with the same request_id) after Retry-After seconds", body = super::error::Problem, content_type = "application/problem+json"),
        (status = 503, description = "overloaded or unavailable: retry (with the same request_id) after Retry-After", body = super::error::Problem, content_type = "application/problem+json"),
    ),
    security(("user_token" = []))
)]
pub(crate) async fn buy(
    State(s): State<Arc<AppState>>,
    _: Door,
    caller: Caller,
    p: Params,
    Json(body): Json<BuyBody>,
) -> Result<Response, ApiError> {
    purchase(&s, &caller, &p, body, None).await
}

#[utoipa::path(
    post,
    path = "/v1/sales/{sale_id}/items/{item_id}/orders/{token}",
    tag = "orders",
    summary = "Buy on a protected sale, through the order URL an order token opened",
    params(
        ("sale_id" = u64, Path, minimum = 1, maximum = 9223372036854775807_u64),
        ("item_id" = u64, Path, minimum = 1, maximum = 9223372036854775807_u64),
        ("token" = String, Path, max_length = 200, description = "the order token (from POST .../order-token)"),
    ),
    request_body = BuyBody,
    responses(
        (status = 201, description = "the order (header idempotent-replayed: true when the request_id had one already)", body = crate::order::store::Order),
        (status = 400, response = super::responses::BadJson),
        (status = 401, response = super::responses::UserTokenRefused),
        (status = 403, description = "invalid_token (does not verify, or another user's, item's or sale's), token_expired, blocked, or the user id is not the token's (forbidden)", body = super::error::Problem, content_type = "application/problem+json"),
        (status = 404, response = super::responses::NoSuchSaleOrItem),
        (status = 409, description = "not_started, ended, sold_out, limit_exceeded, or a replayed purchase whose order was cancelled or expired", body = super::error::Problem, content_type = "application/problem+json"),
        (status = 413, response = super::responses::BodyTooLarge),
        (status = 422, response = super::responses::FieldOutOfRange),
        (status = 429, description = "rate_limited: retry (with the same request_id) after Retry-After seconds", body = super::error::Problem, content_type = "application/problem+json"),
        (status = 503, description = "overloaded or unavailable: retry (with the same request_id) after Retry-After", body = super::error::Problem, content_type = "application/problem+json"),
    ),
    security(("user_token" = []))
)]
pub(crate) async fn buy_with_token(
    State(s): State<Arc<AppState>>,
    _: Door,
    caller: Caller,
    p: Params,
    Json(body): Json<BuyBody>,
) -> Result<Response, ApiError> {
    let token = p.get("token").to_string();
    purchase(&s, &caller, &p, body, Some(&token)).await
}

/// The buy path after the client-address gate: the user blocklist, the order token (or, on a
/// protected item's plain URL, `token_required`), the user's rate limit, then the order service.
async fn purchase(
    s: &AppState,
    caller: &Caller,
    p: &Params,
    body: BuyBody,
    token: Option<&str>,
) -> Result<Response, ApiError> {
    let req = BuyRequest {
        sale: p.sale()?,
        item: p.item()?,
        user: caller.acting_as(body.user_id)?,
        quantity: body.quantity,
        request_id: body.request_id,
    };
    let outcome = match admit(s, &req, token).await {
        Ok(()) => s.fair.buy(req).await.map_err(ApiError::from),
        Err(e) => Err(e),
    };
    let bought = outcome.inspect_err(|e| super::observe::count_outcome(e.code.as_str()))?;
    super::observe::count_outcome(if bought.replayed {
        "replayed"
    } else {
        "created"
    });
    let mut resp = (StatusCode::CREATED, axum::Json(&bought.order)).into_response();
    if bought.replayed {
        resp.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(resp)
}

/// The front door's checks of one purchase, cheapest first (crate::frontdoor): the user
/// blocklist, the order token's signature, the user's limit, and only then (on a plain URL) the
/// item's rules, which a node reads from the item's group at most once a second: an unknown
/// (sale, item) gets 404 from them before any gate or transaction exists for it.
async fn admit(s: &AppState, req: &BuyRequest, token: Option<&str>) -> Result<(), ApiError> {
    let door = &s.frontdoor;
    door.check_user(req.user)?;
    if let Some(t) = token {
        door.verify_token(t, req.sale, req.item, req.user)?;
    }
    door.limit_user(req.user)?;
    if token.is_none() {
        // An unknown pair is answered here, from the remembered lookup: no gate, no transaction.
        let Some(rules) = door.rules.get(req.sale, req.item).await? else {
            return Err(crate::order::OrderError::ItemNotFound {
                sale: req.sale,
                item: req.item,
            }
            .into());
        };
        if rules.protection.is_some_and(|p| p.order_token) {
            return Err(Refusal::TokenRequired.into());
        }
    }
    Ok(())
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListQuery {
    /// 1 to 1000; default 100.
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
}

/// A user's orders, newest first.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Orders {
    pub orders: Vec<crate::order::store::Order>,
}

#[utoipa::path(
    get,
    path = "/v1/users/{user_id}/orders",
    tag = "orders",
    summary = "A user's orders, newest first",
    params(("user_id" = u64, Path, minimum = 1, maximum = 9223372036854775807_u64), ListQuery),
    responses(
        (status = 200, body = Orders),
        (status = 401, response = super::responses::UserTokenRefused),
        (status = 403, response = super::responses::NotTheTokensUser),
        (status = 422, description = "an id or the limit is out of range", body = super::error::Problem, content_type = "application/problem+json"),
        (status = 503, response = super::responses::Unavailable),
    ),
    security(("user_token" = []))
)]
pub(crate) async fn list(
    State(s): State<Arc<AppState>>,
    caller: Caller,
    p: Params,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let user = caller.acting_as(Some(p.user()?))?;
    let Query(q) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid("limit must be between 1 and 1000"));
    }
    let orders = s.orders.list_orders(user, limit).await?;
    Ok(axum::Json(Orders { orders }).into_response())
}

#[utoipa::path(
    get,
    path = "/v1/users/{user_id}/orders/{order_id}",
    tag = "orders",
    summary = "One order",
    params(
        ("user_id" = u64, Path, minimum = 1, maximum = 9223372036854775807_u64),
        ("order_id" = uuid::Uuid, Path),
    ),
    responses(
        (status = 200, body = crate::order::store::Order),
        (status = 401, response = super::responses::UserTokenRefused),
        (status = 403, response = super::responses::NotTheTokensUser),
        (status = 404, description = "no such order", body = super::error::Problem, content_type = "application/problem+json"),
        (status = 422, description = "an id is malformed", body = super::error::Problem, content_type = "application/problem+json"),
        (status = 503, response = super::responses::Unavailable),
    ),
    security(("user_token" = []))
)]
pub(crate) async fn get(
    State(s): State<Arc<AppState>>,
    caller: Caller,
    p: Params,
) -> Result<Response, ApiError> {
    let user = caller.acting_as(Some(p.user()?))?;
    let order = s.orders.get_order(user, p.order()?).await?;
    Ok(axum::Json(order).into_response())
}

#[utoipa::path(
    post,
    path = "/v1/users/{user_id}/orders/{order_id}/cancel",
    tag = "orders",
    summary = "Cancel an unpaid order: its stock returns",
    params(
        ("user_id" = u64, Path, minimum = 1, maximum = 9223372036854775807_u64),
        ("order_id" = uuid::Uuid, Path),
    ),
    responses(
        (status = 200, description = "the cancelled order (cancelling twice answers the same)", body = crate::order::store::Order),
        (status = 401, response = super::responses::UserTokenRefused),
        (status = 403, response = super::responses::NotTheTokensUser),
        (status = 404, description = "no such order", body = super::error::Problem, content_type = "application/problem+json"),
        (status = 409, description = "order_paid or order_expired", body = super::error::Problem, content_type = "application/problem+json"),
        (status = 422, description = "an id is malformed", body = super::error::Problem, content_type = "application/problem+json"),
        (status = 503, response = super::responses::Unavailable),
    ),
    security(("user_token" = []))
)]
pub(crate) async fn cancel(
    State(s): State<Arc<AppState>>,
    caller: Caller,
    p: Params,
) -> Result<Response, ApiError> {
    let user = caller.acting_as(Some(p.user()?))?;
    let order = s.orders.cancel(user, p.order()?).await?;
    Ok(axum::Json(order).into_response())
}
