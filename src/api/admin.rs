//! The admin API (`/v1/admin/*`, the admin token): sales, audits, groups, payments, the blocklist.

use super::error::{request_id, ApiError};
use super::extract::{AdminJson, Json, Params};
use super::identity::Admin;
use crate::state::AppState;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use std::sync::Arc;

#[utoipa::path(
    post,
    path = "/v1/admin/sales",
    tag = "admin",
    summary = "Create a sale",
    request_body = crate::sale::NewSale,
    responses(
        (status = 201, description = "created", body = crate::sale::SaleView),
        (status = 400, response = super::responses::BadJson),
        (status = 401, response = super::responses::AdminTokenRefused),
        (status = 413, description = "the body is larger than server.admin_body_limit_bytes", body = super::error::Problem, content_type = "application/problem+json"),
        (status = 422, description = "a field is out of range or the sale is inconsistent (the detail names the field); a protection on an engine without token keys", body = super::error::Problem, content_type = "application/problem+json"),
        (status = 503, response = super::responses::GroupUnavailable),
    ),
    security(("admin_token" = []))
)]
pub(crate) async fn create_sale(
    State(s): State<Arc<AppState>>,
    _: Admin,
    AdminJson(new): AdminJson<crate::sale::NewSale>,
) -> Result<Response, ApiError> {
    new.check()
        .map_err(|(field, reason)| ApiError::invalid(format!("{field}: {reason}")))?;
    if new.protection.is_some() && !s.frontdoor.keys_configured() {
        return Err(ApiError::invalid(
            "protection: this engine has no frontdoor.token_keys (SECKILL_TOKEN_KEY); every node \
             must share one to verify order tokens",
        ));
    }
    let view = s.sales().create(&new).await?;
    Ok((StatusCode::CREATED, axum::Json(view)).into_response())
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct SalesQuery {
    /// Only sales in this state: `scheduled`, `live`, `paused` or `ended`.
    #[param(pattern = "^(scheduled|live|paused|ended)$")]
    state: Option<String>,
    /// 1 to 1000; default 100.
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
}

#[utoipa::path(
    get,
    path = "/v1/admin/sales",
    tag = "admin",
    summary = "Sales with their state, newest start first",
    params(SalesQuery),
    responses(
        (status = 200, body = crate::sale::changes::SaleList),
        (status = 401, response = super::responses::AdminTokenRefused),
        (status = 422, description = "an unknown state or a limit out of range", body = super::error::Problem, content_type = "application/problem+json"),
        (status = 503, response = super::responses::OverloadedOrGroupUnavailable),
    ),
    security(("admin_token" = []))
)]
pub(crate) async fn list_sales(
    State(s): State<Arc<AppState>>,
    _: Admin,
    query: Result<Query<SalesQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    let state =
        match q.state.as_deref() {
            None => None,
            Some(v) => Some(crate::sale::changes::SaleState::parse(v).ok_or_else(|| {
                ApiError::invalid("state: must be scheduled, live, paused or ended")
            })?),
        };
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid("limit: must be between 1 and 1000"));
    }
    let list = s.sales().list(state, limit as usize).await?;
    Ok(axum::Json(list).into_response())
}

#[utoipa::path(
    patch,
    path = "/v1/admin/sales/{sale_id}",
    tag = "admin",
    summary = "Change a running sale: move its end (end it now, or extend it), pause or resume it",
    description = "A paused sale refuses buys with 409 `paused`. The change reaches every item's row (every node sells by them at once) and is recorded in the sale's audit.",
    params(("sale_id" = u64, Path, minimum = 1, maximum = 9223372036854775807_u64)),
    request_body = crate::sale::changes::SaleChange,
    responses(
        (status = 200, description = "the sale as changed", body = crate::sale::SaleView),
        (status = 400, response = super::responses::BadJson),
        (status = 401, response = super::responses::AdminTokenRefused),
        (status = 404, description = "no such sale", body = super::error::Problem, content_type = "application/problem+json"),
        (status = 422, description = "nothing to change, or ends_at not after starts_at", body = super::error::Problem, content_type = "application/problem+json"),
        (status = 503, description = "a group is unavailable, or an item is being moved: ask again", body = super::error::Problem, content_type = "application/problem+json"),
    ),
    security(("admin_token" = []))
)]
pub(crate) async fn change_sale(
    State(s): State<Arc<AppState>>,
    _: Admin,
    p: Params,
    Json(change): Json<crate::sale::changes::SaleChange>,
) -> Result<Response, ApiError> {
    let view = s
        .sales()
        .change(p.sale()?, &change, request_id().as_deref())
        .await?;
    s.sale_views.forget(view.sale_id);
    Ok(axum::Json(view).into_response())
}

