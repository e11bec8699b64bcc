//! The floor `--baseline` measures the engine against: a bare axum 0.8 server, no middleware,
//! run as a child process of the bench (`seckill-bench bare-server`, hidden) so that its CPU is
//! read from /proc apart from the bench's and the engine's.
//!
//! It answers what the engine answers in a sold-out storm, with nothing behind it: `GET /v1/time`
//! a small JSON body, and the order `POST` a problem+json 409 of the engine's shape after parsing
//! the JSON body (no token check, no routing, no request id).

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Serve the bare endpoints on `listen` until killed.
pub async fn serve(listen: &str) -> Result<(), String> {
    let app = axum::Router::new()
        .route("/v1/time", get(time))
        .route("/v1/sales/{sale}/items/{item}/orders", post(order));
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("bare server cannot listen on {listen}: {e}"))?;
    axum::serve(listener, app)
        .await
        .map_err(|e| format!("bare server: {e}"))
}

async fn time() -> Response {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    (
        [(header::CACHE_CONTROL, "no-store")],
        axum::Json(serde_json::json!({ "now_ms": now_ms })),
    )
        .into_response()
}

async fn order(axum::Json(body): axum::Json<serde_json::Value>) -> Response {
    let user = body["user_id"].as_u64().unwrap_or(0);
    (
        StatusCode::CONFLICT,
        [(header::CONTENT_TYPE, "application/problem+json")],
        serde_json::json!({
            "type": "https://seckill.dev/problems/sold_out",
            "title": "Conflict",
            "status": 409,
            "code": "sold_out",
            "detail": format!("the item is sold out (user {user})"),
        })
        .to_string(),
    )
        .into_response()
}

/// The bare server as a child process, killed when dropped.
pub struct BareServer {
    child: Child,
    pub url: String,
}

impl BareServer {
    /// Start `seckill-bench bare-server` on a free local port and wait until it answers.
    pub async fn start() -> Result<Self, String> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port for the bare server: {e}"))?
            .port();
        let listen = format!("127.0.0.1:{port}");
        let exe = std::env::current_exe().map_err(|e| format!("own executable: {e}"))?;
        let child = Command::new(exe)
            .args(["bare-server", "--listen", &listen])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting the bare server: {e}"))?;
        let server = Self {
            child,
            url: format!("http://{listen}"),
        };
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(&listen).await.is_ok() {
                return Ok(server);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(format!(
            "the bare server did not listen on {listen} within 5 s"
        ))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for BareServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
