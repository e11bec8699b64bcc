//! Extractors whose rejections are problem+json: malformed JSON, wrong types, out-of-range values
//! and oversized bodies become clear 4xx answers, never a 500 or a panic.

use super::error::{ApiError, Code};
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

pub struct Json<T>(pub T);

impl<S, T> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let headers = req.headers().clone();
        let RawBody(bytes) = RawBody::from_request(req, state).await?;
        parse_json(&headers, &bytes).map(Json)
    }
}

/// The raw body, with problem+json rejections (e.g. 413): for bodies that must be seen exactly as
/// sent, such as a signed payment callback.
pub(crate) struct RawBody(pub axum::body::Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        axum::body::Bytes::from_request(req, state)
            .await
            .map(RawBody)
            .map_err(|r| {
                if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    too_large()
                } else {
                    ApiError::bad_request(r.body_text())
                }
            })
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
