//! A user's purchases: buy, list, read, cancel. Every one acts for the authenticated user.

use super::error::ApiError;
use super::extract::{Json, Params};
use super::identity::Caller;
use crate::app::AppState;
use crate::domain::{Quantity, RequestId, UserId};
use crate::order::BuyRequest;
use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuyBody {
    /// Optional: the token's user (must match it when given).
    #[serde(default)]
    user_id: Option<UserId>,
    #[serde(default = "one")]
    quantity: Quantity,
    #[serde(default)]
    request_id: Option<RequestId>,
}

fn one() -> Quantity {
    Quantity::parse(1).unwrap_or_else(|_| unreachable!("1 is a valid quantity"))
}

pub async fn buy(
    State(s): State<Arc<AppState>>,
    caller: Caller,
    p: Params,
    Json(body): Json<BuyBody>,
) -> Result<Response, ApiError> {
    let req = BuyRequest {
        sale: p.sale()?,
        item: p.item()?,
        user: caller.acting_as(body.user_id)?,
        quantity: body.quantity,
        request_id: body.request_id,
    };
    let bought = s.orders.buy(req).await?;
    let mut resp = (StatusCode::CREATED, axum::Json(&bought.order)).into_response();
    if bought.replayed {
        resp.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(resp)
}

#[derive(Deserialize)]
pub struct ListQuery {
    limit: Option<i64>,
}

pub async fn list(
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
    Ok(axum::Json(json!({ "orders": orders })).into_response())
}

pub async fn get(
    State(s): State<Arc<AppState>>,
    caller: Caller,
    p: Params,
) -> Result<Response, ApiError> {
    let user = caller.acting_as(Some(p.user()?))?;
    let order = s.orders.get_order(user, p.order()?).await?;
    Ok(axum::Json(order).into_response())
}

pub async fn cancel(
    State(s): State<Arc<AppState>>,
    caller: Caller,
    p: Params,
) -> Result<Response, ApiError> {
    let user = caller.acting_as(Some(p.user()?))?;
    let order = s.orders.cancel(user, p.order()?).await?;
    Ok(axum::Json(order).into_response())
}
