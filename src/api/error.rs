//! The one mapping from errors of every layer to `application/problem+json` (RFC 9457).
//!
//! Clients get a stable machine-readable `code`, a short `title`, a safe `detail`, and as
//! `instance` the request's id (the `x-request-id` of the answer), so one failed request can be
//! found in the logs; the full cause chain of server-side failures goes to the log, never to the
//! client.
//!
//! Each layer's error has its `From` here. Work on a shard group that failed ([`GroupError`])
//! is mapped by one function, whichever layer's error carries it.

use crate::db::DbError;
use crate::frontdoor::Refusal;
use crate::moves::MoveError;
use crate::order::store::{Order, OrderStatus};
use crate::order::OrderError;
use crate::sale::SaleError;
use crate::shard::{GroupError, ShardError};
use crate::shardmap::ShardMapError;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// Every `code` a problem can carry (docs/api.md "The API").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Code {
    InvalidRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    PayloadTooLarge,
    NotStarted,
    Ended,
    Paused,
    SoldOut,
    LimitExceeded,
    OrderPaid,
    OrderCancelled,
    OrderExpired,
    AmountMismatch,
    HasData,
    MoveConflict,
    PrecheckFailed,
    TokenRequired,
    InvalidToken,
    TokenExpired,
    ChallengeFailed,
    Blocked,
    RateLimited,
    Overloaded,
    Unavailable,
    ShadowUnavailable,
    Internal,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::InvalidRequest => "invalid_request",
            Code::Unauthorized => "unauthorized",
            Code::Forbidden => "forbidden",
            Code::NotFound => "not_found",
            Code::MethodNotAllowed => "method_not_allowed",
            Code::PayloadTooLarge => "payload_too_large",
            Code::NotStarted => "not_started",
            Code::Ended => "ended",
            Code::Paused => "paused",
            Code::SoldOut => "sold_out",
            Code::LimitExceeded => "limit_exceeded",
            Code::OrderPaid => "order_paid",
            Code::OrderCancelled => "order_cancelled",
            Code::OrderExpired => "order_expired",
            Code::AmountMismatch => "amount_mismatch",
            Code::HasData => "has_data",
            Code::MoveConflict => "move_conflict",
            Code::PrecheckFailed => "precheck_failed",
            Code::TokenRequired => "token_required",
            Code::InvalidToken => "invalid_token",
            Code::TokenExpired => "token_expired",
            Code::ChallengeFailed => "challenge_failed",
            Code::Blocked => "blocked",
            Code::RateLimited => "rate_limited",
            Code::Overloaded => "overloaded",
            Code::Unavailable => "unavailable",
            Code::ShadowUnavailable => "shadow_unavailable",
            Code::Internal => "internal",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Code::InvalidRequest => "Invalid request",
            Code::Unauthorized => "Unauthorized",
            Code::Forbidden => "Forbidden",
            Code::NotFound => "Not found",
            Code::MethodNotAllowed => "Method not allowed",
            Code::PayloadTooLarge => "Payload too large",
            Code::NotStarted => "Sale not started",
            Code::Ended => "Sale ended",
            Code::Paused => "Sale paused",
            Code::SoldOut => "Sold out",
            Code::LimitExceeded => "Per-user limit exceeded",
            Code::OrderPaid => "Order already paid",
            Code::OrderCancelled => "Order cancelled",
            Code::OrderExpired => "Order expired",
            Code::AmountMismatch => "Amount mismatch",
            Code::HasData => "Key has data",
            Code::MoveConflict => "Move conflict",
            Code::PrecheckFailed => "Move pre-check failed",
            Code::TokenRequired => "Order token required",
            Code::InvalidToken => "Invalid order token",
            Code::TokenExpired => "Order token expired",
            Code::ChallengeFailed => "Challenge failed",
            Code::Blocked => "Blocked",
            Code::RateLimited => "Too many requests",
            Code::Overloaded => "Overloaded",
            Code::Unavailable => "Temporarily unavailable",
            Code::ShadowUnavailable => "No shadow streaming",
            Code::Internal => "Internal error",
        }
    }
}

