//! Extractors whose rejections are problem+json: malformed JSON, wrong types, out-of-range values
//! and oversized bodies become clear 4xx answers, never a 500 or a panic.

use super::error::{ApiError, Code};
use crate::state::AppState;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;
use std::sync::Arc;

/// A JSON object body of at most `server.body_limit_bytes`.
pub struct Json<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Arc<AppState>> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        let limit = state.config.server.body_limit_bytes;
        json_body(req, limit).await.map(Json)
    }
}

/// A JSON object body of at most `server.admin_body_limit_bytes` (a sale of many items).
pub struct AdminJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Arc<AppState>> for AdminJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        let limit = state.config.server.admin_body_limit_bytes;
        json_body(req, limit).await.map(AdminJson)
    }
}

async fn json_body<T: DeserializeOwned>(req: Request, limit: usize) -> Result<T, ApiError> {
    let headers = req.headers().clone();
    let bytes = read_body(req, limit).await?;
    parse_json(&headers, &bytes)
}

/// The raw body (at most `server.body_limit_bytes`), with problem+json rejections (e.g. 413): for
/// bodies that must be seen exactly as sent, such as a signed payment callback.
pub(crate) struct RawBody(pub axum::body::Bytes);

impl FromRequest<Arc<AppState>> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        read_body(req, state.config.server.body_limit_bytes)
            .await
            .map(RawBody)
    }
}

/// The whole body, refused with a 413 past `limit` bytes (at once when its length is declared).
///
/// The limits are applied here, where a body is read, rather than by a `DefaultBodyLimit` layer
/// over the router: such a layer wraps every route, and every request paid for it, bodiless ones
/// too (1,300 of a `GET /v1/time`'s ~23,000 instructions, callgrind).
async fn read_body(req: Request, limit: usize) -> Result<axum::body::Bytes, ApiError> {
    let limited = http_body_util::Limited::new(req.into_body(), limit);
    match http_body_util::BodyExt::collect(limited).await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(ApiError::bad_request(format!(
            "the request body could not be read: {e}"
        ))),
    }
}

/// Parse a JSON object body: a JSON content type is required; malformed JSON is 400, a valid
/// document of the wrong shape 422.
pub(crate) fn parse_json<T: DeserializeOwned>(
    headers: &axum::http::HeaderMap,
    bytes: &[u8],
) -> Result<T, ApiError> {
    let is_json = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json") || v.contains("+json"));
    if !is_json {
        return Err(ApiError::bad_request(
            "expected `Content-Type: application/json`",
        ));
    }
    // serde would also take a JSON array for a struct; the API speaks objects only.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        let parsed: Result<serde_json::Value, _> = serde_json::from_slice(bytes);
        return Err(match parsed {
            Ok(_) => ApiError::invalid("the request body must be a JSON object"),
            Err(e) => ApiError::bad_request(format!("malformed JSON: {e}")),
        });
    }
    match axum::Json::<T>::from_bytes(bytes) {
        Ok(axum::Json(v)) => Ok(v),
        Err(rejection) => Err(json_rejection(rejection)),
    }
}

fn too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        Code::PayloadTooLarge,
        "request body is larger than the limit",
    )
}

fn json_rejection(r: JsonRejection) -> ApiError {
    if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return too_large();
    }
    match r {
        JsonRejection::JsonDataError(e) => ApiError::invalid(e.body_text()),
        JsonRejection::JsonSyntaxError(e) => ApiError::bad_request(e.body_text()),
        JsonRejection::MissingJsonContentType(_) => {
            ApiError::bad_request("expected `Content-Type: application/json`")
        }
        other => ApiError::bad_request(other.body_text()),
    }
}

/// Parse one path segment as a positive id.
pub(crate) fn id<T>(
    name: &str,
    raw: &str,
    parse: impl Fn(i128) -> Result<T, crate::domain::DomainError>,
) -> Result<T, ApiError> {
    let n: i128 = raw.parse().map_err(|_| {
        ApiError::invalid(format!("{name} must be a positive integer, got {raw:?}"))
    })?;
    parse(n).map_err(|e| ApiError::invalid(e.to_string()))
}

pub(crate) fn uuid(name: &str, raw: &str) -> Result<uuid::Uuid, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::invalid(format!("{name} must be a UUID, got {raw:?}")))
}

/// The route's path parameters by name; invalid UTF-8 in the path is a 400, not a 500.
pub(crate) struct Params(pub Vec<(String, String)>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Params {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        let raw = axum::extract::RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::bad_request(e.body_text()))?;
        Ok(Params(
            raw.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ))
    }
}

impl Params {
    pub fn get(&self, name: &str) -> &str {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map_or("", |(_, v)| v.as_str())
    }
    pub fn sale(&self) -> Result<crate::domain::SaleId, ApiError> {
        id("sale_id", self.get("sale_id"), crate::domain::SaleId::parse)
    }
    pub fn item(&self) -> Result<crate::domain::ItemId, ApiError> {
        id("item_id", self.get("item_id"), crate::domain::ItemId::parse)
    }
    pub fn user(&self) -> Result<crate::domain::UserId, ApiError> {
        id("user_id", self.get("user_id"), crate::domain::UserId::parse)
    }
    pub fn order(&self) -> Result<uuid::Uuid, ApiError> {
        uuid("order_id", self.get("order_id"))
    }
}
