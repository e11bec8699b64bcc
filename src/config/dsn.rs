//! Connection strings of shard-group members, in either libpq form: `key=value` pairs
//! (`host=10.0.0.1 port=5432 user=seckill sslmode=verify-full sslrootcert=/etc/ca.pem`) or a URL
//! (`postgresql://seckill@10.0.0.1:5432/seckill?sslmode=require`).
//!
//! tokio-postgres parses the rest; this module takes out what it does not understand: the TLS
//! modes `verify-ca` and `verify-full` (libpq's names; tokio-postgres knows only up to `require`)
//! and `sslrootcert`. Like libpq, `require` encrypts without checking the server's certificate,
//! unless a root certificate is given; `verify-ca` checks the chain, `verify-full` the chain and the
//! host name. Without `sslrootcert` the chain is checked against the Mozilla roots.
//!
//! A DSN's `Debug` never shows its password.

use super::secret::Secret;
use serde::Deserialize;
use std::path::PathBuf;

/// A member's connection string as written in shards.toml.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Dsn(String);

/// How to secure a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    Disable,
    /// TLS when the server offers it, else plain (libpq's default).
    Prefer,
    /// TLS, no certificate check (unless a root certificate is given: then as `VerifyCa`).
    Require,
    VerifyCa,
    VerifyFull,
}

/// A DSN resolved for connecting.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub(crate) pg: tokio_postgres::Config,
    pub tls: TlsMode,
    /// PEM file of the root certificate(s) to check the server against.
    pub(crate) root_cert: Option<PathBuf>,
}

impl Dsn {
    pub fn new(text: impl Into<String>) -> Self {
        Self(text.into())
    }

    /// The text as written, password included.
    #[cfg(test)]
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }

    /// Parse for connecting. `password` fills in a DSN that names none (the environment
    /// override of the deployment's secrets).
    pub fn resolve(&self, password: Option<&Secret>) -> Result<Resolved, String> {
        let (rest, tls, root_cert) = if is_url(&self.0) {
            split_url(&self.0)?
        } else {
            split_pairs(&self.0)?
        };
        let mut pg: tokio_postgres::Config = rest.parse().map_err(|e| format!("{e}"))?;
        let tls = match (tls, &root_cert) {
            (TlsMode::Require, Some(_)) => TlsMode::VerifyCa,
            // Against the public roots, a chain check without the name would accept any site's
            // certificate (libpq refuses this too).
            (TlsMode::VerifyCa, None) => {
                return Err("sslmode=verify-ca needs sslrootcert (or use verify-full)".into())
            }
            (mode, _) => mode,
        };
        pg.ssl_mode(match tls {
            TlsMode::Disable => tokio_postgres::config::SslMode::Disable,
            TlsMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
        if pg.get_password().is_none() {
            if let Some(p) = password {
                pg.password(p.expose());
            }
        }
        Ok(Resolved { pg, tls, root_cert })
    }
}

fn is_url(text: &str) -> bool {
    let t = text.trim_start();
    t.starts_with("postgres://") || t.starts_with("postgresql://")
}

fn tls_mode(value: &str) -> Result<TlsMode, String> {
    Ok(match value {
        "disable" => TlsMode::Disable,
        "allow" | "prefer" => TlsMode::Prefer,
        "require" => TlsMode::Require,
        "verify-ca" => TlsMode::VerifyCa,
        "verify-full" => TlsMode::VerifyFull,
        other => return Err(format!("unknown sslmode {other:?}")),
    })
}

type Split = (String, TlsMode, Option<PathBuf>);

const UNSUPPORTED: [&str; 3] = ["sslcert", "sslkey", "sslpassword"];

/// `key=value` form: take out the TLS keys, give back the rest as a DSN tokio-postgres reads.
fn split_pairs(text: &str) -> Result<Split, String> {
    let mut tls = TlsMode::Prefer;
    let mut root = None;
    let mut rest = Vec::new();
    for (k, v) in pairs(text)? {
        match k.as_str() {
            "sslmode" => tls = tls_mode(&v)?,
            "sslrootcert" => root = Some(PathBuf::from(v)),
            k if UNSUPPORTED.contains(&k) => {
                return Err(format!("{k} is not supported (no client certificates)"))
            }
            _ => rest.push(format!(
                "{k}='{}'",
                v.replace('\\', "\\\\").replace('\'', "\\'")
            )),
        }
    }
    Ok((rest.join(" "), tls, root))
}

/// libpq's `key=value` syntax: values unquoted (no spaces) or in single quotes with `\'` and
/// `\\` escapes.
fn pairs(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            // The text is not echoed: it may be part of a password.
            return Err(format!("expected `=` after key number {}", out.len() + 1));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    Some('\\') => value.push(chars.next().ok_or("unterminated quoted value")?),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => return Err("unterminated quoted value".into()),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                chars.next();
                // As libpq: a backslash escapes the next character, in unquoted values too.
                if c == '\\' {
                    value.push(chars.next().ok_or("a value ends in a backslash")?);
                } else {
                    value.push(c);
                }
            }
        }
        out.push((key, value));
    }
}