/// A problem-details body (`application/problem+json`).
#[derive(Serialize, ToSchema)]
pub(crate) struct Problem {
    /// Always `about:blank`: `code` says what happened.
    #[serde(rename = "type")]
    #[schema(example = "about:blank")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub code: Code,
    pub detail: String,
    /// The request's id (its `x-request-id`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// The order the refusal is about (a replayed purchase whose order was cancelled or has
    /// expired, a refused payment's order).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order: Option<Order>,
    /// The payment a refused payment callback was recorded as.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payment: Option<crate::order::payments::Payment>,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: Code,
    pub detail: String,
    pub(crate) retry_after_secs: Option<u32>,
    pub order: Option<Box<Order>>,
    pub(crate) payment: Option<Box<crate::order::payments::Payment>>,
}

tokio::task_local! {
    /// The id of the request being served (set by the request-id middleware), as its header.
    pub(crate) static REQUEST_ID: axum::http::HeaderValue;
}

/// The id of the request being served, if any.
pub(crate) fn request_id() -> Option<String> {
    REQUEST_ID
        .try_with(|id| id.to_str().ok().map(str::to_string))
        .ok()
        .flatten()
}

impl ApiError {
    pub fn new(status: StatusCode, code: Code, detail: impl Into<String>) -> Self {
        Self {
            status,
            code,
            detail: detail.into(),
            retry_after_secs: None,
            order: None,
            payment: None,
        }
    }

    pub(crate) fn with_order(mut self, order: Order) -> Self {
        self.order = Some(Box::new(order));
        self
    }

    pub(crate) fn with_payment(mut self, payment: crate::order::payments::Payment) -> Self {
        self.payment = Some(Box::new(payment));
        self
    }

    pub(crate) fn invalid(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            Code::InvalidRequest,
            detail,
        )
    }

    pub(crate) fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, Code::InvalidRequest, detail)
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, Code::NotFound, detail)
    }

    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, Code::Unauthorized, detail)
    }

    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, Code::Forbidden, detail)
    }

    pub fn retry_after(mut self, secs: u32) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Problem {
            kind: "about:blank".into(),
            title: self.code.title().into(),
            status: self.status.as_u16(),
            code: self.code,
            detail: self.detail,
            instance: request_id(),
            order: self.order.map(|o| *o),
            payment: self.payment.map(|p| *p),
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
        if self.status == StatusCode::PAYLOAD_TOO_LARGE {
            // The rest of the body was never read: the connection cannot carry another request,
            // and a client must not put it back in its pool.
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        // For the request log and the metrics: what this answer was.
        resp.extensions_mut().insert(self.code);
        resp
    }
}

/// The refusal code for an order in a state that forbids what was asked.
fn status_code(status: OrderStatus) -> Code {
    match status {
        OrderStatus::Paid => Code::OrderPaid,
        OrderStatus::Cancelled => Code::OrderCancelled,
        OrderStatus::Expired => Code::OrderExpired,
        // Not a refusal reason (only a dead or paid order refuses); kept total.
        OrderStatus::PendingPayment => Code::InvalidRequest,
    }
}

impl From<OrderError> for ApiError {
    fn from(e: OrderError) -> Self {
        use StatusCode as S;
        match &e {
            OrderError::ItemNotFound { .. } | OrderError::OrderNotFound(_) => {
                ApiError::not_found(e.to_string())
            }
            OrderError::NotStarted => ApiError::new(S::CONFLICT, Code::NotStarted, e.to_string()),
            OrderError::Ended => ApiError::new(S::CONFLICT, Code::Ended, e.to_string()),
            OrderError::Paused => ApiError::new(S::CONFLICT, Code::Paused, e.to_string()),
            OrderError::SoldOut { .. } => ApiError::new(S::CONFLICT, Code::SoldOut, e.to_string()),
            OrderError::LimitExceeded { .. } => {
                ApiError::new(S::CONFLICT, Code::LimitExceeded, e.to_string())
            }
            OrderError::WrongState { status, .. } => {
                ApiError::new(S::CONFLICT, status_code(*status), e.to_string())
            }
            OrderError::DeadOrder(order) => {
                ApiError::new(S::CONFLICT, status_code(order.status), e.to_string())
                    .with_order((**order).clone())
            }
            OrderError::Overloaded => {
                ApiError::new(S::SERVICE_UNAVAILABLE, Code::Overloaded, e.to_string())
                    .retry_after(1)
            }
            OrderError::Moving(_) => {
                ApiError::new(S::SERVICE_UNAVAILABLE, Code::Unavailable, e.to_string())
                    .retry_after(1)
            }
            OrderError::Unavailable(_) => {
                tracing::warn!(error = %e, "request failed: shard group unavailable");
                group_unavailable(GROUP_UNAVAILABLE.to_string())
            }
            OrderError::Group(g) => group_error(g),
        }
    }
}

