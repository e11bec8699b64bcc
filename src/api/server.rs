//! The HTTP server loop: how connections are accepted, bounded, timed out and drained.
//!
//! Each engine node bounds what a crowd can make it hold:
//! - **connections**: at most `server.max_connections` at once; one more is answered 503
//!   `overloaded` (with `Retry-After`) and closed, never queued. The refusal first reads the
//!   request the client already sent (its head, at most 16 KiB, and a body of at most 64 KiB,
//!   within a second), answers, and lingers a second for the client to close: closing a socket
//!   with unread data makes the kernel send a reset, and the client would never see the 503 or
//!   its Retry-After. At most four times `server.max_connections` refusals (1024 at least) run
//!   at once, each holding about 2 KiB for at most two seconds and a quarter (beyond that, a
//!   flood is dropped unanswered);
//! - **slow clients**: a client must send a whole request head within `server.header_read_timeout_ms`
//!   (this also closes keep-alive connections idle that long), and a whole request, body included,
//!   is answered within `server.http_timeout_ms` (see [`super::within`]);
//! - **shutdown**: on SIGTERM the listener closes, in-flight requests get `server.drain_ms` to finish
//!   (idle and slow-header connections are closed at once), then every connection is dropped. A
//!   purchase that was under way runs to its end regardless (it is a task of the order service).

use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// What the server loop enforces (module docs).
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    pub max_connections: usize,
    pub(crate) header_read_timeout: Duration,
    pub drain: Duration,
}

/// Answer to a connection beyond the bound: problem+json, then close.
fn full() -> Vec<u8> {
    let body = r#"{"type":"about:blank","title":"Overloaded","status":503,"code":"overloaded","detail":"too many connections to this node; retry shortly"}"#;
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/problem+json\r\n\
         retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Serve `app` on `listener` until `shutdown` fires, then drain (module docs).
pub(crate) async fn serve(
    listener: TcpListener,
    app: super::observe::Front,
    limits: Limits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let refusals = Arc::new(Semaphore::new((4 * limits.max_connections).max(1024)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Reap finished connection tasks so the set does not grow.
        while connections.try_join_next().is_some() {}
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if let Ok(refusing) = refusals.clone().try_acquire_owned() {
                connections.spawn(async move {
                    refuse(stream).await;
                    drop(refusing);
                });
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let service =
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                app.answer(req.map(axum::body::Body::new))
            });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .keep_alive(true)
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        connections.spawn(async move {
            let _slot = slot;
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    let open = graceful.count();
    if open > 0 {
        tracing::info!(
            open,
            drain_ms = limits.drain.as_millis() as u64,
            "draining connections"
        );
    }
    if tokio::time::timeout(limits.drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            left = connections.len(),
            "connections still open after the drain period: closing them"
        );
    }
    connections.abort_all();
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// Largest request head a refusal reads.
const REFUSED_HEAD: usize = 16 * 1024;
/// Largest request body a refusal reads (and discards).
const REFUSED_BODY: usize = 64 * 1024;

/// Answer a connection beyond the bound cleanly (module docs): read the request, answer 503,
/// half-close, and read on until the client closes, each step bounded in time.
async fn refuse(mut stream: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    let second = Duration::from_secs(1);
    let _ = tokio::time::timeout(second, read_request(&mut stream)).await;
    let _ = tokio::time::timeout(second, stream.write_all(&full())).await;
    let _ = stream.shutdown().await;
    let linger = Duration::from_millis(250);
    let _ = tokio::time::timeout(linger, discard(&mut stream, usize::MAX)).await;
}

/// Read one request head and its body (bounded by [`REFUSED_HEAD`] and [`REFUSED_BODY`]).
async fn read_request(stream: &mut tokio::net::TcpStream) -> std::io::Result<()> {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&chunk[..n]);
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            let already = head.len() - (end + 4);
            let body = content_length(&head[..end]).min(REFUSED_BODY);
            return discard(stream, body.saturating_sub(already)).await;
        }
        if head.len() > REFUSED_HEAD {
            return Ok(());
        }
    }
}

/// Read and drop `left` bytes, or until the client closes.
async fn discard(stream: &mut tokio::net::TcpStream, mut left: usize) -> std::io::Result<()> {
    use tokio::io::AsyncReadExt;
    let mut chunk = [0u8; 1024];
    while left > 0 {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        left = left.saturating_sub(n);
    }
    Ok(())
}

/// The `content-length` of a request head; 0 when absent or unreadable.
fn content_length(head: &[u8]) -> usize {
    String::from_utf8_lossy(head)
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

/// The peer address of a request served by [`serve`] (tests that call the router directly have
/// none).
pub(crate) fn peer(req: &axum::http::request::Parts) -> Option<SocketAddr> {
    req.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_full_answer_has_the_length_it_says() {
        let full = super::full();
        let text = std::str::from_utf8(&full).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["code"], "overloaded");
    }

    #[test]
    fn a_refusal_finds_the_body_length_in_any_case() {
        let head = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 42\r\nX: y";
        assert_eq!(super::content_length(head), 42);
        assert_eq!(super::content_length(b"GET / HTTP/1.1\r\nHost: a"), 0);
        assert_eq!(
            super::content_length(b"POST / HTTP/1.1\r\ncontent-length: x"),
            0
        );
    }
}
