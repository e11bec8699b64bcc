//! The admin API (`/v1/admin/*`, the admin token): sales, audits, groups, payments.

use super::error::ApiError;
use super::extract::{Json, Params};
use super::identity::Admin;
use crate::app::AppState;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;

pub async fn create_sale(
    State(s): State<Arc<AppState>>,
    _: Admin,
    Json(new): Json<crate::sale::NewSale>,
) -> Result<Response, ApiError> {
    new.check()
        .map_err(|(field, reason)| ApiError::invalid(format!("{field}: {reason}")))?;
    let view = s.sales().create(&new).await?;
    Ok((StatusCode::CREATED, axum::Json(view)).into_response())
}

pub async fn audit(
    State(s): State<Arc<AppState>>,
    _: Admin,
    p: Params,
) -> Result<Response, ApiError> {
    let report = crate::reconcile::audit_sale(&s.orders, p.sale()?).await?;
    Ok(axum::Json(report).into_response())
}

pub async fn groups(State(s): State<Arc<AppState>>, _: Admin) -> Result<Response, ApiError> {
    Ok(axum::Json(crate::shard::groups_report(&s.cluster)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaymentsQuery {
    sale_id: Option<i64>,
    state: Option<String>,
    limit: Option<i64>,
}

/// `GET /v1/admin/payments?sale_id=&state=refund_due&limit=`: recorded payments, newest first.
pub async fn payments(
    State(s): State<Arc<AppState>>,
    _: Admin,
    query: Result<Query<PaymentsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    let sale = q
        .sale_id
        .map(|id| crate::domain::SaleId::parse(id.into()))
        .transpose()
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    let state = match q.state.as_deref() {
        None => None,
        Some(s @ ("applied" | "refund_due")) => Some(s),
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "state must be `applied` or `refund_due`, got {other:?}"
            )))
        }
    };
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid("limit must be between 1 and 1000"));
    }
    let found = s.orders.list_payments(sale, state, limit).await?;
    Ok(axum::Json(json!({ "payments": found })).into_response())
}