impl From<SaleError> for ApiError {
    fn from(e: SaleError) -> Self {
        match &e {
            SaleError::NotFound(_) | SaleError::ItemNotFound { .. } => {
                ApiError::not_found(e.to_string())
            }
            SaleError::Invalid(why) => ApiError::invalid(why.clone()),
            SaleError::Group(g) => group_error(g),
        }
    }
}

impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> Self {
        let code = match &r {
            Refusal::Blocked(_) => Code::Blocked,
            Refusal::RateLimited { retry_after } => {
                return ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    Code::RateLimited,
                    r.to_string(),
                )
                .retry_after(u32::try_from(*retry_after).unwrap_or(u32::MAX).max(1));
            }
            Refusal::TokenRequired => Code::TokenRequired,
            Refusal::InvalidToken(_) => Code::InvalidToken,
            Refusal::TokenExpired => Code::TokenExpired,
            Refusal::ChallengeFailed(_) => Code::ChallengeFailed,
        };
        ApiError::new(StatusCode::FORBIDDEN, code, r.to_string())
    }
}

impl From<MoveError> for ApiError {
    fn from(e: MoveError) -> Self {
        use StatusCode as S;
        match &e {
            MoveError::UnknownGroup(_)
            | MoveError::SameGroup { .. }
            | MoveError::Unsupported(_) => ApiError::invalid(e.to_string()),
            MoveError::NotFound(_) => ApiError::not_found(e.to_string()),
            MoveError::Conflict(_) => ApiError::new(S::CONFLICT, Code::MoveConflict, e.to_string()),
            MoveError::Precheck(_) => {
                ApiError::new(S::CONFLICT, Code::PrecheckFailed, e.to_string())
            }
            MoveError::HasData { .. } => ApiError::new(S::CONFLICT, Code::HasData, e.to_string()),
            MoveError::Group(g) => group_error(g),
        }
    }
}

impl From<ShardMapError> for ApiError {
    fn from(e: ShardMapError) -> Self {
        match &e {
            ShardMapError::UnknownGroup(_) => ApiError::invalid(e.to_string()),
            ShardMapError::HasData { .. } => {
                ApiError::new(StatusCode::CONFLICT, Code::HasData, e.to_string())
            }
            ShardMapError::NoEntry { .. } => ApiError::not_found(e.to_string()),
            ShardMapError::Group(g) => group_error(g),
        }
    }
}

impl From<GroupError> for ApiError {
    fn from(e: GroupError) -> Self {
        group_error(&e)
    }
}

/// What a client is told when a group could not do the work, for a reason it need not know.
const GROUP_UNAVAILABLE: &str =
    "a shard group is unavailable; retry shortly (with the same request_id)";

/// 503 `unavailable`, retry in a second.
fn group_unavailable(detail: String) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, Code::Unavailable, detail).retry_after(1)
}

