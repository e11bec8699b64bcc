//! `POST /v1/payments`: the payment service's signed callback ([`crate::auth::signature`]).
//!
//! Answers: 200 with the paid order (the same `payment_ref` again: the same answer, header
//! `idempotent-replayed: true`); 401 for a missing, malformed, stale or wrong signature; 409
//! `amount_mismatch` (the order is left as it was), `order_paid` (paid by another payment),
//! `order_cancelled` / `order_expired`; 404 for an unknown order. Every payment is recorded,
//! refused ones as `refund_due` (the body's `payment` says why).

use super::error::{ApiError, Code};
use super::extract::{parse_json, RawBody};
use crate::domain::UserId;
use crate::order::payments::{Notice, Refused};
use crate::state::AppState;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use std::sync::Arc;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PaymentBody {
    order_id: uuid::Uuid,
    #[schema(value_type = u64, minimum = 1, maximum = 9223372036854775807_u64)]
    user_id: UserId,
    #[schema(minimum = 0)]
    #[serde(deserialize_with = "crate::domain::integer_i64")]
    amount_cents: i64,
    /// The payment provider's reference: recorded once; the same again gives the same answer.
    #[schema(min_length = 1, max_length = 128, pattern = "^[\\x21-\\x7e]+$")]
    payment_ref: String,
}

#[utoipa::path(
    post,
    path = "/v1/payments",
    tag = "payments",
    summary = "The payment service's callback (signed)",
    request_body = PaymentBody,
    responses(
        (status = 200, description = "the paid order (header idempotent-replayed: true for a payment_ref seen before)", body = crate::order::store::Order),
        (status = 400, response = super::responses::BadJson),
        (status = 401, description = "the signature is missing, malformed, wrong or stale", body = super::error::Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such order for this user (recorded: refund due)", body = super::error::Problem, content_type = "application/problem+json"),
        (status = 409, description = "amount_mismatch, order_paid, order_cancelled or order_expired (recorded: refund due; the payment in the body)", body = super::error::Problem, content_type = "application/problem+json"),
        (status = 413, response = super::responses::BodyTooLarge),
        (status = 422, description = "a field is out of range, or the payment_ref was recorded for another order or amount", body = super::error::Problem, content_type = "application/problem+json"),
        (status = 503, description = "overloaded or unavailable: retry", body = super::error::Problem, content_type = "application/problem+json"),
    ),
    security(("payment_signature" = []))
)]
pub(crate) async fn callback(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    // The signature first: nothing of an unsigned body is even parsed.
    let signature = headers
        .get("seckill-signature")
        .and_then(|v| v.to_str().ok());
    crate::auth::signature::verify(
        s.config.payments.secret.as_ref(),
        signature,
        &body,
        chrono::Utc::now().timestamp(),
        s.config.payments.tolerance_secs,
    )
    .map_err(|e| ApiError::unauthorized(e.to_string()))?;
    let p: PaymentBody = parse_json(&headers, &body)?;
    let reference_ok = (1..=128).contains(&p.payment_ref.len())
        && p.payment_ref.bytes().all(|b| b.is_ascii_graphic());
    if !reference_ok {
        return Err(ApiError::invalid(
            "payment_ref must be 1 to 128 printable ASCII characters",
        ));
    }
    if p.amount_cents < 0 {
        return Err(ApiError::invalid("amount_cents must not be negative"));
    }
    let notice = Notice {
        order_id: p.order_id,
        user: p.user_id,
        amount_cents: p.amount_cents,
        payment_ref: p.payment_ref,
    };
    let settled = s.orders.settle_payment(notice.clone()).await?;
    let payment = &settled.payment;
    if payment.order_id != notice.order_id
        || payment.amount_cents != notice.amount_cents
        || payment.user_id != notice.user.key()
    {
        return Err(ApiError::invalid(
            "this payment_ref was already recorded for another order, user or amount",
        )
        .with_payment(payment.clone()));
    }
    if let Some(reason) = payment.reason {
        let (status, code) = match reason {
            Refused::OrderNotFound => (StatusCode::NOT_FOUND, Code::NotFound),
            Refused::AmountMismatch => (StatusCode::CONFLICT, Code::AmountMismatch),
            Refused::OrderPaid => (StatusCode::CONFLICT, Code::OrderPaid),
            Refused::OrderCancelled => (StatusCode::CONFLICT, Code::OrderCancelled),
            Refused::OrderExpired => (StatusCode::CONFLICT, Code::OrderExpired),
        };
        let mut e = ApiError::new(status, code, refusal_text(reason)).with_payment(payment.clone());
        if let Some(order) = &settled.order {
            e = e.with_order(order.clone());
        }
        return Err(e);
    }
    let mut resp = axum::Json(&settled.order).into_response();
    if settled.replayed {
        resp.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(resp)
}

fn refusal_text(r: Refused) -> &'static str {
    match r {
        Refused::AmountMismatch => "the amount differs from the order's; the order is unchanged and the payment is due for refund",
        Refused::OrderPaid => "the order was already paid by another payment; this one is due for refund",
        Refused::OrderCancelled => "the order was cancelled; the payment is due for refund",
        Refused::OrderExpired => "the order's payment window had passed; the payment is due for refund",
        Refused::OrderNotFound => "no such order for this user; the payment is due for refund",
    }
}
