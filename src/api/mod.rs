//! The public REST API (docs/api.md "The API"): routes and handlers.
//!
//! Handlers only translate between HTTP and the services; who may call what is decided by the
//! extractors of [`identity`] (admin token, user token); every error leaves through
//! [`error::ApiError`] as problem+json.
//!
//! The OpenAPI 3.1 document (`GET /openapi.json`, and `openapi.json` in the repository) is
//! generated from the handlers' annotations: a route is registered through the same
//! `routes!` that documents it, so none can exist undocumented.

pub mod admin;
pub mod error;
pub mod extract;
pub mod frontdoor;
pub mod identity;
pub mod moves;
pub mod observe;
pub mod orders;
pub mod page;
pub mod payments;
mod responses;
pub mod server;
pub mod shardmap;

use crate::state::AppState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use error::{ApiError, Code};
use extract::Params;
use std::sync::Arc;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// The document's frame; the paths come from the handlers.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "seckill",
        description = "A flash-sale order engine on sharded PostgreSQL. Errors are application/problem+json with a machine-readable `code`.",
        license(name = "MIT OR Apache-2.0")
    ),
    modifiers(&Security, &SharedResponses),
    tags(
        (name = "sales", description = "Sales and their items"),
        (name = "orders", description = "A user's purchases (user token)"),
        (name = "payments", description = "The payment service's signed callbacks"),
        (name = "admin", description = "Administration (admin token)"),
        (name = "operations", description = "Health, metrics, the clock, this document"),
    )
)]
pub(crate) struct ApiDoc;

struct Security;

/// The problem+json answers many operations share ([`responses`]), in `components.responses`.
struct SharedResponses;

impl utoipa::Modify for SharedResponses {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.responses.extend(responses::all());
    }
}

impl utoipa::Modify for Security {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{
            ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme,
        };
        let components = doc.components.get_or_insert_with(Default::default);
        let bearer = |what: &str| {
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(what.to_string()))
                    .build(),
            )
        };
        components.add_security_scheme(
            "admin_token",
            bearer("the admin token (server.admin_token)"),
        );
        components.add_security_scheme(
            "user_token",
            bearer("a JWT whose `sub` is the user id (HS256, RS256, ES256 or EdDSA)"),
        );
        components.add_security_scheme(
            "payment_signature",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "Seckill-Signature",
                "t=<unix seconds>,v1=<hex HMAC-SHA256(payment secret, \"<t>.\" + raw body)>",
            ))),
        );
    }
}

/// Every route, with its documentation.
fn documented() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(time))
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(observe::metrics))
        .routes(routes!(openapi_json))
        .routes(routes!(admin::create_sale))
        .routes(routes!(admin::list_sales))
        .routes(routes!(admin::change_sale))
        .routes(routes!(admin::restock))
        .routes(routes!(admin::audit))
        .routes(routes!(admin::draw))
        .routes(routes!(admin::groups))
        .routes(routes!(admin::payments))
        .routes(routes!(admin::block, admin::blocklist))
        .routes(routes!(admin::unblock))
        .routes(routes!(shardmap::route))
        .routes(routes!(shardmap::list))
        .routes(routes!(shardmap::set, shardmap::remove))
        .routes(routes!(moves::start, moves::list))
        .routes(routes!(moves::get))
        .routes(routes!(moves::action))
        .routes(routes!(get_sale))
        .routes(routes!(orders::buy))
        .routes(routes!(orders::buy_with_token))
        .routes(routes!(frontdoor::challenge))
        .routes(routes!(frontdoor::order_token))
        .routes(routes!(orders::list))
        .routes(routes!(orders::get))
        .routes(routes!(orders::cancel))
        .routes(routes!(payments::callback))
        .routes(routes!(page::sale_page))
        .routes(routes!(page::asset))
}

/// The OpenAPI document of this engine.
pub fn openapi() -> utoipa::openapi::OpenApi {
    documented().into_openapi()
}

/// The engine's HTTP application: every route, behind what every request crosses first (its id,
/// span, metrics and deadline: [`observe::Front`]).
pub(crate) fn front(state: Arc<AppState>) -> observe::Front {
    let server = &state.config.server;
    let deadline = std::time::Duration::from_millis(server.http_timeout_ms);
    let (mut router, doc) = documented().split_for_parts();
    let mut templates: Vec<String> = doc.paths.paths.into_keys().collect();
    if server.dev_login {
        router = router.route(DEV_TOKEN, axum::routing::post(page::dev_token));
        templates.push(DEV_TOKEN.to_string());
    }
    let router = router
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                Code::MethodNotAllowed,
                "this endpoint does not accept that method",
            )
        })
        // Body limits are applied where a body is read (api::extract): no layer for them.
        .with_state(state);
    observe::Front::new(router, templates, deadline)
}