#[utoipa::path(
    post,
    path = "/v1/admin/sales/{sale_id}/items/{item_id}/restock",
    tag = "admin",
    summary = "Add stock to an item of a sale, live",
    description = "Stock and remaining grow together in one transaction (conservation holds); every node sells the new units at once, and a node that held the item sold out learns of it within coalesce.soldout_refresh_ms. Recorded in the sale's audit.",
    params(
        ("sale_id" = u64, Path, minimum = 1, maximum = 9223372036854775807_u64),
        ("item_id" = u64, Path, minimum = 1, maximum = 9223372036854775807_u64),
    ),
    request_body = crate::sale::changes::Restock,
    responses(
        (status = 200, description = "the item with its new stock and remaining", body = crate::sale::changes::Restocked),
        (status = 400, response = super::responses::BadJson),
        (status = 401, response = super::responses::AdminTokenRefused),
        (status = 404, response = super::responses::NoSuchSaleOrItem),
        (status = 422, description = "add out of range, or the stock would pass 1000000000", body = super::error::Problem, content_type = "application/problem+json"),
        (status = 503, description = "a group is unavailable, or the item is being moved: ask again", body = super::error::Problem, content_type = "application/problem+json"),
    ),
    security(("admin_token" = []))
)]
pub(crate) async fn restock(
    State(s): State<Arc<AppState>>,
    _: Admin,
    p: Params,
    Json(r): Json<crate::sale::changes::Restock>,
) -> Result<Response, ApiError> {
    let (sale, item) = (p.sale()?, p.item()?);
    let done = s
        .sales()
        .restock(sale, item, r.add, request_id().as_deref())
        .await?;
    // This node sells the new units at once; the others within their sold-out refresh.
    s.orders.hot.observe(sale, item, done.remaining);
    s.sale_views.forget(sale.key());
    Ok(axum::Json(done).into_response())
}

#[utoipa::path(
    get,
    path = "/v1/admin/sales/{sale_id}/audit",
    tag = "admin",
    summary = "Per item: stock, remaining, reserved, ordered, paid, and whether conservation holds",
    params(("sale_id" = u64, Path, minimum = 1, maximum = 9223372036854775807_u64)),
    responses(
        (status = 200, body = crate::reconcile::SaleAudit),
        (status = 401, response = super::responses::AdminTokenRefused),
        (status = 404, description = "no such sale", body = super::error::Problem, content_type = "application/problem+json"),
        (status = 422, description = "the id is not a positive integer", body = super::error::Problem, content_type = "application/problem+json"),
        (status = 503, response = super::responses::OverloadedOrGroupUnavailable),
    ),
    security(("admin_token" = []))
)]
pub(crate) async fn audit(
    State(s): State<Arc<AppState>>,
    _: Admin,
    p: Params,
) -> Result<Response, ApiError> {
    let report = crate::reconcile::audit_sale(&s.orders, p.sale()?).await?;
    Ok(axum::Json(report).into_response())
}

