//! User tokens: JWTs whose `sub` is the user id (a decimal string).
//!
//! Keys: an HS256 shared secret (`auth.hs256_secret`), and/or public keys from a PEM file or a
//! JWKS file. A token's `alg` chooses among them (HS256 only with the secret, RS256 with RSA keys,
//! ES256 with P-256 keys, EdDSA with Ed25519 keys; nothing else is accepted, so a token can
//! never pick `none` or confuse a public key for an HMAC secret); its `kid`, when given, picks
//! the key with that id.

use crate::config::{AuthConfig, Secret, UsersAuth};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Why a token was refused: a safe text for the client.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum TokenError {
    #[error("missing `Authorization: Bearer <token>`")]
    Missing,
    #[error("the token has expired")]
    Expired,
    #[error("the token is invalid: {0}")]
    Invalid(String),
}

/// Problems with the key material in the configuration, found at start.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct KeyError {
    pub field: &'static str,
    pub reason: String,
}

struct Key {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// Verifies user tokens (module docs). Built once at start from `[auth]`.
pub(crate) struct UserTokens {
    mode: UsersAuth,
    keys: Vec<Key>,
    /// The rules a token is checked against, one per algorithm a key accepts: built once at
    /// start, not per request (they are the same for every token of that algorithm).
    validations: Vec<(Algorithm, Validation)>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
}

impl UserTokens {
    pub fn new(config: &AuthConfig) -> Result<Self, KeyError> {
        let mut keys = Vec::new();
        if let Some(secret) = &config.hs256_secret {
            keys.push(Key {
                kid: None,
                alg: Algorithm::HS256,
                key: DecodingKey::from_secret(secret.expose().as_bytes()).map_err(|e| {
                    KeyError {
                        field: "auth.hs256_secret",
                        reason: e.to_string(),
                    }
                })?,
            });
        }
        if let Some(path) = &config.public_key_file {
            keys.extend(pem_keys(path)?);
        }
        if let Some(path) = &config.jwks_file {
            keys.extend(jwks_keys(path)?);
        }
        let mut validations: Vec<(Algorithm, Validation)> = Vec::new();
        for k in &keys {
            if !validations.iter().any(|(alg, _)| *alg == k.alg) {
                validations.push((k.alg, validation(config, k.alg)));
            }
        }
        Ok(Self {
            mode: config.users,
            keys,
            validations,
        })
    }

    /// Whether user ids are taken from tokens (`jwt`) or trusted as given (`none`).
    pub fn mode(&self) -> UsersAuth {
        self.mode
    }

    /// The user id a token proves.
    pub fn verify(&self, token: &str) -> Result<u64, TokenError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| TokenError::Invalid(e.to_string()))?;
        let candidates: Vec<&Key> = self
            .keys
            .iter()
            .filter(|k| k.alg == header.alg)
            .filter(|k| header.kid.is_none() || k.kid.is_none() || k.kid == header.kid)
            .collect();
        if candidates.is_empty() {
            return Err(TokenError::Invalid(format!(
                "no key for algorithm {:?}{}",
                header.alg,
                header
                    .kid
                    .as_ref()
                    .map(|k| format!(" and kid {k:?}"))
                    .unwrap_or_default()
            )));
        }
        // Every key's algorithm has its rules (new), and a candidate's algorithm is the header's.
        let Some((_, validation)) = self.validations.iter().find(|(alg, _)| *alg == header.alg)
        else {
            return Err(TokenError::Invalid(format!(
                "no key for algorithm {:?}",
                header.alg
            )));
        };
        let mut last = TokenError::Invalid("signature does not verify".into());
        for k in candidates {
            match jsonwebtoken::decode::<Claims>(token, &k.key, validation) {
                Ok(data) => return parse_sub(&data.claims.sub),
                Err(e) => {
                    last = match e.kind() {
                        jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
                        kind => TokenError::Invalid(format!("{kind:?}")),
                    };
                    if matches!(last, TokenError::Expired) {
                        return Err(last);
                    }
                }
            }
        }
        Err(last)
    }
}