/// The one mapping of a failed piece of work on a shard group, whichever layer's error carries
/// it: a busy pool or item is `overloaded`, a missing shadow `shadow_unavailable`; a failover, a
/// move or a database that did not answer `unavailable` (all 503 with Retry-After); a statement
/// the database refused is ours to fix (500, logged).
fn group_error(e: &GroupError) -> ApiError {
    use StatusCode as S;
    match e {
        GroupError::Shard(ShardError::Busy { .. } | ShardError::Exhausted { .. }) => ApiError::new(
            S::SERVICE_UNAVAILABLE,
            Code::Overloaded,
            "the database is busy; retry shortly",
        )
        .retry_after(1),
        GroupError::Shard(ShardError::NoShadow { group }) => ApiError::new(
            S::SERVICE_UNAVAILABLE,
            Code::ShadowUnavailable,
            format!(
                "shard group {group} has no shadow streaming: nothing is acknowledged that \
                 only one server holds; retry shortly (with the same request_id)"
            ),
        )
        .retry_after(2),
        GroupError::Shard(shard) => {
            tracing::warn!(error = %e, "request failed: shard group unavailable");
            let detail = match shard {
                ShardError::NoMaster { group } => {
                    format!("shard group {group} is failing over; retry shortly")
                }
                _ => GROUP_UNAVAILABLE.to_string(),
            };
            group_unavailable(detail)
        }
        GroupError::Db(db) => match db {
            DbError::Busy(_) => ApiError::new(
                S::SERVICE_UNAVAILABLE,
                Code::Overloaded,
                "this item is busy; retry shortly",
            )
            .retry_after(1),
            DbError::Moving(_) => ApiError::new(
                S::SERVICE_UNAVAILABLE,
                Code::Unavailable,
                "moving to another shard group; retry shortly",
            )
            .retry_after(1),
            DbError::Rejected { .. } => {
                tracing::error!(error = %e, "database refused a statement");
                ApiError::new(S::INTERNAL_SERVER_ERROR, Code::Internal, "internal error")
            }
            _ => {
                tracing::warn!(error = %e, "database connection trouble");
                ApiError::new(
                    S::SERVICE_UNAVAILABLE,
                    Code::Unavailable,
                    "the database did not answer; retry shortly (with the same request_id)",
                )
                .retry_after(1)
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the client sees: status, code, detail, Retry-After.
    type Answer = (u16, &'static str, String, Option<u32>);

    fn answer(e: ApiError) -> Answer {
        (
            e.status.as_u16(),
            e.code.as_str(),
            e.detail,
            e.retry_after_secs,
        )
    }

    /// The answer to a failure of work on a group, the same through every layer's error that
    /// carries it.
    fn maps(make: impl Fn() -> GroupError, status: u16, code: &str, detail: &str) {
        let retry = (status == 503).then_some(1);
        let want = (status, code, detail.to_string(), retry);
        assert_eq!(answer(make().into()), want, "{}", make());
        assert_eq!(answer(OrderError::Group(make()).into()), want, "{}", make());
        assert_eq!(answer(SaleError::Group(make()).into()), want, "{}", make());
        assert_eq!(answer(MoveError::Group(make()).into()), want, "{}", make());
        assert_eq!(
            answer(ShardMapError::Group(make()).into()),
            want,
            "{}",
            make()
        );
    }

    #[test]
    fn work_on_a_group_maps_the_same_through_every_layer() {
        let g1 = || "g1".to_string();
        let busy = "the database is busy; retry shortly";
        maps(
            || ShardError::Busy { group: g1() }.into(),
            503,
            "overloaded",
            busy,
        );
        maps(
            || ShardError::Exhausted { group: g1() }.into(),
            503,
            "overloaded",
            busy,
        );
        let failing_over = "shard group g1 is failing over; retry shortly";
        maps(
            || ShardError::NoMaster { group: g1() }.into(),
            503,
            "unavailable",
            failing_over,
        );
        let dsn = || ShardError::Dsn {
            group: g1(),
            reason: "bad".into(),
        };
        let unavailable = "a shard group is unavailable; retry shortly (with the same request_id)";
        maps(|| dsn().into(), 503, "unavailable", unavailable);
        let item_busy = "this item is busy; retry shortly";
        maps(
            || DbError::Busy("lock".into()).into(),
            503,
            "overloaded",
            item_busy,
        );
        let moving = "moving to another shard group; retry shortly";
        maps(
            || DbError::Moving("item 7".into()).into(),
            503,
            "unavailable",
            moving,
        );
        let rejected = || DbError::Rejected {
            code: "42P01".into(),
            message: "no table".into(),
        };
        maps(|| rejected().into(), 500, "internal", "internal error");
        let silent = "the database did not answer; retry shortly (with the same request_id)";
        maps(
            || DbError::Lost("reset".into()).into(),
            503,
            "unavailable",
            silent,
        );
        maps(|| DbError::ReadOnly.into(), 503, "unavailable", silent);

        let (status, code, detail, retry) =
            answer(GroupError::from(ShardError::NoShadow { group: g1() }).into());
        assert_eq!((status, code, retry), (503, "shadow_unavailable", Some(2)));
        assert!(
            detail.starts_with("shard group g1 has no shadow streaming"),
            "{detail}"
        );
    }

    #[test]
    fn a_sale_not_found_is_404() {
        let sale = crate::domain::SaleId::from_db(42);
        assert_eq!(
            answer(SaleError::NotFound(sale).into()),
            (404, "not_found", "sale 42 not found".to_string(), None)
        );
    }

    #[test]
    fn a_failed_batch_is_unavailable() {
        let detail = "a shard group is unavailable; retry shortly (with the same request_id)";
        assert_eq!(
            answer(OrderError::Unavailable("batch".into()).into()),
            (503, "unavailable", detail.to_string(), Some(1))
        );
    }
}