/// URL form: take the TLS parameters out of the query string.
fn split_url(text: &str) -> Result<Split, String> {
    let (base, query) = match text.split_once('?') {
        Some((b, q)) => (b, q),
        None => (text, ""),
    };
    let mut tls = TlsMode::Prefer;
    let mut root = None;
    let mut rest = Vec::new();
    for param in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = param.split_once('=').unwrap_or((param, ""));
        match k {
            "sslmode" => tls = tls_mode(&percent_decode(v))?,
            "sslrootcert" => root = Some(PathBuf::from(percent_decode(v))),
            k if UNSUPPORTED.contains(&k) => {
                return Err(format!("{k} is not supported (no client certificates)"))
            }
            _ => rest.push(param),
        }
    }
    let rebuilt = if rest.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    Ok((rebuilt, tls, root))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl std::fmt::Debug for Dsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", redact(&self.0))
    }
}

/// The DSN with its password (key, URL user info or query parameter) replaced by `***`.
pub(crate) fn redact(text: &str) -> String {
    if is_url(text) {
        let (base, query) = text.split_once('?').unwrap_or((text, ""));
        let base = match (base.find("://"), base.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                let userinfo = &base[scheme + 3..at];
                match userinfo.split_once(':') {
                    Some((user, _)) => format!("{}{user}:***{}", &base[..scheme + 3], &base[at..]),
                    None => base.to_string(),
                }
            }
            _ => base.to_string(),
        };
        let query: Vec<String> = query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| match p.split_once('=') {
                Some(("password", _)) => "password=***".to_string(),
                _ => p.to_string(),
            })
            .collect();
        return if query.is_empty() {
            base
        } else {
            format!("{base}?{}", query.join("&"))
        };
    }
    match pairs(text) {
        Ok(pairs) => pairs
            .into_iter()
            .map(|(k, v)| {
                if k == "password" {
                    "password=***".to_string()
                } else {
                    format!("{k}={v}")
                }
            })
            .collect::<Vec<_>>()
            .join(" "),
        Err(_) => "<unparsable DSN>".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_full_and_root_cert_are_ours_the_rest_is_tokio_postgres() {
        let d = Dsn::new("host=db1 port=5433 user=app password='p w\\'d' dbname=s sslmode=verify-full sslrootcert=/etc/ca.pem");
        let r = d.resolve(None).unwrap();
        assert_eq!(r.tls, TlsMode::VerifyFull);
        assert_eq!(r.root_cert, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(r.pg.get_password(), Some(&b"p w'd"[..]));
        assert_eq!(r.pg.get_ports(), &[5433]);
        assert_eq!(
            r.pg.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
    }

    #[test]
    fn urls_work_too() {
        let d = Dsn::new(
            "postgresql://app:secret@db1:5433/s?sslmode=verify-ca&sslrootcert=%2Fetc%2Fca.pem&application_name=x",
        );
        let r = d.resolve(None).unwrap();
        assert_eq!(r.tls, TlsMode::VerifyCa);
        assert_eq!(r.pg.get_application_name(), Some("x"));
        assert_eq!(r.root_cert, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(
            redact(d.expose()),
            "postgresql://app:***@db1:5433/s?sslmode=verify-ca&sslrootcert=%2Fetc%2Fca.pem&application_name=x"
        );
    }

    #[test]
    fn require_with_a_root_certificate_checks_the_chain() {
        let r = Dsn::new("host=h sslmode=require sslrootcert=ca.pem")
            .resolve(None)
            .unwrap();
        assert_eq!(r.tls, TlsMode::VerifyCa);
        let r = Dsn::new("host=h sslmode=require").resolve(None).unwrap();
        assert_eq!(r.tls, TlsMode::Require);
    }

    #[test]
    fn the_environment_password_fills_only_a_missing_one() {
        let env = Secret::new("from-env");
        let r = Dsn::new("host=h user=u").resolve(Some(&env)).unwrap();
        assert_eq!(r.pg.get_password(), Some(&b"from-env"[..]));
        let r = Dsn::new("host=h user=u password=own")
            .resolve(Some(&env))
            .unwrap();
        assert_eq!(r.pg.get_password(), Some(&b"own"[..]));
    }

    #[test]
    fn passwords_never_print() {
        let d = Dsn::new("host=h user=u password=topsecret");
        assert!(!format!("{d:?}").contains("topsecret"));
        assert!(format!("{d:?}").contains("password=***"));
    }

    #[test]
    fn unquoted_backslashes_escape_as_in_libpq() {
        let r = Dsn::new("host=h password=p\\'w\\ x").resolve(None).unwrap();
        assert_eq!(r.pg.get_password(), Some(&b"p'w x"[..]));
    }

    #[test]
    fn errors_do_not_echo_what_may_be_a_password() {
        let e = Dsn::new("host=h password=secret part")
            .resolve(None)
            .unwrap_err();
        assert!(!e.contains("part") && !e.contains("secret"), "{e}");
        assert!(Dsn::new("host=h sslmode=verify-ca").resolve(None).is_err());
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        for bad in [
            "host=h sslmode=sometimes",
            "host='unterminated",
            "host",
            "host=h sslcert=c.pem",
        ] {
            assert!(Dsn::new(bad).resolve(None).is_err(), "{bad}");
        }
    }
}
