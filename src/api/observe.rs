//! What every request leaves behind: its id, its span, its metrics; and `GET /metrics`.
//!
//! The request id is the caller's `x-request-id` when it is a sane token (1 to 128 printable
//! ASCII characters), else a fresh UUID v7; every answer carries it back in `x-request-id`, and
//! a problem+json body names it as `instance`.
//!
//! [`Front`] puts this around the whole router, not on each route: a layer on the router's routes
//! (`Router::layer`) wraps every route in one more boxed service, and `from_fn` boxed the request's
//! future and a clone of the service under it, five allocations a request in all. Outside the
//! router the route is not yet known, so the front matches the path against the same templates
//! itself (the router's own matcher, `matchit`, over the OpenAPI document's paths).

use super::error::{Code, REQUEST_ID};
use crate::state::AppState;
use crate::telemetry as t;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use std::collections::HashMap;
use std::sync::{Arc, LazyLock, RwLock};
use std::time::{Duration, Instant};
use tracing::Instrument;

/// A header name, not a `&str`: a `&str` is parsed and checked on every lookup and insert.
pub(crate) const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// The caller's `x-request-id` when it is a sane token, kept as it came (a header value: no copy,
/// and it goes back in the answer as it is), else a fresh UUID v7.
fn request_id(req: &Request) -> HeaderValue {
    let sane = |v: &&HeaderValue| {
        let b = v.as_bytes();
        !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic())
    };
    if let Some(v) = req.headers().get(&REQUEST_ID_HEADER).filter(sane) {
        return v.clone();
    }
    let mut text = uuid::Uuid::encode_buffer();
    let id = uuid::Uuid::now_v7().hyphenated().encode_lower(&mut text);
    // A UUID's text is always a valid header value.
    HeaderValue::from_str(id).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// The HTTP metric handles of one method and route, looked up in the registry once (a lookup
/// hashes and compares every label, and building the labels allocated, on every request).
struct RouteMetrics {
    method: String,
    route: String,
    active: metrics::Gauge,
    /// By status code: a route answers a handful of them.
    durations: RwLock<Vec<(u16, metrics::Histogram)>>,
}

impl RouteMetrics {
    fn new(method: &str, route: &str) -> Self {
        // Install the recorder before the first handle: a handle binds to the recorder of its time.
        let _ = t::recorder();
        let labels = [
            ("http_request_method", method.to_string()),
            ("http_route", route.to_string()),
        ];
        Self {
            method: method.to_string(),
            route: route.to_string(),
            active: metrics::gauge!(t::HTTP_ACTIVE, &labels),
            durations: RwLock::new(Vec::new()),
        }
    }

    fn record(&self, status: u16, seconds: f64) {
        let known = self
            .durations
            .read()
            .ok()
            .and_then(|d| d.iter().find(|(s, _)| *s == status).map(|(_, h)| h.clone()));
        let histogram = known.unwrap_or_else(|| {
            let h = metrics::histogram!(
                t::HTTP_DURATION,
                "http_request_method" => self.method.clone(),
                "http_route" => self.route.clone(),
                "http_response_status_code" => status.to_string(),
            );
            // Another request may have added this status since the read: keep one handle each.
            match self.durations.write() {
                Ok(mut d) => match d.iter().find(|(s, _)| *s == status) {
                    Some((_, kept)) => kept.clone(),
                    None => {
                        d.push((status, h.clone()));
                        h
                    }
                },
                Err(_) => h,
            }
        });
        histogram.record(seconds);
    }
}

/// Every route's metrics, by route and method: the routes are the router's templates and
/// "unmatched", so this stays as small as the API. A client can make up methods, so a route keeps
/// at most [`METHODS_KEPT`] of them; the handles of any further one are looked up each time.
static ROUTES: LazyLock<RwLock<HashMap<String, Vec<Arc<RouteMetrics>>>>> =
    LazyLock::new(Default::default);
const METHODS_KEPT: usize = 16;

