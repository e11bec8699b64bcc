//! The buyer's sale page (`GET /sales/{sale_id}`) and its assets: static files embedded in the
//! binary (`web/`), no framework.
//!
//! The page is the same for every sale and every buyer (the script reads the sale id from the URL
//! and everything else from the API), so a CDN may cache it: `Cache-Control: public, max-age=300`
//! with an `ETag`. Its script, style sheet and proof-of-work worker are served under names that
//! carry a hash of their contents with `immutable`, so a new release is picked up at once and an
//! old one never. A sale id that names no sale gets a friendly 404 page (the answer is remembered
//! per node: for good when the sale exists, 5 s when it does not). In the dev cluster only,
//! `POST /dev/token` mints a user token for the page's sign-in form.

use super::error::ApiError;
use super::extract::{Json, Params};
use crate::domain::{SaleId, UserId};
use crate::state::AppState;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

const SALE_HTML: &str = include_str!("../../web/sale.html");
const NOT_FOUND_HTML: &str = include_str!("../../web/not-found.html");
const SALE_JS: &str = include_str!("../../web/sale.js");
const SALE_CSS: &str = include_str!("../../web/sale.css");
const POW_JS: &str = include_str!("../../web/pow.js");

const UNKNOWN_FOR: Duration = Duration::from_secs(5);
const MAX_REMEMBERED: usize = 100_000;

/// Only what the page itself loads; the token in its URL never leaves as a referrer.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; worker-src 'self'; \
                      connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'self'; \
                      frame-ancestors 'none'";

struct Asset {
    name: String,
    body: &'static str,
    content_type: &'static str,
    etag: String,
}

struct Page {
    html: String,
    etag: String,
}

/// The page, the 404 page and the assets, rendered once per process.
static PAGES: std::sync::LazyLock<SalePages> = std::sync::LazyLock::new(SalePages::default);

pub(crate) struct SalePages {
    page: Page,
    not_found: Page,
    assets: Vec<Asset>,
    /// Whether a sale exists, and when that was read.
    known: RwLock<HashMap<SaleId, (bool, Instant)>>,
}

fn digest(text: &str) -> String {
    hex::encode(&Sha256::digest(text.as_bytes())[..8])
}

impl Default for SalePages {
    fn default() -> Self {
        let asset = |stem: &str, ext: &str, body: &'static str, content_type| {
            let hash = digest(body);
            Asset {
                name: format!("{stem}.{hash}.{ext}"),
                body,
                content_type,
                etag: format!("\"{hash}\""),
            }
        };
        let assets = vec![
            asset("sale", "js", SALE_JS, "text/javascript; charset=utf-8"),
            asset("sale", "css", SALE_CSS, "text/css; charset=utf-8"),
            asset("pow", "js", POW_JS, "text/javascript; charset=utf-8"),
        ];
        let render = |template: &str| {
            let mut html = template.to_string();
            for (placeholder, a) in ["{{sale.js}}", "{{sale.css}}", "{{pow.js}}"]
                .iter()
                .zip(&assets)
            {
                html = html.replace(placeholder, &a.name);
            }
            Page {
                etag: format!("\"{}\"", digest(&html)),
                html,
            }
        };
        Self {
            page: render(SALE_HTML),
            not_found: render(NOT_FOUND_HTML),
            assets,
            known: RwLock::new(HashMap::new()),
        }
    }
}

impl SalePages {
    async fn exists(&self, s: &AppState, sale: SaleId) -> Result<bool, ApiError> {
        let remembered = match self.known.read() {
            Ok(k) => k.get(&sale).copied(),
            Err(poisoned) => poisoned.into_inner().get(&sale).copied(),
        };
        match remembered {
            Some((true, _)) => return Ok(true),
            Some((false, at)) if at.elapsed() < UNKNOWN_FOR => return Ok(false),
            _ => {}
        }
        let exists = s.sales().header(sale).await?.is_some();
        let mut known = match self.known.write() {
            Ok(k) => k,
            Err(poisoned) => poisoned.into_inner(),
        };
        if known.len() >= MAX_REMEMBERED {
            known.clear();
        }
        known.insert(sale, (exists, Instant::now()));
        Ok(exists)
    }
}

