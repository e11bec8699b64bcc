//! The public REST API (DESIGN.md "Public contract"): routes and handlers.
//!
//! Handlers only translate between HTTP and the services; who may call what is decided by the
//! extractors of [`identity`] (admin token, user token); every error leaves through
//! [`error::ApiError`] as problem+json.

pub mod admin;
pub mod error;
pub mod extract;
pub mod identity;
pub mod orders;
pub mod payments;
pub mod server;

use crate::app::AppState;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use error::ApiError;
use extract::Params;
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
            post(admin::create_sale).layer(DefaultBodyLimit::max(admin_body_limit)),
        )
        .route("/v1/admin/sales/{sale_id}/audit", get(admin::audit))
        .route("/v1/admin/groups", get(admin::groups))
        .route("/v1/admin/payments", get(admin::payments))
        .route("/v1/sales/{sale_id}", get(get_sale))
        .route(
            "/v1/sales/{sale_id}/items/{item_id}/orders",
            post(orders::buy),
        )
        .route("/v1/users/{user_id}/orders", get(orders::list))
        .route("/v1/users/{user_id}/orders/{order_id}", get(orders::get))
        .route(
            "/v1/users/{user_id}/orders/{order_id}/cancel",
            post(orders::cancel),
        )
        .route("/v1/payments", post(payments::callback))
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

async fn get_sale(State(s): State<Arc<AppState>>, p: Params) -> Result<Response, ApiError> {
    let view = s.sales().get(p.sale()?).await?;
    Ok(axum::Json(view).into_response())
}
