//! Live moves over HTTP (admin): start one (or plan it with `dry_run`), follow it, cancel,
//! reverse or complete it ([`crate::moves`]).

use super::error::ApiError;
use super::extract::{Json, Params};
use super::identity::Admin;
use crate::moves::{Move, Unit};
use crate::router::KeyKind;
use crate::state::AppState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

/// A move to start.
#[derive(serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewMove {
    /// `items` (sale items with their reservations, and sales, by id) or `users` (orders,
    /// payments and pending stock releases).
    #[schema(example = "items")]
    kind: String,
    /// One key to move, or
    #[schema(minimum = 1, maximum = 9223372036854775807_u64, example = 1001)]
    key: Option<u64>,
    /// one hash slot (every key of it). Exactly one of the two.
    slot: Option<u32>,
    /// The destination group.
    #[schema(example = "g1")]
    to: String,
    /// Only run the pre-checks and say what would be copied.
    #[serde(default)]
    dry_run: bool,
    /// Drop the source's copy right after the switch (no way back but a new move).
    #[serde(default)]
    complete: bool,
}

/// The moves, newest first.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub(crate) struct MoveList {
    moves: Vec<crate::moves::Move>,
}

#[utoipa::path(
    post,
    path = "/v1/admin/moves",
    tag = "admin",
    summary = "Move a key or a hash slot of items or users to another group, live",
    request_body = NewMove,
    responses(
        (status = 202, description = "started; follow it at /v1/admin/moves/{move_id}", body = crate::moves::Move),
        (status = 200, description = "dry_run: what the move would copy, and the checks it passed", body = crate::moves::Plan),
        (status = 400, response = super::responses::BadJson),
        (status = 401, response = super::responses::AdminTokenRefused),
        (status = 409, description = "move_conflict: another open move of the key; precheck_failed: a group not writable, a shadow not streaming, schema versions differ; has_data: live rows for the key on the destination", body = super::error::Problem, content_type = "application/problem+json"),
        (status = 422, description = "an unknown kind or group, the key's own group, or a key out of range", body = super::error::Problem, content_type = "application/problem+json"),
        (status = 503, response = super::responses::GroupUnavailable),
    ),
    security(("admin_token" = []))
)]
pub async fn start(
    State(s): State<Arc<AppState>>,
    _: Admin,
    Json(body): Json<NewMove>,
) -> Result<Response, ApiError> {
    let kind = KeyKind::parse_given(&body.kind).map_err(ApiError::invalid)?;
    let unit = match (body.key, body.slot) {
        (Some(k), None) if (1..=i64::MAX as u64).contains(&k) => Unit::Key(k),
        (Some(_), None) => return Err(ApiError::invalid("key must be between 1 and 2^63-1")),
        (None, Some(s)) => Unit::Slot(s),
        _ => return Err(ApiError::invalid("give either key or slot")),
    };
    if body.dry_run {
        let plan = s.moves.plan(kind, unit, &body.to).await?;
        return Ok(axum::Json(plan).into_response());
    }
    let m = s.moves.start(kind, unit, &body.to, body.complete).await?;
    Ok((StatusCode::ACCEPTED, axum::Json(m.shown())).into_response())
}

#[utoipa::path(
    get,
    path = "/v1/admin/moves",
    tag = "admin",
    summary = "The moves, newest first (the last 100)",
    responses(
        (status = 200, body = MoveList),
        (status = 401, response = super::responses::AdminTokenRefused),
        (status = 503, response = super::responses::ConfigGroupUnavailable),
    ),
    security(("admin_token" = []))
)]
pub(crate) async fn list(State(s): State<Arc<AppState>>, _: Admin) -> Result<Response, ApiError> {
    let moves = s
        .moves
        .list(100)
        .await?
        .into_iter()
        .map(Move::shown)
        .collect();
    Ok(axum::Json(MoveList { moves }).into_response())
}

fn move_id(p: &Params) -> Result<u64, ApiError> {
    Ok(super::extract::id("move_id", p.get("move_id"), crate::domain::ItemId::parse)?.key())
}

#[utoipa::path(
    get,
    path = "/v1/admin/moves/{move_id}",
    tag = "admin",
    summary = "One move: its phase, rows copied, write pause, error",
    params(("move_id" = u64, Path, minimum = 1, maximum = 9223372036854775807_u64)),
    responses(
        (status = 200, body = crate::moves::Move),
        (status = 401, response = super::responses::AdminTokenRefused),
        (status = 404, description = "no such move", body = super::error::Problem, content_type = "application/problem+json"),
        (status = 422, description = "a move id out of range", body = super::error::Problem, content_type = "application/problem+json"),
        (status = 503, response = super::responses::ConfigGroupUnavailable),
    ),
    security(("admin_token" = []))
)]
pub(crate) async fn get(
    State(s): State<Arc<AppState>>,
    _: Admin,
    p: Params,
) -> Result<Response, ApiError> {
    let m = s.moves.get(move_id(&p)?).await?;
    Ok(axum::Json(m.shown()).into_response())
}

#[utoipa::path(
    post,
    path = "/v1/admin/moves/{move_id}/{action}",
    tag = "admin",
    summary = "cancel (roll back a move that has not switched), reverse (move a switched or completed key back: a new move), complete (drop the source's copy of a switched move)",
    params(
        ("move_id" = u64, Path, minimum = 1, maximum = 9223372036854775807_u64),
        ("action" = String, Path, description = "`cancel`, `reverse` or `complete`"),
    ),
    responses(
        (status = 202, description = "asked; the move (for reverse: the new move)", body = crate::moves::Move),
        (status = 401, response = super::responses::AdminTokenRefused),
        (status = 404, description = "no such move, or no such action", body = super::error::Problem, content_type = "application/problem+json"),
        (status = 409, description = "move_conflict: the move's phase does not allow it; precheck_failed / has_data (reverse)", body = super::error::Problem, content_type = "application/problem+json"),
        (status = 422, description = "a move id out of range", body = super::error::Problem, content_type = "application/problem+json"),
        (status = 503, response = super::responses::GroupUnavailable),
    ),
    security(("admin_token" = []))
)]
pub(crate) async fn action(
    State(s): State<Arc<AppState>>,
    _: Admin,
    p: Params,
) -> Result<Response, ApiError> {
    let id = move_id(&p)?;
    let m = match p.get("action") {
        "cancel" => s.moves.cancel(id).await?,
        "reverse" => s.moves.reverse(id, false).await?,
        "complete" => s.moves.complete(id).await?,
        other => {
            return Err(ApiError::not_found(format!(
                "no action {other:?} on moves (cancel, reverse, complete)"
            )))
        }
    };
    Ok((StatusCode::ACCEPTED, axum::Json(m.shown())).into_response())
}