#[utoipa::path(
    get,
    path = "/v1/admin/sales/{sale_id}/items/{item_id}/draw",
    tag = "admin",
    summary = "A fair start's draw of one item: every entry with its rank and outcome",
    description = "Entries in the order the draw served them (ascending HMAC-SHA256(seed, \"<sale_id>:<item_id>:<user_id>\")), each with its rank key, outcome and a winner's order id; with the sale's revealed seed anyone can recompute it (scripts/verify-draw).",
    params(
        ("sale_id" = u64, Path, minimum = 1, maximum = 9223372036854775807_u64),
        ("item_id" = u64, Path, minimum = 1, maximum = 9223372036854775807_u64),
    ),
    responses(
        (status = 200, body = crate::fair::store::Listing),
        (status = 401, response = super::responses::AdminTokenRefused),
        (status = 404, response = super::responses::NoSuchSaleOrItem),
        (status = 422, description = "an id is not a positive integer", body = super::error::Problem, content_type = "application/problem+json"),
        (status = 503, response = super::responses::OverloadedOrGroupUnavailable),
    ),
    security(("admin_token" = []))
)]
pub(crate) async fn draw(
    State(s): State<Arc<AppState>>,
    _: Admin,
    p: Params,
) -> Result<Response, ApiError> {
    let (sale, item) = (p.sale()?, p.item()?);
    match s.fair.listing(sale, item).await? {
        Some(listing) => Ok(axum::Json(listing).into_response()),
        None => Err(ApiError::not_found(format!(
            "item {} is not part of sale {}",
            item.key(),
            sale.key()
        ))),
    }
}

#[utoipa::path(
    get,
    path = "/v1/admin/groups",
    tag = "admin",
    summary = "Every shard group: members, role, health, replication lag",
    responses(
        (status = 200, body = crate::shard::GroupsReport),
        (status = 401, response = super::responses::AdminTokenRefused),
    ),
    security(("admin_token" = []))
)]
pub async fn groups(State(s): State<Arc<AppState>>, _: Admin) -> Result<Response, ApiError> {
    Ok(axum::Json(crate::shard::groups_report(&s.cluster)).into_response())
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct PaymentsQuery {
    /// Only this sale's payments.
    #[param(minimum = 1, maximum = 9223372036854775807_i64)]
    sale_id: Option<i64>,
    /// `applied` or `refund_due`.
    #[param(pattern = "^(applied|refund_due)$")]
    state: Option<String>,
    /// 1 to 1000; default 100.
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
}

/// Recorded payments.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub(crate) struct Payments {
    pub payments: Vec<crate::order::payments::Payment>,
}

/// `GET /v1/admin/payments?sale_id=&state=refund_due&limit=`: recorded payments, newest first.
#[utoipa::path(
    get,
    path = "/v1/admin/payments",
    tag = "admin",
    summary = "Recorded payments, newest first (e.g. those due for refund)",
    params(PaymentsQuery),
    responses(
        (status = 200, body = Payments),
        (status = 401, response = super::responses::AdminTokenRefused),
        (status = 422, description = "a query parameter is out of range", body = super::error::Problem, content_type = "application/problem+json"),
        (status = 503, response = super::responses::OverloadedOrGroupUnavailable),
    ),
    security(("admin_token" = []))
)]
pub(crate) async fn payments(
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
        Some(text) => match crate::order::payments::PaymentState::parse(text) {
            Some(state) => Some(state),
            None => {
                return Err(ApiError::invalid(format!(
                    "state must be `applied` or `refund_due`, got {text:?}"
                )))
            }
        },
    };
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid("limit must be between 1 and 1000"));
    }
    let found = s.orders.list_payments(sale, state, limit).await?;
    Ok(axum::Json(Payments { payments: found }).into_response())
}

/// Run `work` on the config group's writer (the blocklist lives there).
async fn on_config_group<T>(
    s: &AppState,
    work: impl AsyncFnOnce(&mut deadpool_postgres::Object) -> Result<T, crate::db::DbError>,
) -> Result<T, ApiError> {
    let (g, _) = s
        .cluster
        .by_name(s.config.config_group())
        .ok_or_else(|| ApiError::not_found("the config group is not configured"))?;
    Ok(s.cluster
        .group(g)
        .run(crate::shard::Work::Settle, s.config.request_timeout(), work)
        .await?)
}

/// The blocklist's entries in force.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Blocklist {
    pub entries: Vec<crate::frontdoor::blocklist::Entry>,
}

