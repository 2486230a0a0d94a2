//! Who is calling.
//!
//! * Users: `Authorization: Bearer <JWT>`, HS256 with `AUTH_JWT_SECRET`, or RS256/ES256 with keys
//!   from `AUTH_JWKS_FILE` / `AUTH_JWKS_URL` (Firebase ID tokens verify against Google's JWKS).
//!   `exp` is required and `nbf` checked; `iss` and `aud` are checked when configured (and
//!   configuration requires both with a key set). The user id is the
//!   `AUTH_USER_CLAIM` claim. Any failure is the same bare 401: nothing about why.
//! * The host app and cron: a static bearer key, compared in constant time.

use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::clock::DynClock;
use crate::config::{Config, ConfigError, Secret};
use crate::error::AppError;

/// How long fetched keys are trusted before they are fetched again.
const JWKS_TTL: chrono::Duration = chrono::Duration::hours(1);
/// Fetches of `AUTH_JWKS_URL` (an unknown `kid`, or keys past their TTL) happen at most this
/// often, whether they succeed or not.
const JWKS_MIN_REFRESH: chrono::Duration = chrono::Duration::seconds(60);
/// How long one fetch of `AUTH_JWKS_URL` may take.
const JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Authenticator {
    hs256_key: Option<DecodingKey>,
    jwks: Option<Arc<JwksKeys>>,
    issuer: Option<String>,
    audience: Option<String>,
    user_claim: String,
}

/// The public keys for RS256/ES256 tokens: those from `AUTH_JWKS_FILE` plus the last set fetched
/// from `AUTH_JWKS_URL`.
///
/// A token check only reads the cache (a short lock, never held across I/O). A fetch runs outside
/// it, one at a time, at most once a [`JWKS_MIN_REFRESH`] counting failures; a failed or hanging
/// fetch leaves the cached keys in service. Keys past their TTL are still used while a background
/// fetch replaces them.
struct JwksKeys {
    url: Option<String>,
    file_keys: JwkSet,
    client: reqwest::Client,
    clock: DynClock,
    cache: RwLock<KeyCache>,
    /// Held for the whole of a fetch, so there is only ever one.
    fetching: Arc<Mutex<()>>,
}

struct KeyCache {
    /// The file's keys and the fetched ones.
    keys: JwkSet,
    /// The last successful fetch.
    fetched_at: Option<DateTime<Utc>>,
    /// The last fetch started, whatever became of it.
    attempted_at: Option<DateTime<Utc>>,
}

impl KeyCache {
    fn may_fetch(&self, now: DateTime<Utc>) -> bool {
        // A clock that went backwards allows a fetch rather than blocking one for as long.
        self.attempted_at.is_none_or(|at| {
            let since = now - at;
            since >= JWKS_MIN_REFRESH || since < chrono::Duration::zero()
        })
    }

    fn is_stale(&self, now: DateTime<Utc>) -> bool {
        self.fetched_at.is_none_or(|at| now - at >= JWKS_TTL)
    }
}

impl JwksKeys {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, KeyCache> {
        self.cache.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, KeyCache> {
        self.cache.write().unwrap_or_else(PoisonError::into_inner)
    }

    async fn key_for(self: &Arc<Self>, kid: Option<&str>) -> Option<DecodingKey> {
        let now = self.clock.now();
        let (key, stale, may_fetch) = {
            let cache = self.read();
            (
                find_key(&cache.keys, kid),
                cache.is_stale(now),
                cache.may_fetch(now),
            )
        };
        if self.url.is_none() || !may_fetch {
            return key;
        }
        match key {
            // Known key: answer now; if the set is old, renew it in the background (unless a
            // fetch is already under way).
            Some(key) => {
                if stale {
                    if let Ok(guard) = self.fetching.clone().try_lock_owned() {
                        let this = self.clone();
                        tokio::spawn(async move { this.fetch(guard).await });
                    }
                }
                Some(key)
            }
            // Unknown key: the keys may have rotated. Only this check waits for the fetch.
            None => {
                let guard = self.fetching.clone().lock_owned().await;
                self.fetch(guard).await;
                find_key(&self.read().keys, kid)
            }
        }
    }

    /// One fetch, holding the fetch lock (`_guard`), unless another fetch started within
    /// [`JWKS_MIN_REFRESH`] (for instance while this caller waited for the lock).
    async fn fetch(&self, _guard: OwnedMutexGuard<()>) {
        let Some(url) = &self.url else {
            return;
        };
        {
            let mut cache = self.write();
            let now = self.clock.now();
            if !cache.may_fetch(now) {
                return;
            }
            cache.attempted_at = Some(now);
        }
        match fetch_jwks(&self.client, url).await {
            Ok(fetched) => {
                let mut keys = self.file_keys.clone();
                keys.keys.extend(fetched.keys);
                let mut cache = self.write();
                cache.keys = keys;
                cache.fetched_at = Some(self.clock.now());
            }
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "could not refresh the JWKS; keeping the keys we have"
                )
            }
        }
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
    /// fetch is retried a minute later, on use, so a start never depends on the key server being
    /// up). `clock` paces the refetches.
    pub async fn from_config(config: &Config, clock: DynClock) -> anyhow::Result<Self> {
        Self::build(config, clock, JWKS_FETCH_TIMEOUT).await
    }