/// The route `seckill dev` adds for its demo tokens (`server.dev_login`).
const DEV_TOKEN: &str = "/dev/token";

/// A whole request, body included, is answered within `server.http_timeout_ms`. A purchase that
/// is still under way when the time is up goes on (it is a task of the order service); the client
/// learns to retry it with the same request_id.
///
/// The timer is armed only for an answer that is not ready at its first poll, with the deadline
/// taken before that poll. Most answers of a storm are (`sold_out` from memory, `GET /v1/time`),
/// and a tokio timer takes the timer driver's lock when it is dropped, armed or not. Measured
/// with the bench, this build and the one before alternated on one dev cluster, three runs each:
/// a sold-out answer 16.0-17.7 µs against 17.2-20.3 µs; `GET /v1/time` 8.5-9.0 against
/// 8.8-9.1 µs, inside the noise.
pub(crate) async fn within(
    limit: std::time::Duration,
    answer: impl std::future::Future<Output = Response>,
) -> Response {
    let deadline = tokio::time::Instant::now() + limit;
    let mut answer = std::pin::pin!(answer);
    if let std::task::Poll::Ready(resp) = futures::poll!(answer.as_mut()) {
        return resp;
    }
    match tokio::time::timeout_at(deadline, answer).await {
        Ok(resp) => resp,
        Err(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Code::Unavailable,
            format!(
                "no answer within {} ms; a purchase goes on: retry it with the same request_id",
                limit.as_millis()
            ),
        )
        .retry_after(1)
        .into_response(),
    }
}

/// The server's clock.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub(crate) struct Time {
    /// Milliseconds since the Unix epoch.
    pub now_ms: i64,
}

/// Status of a health check.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub(crate) struct Health {
    #[schema(example = "ok")]
    pub status: &'static str,
}

#[utoipa::path(
    get,
    path = "/v1/time",
    tag = "operations",
    summary = "The server's clock, for client countdowns",
    responses((status = 200, body = Time))
)]
async fn time() -> Response {
    let mut resp = axum::Json(Time {
        now_ms: chrono::Utc::now().timestamp_millis(),
    })
    .into_response();
    resp.headers_mut().insert(
        axum::http::header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-store"),
    );
    resp
}

#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    summary = "Liveness",
    responses((status = 200, body = Health))
)]
async fn healthz() -> impl IntoResponse {
    axum::Json(Health { status: "ok" })
}

#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    summary = "Readiness: every group has a writable master",
    responses(
        (status = 200, body = Health),
        (status = 503, description = "a group has no writable master", body = error::Problem, content_type = "application/problem+json"),
    )
)]
async fn readyz(State(s): State<Arc<AppState>>) -> Response {
    if s.cluster.all_writable() {
        axum::Json(Health { status: "ready" }).into_response()
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
            Code::Unavailable,
            format!("no writable master in group(s): {}", missing.join(", ")),
        )
        .retry_after(1)
        .into_response()
    }
}

#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    summary = "This document (OpenAPI 3.1)",
    responses((status = 200, description = "the OpenAPI document", content_type = "application/json", body = Object))
)]
async fn openapi_json() -> Response {
    axum::Json(openapi()).into_response()
}