/// The checks a token of algorithm `alg` must pass under `[auth]`.
fn validation(config: &AuthConfig, alg: Algorithm) -> Validation {
    let mut validation = Validation::new(alg);
    validation.leeway = config.leeway_secs;
    validation.validate_nbf = true;
    // A configured issuer or audience must be present, not merely not wrong.
    let mut required = vec!["exp", "sub"];
    validation.validate_aud = config.audience.is_some();
    if let Some(aud) = &config.audience {
        validation.set_audience(&[aud]);
        required.push("aud");
    }
    if let Some(iss) = &config.issuer {
        validation.set_issuer(&[iss]);
        required.push("iss");
    }
    validation.set_required_spec_claims(&required);
    validation
}

fn parse_sub(sub: &str) -> Result<u64, TokenError> {
    sub.parse::<u64>()
        .ok()
        .filter(|u| *u >= 1 && *u <= i64::MAX as u64)
        .ok_or_else(|| TokenError::Invalid("`sub` must be a user id (1..2^63-1)".into()))
}

/// An HS256 token for `user`, valid for `ttl_secs` (dev cluster, bench, tests).
pub fn mint(secret: &Secret, user: u64, ttl_secs: u64) -> Result<String, String> {
    let now = jsonwebtoken::get_current_timestamp();
    let claims = Claims {
        sub: user.to_string(),
        exp: now + ttl_secs,
        iat: Some(now),
    };
    let key = EncodingKey::from_secret(secret.expose().as_bytes()).map_err(|e| e.to_string())?;
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).map_err(|e| e.to_string())
}

