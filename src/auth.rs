//! Who is calling.
//!
//! * Users: `Authorization: Bearer <JWT>`, HS256 with `AUTH_JWT_SECRET`, or RS256/ES256 with keys
//!   from `AUTH_JWKS_FILE` / `AUTH_JWKS_URL` (Firebase ID tokens verify against Google's JWKS).
//!   `exp` is required; `iss` and `aud` are checked when configured. The user id is the
//!   `AUTH_USER_CLAIM` claim. Any failure is the same bare 401: nothing about why.
//! * The host app and cron: a static bearer key, compared in constant time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::RwLock;

use crate::config::{Config, Secret};
use crate::error::AppError;

/// How long fetched keys are trusted before they are fetched again.
const JWKS_TTL: Duration = Duration::from_secs(3600);
/// An unknown `kid` refetches the keys (they rotate), but at most this often.
const JWKS_MIN_REFRESH: Duration = Duration::from_secs(60);
const MAX_USER_ID_LEN: usize = 128;

pub struct Authenticator {
    hs256_key: Option<DecodingKey>,
    jwks: Option<JwksKeys>,
    issuer: Option<String>,
    audience: Option<String>,
    user_claim: String,
}

struct JwksKeys {
    url: Option<String>,
    client: reqwest::Client,
    cache: RwLock<(JwkSet, Option<Instant>)>,
}

impl JwksKeys {
    async fn key_for(&self, kid: Option<&str>) -> Option<DecodingKey> {
        {
            let cache = self.cache.read().await;
            let fresh = cache.1.is_none_or(|at| at.elapsed() < JWKS_TTL);
            if let Some(key) = find_key(&cache.0, kid) {
                if fresh {
                    return Some(key);
                }
            }
        }
        let url = self.url.as_ref()?;
        let mut cache = self.cache.write().await;
        if cache.1.is_some_and(|at| at.elapsed() < JWKS_MIN_REFRESH) {
            return find_key(&cache.0, kid);
        }
        match fetch_jwks(&self.client, url).await {
            Ok(set) => *cache = (set, Some(Instant::now())),
            Err(e) => {
                tracing::warn!(error = %e, "could not refresh the JWKS; keeping the keys we have")
            }
        }
        find_key(&cache.0, kid)
    }
}

fn find_key(set: &JwkSet, kid: Option<&str>) -> Option<DecodingKey> {
    let jwk = match kid {
        Some(kid) => set.find(kid)?,
        // No `kid` in the token: only unambiguous with a single key.
        None if set.keys.len() == 1 => &set.keys[0],
        None => return None,
    };
    DecodingKey::from_jwk(jwk).ok()
}

async fn fetch_jwks(client: &reqwest::Client, url: &str) -> anyhow::Result<JwkSet> {
    Ok(client
        .get(url)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?)
}