#[utoipa::path(
    post,
    path = "/v1/admin/blocklist",
    tag = "admin",
    summary = "Block a user or an IP (or CIDR) on every node within about a second",
    request_body = crate::frontdoor::blocklist::NewEntry,
    responses(
        (status = 201, description = "the entry", body = crate::frontdoor::blocklist::Entry),
        (status = 400, response = super::responses::BadJson),
        (status = 401, response = super::responses::AdminTokenRefused),
        (status = 413, response = super::responses::BodyTooLarge),
        (status = 422, description = "the kind, value, reason or ttl_secs is invalid", body = super::error::Problem, content_type = "application/problem+json"),
        (status = 503, response = super::responses::ConfigGroupUnavailable),
    ),
    security(("admin_token" = []))
)]
pub(crate) async fn block(
    State(s): State<Arc<AppState>>,
    _: Admin,
    Json(new): Json<crate::frontdoor::blocklist::NewEntry>,
) -> Result<Response, ApiError> {
    use crate::frontdoor::blocklist;
    let value = new
        .canonical()
        .map_err(|(field, why)| ApiError::invalid(format!("{field}: {why}")))?;
    let entry = on_config_group(&s, async |c| {
        Ok(blocklist::add(c, new.kind, &value, &new.reason, new.ttl_secs).await?)
    })
    .await?;
    tracing::info!(id = entry.id, kind = entry.kind.as_str(), value = %entry.value, "blocklist entry added");
    // This node applies it at once; the others at their next refresh.
    s.frontdoor.refresh_blocklist().await;
    Ok((StatusCode::CREATED, axum::Json(entry)).into_response())
}

#[utoipa::path(
    get,
    path = "/v1/admin/blocklist",
    tag = "admin",
    summary = "The blocklist's entries in force, newest first",
    responses(
        (status = 200, body = Blocklist),
        (status = 401, response = super::responses::AdminTokenRefused),
        (status = 503, response = super::responses::ConfigGroupUnavailable),
    ),
    security(("admin_token" = []))
)]
pub(crate) async fn blocklist(
    State(s): State<Arc<AppState>>,
    _: Admin,
) -> Result<Response, ApiError> {
    let entries = on_config_group(
        &s,
        async |c| Ok(crate::frontdoor::blocklist::list(c).await?),
    )
    .await?;
    Ok(axum::Json(Blocklist { entries }).into_response())
}

#[utoipa::path(
    delete,
    path = "/v1/admin/blocklist/{id}",
    tag = "admin",
    summary = "Remove a blocklist entry",
    params(("id" = u64, Path, minimum = 1, maximum = 9223372036854775807_u64)),
    responses(
        (status = 204, description = "removed"),
        (status = 401, response = super::responses::AdminTokenRefused),
        (status = 404, description = "no such entry", body = super::error::Problem, content_type = "application/problem+json"),
        (status = 422, description = "the id is not a positive integer", body = super::error::Problem, content_type = "application/problem+json"),
        (status = 503, response = super::responses::ConfigGroupUnavailable),
    ),
    security(("admin_token" = []))
)]
pub(crate) async fn unblock(
    State(s): State<Arc<AppState>>,
    _: Admin,
    p: Params,
) -> Result<Response, ApiError> {
    let id = super::extract::id("id", p.get("id"), |n| {
        u64::try_from(n)
            .ok()
            .filter(|n| (1..=i64::MAX as u64).contains(n))
            .ok_or(crate::domain::DomainError::OutOfRange {
                field: "id",
                max: i64::MAX as u64,
                value: n,
            })
    })?;
    let removed = on_config_group(&s, async |c| {
        Ok(crate::frontdoor::blocklist::remove(c, id).await?)
    })
    .await?;
    if !removed {
        return Err(ApiError::not_found(format!("no blocklist entry {id}")));
    }
    tracing::info!(id, "blocklist entry removed");
    s.frontdoor.refresh_blocklist().await;
    Ok(StatusCode::NO_CONTENT.into_response())
}
