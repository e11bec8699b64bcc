//! One virtual user's keep-alive HTTP/1.1 connection.
//!
//! The load loop drives hyper's connection-level client directly instead of a pooled client: each
//! virtual user owns exactly one connection, so there is no pool to lock, and the request line,
//! headers and body are built once per attempt from bytes. On this kind of single-host bench the
//! load generator shares the CPUs with the engine and PostgreSQL, and every cycle it spends is one
//! the system under test does not get. Setup, verification and chaos still use reqwest.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

/// Where the engine listens, parsed once from the base URL.
#[derive(Debug, Clone)]
pub struct Target {
    /// `host:port`, for connecting.
    addr: String,
    /// The Host header.
    host: String,
}

impl Target {
    /// Accepts `http://host[:port]` (the engine serves plain HTTP; put TLS in front of it).
    pub fn parse(url: &str) -> Result<Self, String> {
        let uri: hyper::Uri = url.parse().map_err(|e| format!("not a URL: {url} ({e})"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!(
                "the load loop speaks plain HTTP/1.1; {url} is not an http:// URL"
            ));
        }
        let authority = uri.authority().ok_or_else(|| format!("no host in {url}"))?;
        let port = authority.port_u16().unwrap_or(80);
        Ok(Self {
            addr: format!("{}:{port}", authority.host()),
            host: authority.as_str().to_string(),
        })
    }
}

/// A connection that reconnects when the server closes it.
pub struct Conn {
    target: Target,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Conn {
    pub fn new(target: Target) -> Self {
        Self {
            target,
            sender: None,
        }
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, String> {
        let stream = tokio::net::TcpStream::connect(&self.target.addr)
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", self.target.addr))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// Open the connection ahead of the first request.
    pub async fn connect_now(&mut self) -> Result<(), String> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            self.sender = Some(self.connect().await?);
        }
        Ok(())
    }

    /// Send one request and read the whole answer: the status and the body.
    pub async fn send(
        &mut self,
        method: hyper::Method,
        path: &str,
        body: Option<Bytes>,
        bearer: Option<&str>,
    ) -> Result<(u16, Bytes), String> {
        let mut sender = match self.sender.take() {
            Some(s) if !s.is_closed() => s,
            _ => self.connect().await?,
        };
        if sender.ready().await.is_err() {
            sender = self.connect().await?;
        }
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, &self.target.host);
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        if let Some(token) = bearer {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let req = req
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        self.sender = Some(sender);
        Ok((status, body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_with_and_without_port() {
        let t = Target::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!(
            (t.addr.as_str(), t.host.as_str()),
            ("127.0.0.1:8080", "127.0.0.1:8080")
        );
        let t = Target::parse("http://engine/").unwrap();
        assert_eq!((t.addr.as_str(), t.host.as_str()), ("engine:80", "engine"));
        assert!(Target::parse("https://engine").is_err());
        assert!(Target::parse("engine:8080").is_err());
    }
}