fn route_metrics(method: &Method, route: &str) -> Arc<RouteMetrics> {
    let of = |ms: &Vec<Arc<RouteMetrics>>| ms.iter().find(|m| m.method == method.as_str()).cloned();
    if let Some(m) = ROUTES.read().ok().and_then(|r| r.get(route).and_then(of)) {
        return m;
    }
    let made = Arc::new(RouteMetrics::new(method.as_str(), route));
    let Ok(mut routes) = ROUTES.write() else {
        return made;
    };
    let kept = routes.entry(route.to_string()).or_default();
    if let Some(m) = of(kept) {
        return m;
    }
    if kept.len() < METHODS_KEPT {
        kept.push(made.clone());
    }
    made
}

/// The HTTP application as the server loop runs it: the router behind what every request
/// crosses first (module docs).
#[derive(Clone)]
pub(crate) struct Front {
    router: axum::Router,
    /// Every route template of the router, by itself.
    routes: Arc<matchit::Router<String>>,
    deadline: Duration,
}

impl Front {
    /// `templates`: every path the router routes, as written in its routes (`/v1/sales/{sale_id}`).
    pub(crate) fn new(
        router: axum::Router,
        templates: impl IntoIterator<Item = String>,
        deadline: Duration,
    ) -> Self {
        let mut routes = matchit::Router::new();
        for t in templates {
            // The router took these same paths, so they cannot conflict here; were one refused
            // anyway, its requests would only be labelled "unmatched".
            if let Err(e) = routes.insert(t.clone(), t.clone()) {
                tracing::warn!(route = %t, error = %e, "route left out of the HTTP metrics");
            }
        }
        Self {
            router,
            routes: Arc::new(routes),
            deadline,
        }
    }

    /// The route template `path` takes, as the router matches it; "unmatched" when none.
    pub(crate) fn route(&self, path: &str) -> &str {
        self.routes
            .at(path)
            .map_or("unmatched", |m| m.value.as_str())
    }

    /// Answer `req`: request id, span, HTTP metrics and the deadline ([`super::within`]) around
    /// the router's answer.
    pub(crate) fn answer(
        &self,
        req: Request,
    ) -> impl std::future::Future<Output = Result<Response, std::convert::Infallible>> + Send + 'static
    {
        let id = request_id(&req);
        // The route template, never the concrete path (no ids in labels).
        let m = route_metrics(req.method(), self.route(req.uri().path()));
        let answer = tower::ServiceExt::oneshot(self.router.clone(), req);
        let deadline = self.deadline;
        async move {
            let answer = async move {
                match answer.await {
                    Ok(resp) => resp,
                    Err(never) => match never {},
                }
            };
            Ok(observe(deadline, m, id, answer).await)
        }
    }
}

/// What [`Front::answer`] puts around one request.
async fn observe(
    deadline: Duration,
    m: Arc<RouteMetrics>,
    id: HeaderValue,
    answer: impl std::future::Future<Output = Response> + Send,
) -> Response {
    let span = tracing::info_span!(
        "request",
        method = %m.method,
        route = %m.route,
        request_id = %id.to_str().unwrap_or_default(),
    );
    // The span is kept for the closing line only when a debug line can be logged anywhere (the
    // filter's most verbose level, the same check the macro makes first): a clone and its drop
    // cost every answer.
    let closing = (tracing::Level::DEBUG <= tracing::level_filters::LevelFilter::current())
        .then(|| span.clone());
    m.active.increment(1.0);
    let started = Instant::now();
    // The id is handed back by the task-local when the answer is done: not copied for it.
    let mut answer =
        std::pin::pin!(REQUEST_ID.scope(id, super::within(deadline, answer).instrument(span)));
    let mut resp = answer.as_mut().await;
    m.active.decrement(1.0);
    let elapsed = started.elapsed();
    let status = resp.status().as_u16();
    // One line per request, at debug: a sale's millions of sold_out answers must not flood the
    // log at the default level. The causes of server errors are logged at warn where they are
    // known (api::error), inside this span, so they carry the request id all the same. The
    // status and code are not recorded in the span: formatting them cost every answer.
    // Entered, not named as the event's parent: the JSON log lists the entered spans only.
    if let Some(span) = closing {
        span.in_scope(|| {
            let code = resp.extensions().get::<Code>().map(|c| c.as_str());
            tracing::debug!(
                status,
                code,
                elapsed_ms = elapsed.as_millis() as u64,
                "request done"
            )
        });
    }
    m.record(status, elapsed.as_secs_f64());
    if let Some(id) = answer.as_mut().take_value() {
        resp.headers_mut().insert(REQUEST_ID_HEADER, id);
    }
    resp
}