    async fn build(
        config: &Config,
        clock: DynClock,
        fetch_timeout: Duration,
    ) -> anyhow::Result<Self> {
        let mut jwks = None;
        if config.auth.jwks_file.is_some() || config.auth.jwks_url.is_some() {
            let mut file_keys = JwkSet { keys: vec![] };
            if let Some(path) = &config.auth.jwks_file {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ConfigError::new("AUTH_JWKS_FILE", format!("cannot read {path}: {e}"))
                })?;
                file_keys = serde_json::from_str(&text).map_err(|e| {
                    ConfigError::new("AUTH_JWKS_FILE", format!("not a JWK set: {e}"))
                })?;
            }
            let client = reqwest::Client::builder().timeout(fetch_timeout).build()?;
            let keys = Arc::new(JwksKeys {
                url: config.auth.jwks_url.clone(),
                cache: RwLock::new(KeyCache {
                    keys: file_keys.clone(),
                    fetched_at: None,
                    attempted_at: None,
                }),
                file_keys,
                client,
                clock,
                fetching: Arc::new(Mutex::new(())),
            });
            if keys.url.is_some() {
                let guard = keys.fetching.clone().lock_owned().await;
                keys.fetch(guard).await;
                if keys.read().fetched_at.is_none() {
                    tracing::warn!("could not fetch AUTH_JWKS_URL at start; will retry on use");
                }
            }
            jwks = Some(keys);
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
        // `nbf`, when present, is checked (with the same minute of leeway as `exp`).
        validation.validate_nbf = true;
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
            // The same rule as every user id the API takes (export and erasure check it too): a
            // user this service could store data for but never hand back or erase is refused.
            Some(Value::String(id)) if crate::outbox::validate_user_id(id).is_ok() => {
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

    mod jwks {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Mutex as StdMutex;

        use chrono::Duration as ChronoDuration;
        use serde_json::json;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio::net::TcpListener;
        use tokio::sync::Notify;

        use super::super::*;
        use crate::clock::ManualClock;

        const ISSUER: &str = "https://securetoken.google.com/prism-test";
        const AUDIENCE: &str = "prism-test";

        #[derive(Clone, Copy, PartialEq, Eq)]
        enum Mode {
            Serve,
            Fail,
            Hang,
        }

        /// A key server on a loopback port that counts the requests it reads and answers each
        /// as `mode` says at that moment: the test key set, a 500, or nothing at all (the
        /// connection is held open).
        struct KeyServer {
            url: String,
            hits: Arc<AtomicUsize>,
            hit: Arc<Notify>,
            mode: Arc<StdMutex<Mode>>,
        }

        impl KeyServer {
            async fn start(mode: Mode) -> KeyServer {
                let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                let url = format!("http://{}/jwks", listener.local_addr().unwrap());
                let server = KeyServer {
                    url,
                    hits: Arc::new(AtomicUsize::new(0)),
                    hit: Arc::new(Notify::new()),
                    mode: Arc::new(StdMutex::new(mode)),
                };
                let (hits, hit, mode) =
                    (server.hits.clone(), server.hit.clone(), server.mode.clone());
                tokio::spawn(async move {
                    while let Ok((mut socket, _)) = listener.accept().await {
                        let (hits, hit, mode) = (hits.clone(), hit.clone(), mode.clone());
                        tokio::spawn(async move {
                            let mut head = Vec::new();
                            let mut buf = [0u8; 1024];
                            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                                match socket.read(&mut buf).await {
                                    Ok(0) | Err(_) => return,
                                    Ok(n) => head.extend_from_slice(&buf[..n]),
                                }
                            }
                            let mode = *mode.lock().unwrap();
                            hits.fetch_add(1, Ordering::SeqCst);
                            hit.notify_waiters();
                            let (status, body) = match mode {
                                Mode::Serve => {
                                    ("200 OK", include_str!("../tests/fixtures/test_jwks.json"))
                                }
                                Mode::Fail => ("500 Internal Server Error", "{}"),
                                Mode::Hang => {
                                    std::future::pending::<()>().await;
                                    return;
                                }
                            };
                            let response = format!(
                                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                                body.len()
                            );
                            let _ = socket.write_all(response.as_bytes()).await;
                        });
                    }
                });
                server
            }

            fn hits(&self) -> usize {
                self.hits.load(Ordering::SeqCst)
            }

            fn set(&self, mode: Mode) {
                *self.mode.lock().unwrap() = mode;
            }

            /// Wait (bounded, generously: this is a hang guard, not a timing check) until the
            /// server has read `n` requests.
            async fn wait_for_hits(&self, n: usize) {
                tokio::time::timeout(std::time::Duration::from_secs(60), async {
                    loop {
                        let notified = self.hit.notified();
                        if self.hits() >= n {
                            return;
                        }
                        notified.await;
                    }
                })
                .await
                .unwrap_or_else(|_| panic!("the key server saw {} requests, not {n}", self.hits()));
            }
        }

        async fn authenticator(server: &KeyServer, clock: &ManualClock) -> Authenticator {
            let url = server.url.clone();
            let config = Config::from_lookup(|name| match name {
                "AUTH_JWKS_URL" => Some(url.clone()),
                "AUTH_ISSUER" => Some(ISSUER.into()),
                "AUTH_AUDIENCE" => Some(AUDIENCE.into()),
                _ => None,
            })
            .unwrap();
            // A fetch timeout far beyond the test's own bounds: a check that waited for a
            // hanging fetch would fail the test instead of finishing late.
            Authenticator::build(&config, Arc::new(clock.clone()), Duration::from_secs(600))
                .await
                .unwrap()
        }

        fn token(kid: &str) -> String {
            let mut header = jsonwebtoken::Header::new(Algorithm::ES256);
            header.kid = Some(kid.to_string());
            let claims = json!({
                "sub": "patient-1", "iss": ISSUER, "aud": AUDIENCE,
                "exp": Utc::now().timestamp() + 3600,
            });
            let key = jsonwebtoken::EncodingKey::from_ec_pem(include_bytes!(
                "../tests/fixtures/test_es256_private.pem"
            ))
            .unwrap();
            jsonwebtoken::encode(&header, &claims, &key).unwrap()
        }

        async fn fetch_settled(auth: &Authenticator) {
            let _ = auth.jwks.as_ref().unwrap().fetching.lock().await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_hanging_key_server_stalls_no_check_with_a_cached_key() {
            let server = KeyServer::start(Mode::Serve).await;
            let clock = ManualClock::new(Utc::now());
            let auth = Arc::new(authenticator(&server, &clock).await);
            assert_eq!(server.hits(), 1, "fetched at start");
            let good = token("test-es256");
            assert_eq!(auth.verify(&good).await.unwrap(), "patient-1");

            // The key server hangs; a token with an unknown key starts a fetch that never ends.
            server.set(Mode::Hang);
            clock.advance(ChronoDuration::seconds(61));
            let pending = tokio::spawn({
                let auth = auth.clone();
                async move { auth.verify(&token("rotated-key")).await }
            });
            server.wait_for_hits(2).await;

            // Checks of tokens whose key is cached do not wait for it, even once the keys are
            // past their TTL. (The bound only turns a stall into a failure; without one the check
            // would wait as long as the fetch: here 600 s.)
            let bound = std::time::Duration::from_secs(60);
            for advance in [0, 2 * 3600] {
                clock.advance(ChronoDuration::seconds(advance));
                let user = tokio::time::timeout(bound, auth.verify(&good))
                    .await
                    .expect("a check with a cached key does not wait for the hanging fetch");
                assert_eq!(user.unwrap(), "patient-1");
            }
            assert!(!pending.is_finished(), "the fetch is still hanging");
            assert_eq!(server.hits(), 2, "one fetch at a time");
            pending.abort();
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_failing_key_server_is_asked_at_most_once_a_minute() {
            let server = KeyServer::start(Mode::Fail).await;
            let clock = ManualClock::new(Utc::now());
            let auth = authenticator(&server, &clock).await;
            assert_eq!(server.hits(), 1, "tried at start");

            // The failed start counts: no fetch for unknown keys within the minute.
            let good = token("test-es256");
            for _ in 0..10 {
                assert!(matches!(
                    auth.verify(&good).await,
                    Err(AppError::Unauthorized)
                ));
                assert!(matches!(
                    auth.verify(&token("other")).await,
                    Err(AppError::Unauthorized)
                ));
            }
            clock.advance(ChronoDuration::seconds(59));
            assert!(auth.verify(&good).await.is_err());
            assert_eq!(server.hits(), 1);

            // A minute on: one more try, failing again, and again it counts.
            clock.advance(ChronoDuration::seconds(2));
            for _ in 0..10 {
                assert!(auth.verify(&good).await.is_err());
            }
            assert_eq!(server.hits(), 2);

            // The server recovers: the next minute's check fetches the keys.
            server.set(Mode::Serve);
            clock.advance(ChronoDuration::seconds(61));
            assert_eq!(auth.verify(&good).await.unwrap(), "patient-1");
            assert_eq!(server.hits(), 3);

            // It fails again with the keys past their TTL: they stay in service, and the
            // background renewal is tried once a minute, not on every check.
            server.set(Mode::Fail);
            clock.advance(ChronoDuration::hours(2));
            assert_eq!(auth.verify(&good).await.unwrap(), "patient-1");
            server.wait_for_hits(4).await;
            fetch_settled(&auth).await;
            for _ in 0..10 {
                assert_eq!(auth.verify(&good).await.unwrap(), "patient-1");
            }
            fetch_settled(&auth).await;
            assert_eq!(server.hits(), 4);
            clock.advance(ChronoDuration::seconds(61));
            assert_eq!(auth.verify(&good).await.unwrap(), "patient-1");
            server.wait_for_hits(5).await;
            fetch_settled(&auth).await;
            assert_eq!(auth.verify(&good).await.unwrap(), "patient-1");
            assert_eq!(server.hits(), 5);
        }
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
