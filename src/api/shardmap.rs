//! The shard map over HTTP (admin): where a key routes, the router-config table, and safe
//! changes to it ([`crate::shardmap`]).

use super::error::ApiError;
use super::extract::{Json, Params};
use super::identity::Admin;
use crate::router::KeyKind;
use crate::state::AppState;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

/// The kind and key of a `/{kind}/{key}` path.
fn kind_and_key(p: &Params) -> Result<(KeyKind, u64), ApiError> {
    let kind = KeyKind::parse_given(p.get("kind")).map_err(ApiError::invalid)?;
    let key = super::extract::id("key", p.get("key"), crate::domain::ItemId::parse)?;
    Ok((kind, key.key()))
}

#[utoipa::path(
    get,
    path = "/v1/admin/route/{kind}/{key}",
    tag = "admin",
    summary = "Where a key routes on this node, and why (hash slot, range or table entry)",
    params(
        ("kind" = String, Path, description = "`items` or `users`"),
        ("key" = u64, Path, minimum = 1, maximum = 9223372036854775807_u64),
    ),
    responses(
        (status = 200, body = crate::shardmap::Route),
        (status = 401, response = super::responses::AdminTokenRefused),
        (status = 422, description = "an unknown kind or a key out of range", body = super::error::Problem, content_type = "application/problem+json"),
    ),
    security(("admin_token" = []))
)]
pub(crate) async fn route(
    State(s): State<Arc<AppState>>,
    _: Admin,
    p: Params,
) -> Result<Response, ApiError> {
    let (kind, key) = kind_and_key(&p)?;
    Ok(axum::Json(s.maps().route(kind, key)).into_response())
}

#[utoipa::path(
    get,
    path = "/v1/admin/shard-map",
    tag = "admin",
    summary = "The router-config table: its entries and version",
    responses(
        (status = 200, body = crate::shardmap::ShardMap),
        (status = 401, response = super::responses::AdminTokenRefused),
        (status = 503, response = super::responses::ConfigGroupUnavailable),
    ),
    security(("admin_token" = []))
)]
pub(crate) async fn list(State(s): State<Arc<AppState>>, _: Admin) -> Result<Response, ApiError> {
    Ok(axum::Json(s.maps().list().await?).into_response())
}

/// Where a key should route.
#[derive(serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SetRoute {
    #[schema(example = "g1")]
    group: String,
}

#[utoipa::path(
    put,
    path = "/v1/admin/shard-map/{kind}/{key}",
    tag = "admin",
    summary = "Route a key to a group by a table entry (only a key without rows: a key with rows must be moved)",
    params(
        ("kind" = String, Path, description = "`items` or `users`"),
        ("key" = u64, Path, minimum = 1, maximum = 9223372036854775807_u64),
    ),
    request_body = SetRoute,
    responses(
        (status = 200, description = "where the key routes now", body = crate::shardmap::Route),
        (status = 400, response = super::responses::BadJson),
        (status = 401, response = super::responses::AdminTokenRefused),
        (status = 409, description = "has_data: the key has rows on its current or its new group", body = super::error::Problem, content_type = "application/problem+json"),
        (status = 422, description = "an unknown kind or group, or a key out of range", body = super::error::Problem, content_type = "application/problem+json"),
        (status = 503, response = super::responses::GroupUnavailable),
    ),
    security(("admin_token" = []))
)]
pub(crate) async fn set(
    State(s): State<Arc<AppState>>,
    _: Admin,
    p: Params,
    Json(body): Json<SetRoute>,
) -> Result<Response, ApiError> {
    let (kind, key) = kind_and_key(&p)?;
    let route = s.maps().change(kind, key, Some(&body.group)).await?;
    Ok(axum::Json(route).into_response())
}

#[utoipa::path(
    delete,
    path = "/v1/admin/shard-map/{kind}/{key}",
    tag = "admin",
    summary = "Remove a key's table entry: it routes by its rule again (only a key without rows)",
    params(
        ("kind" = String, Path, description = "`items` or `users`"),
        ("key" = u64, Path, minimum = 1, maximum = 9223372036854775807_u64),
    ),
    responses(
        (status = 200, description = "where the key routes now", body = crate::shardmap::Route),
        (status = 401, response = super::responses::AdminTokenRefused),
        (status = 404, description = "the key has no table entry", body = super::error::Problem, content_type = "application/problem+json"),
        (status = 409, description = "has_data: the key has rows on its current or its new group", body = super::error::Problem, content_type = "application/problem+json"),
        (status = 422, description = "an unknown kind or a key out of range", body = super::error::Problem, content_type = "application/problem+json"),
        (status = 503, response = super::responses::GroupUnavailable),
    ),
    security(("admin_token" = []))
)]
pub(crate) async fn remove(
    State(s): State<Arc<AppState>>,
    _: Admin,
    p: Params,
) -> Result<Response, ApiError> {
    let (kind, key) = kind_and_key(&p)?;
    let route = s.maps().change(kind, key, None).await?;
    Ok(axum::Json(route).into_response())
}