fn pem_keys(path: &std::path::Path) -> Result<Vec<Key>, KeyError> {
    let err = |reason: String| KeyError {
        field: "auth.public_key_file",
        reason: format!("{}: {reason}", path.display()),
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let mut keys = Vec::new();
    // One or more PEM blocks; each is tried as RSA, EC (P-256) and Ed25519.
    for block in pem_blocks(&text) {
        let pem = block.as_bytes();
        if let Ok(k) = DecodingKey::from_rsa_pem(pem) {
            keys.push(Key {
                kid: None,
                alg: Algorithm::RS256,
                key: k,
            });
        } else if let Ok(k) = DecodingKey::from_ec_pem(pem) {
            keys.push(Key {
                kid: None,
                alg: Algorithm::ES256,
                key: k,
            });
        } else if let Ok(k) = DecodingKey::from_ed_pem(pem) {
            keys.push(Key {
                kid: None,
                alg: Algorithm::EdDSA,
                key: k,
            });
        } else {
            return Err(err(
                "a PEM block is not an RSA, EC or Ed25519 public key".into()
            ));
        }
    }
    if keys.is_empty() {
        return Err(err("no PEM public key found".into()));
    }
    Ok(keys)
}

/// The `-----BEGIN ...-----` .. `-----END ...-----` blocks of a PEM file, each with its lines.
fn pem_blocks(text: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines().map(str::trim) {
        if line.starts_with("-----BEGIN ") {
            current = Some(String::new());
        }
        if let Some(block) = current.as_mut() {
            block.push_str(line);
            block.push('\n');
        }
        if line.starts_with("-----END ") {
            blocks.extend(current.take());
        }
    }
    blocks
}

fn jwks_keys(path: &std::path::Path) -> Result<Vec<Key>, KeyError> {
    let err = |reason: String| KeyError {
        field: "auth.jwks_file",
        reason: format!("{}: {reason}", path.display()),
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let set: JwkSet = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        let key = DecodingKey::from_jwk(jwk).map_err(|e| err(e.to_string()))?;
        let alg = match &jwk.algorithm {
            jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => Algorithm::RS256,
            jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
            jsonwebtoken::jwk::AlgorithmParameters::OctetKeyPair(_) => Algorithm::EdDSA,
            // Symmetric keys in a JWKS would let anyone who reads the file mint tokens.
            _ => {
                return Err(err(
                    "only RSA, EC and OKP (Ed25519) public keys are accepted".into(),
                ))
            }
        };
        keys.push(Key {
            kid: jwk.common.key_id.clone(),
            alg,
            key,
        });
    }
    if keys.is_empty() {
        return Err(err("no keys".into()));
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(secret: &str) -> AuthConfig {
        AuthConfig {
            hs256_secret: Some(Secret::new(secret)),
            ..Default::default()
        }
    }

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn a_minted_token_verifies_to_its_user() {
        let t = UserTokens::new(&config(SECRET)).unwrap();
        let token = mint(&Secret::new(SECRET), 42, 60).unwrap();
        assert_eq!(t.verify(&token).unwrap(), 42);
    }

    #[test]
    fn wrong_secret_expired_and_garbage_are_refused() {
        let t = UserTokens::new(&config(SECRET)).unwrap();
        let other = mint(&Secret::new("another-secret-another-secret-xx"), 42, 60).unwrap();
        assert!(matches!(t.verify(&other), Err(TokenError::Invalid(_))));
        let claims = Claims {
            sub: "42".into(),
            exp: jsonwebtoken::get_current_timestamp() - 3600,
            iat: None,
        };
        let old = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
        )
        .unwrap();
        assert!(matches!(t.verify(&old), Err(TokenError::Expired)));
        assert!(t.verify("not.a.token").is_err());
        assert!(t.verify("").is_err());
    }

    #[test]
    fn sub_must_be_a_user_id() {
        for sub in ["0", "-1", "abc", "9223372036854775808"] {
            assert!(parse_sub(sub).is_err(), "{sub}");
        }
        assert_eq!(parse_sub("9223372036854775807").unwrap(), i64::MAX as u64);
    }

    #[test]
    fn issuer_and_audience_are_checked_when_configured() {
        #[derive(Serialize)]
        struct Full {
            sub: String,
            exp: u64,
            iss: String,
            aud: String,
        }
        let mut c = config(SECRET);
        c.issuer = Some("https://idp.example".into());
        c.audience = Some("seckill".into());
        let t = UserTokens::new(&c).unwrap();
        let make = |iss: &str, aud: &str| {
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &Full {
                    sub: "7".into(),
                    exp: jsonwebtoken::get_current_timestamp() + 60,
                    iss: iss.into(),
                    aud: aud.into(),
                },
                &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
            )
            .unwrap()
        };
        assert_eq!(
            t.verify(&make("https://idp.example", "seckill")).unwrap(),
            7
        );
        assert!(t.verify(&make("https://evil.example", "seckill")).is_err());
        assert!(t.verify(&make("https://idp.example", "other")).is_err());
        // Missing altogether is refused too.
        let bare = mint(&Secret::new(SECRET), 7, 60).unwrap();
        assert!(t.verify(&bare).is_err(), "a token without iss and aud");
    }

    #[test]
    fn public_keys_from_a_pem_file_verify_asymmetric_tokens() {
        let dir = std::env::temp_dir().join(format!("seckill-pem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let pub_path = dir.join("idp.pem");
        std::fs::write(&pub_path, key.public_key_pem()).unwrap();
        let t = UserTokens::new(&AuthConfig {
            public_key_file: Some(pub_path),
            ..Default::default()
        })
        .unwrap();
        let claims = Claims {
            sub: "99".into(),
            exp: jsonwebtoken::get_current_timestamp() + 60,
            iat: None,
        };
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::ES256),
            &claims,
            &EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap(),
        )
        .unwrap();
        assert_eq!(t.verify(&token).unwrap(), 99);
        // An HS256 token "signed" with the public key's text is not accepted.
        let confused = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(key.public_key_pem().as_bytes()).unwrap(),
        )
        .unwrap();
        assert!(t.verify(&confused).is_err());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_jwks_key_is_chosen_by_kid() {
        use base64::Engine;
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let raw = key.public_key_raw(); // 0x04 || X || Y
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let jwks = serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "kid": "k1", "use": "sig", "alg": "ES256",
            "x": b64(&raw[1..33]), "y": b64(&raw[33..65]),
        }]});
        let dir = std::env::temp_dir().join(format!("seckill-jwks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("jwks.json");
        std::fs::write(&path, jwks.to_string()).unwrap();
        let t = UserTokens::new(&AuthConfig {
            jwks_file: Some(path),
            ..Default::default()
        })
        .unwrap();
        let sign = |kid: &str| {
            let mut h = Header::new(Algorithm::ES256);
            h.kid = Some(kid.into());
            let claims = Claims {
                sub: "5".into(),
                exp: jsonwebtoken::get_current_timestamp() + 60,
                iat: None,
            };
            jsonwebtoken::encode(
                &h,
                &claims,
                &EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap(),
            )
            .unwrap()
        };
        assert_eq!(t.verify(&sign("k1")).unwrap(), 5);
        assert!(t.verify(&sign("k2")).is_err(), "an unknown kid has no key");
        let _ = std::fs::remove_dir_all(dir);
    }
}