impl Authenticator {
    /// Build from configuration; reads `AUTH_JWKS_FILE` and fetches `AUTH_JWKS_URL` once (a failed
    /// fetch is retried on first use, so a start never depends on Google being up).
    pub async fn from_config(config: &Config) -> anyhow::Result<Self> {
        let mut jwks = None;
        if config.auth.jwks_file.is_some() || config.auth.jwks_url.is_some() {
            let mut set = JwkSet { keys: vec![] };
            let mut fetched_at = None;
            if let Some(path) = &config.auth.jwks_file {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    anyhow::anyhow!("configuration error: AUTH_JWKS_FILE: cannot read {path}: {e}")
                })?;
                set = serde_json::from_str(&text).map_err(|e| {
                    anyhow::anyhow!("configuration error: AUTH_JWKS_FILE: not a JWK set: {e}")
                })?;
            }
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?;
            if let Some(url) = &config.auth.jwks_url {
                match fetch_jwks(&client, url).await {
                    Ok(fetched) => {
                        set.keys.extend(fetched.keys);
                        fetched_at = Some(Instant::now());
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "could not fetch AUTH_JWKS_URL at start; will retry on first use")
                    }
                }
            }
            jwks = Some(JwksKeys {
                url: config.auth.jwks_url.clone(),
                client,
                cache: RwLock::new((set, fetched_at)),
            });
        }
        Ok(Authenticator {
            hs256_key: config
                .auth
                .jwt_secret
                .as_ref()
                .map(|s| DecodingKey::from_secret(s.expose().as_bytes())),
            jwks,
            issuer: config.auth.issuer.clone(),
            audience: config.auth.audience.clone(),
            user_claim: config.auth.user_claim.clone(),
        })
    }

    pub fn is_configured(&self) -> bool {
        self.hs256_key.is_some() || self.jwks.is_some()
    }

    /// The user id a bearer token proves, or `Unauthorized`.
    pub async fn verify(&self, token: &str) -> Result<String, AppError> {
        if !self.is_configured() {
            return Err(AppError::NotConfigured(
                "user authentication is not configured: set AUTH_JWT_SECRET or AUTH_JWKS_FILE / AUTH_JWKS_URL".into(),
            ));
        }
        let header = decode_header(token).map_err(|_| AppError::Unauthorized)?;
        // The algorithm picks the key kind, so an HS256 token can never be checked against a
        // public key (the classic algorithm-confusion attack).
        let key = match header.alg {
            Algorithm::HS256 => self.hs256_key.clone(),
            Algorithm::RS256 | Algorithm::ES256 => match &self.jwks {
                Some(jwks) => jwks.key_for(header.kid.as_deref()).await,
                None => None,
            },
            _ => None,
        }
        .ok_or(AppError::Unauthorized)?;

        let mut validation = Validation::new(header.alg);
        let mut required = vec!["exp"];
        match &self.issuer {
            Some(iss) => {
                validation.set_issuer(&[iss]);
                required.push("iss");
            }
            None => validation.iss = None,
        }
        match &self.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        let data = decode::<Map<String, Value>>(token, &key, &validation)
            .map_err(|_| AppError::Unauthorized)?;
        match data.claims.get(&self.user_claim) {
            Some(Value::String(id)) if !id.is_empty() && id.len() <= MAX_USER_ID_LEN => {
                Ok(id.clone())
            }
            _ => Err(AppError::Unauthorized),
        }
    }
}

/// Constant-time comparison of a presented bearer key with the configured one. Both sides are
/// hashed first so neither the content nor the length leaks through timing.
pub fn key_matches(presented: &str, expected: &Secret) -> bool {
    let a = Sha256::digest(presented.as_bytes());
    let b = Sha256::digest(expected.expose().as_bytes());
    a.ct_eq(&b).into()
}

/// The token after `Bearer ` in an Authorization header value.
pub fn bearer_token(header: Option<&str>) -> Option<&str> {
    let value = header?;
    let (scheme, token) = value.split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty()).then(|| token.trim())
}

/// Mint an HS256 user token (for the `token` subcommand and tests).
pub fn mint_hs256(
    secret: &Secret,
    user_id: &str,
    ttl: Duration,
    extra: &[(&str, &str)],
) -> anyhow::Result<String> {
    let exp = chrono::Utc::now().timestamp() + ttl.as_secs() as i64;
    let mut claims = Map::new();
    claims.insert("sub".into(), Value::String(user_id.into()));
    claims.insert("exp".into(), Value::from(exp));
    claims.insert("iat".into(), Value::from(chrono::Utc::now().timestamp()));
    for (k, v) in extra {
        claims.insert((*k).into(), Value::String((*v).into()));
    }
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.expose().as_bytes()),
    )?)
}

pub type SharedAuthenticator = Arc<Authenticator>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_parsing() {
        assert_eq!(bearer_token(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer_token(Some("bearer abc")), Some("abc"));
        assert_eq!(bearer_token(Some("Basic abc")), None);
        assert_eq!(bearer_token(Some("Bearer ")), None);
        assert_eq!(bearer_token(None), None);
    }

    #[test]
    fn keys_compare_exactly() {
        let key = Secret::new("0123456789abcdef");
        assert!(key_matches("0123456789abcdef", &key));
        assert!(!key_matches("0123456789abcdeF", &key));
        assert!(!key_matches("0123456789abcdef0", &key));
        assert!(!key_matches("", &key));
    }
}