#[utoipa::path(
    get,
    path = "/v1/sales/{sale_id}",
    tag = "sales",
    summary = "A sale, its items and each item's remaining stock",
    description = "Served from a per-node cache at most `server.sale_view_cache_ms` old (250 ms by default), behind the per-IP limit. The answer has an `ETag`: send it back in `If-None-Match` to get 304 with no body while nothing changed.",
    params(
        ("sale_id" = u64, Path, minimum = 1, maximum = 9223372036854775807_u64),
        ("if-none-match" = Option<String>, Header, description = "the `ETag` of a view already held"),
    ),
    responses(
        (status = 200, body = crate::sale::SaleView, headers(
            ("etag" = String, description = "changes whenever the view does"),
            ("cache-control" = String, description = "`public, max-age=1`: a CDN may serve it for a second"),
        )),
        (status = 304, description = "the view is the one whose `ETag` was sent"),
        (status = 404, description = "no such sale", body = error::Problem, content_type = "application/problem+json"),
        (status = 422, description = "the id is not a positive integer", body = error::Problem, content_type = "application/problem+json"),
        (status = 429, description = "this address asks too often (`frontdoor.ip_limit`)", body = error::Problem, content_type = "application/problem+json"),
        (status = 503, response = responses::OverloadedOrGroupUnavailable),
    )
)]
async fn get_sale(
    State(s): State<Arc<AppState>>,
    _: frontdoor::Door,
    p: Params,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    use axum::http::{header, HeaderValue};
    let sale = p.sale()?;
    let cached = s
        .sale_views
        .get(sale, || async { s.sales().get(sale).await })
        .await?;
    let crate::sale::cache::Cached::Found { body, etag } = cached else {
        return Err(crate::sale::SaleError::NotFound(sale).into());
    };
    let tag = HeaderValue::from_str(&etag).map_err(|_| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            Code::Internal,
            "an unprintable ETag",
        )
    })?;
    // The remaining stock changes by the second: a CDN may answer for one second at most.
    let cache = HeaderValue::from_static("public, max-age=1");
    let held = headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            let t = t.trim();
            t == "*" || t.trim_start_matches("W/") == &*etag
        });
    let mut resp = if held {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response()
    };
    resp.headers_mut().insert(header::ETAG, tag);
    resp.headers_mut().insert(header::CACHE_CONTROL, cache);
    Ok(resp)
}

#[cfg(test)]
mod tests {
    /// The committed openapi.json is what the handlers say: a change to the API that is not in
    /// the committed document fails here. Regenerate it with
    /// `cargo run --bin seckill -- openapi > openapi.json`.
    #[test]
    fn the_committed_openapi_document_has_not_drifted() {
        let generated = serde_json::to_string_pretty(&super::openapi()).unwrap();
        let committed = include_str!("../../openapi.json");
        assert!(
            committed.trim() == generated.trim(),
            "openapi.json is stale: run `cargo run --bin seckill -- openapi > openapi.json`"
        );
    }

    #[test]
    fn every_documented_error_is_problem_json_with_a_code() {
        let doc = serde_json::to_value(super::openapi()).unwrap();
        for (path, ops) in doc["paths"].as_object().unwrap() {
            for (method, op) in ops.as_object().unwrap() {
                for (status, resp) in op["responses"].as_object().unwrap() {
                    // A shared answer is a reference into components.responses.
                    let resp = match resp["$ref"].as_str() {
                        Some(r) => {
                            let name = r.strip_prefix("#/components/responses/").unwrap();
                            &doc["components"]["responses"][name]
                        }
                        None => resp,
                    };
                    assert!(resp.is_object(), "{method} {path} {status}: {resp}");
                    // The sale page's friendly 404 is a page for people.
                    let is_page = resp["content"].get("text/html").is_some();
                    if (status.starts_with('4') || status.starts_with('5')) && !is_page {
                        let schema = &resp["content"]["application/problem+json"]["schema"];
                        assert_eq!(
                            schema["$ref"], "#/components/schemas/Problem",
                            "{method} {path} {status}"
                        );
                    }
                }
            }
        }
    }

    /// The front names a request's route as the router matches it: every documented path, with
    /// its parameters filled in, takes its own template; anything else is "unmatched".
    #[test]
    fn the_front_names_routes_by_their_templates() {
        let templates: Vec<String> = super::openapi().paths.paths.into_keys().collect();
        assert!(templates.len() > 25, "{templates:?}");
        let front = super::observe::Front::new(
            axum::Router::new(),
            templates.clone(),
            std::time::Duration::from_secs(1),
        );
        for t in &templates {
            let concrete: String = t
                .split('/')
                .map(|seg| if seg.starts_with('{') { "42" } else { seg })
                .collect::<Vec<_>>()
                .join("/");
            assert_eq!(front.route(&concrete), t, "{concrete}");
        }
        assert_eq!(
            front.route("/v1/sales/42/items/7/orders"),
            "/v1/sales/{sale_id}/items/{item_id}/orders"
        );
        for unknown in ["/", "/v1", "/v1/time/", "/v1/sales/42/items", "/nope"] {
            assert_eq!(front.route(unknown), "unmatched", "{unknown}");
        }
    }
}