/// Prometheus text of every metric (telemetry module docs).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    summary = "Prometheus metrics",
    description = "Prometheus text format. Open on the listener unless `server.metrics_need_admin` is set.",
    responses(
        (status = 200, description = "metrics", content_type = "text/plain", body = String),
        (status = 401, description = "the admin token is required and missing or wrong", body = super::error::Problem, content_type = "application/problem+json"),
        (status = 503, description = "no metrics recorder in this process", body = super::error::Problem, content_type = "application/problem+json"),
    ),
    security((), ("admin_token" = []))
)]
pub async fn metrics(State(s): State<Arc<AppState>>, headers: axum::http::HeaderMap) -> Response {
    if s.config.server.metrics_need_admin {
        if let Err(e) = super::identity::check_admin(&s, &headers) {
            return e.into_response();
        }
    }
    let Some(handle) = t::recorder() else {
        return super::error::ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Code::Unavailable,
            "no metrics recorder",
        )
        .into_response();
    };
    record_state(&s);
    t::record_process();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        handle.render(),
    )
        .into_response()
}

/// Gauges mirroring the shard groups at scrape time.
fn record_state(s: &AppState) {
    use crate::shard::Role;
    for g in &s.cluster.groups {
        let status = g.status();
        for (m, st) in g.members.iter().zip(&status) {
            let pool = m.pool.status();
            let member = m.endpoint.clone();
            for (state, n) in [
                ("idle", pool.available),
                ("in_use", pool.size.saturating_sub(pool.available)),
                ("max", pool.max_size),
            ] {
                metrics::gauge!(t::POOL, "group" => g.name.clone(), "member" => member.clone(), "state" => state)
                    .set(n as f64);
            }
            for (role, name) in [
                (Role::Master, "master"),
                (Role::Shadow, "shadow"),
                (Role::Fenced, "fenced"),
                (Role::Down, "down"),
            ] {
                let up = if st.role == role { 1.0 } else { 0.0 };
                metrics::gauge!(t::GROUP_UP, "group" => g.name.clone(), "member" => member.clone(), "role" => name)
                    .set(up);
            }
        }
        let lag = status.iter().find_map(|st| st.replication_lag_bytes);
        metrics::gauge!(t::LAG, "group" => g.name.clone()).set(lag.unwrap_or(0) as f64);
        metrics::counter!(t::FAILOVERS, "group" => g.name.clone()).absolute(g.failovers());
        let replication = g.replication();
        let flag = |b: bool| if b { 1.0 } else { 0.0 };
        metrics::gauge!(t::SHADOW_STREAMING, "group" => g.name.clone())
            .set(flag(replication.shadow_streaming));
        metrics::gauge!(t::SYNCHRONOUS, "group" => g.name.clone())
            .set(flag(replication.synchronous));
        let held = g.durability() == crate::shard::Durability::NotDurable;
        metrics::gauge!(t::WRITES_HELD, "group" => g.name.clone()).set(flag(held));
        let (ok, failed) = g.heals();
        metrics::counter!(t::HEALS, "group" => g.name.clone(), "outcome" => "ok").absolute(ok);
        metrics::counter!(t::HEALS, "group" => g.name.clone(), "outcome" => "failed")
            .absolute(failed);
    }
}

/// The routes that buy (for the outcome metric).
pub(crate) fn is_buy_route(route: &str) -> bool {
    route == "/v1/sales/{sale_id}/items/{item_id}/orders"
        || route == "/v1/sales/{sale_id}/items/{item_id}/orders/{token}"
}

/// Count one buy request's outcome in `seckill_orders_total`.
pub(crate) fn count_outcome(outcome: &'static str) {
    metrics::counter!(crate::telemetry::ORDERS, "outcome" => outcome).increment(1);
}
