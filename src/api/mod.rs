//! The public REST API (DESIGN.md "Public contract"): routes, handlers, admin authentication.
//!
//! Handlers only translate between HTTP and the services; every error leaves through
//! [`error::ApiError`] as problem+json.

pub mod error;
pub mod extract;
pub mod server;

use crate::app::AppState;
use crate::domain::{Quantity, RequestId, UserId};
use crate::order::BuyRequest;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use error::ApiError;
use extract::{Json, Params};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;

pub fn router(state: Arc<AppState>) -> Router {
    let server = &state.config.server;
    let body_limit = server.body_limit_bytes;
    let admin_body_limit = server.admin_body_limit_bytes;
    let deadline = std::time::Duration::from_millis(server.http_timeout_ms);
    Router::new()
        .route("/v1/time", get(time))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route(
            "/v1/admin/sales",
            post(create_sale).layer(DefaultBodyLimit::max(admin_body_limit)),
        )
        .route("/v1/admin/sales/{sale_id}/audit", get(audit))
        .route("/v1/admin/groups", get(groups))
        .route("/v1/sales/{sale_id}", get(get_sale))
        .route("/v1/sales/{sale_id}/items/{item_id}/orders", post(buy))
        .route("/v1/users/{user_id}/orders", get(list_orders))
        .route("/v1/users/{user_id}/orders/{order_id}", get(get_order))
        .route("/v1/users/{user_id}/orders/{order_id}/pay", post(pay))
        .route("/v1/users/{user_id}/orders/{order_id}/cancel", post(cancel))
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this endpoint does not accept that method",
            )
        })
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn(move |req, next| {
            within(deadline, req, next)
        }))
        .with_state(state)
}

/// A whole request, body included, is answered within `server.http_timeout_ms`. A purchase that
/// is still under way when the time is up goes on (it is a task of the order service); the client
/// learns to retry it with the same request_id.
async fn within(
    limit: std::time::Duration,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!(
                "no answer within {} ms; a purchase goes on: retry it with the same request_id",
                limit.as_millis()
            ),
        )
        .retry_after(1)
        .into_response(),
    }
}

async fn time() -> impl IntoResponse {
    axum::Json(json!({ "now_ms": chrono::Utc::now().timestamp_millis() }))
}

async fn healthz() -> impl IntoResponse {
    axum::Json(json!({ "status": "ok" }))
}

async fn readyz(State(s): State<Arc<AppState>>) -> Response {
    if s.cluster.all_writable() {
        axum::Json(json!({ "status": "ready" })).into_response()
    } else {
        let missing: Vec<&str> = s
            .cluster
            .groups
            .iter()
            .filter(|g| g.writer_index().is_none())
            .map(|g| g.name.as_str())
            .collect();
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("no writable master in group(s): {}", missing.join(", ")),
        )
        .retry_after(1)
        .into_response()
    }
}

/// A request that carries the admin token. As an extractor it runs before the body is read, so
/// an anonymous caller learns nothing about the schema.
pub struct Admin;

impl axum::extract::FromRequestParts<Arc<AppState>> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        s: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        require_admin(s, &parts.headers)?;
        Ok(Admin)
    }
}

fn require_admin(s: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = s.admin_token.as_deref() else {
        return Err(ApiError::unauthorized(
            "the admin API is disabled: set server.admin_token or SECKILL_ADMIN_TOKEN",
        ));
    };
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| ApiError::unauthorized("missing `Authorization: Bearer <admin token>`"))?;
    if !constant_time_eq(given.as_bytes(), expected.as_bytes()) {
        return Err(ApiError::unauthorized("wrong admin token"));
    }
    Ok(())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn create_sale(
    State(s): State<Arc<AppState>>,
    _: Admin,
    Json(new): Json<crate::sale::NewSale>,
) -> Result<Response, ApiError> {
    new.check()
        .map_err(|(field, reason)| ApiError::invalid(format!("{field}: {reason}")))?;
    let view = s.sales().create(&new).await?;
    Ok((StatusCode::CREATED, axum::Json(view)).into_response())
}

async fn get_sale(State(s): State<Arc<AppState>>, p: Params) -> Result<Response, ApiError> {
    let view = s.sales().get(p.sale()?).await?;
    Ok(axum::Json(view).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BuyBody {
    user_id: UserId,
    #[serde(default = "one")]
    quantity: Quantity,
    #[serde(default)]
    request_id: Option<RequestId>,
}

fn one() -> Quantity {
    Quantity::parse(1).unwrap_or_else(|_| unreachable!("1 is a valid quantity"))
}

async fn buy(
    State(s): State<Arc<AppState>>,
    p: Params,
    Json(body): Json<BuyBody>,
) -> Result<Response, ApiError> {
    let req = BuyRequest {
        sale: p.sale()?,
        item: p.item()?,
        user: body.user_id,
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
struct ListQuery {
    limit: Option<i64>,
}

async fn list_orders(
    State(s): State<Arc<AppState>>,
    p: Params,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid("limit must be between 1 and 1000"));
    }
    let orders = s.orders.list_orders(p.user()?, limit).await?;
    Ok(axum::Json(json!({ "orders": orders })).into_response())
}

async fn get_order(State(s): State<Arc<AppState>>, p: Params) -> Result<Response, ApiError> {
    let order = s.orders.get_order(p.user()?, p.order()?).await?;
    Ok(axum::Json(order).into_response())
}

async fn pay(State(s): State<Arc<AppState>>, p: Params) -> Result<Response, ApiError> {
    let order = s.orders.pay(p.user()?, p.order()?).await?;
    Ok(axum::Json(order).into_response())
}

async fn cancel(State(s): State<Arc<AppState>>, p: Params) -> Result<Response, ApiError> {
    let order = s.orders.cancel(p.user()?, p.order()?).await?;
    Ok(axum::Json(order).into_response())
}

async fn audit(State(s): State<Arc<AppState>>, _: Admin, p: Params) -> Result<Response, ApiError> {
    let report = crate::reconcile::audit_sale(&s.orders, p.sale()?).await?;
    Ok(axum::Json(report).into_response())
}

async fn groups(State(s): State<Arc<AppState>>, _: Admin) -> Result<Response, ApiError> {
    Ok(axum::Json(crate::shard::groups_report(&s.cluster)).into_response())
}
