//! The one mapping from errors of every layer to `application/problem+json`.
//!
//! Clients get a stable machine-readable `code`, a short `title` and a safe `detail`; the full
//! cause chain of server-side failures goes to the log, never to the client.

use crate::order::OrderError;
use crate::shard::ShardError;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub detail: String,
    pub retry_after_secs: Option<u32>,
    /// Problem-details extension members (RFC 9457 §3.2), e.g. the order a refusal is about.
    pub extensions: Vec<(&'static str, serde_json::Value)>,
}

#[derive(Serialize)]
struct Problem<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    title: &'a str,
    status: u16,
    code: &'a str,
    detail: &'a str,
    #[serde(flatten)]
    extensions: serde_json::Map<String, serde_json::Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            code,
            detail: detail.into(),
            retry_after_secs: None,
            extensions: Vec::new(),
        }
    }

    pub fn with(mut self, name: &'static str, value: serde_json::Value) -> Self {
        self.extensions.push((name, value));
        self
    }

    pub fn invalid(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", detail)
    }

    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", detail)
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", detail)
    }

    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", detail)
    }

    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", detail)
    }

    pub fn retry_after(mut self, secs: u32) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }
}

fn title_of(code: &str) -> &'static str {
    match code {
        "invalid_request" => "Invalid request",
        "unauthorized" => "Unauthorized",
        "forbidden" => "Forbidden",
        "amount_mismatch" => "Amount mismatch",
        "not_found" => "Not found",
        "method_not_allowed" => "Method not allowed",
        "payload_too_large" => "Payload too large",
        "not_started" => "Sale not started",
        "ended" => "Sale ended",
        "sold_out" => "Sold out",
        "limit_exceeded" => "Per-user limit exceeded",
        "order_paid" => "Order already paid",
        "order_cancelled" => "Order cancelled",
        "order_expired" => "Order expired",
        "rate_limited" => "Too many requests",
        "overloaded" => "Overloaded",
        "unavailable" => "Temporarily unavailable",
        _ => "Internal error",
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Problem {
            kind: "about:blank",
            title: title_of(self.code),
            status: self.status.as_u16(),
            code: self.code,
            detail: &self.detail,
            extensions: self
                .extensions
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        };
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        let mut resp = (self.status, bytes).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"seckill\""),
            );
        }
        if let Some(secs) = self.retry_after_secs {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

/// The refusal code for an order in a state that forbids what was asked.
fn status_code(status: crate::order::store::OrderStatus) -> &'static str {
    use crate::order::store::OrderStatus as O;
    match status {
        O::Paid => "order_paid",
        O::Cancelled => "order_cancelled",
        O::Expired => "order_expired",
        // Not a refusal reason (only a dead or paid order refuses); kept total.
        O::PendingPayment => "invalid_request",
    }
}

impl From<OrderError> for ApiError {
    fn from(e: OrderError) -> Self {
        use StatusCode as S;
        match &e {
            OrderError::SaleNotFound(_)
            | OrderError::ItemNotFound { .. }
            | OrderError::OrderNotFound(_) => ApiError::not_found(e.to_string()),
            OrderError::NotStarted => ApiError::new(S::CONFLICT, "not_started", e.to_string()),
            OrderError::Ended => ApiError::new(S::CONFLICT, "ended", e.to_string()),
            OrderError::SoldOut { .. } => ApiError::new(S::CONFLICT, "sold_out", e.to_string()),
            OrderError::LimitExceeded { .. } => {
                ApiError::new(S::CONFLICT, "limit_exceeded", e.to_string())
            }
            OrderError::WrongState { status, .. } => {
                ApiError::new(S::CONFLICT, status_code(*status), e.to_string())
            }
            OrderError::DeadOrder(order) => {
                ApiError::new(S::CONFLICT, status_code(order.status), e.to_string())
                    .with("order", serde_json::to_value(order).unwrap_or_default())
            }
            OrderError::Overloaded => {
                ApiError::new(S::SERVICE_UNAVAILABLE, "overloaded", e.to_string()).retry_after(1)
            }
            OrderError::Shard(ShardError::Busy { .. } | ShardError::Exhausted { .. }) => {
                ApiError::new(
                    S::SERVICE_UNAVAILABLE,
                    "overloaded",
                    "the database is busy; retry shortly",
                )
                .retry_after(1)
            }
            OrderError::Unavailable(_) | OrderError::Shard(_) => {
                tracing::warn!(error = %e, "request failed: shard group unavailable");
                let detail = match &e {
                    OrderError::Shard(ShardError::NoMaster { group }) => {
                        format!("shard group {group} is failing over; retry shortly")
                    }
                    _ => "a shard group is unavailable; retry shortly (with the same request_id)"
                        .to_string(),
                };
                ApiError::new(S::SERVICE_UNAVAILABLE, "unavailable", detail).retry_after(1)
            }
            OrderError::Db(db) => match db {
                crate::db::DbError::Busy(_) => ApiError::new(
                    S::SERVICE_UNAVAILABLE,
                    "overloaded",
                    "this item is busy; retry shortly",
                )
                .retry_after(1),
                crate::db::DbError::Rejected { .. } => {
                    tracing::error!(error = %e, "database refused a statement");
                    ApiError::new(S::INTERNAL_SERVER_ERROR, "internal", "internal error")
                }
                _ => {
                    tracing::warn!(error = %e, "database connection trouble");
                    ApiError::new(
                        S::SERVICE_UNAVAILABLE,
                        "unavailable",
                        "the database did not answer; retry shortly (with the same request_id)",
                    )
                    .retry_after(1)
                }
            },
        }
    }
}