fn not_modified(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"))
}

fn html(status: StatusCode, page: &Page, cache: &'static str, headers: &HeaderMap) -> Response {
    let mut resp = if status == StatusCode::OK && not_modified(headers, &page.etag) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (status, page.html.clone()).into_response()
    };
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    if let Ok(v) = HeaderValue::from_str(&page.etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(POLICY),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}

#[utoipa::path(
    get,
    path = "/sales/{sale_id}",
    tag = "sales",
    summary = "The buyer's sale page (HTML): server-synchronised countdown and a buy button",
    description = "The same page for every sale and buyer (cacheable: `Cache-Control: public, max-age=300`, `ETag`); the buyer's token comes in the fragment, `#token=` (never sent to a server). States for tests: `body[data-state]` is loading, waiting, open, pending, done, sold_out, ended or error; elements `#countdown`, `#buy`, `#status`, `#remaining`.",
    params(("sale_id" = String, Path, description = "the sale id")),
    responses(
        (status = 200, description = "the page", content_type = "text/html", body = String),
        (status = 304, description = "not modified (If-None-Match)"),
        (status = 404, description = "a friendly page: no such sale", content_type = "text/html", body = String),
        (status = 503, description = "the sale's group is unavailable", body = super::error::Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn sale_page(
    State(s): State<Arc<AppState>>,
    p: Params,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let pages = &*PAGES;
    let missing = || {
        html(
            StatusCode::NOT_FOUND,
            &pages.not_found,
            "public, max-age=10",
            &headers,
        )
    };
    let Ok(sale) = p.sale() else {
        return Ok(missing());
    };
    if !pages.exists(&s, sale).await? {
        return Ok(missing());
    }
    Ok(html(
        StatusCode::OK,
        &pages.page,
        "public, max-age=300",
        &headers,
    ))
}

#[utoipa::path(
    get,
    path = "/assets/{name}",
    tag = "sales",
    summary = "The sale page's script, style sheet and proof-of-work worker, by content-hashed name (immutable)",
    params(("name" = String, Path)),
    responses(
        (status = 200, description = "the file", content_type = "text/javascript", body = String),
        (status = 304, description = "not modified (If-None-Match)"),
        (status = 404, description = "no such file", body = super::error::Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn asset(p: Params, headers: HeaderMap) -> Result<Response, ApiError> {
    let name = p.get("name");
    let a = PAGES
        .assets
        .iter()
        .find(|a| a.name == name)
        .ok_or_else(|| ApiError::not_found(format!("no asset {name:?}")))?;
    let mut resp = if not_modified(&headers, &a.etag) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        a.body.into_response()
    };
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(a.content_type),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=31536000, immutable"),
    );
    if let Ok(v) = HeaderValue::from_str(&a.etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    Ok(resp)
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DevLogin {
    user_id: UserId,
}

/// `POST /dev/token {"user_id": 42}` → `{"token": "..."}`: the dev cluster's sign-in (absent from
/// `seckill serve`, and from the OpenAPI document).
pub(crate) async fn dev_token(
    State(s): State<Arc<AppState>>,
    Json(login): Json<DevLogin>,
) -> Result<Response, ApiError> {
    let secret = s
        .config
        .auth
        .hs256_secret
        .as_ref()
        .ok_or_else(|| ApiError::not_found("no HS256 secret to sign dev tokens with"))?;
    let token = crate::auth::users::mint(secret, login.user_id.key(), 3600)
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    let mut resp = axum::Json(serde_json::json!({ "token": token })).into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_names_its_assets_by_their_hash() {
        let p = SalePages::default();
        for a in &p.assets {
            assert!(
                p.page.html.contains(&format!("/assets/{}", a.name)) || a.name.starts_with("pow")
            );
            assert!(a.name.contains(&a.etag.trim_matches('"')[..16]));
        }
        assert!(!p.page.html.contains("{{"), "every placeholder filled");
        assert!(!p.not_found.html.contains("{{"));
        let worker = &p.assets[2].name;
        assert!(p
            .page
            .html
            .contains(&format!("data-worker=\"/assets/{worker}\"")));
    }
}
