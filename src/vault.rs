//! Encryption at rest: phone numbers, message bodies and variables, and reply bodies are stored
//! sealed with AES-256-GCM; lookups by number use a keyed blind index (HMAC-SHA256 of the E.164
//! number) so that equality works without the clear number in the database.
//!
//! A sealed value is `enc1:<key id>:<base64 of nonce || ciphertext || tag>`. The key id (the first
//! 8 bytes of SHA-256 of the key, in hex) names the key that sealed it, so old keys stay readable
//! (`DATA_ENCRYPTION_OLD_KEYS`) while `rotate-key` re-seals every row under the current one.
//! A value without the prefix is clear text written before encryption; it reads as itself until
//! the store's start-up pass seals it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::error::{AppError, AppResult, ConfigError};

/// The prefix of every sealed value.
pub const SEALED_PREFIX: &str = "enc1:";

/// 32 bytes of key material.
#[derive(Clone, PartialEq, Eq)]
pub struct Key([u8; 32]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({})", self.id())
    }
}

impl Key {
    /// A key from its base64 form (standard alphabet, 32 bytes).
    pub fn parse(text: &str) -> Result<Key, String> {
        let bytes = B64
            .decode(text.trim())
            .map_err(|_| "is not base64".to_string())?;
        let bytes: [u8; 32] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| format!("is {} bytes; it must be 32", b.len()))?;
        Ok(Key(bytes))
    }

    /// A fresh random key.
    pub fn generate() -> Key {
        let key = Aes256Gcm::generate_key(OsRng);
        Key(key.into())
    }

    pub fn to_base64(&self) -> String {
        B64.encode(self.0)
    }

    /// The key's id: the first 8 bytes of its SHA-256, in hex. Names the key in every value it
    /// seals without revealing it.
    pub fn id(&self) -> String {
        let digest = Sha256::digest(self.0);
        hex::encode(&digest[..8])
    }

    /// The blind-index key derived from this one (when `BLIND_INDEX_KEY` is not set).
    fn derive_blind_index_key(&self) -> Key {
        Key(hmac_sha256(&self.0, b"prism-messaging blind index v1"))
    }
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// The keys as configured (`DATA_ENCRYPTION_KEY`, `DATA_ENCRYPTION_OLD_KEYS`, `BLIND_INDEX_KEY`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeySettings {
    pub current: Option<Key>,
    pub old: Vec<Key>,
    pub blind_index: Option<Key>,
}

impl KeySettings {
    /// The current key: the configured one, or for SQLite the one in the key file beside the
    /// database (generated on first start, mode 0600). PostgreSQL without a key refuses to start:
    /// there is no file of ours beside its data to keep one in. A key file is created only for a
    /// new database (`may_create`): one already sealed without a file was sealed with a
    /// configured key, and a fresh key would not open it.
    pub fn current_key(&self, database_url: &str, may_create: bool) -> AppResult<Key> {
        if let Some(key) = &self.current {
            return Ok(key.clone());
        }
        let Some(path) = sqlite_key_file(database_url) else {
            if database_url.starts_with("sqlite:") {
                // An in-memory database lives and dies with the process: so does its key.
                return Ok(Key::generate());
            }
            return Err(AppError::Internal(
                ConfigError::new(
                    "DATA_ENCRYPTION_KEY",
                    "required with PostgreSQL (32 random bytes, base64: `openssl rand -base64 32`)",
                )
                .into(),
            ));
        };
        load_or_create_key_file(&path, may_create)
    }
}

/// `<database file>.key` for a SQLite file database; `None` for memory or other backends.
pub fn sqlite_key_file(database_url: &str) -> Option<PathBuf> {
    sqlite_file(database_url).map(|path| {
        let mut key = path.into_os_string();
        key.push(".key");
        PathBuf::from(key)
    })
}

/// The file of a SQLite database URL; `None` for memory or other backends.
pub fn sqlite_file(database_url: &str) -> Option<PathBuf> {
    let rest = database_url.strip_prefix("sqlite:")?;
    let rest = rest.strip_prefix("//").unwrap_or(rest);
    let path = rest.split('?').next().unwrap_or(rest);
    if path.is_empty() || path == ":memory:" || rest.contains("mode=memory") {
        return None;
    }
    // Decoded as sqlx decodes it, so the key file, the lock and the fsync name the database's
    // own file (found by review: `sqlite:my%20db.db` opened `my db.db`, and the start failed
    // fsyncing `my%20db.db`).
    let decoded = percent_encoding::percent_decode_str(path).decode_utf8_lossy();
    Some(PathBuf::from(decoded.as_ref()))
}

fn load_or_create_key_file(path: &Path, may_create: bool) -> AppResult<Key> {
    match std::fs::read_to_string(path) {
        Ok(text) => Key::parse(&text).map_err(|e| {
            key_file_refused(format!(
                "not set, and the key file {} {e} (it holds a key as DATA_ENCRYPTION_KEY \
                 does: 32 bytes in base64, one line)",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !may_create => {
            Err(AppError::Internal(
                ConfigError::new(
                    "DATA_ENCRYPTION_KEY",
                    format!(
                        "not set and there is no key file {}, but the database holds sealed \
                         data: set the key it was sealed with",
                        path.display()
                    ),
                )
                .into(),
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = Key::generate();
            write_key_file(path, &key)?;
            tracing::warn!(
                key_file = %path.display(),
                key_id = %key.id(),
                "no DATA_ENCRYPTION_KEY: generated one into the key file beside the database; \
                 back it up with the database (without it the data cannot be read)"
            );
            Ok(key)
        }
        Err(e) => Err(key_file_refused(format!(
            "not set, and the key file {} cannot be read as text: {e} (it holds a key as \
             DATA_ENCRYPTION_KEY does: 32 bytes in base64, one line)",
            path.display()
        ))),
    }
}

/// The key file stands in for `DATA_ENCRYPTION_KEY`: one that cannot be used is that setting
/// wrong, refused at start like any other (exit code 2).
fn key_file_refused(problem: String) -> AppError {
    AppError::Internal(ConfigError::new("DATA_ENCRYPTION_KEY", problem).into())
}

fn write_key_file(path: &Path, key: &Key) -> AppResult<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(|e| {
        AppError::Internal(
            anyhow::Error::new(e).context(format!("creating the key file {}", path.display())),
        )
    })?;
    writeln!(file, "{}", key.to_base64())
        .and_then(|_| file.sync_all())
        .map_err(|e| {
            AppError::Internal(
                anyhow::Error::new(e).context(format!("writing the key file {}", path.display())),
            )
        })
}

/// What the database records about its blind index, so that it never changes under it: the
/// index key itself when it was derived (sealed under the data key, so it follows rotation and
/// never sits in the database in clear: numbers are few enough to try them all against a known
/// index key), and a fingerprint of the index key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlindIndexRecord {
    pub sealed_key: Option<String>,
    pub fingerprint: String,
}

/// The keys in use: seals under the current key, opens under any known one, and computes the
/// blind index.
pub struct Vault {
    current_id: String,
    ciphers: HashMap<String, Aes256Gcm>,
    blind_index_key: Key,
    /// What to record in a database that has no record yet.
    record: BlindIndexRecord,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault")
            .field("current_id", &self.current_id)
            .finish_non_exhaustive()
    }
}

impl Vault {
    /// The vault for a database: `current` seals; `settings.old` stay readable. The blind index
    /// key is `BLIND_INDEX_KEY`, else the one the database recorded (derived from the first key
    /// it was ever opened with), else derived from `current` (a new database). A database whose
    /// recorded index key does not match is refused: every lookup by number would miss.
    pub fn new(
        current: Key,
        settings: &KeySettings,
        recorded: Option<&BlindIndexRecord>,
    ) -> AppResult<Vault> {
        let mut keys: Vec<&Key> = vec![&current];
        keys.extend(settings.old.iter());
        let ciphers = keys
            .iter()
            .map(|k| (k.id(), Aes256Gcm::new((&k.0).into())))
            .collect();
        let mut vault = Vault {
            current_id: current.id(),
            ciphers,
            blind_index_key: current.derive_blind_index_key(),
            record: BlindIndexRecord {
                sealed_key: None,
                fingerprint: String::new(),
            },
        };
        let recorded_key = recorded.and_then(|r| r.sealed_key.as_deref());
        match (&settings.blind_index, recorded_key) {
            (Some(key), _) => vault.blind_index_key = key.clone(),
            (None, Some(sealed)) => {
                let text = vault.open(sealed).map_err(|_| {
                    AppError::Internal(
                        ConfigError::new(
                            "DATA_ENCRYPTION_KEY",
                            "the blind index key recorded in this database is sealed with a key \
                             that is neither DATA_ENCRYPTION_KEY nor in DATA_ENCRYPTION_OLD_KEYS",
                        )
                        .into(),
                    )
                })?;
                vault.blind_index_key = Key::parse(&text).map_err(|e| {
                    AppError::Internal(anyhow::anyhow!("the recorded blind index key {e}"))
                })?;
            }
            (None, None) => {}
        }
        let fingerprint = fingerprint(&vault.blind_index_key);
        if let Some(recorded) = recorded {
            if recorded.fingerprint != fingerprint {
                return Err(AppError::Internal(
                    ConfigError::new(
                        "BLIND_INDEX_KEY",
                        "differs from the key this database was indexed with (changed, or set \
                         or unset after the first start): lookups by number would miss, so the \
                         service does not start",
                    )
                    .into(),
                ));
            }
        }
        vault.record = BlindIndexRecord {
            sealed_key: settings
                .blind_index
                .is_none()
                .then(|| vault.seal(&vault.blind_index_key.to_base64())),
            fingerprint,
        };
        Ok(vault)
    }
    /// A vault with one random key, for tests and tools that need one.
    pub fn ephemeral() -> Vault {
        Vault::new(Key::generate(), &KeySettings::default(), None)
            .expect("a new database has no record to disagree with")
    }

    pub fn current_key_id(&self) -> &str {
        &self.current_id
    }

    /// What the database should record about its blind index.
    pub fn blind_index_record(&self) -> &BlindIndexRecord {
        &self.record
    }

    /// `plain`, sealed under the current key (a fresh random nonce each time).
    pub fn seal(&self, plain: &str) -> String {
        let cipher = &self.ciphers[&self.current_id];
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        // Encrypting a byte slice in memory cannot fail (only absurd lengths would).
        let sealed = cipher.encrypt(&nonce, plain.as_bytes()).unwrap_or_default();
        let mut bytes = Vec::with_capacity(nonce.len() + sealed.len());
        bytes.extend_from_slice(&nonce);
        bytes.extend_from_slice(&sealed);
        format!("{SEALED_PREFIX}{}:{}", self.current_id, B64.encode(bytes))
    }

    pub fn seal_opt(&self, plain: Option<&str>) -> Option<String> {
        plain.map(|p| self.seal(p))
    }

    /// The clear text of a stored value (clear text written before encryption reads as itself).
    pub fn open(&self, stored: &str) -> AppResult<String> {
        let Some(rest) = stored.strip_prefix(SEALED_PREFIX) else {
            return Ok(stored.to_string());
        };
        let (id, body) = rest.split_once(':').ok_or_else(|| corrupt("no key id"))?;
        let cipher = self.ciphers.get(id).ok_or_else(|| {
            AppError::Internal(anyhow::anyhow!(
                "a value is sealed with key {id}, which is neither DATA_ENCRYPTION_KEY nor in \
                 DATA_ENCRYPTION_OLD_KEYS"
            ))
        })?;
        let bytes = B64.decode(body).map_err(|_| corrupt("not base64"))?;
        if bytes.len() < 12 {
            return Err(corrupt("too short"));
        }
        let (nonce, sealed) = bytes.split_at(12);
        let plain = cipher
            .decrypt(Nonce::from_slice(nonce), sealed)
            .map_err(|_| corrupt("it does not authenticate"))?;
        String::from_utf8(plain).map_err(|_| corrupt("not UTF-8"))
    }

    pub fn open_opt(&self, stored: Option<&str>) -> AppResult<Option<String>> {
        stored.map(|s| self.open(s)).transpose()
    }

    /// Whether a stored value is sealed under the current key (nothing for `rotate-key` to do).
    pub fn is_current(&self, stored: &str) -> bool {
        stored
            .strip_prefix(SEALED_PREFIX)
            .and_then(|rest| rest.split_once(':'))
            .is_some_and(|(id, _)| id == self.current_id)
    }

    /// The blind index of a phone number (E.164): equal numbers, equal indexes; the number cannot
    /// be recovered from it without the index key.
    pub fn blind(&self, phone_number: &str) -> String {
        let mac = hmac_sha256(&self.blind_index_key.0, phone_number.as_bytes());
        hex::encode(mac)
    }

    pub fn blind_opt(&self, phone_number: Option<&str>) -> Option<String> {
        phone_number.map(|p| self.blind(p))
    }
}

fn fingerprint(key: &Key) -> String {
    hex::encode(&hmac_sha256(&key.0, b"prism-messaging blind index fingerprint")[..8])
}

fn corrupt(why: &str) -> AppError {
    AppError::Internal(anyhow::anyhow!("a sealed value cannot be opened: {why}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sqlite_url_names_its_file_as_sqlx_reads_it() {
        let file = |url| sqlite_file(url).map(|p| p.display().to_string());
        assert_eq!(file("sqlite://my%20db.db").as_deref(), Some("my db.db"));
        assert_eq!(
            file("sqlite:/var/lib/p.db?mode=rwc").as_deref(),
            Some("/var/lib/p.db")
        );
        assert_eq!(
            file("sqlite://prism-messaging.db").as_deref(),
            Some("prism-messaging.db")
        );
        assert_eq!(file("sqlite::memory:"), None);
        assert_eq!(file("postgres://x"), None);
    }

    fn vault_with(current: &Key, old: &[Key]) -> Vault {
        let settings = KeySettings {
            current: Some(current.clone()),
            old: old.to_vec(),
            blind_index: None,
        };
        Vault::new(current.clone(), &settings, None).unwrap()
    }

    #[test]
    fn sealed_values_open_and_name_their_key() {
        let key = Key::generate();
        let vault = vault_with(&key, &[]);
        let sealed = vault.seal("+919876543210");
        assert!(sealed.starts_with(&format!("enc1:{}:", key.id())));
        assert!(!sealed.contains("9876543210"));
        assert_ne!(
            sealed,
            vault.seal("+919876543210"),
            "a fresh nonce each time"
        );
        assert_eq!(vault.open(&sealed).unwrap(), "+919876543210");
        assert!(vault.is_current(&sealed));
        assert_eq!(vault.open("clear").unwrap(), "clear");
        assert!(!vault.is_current("clear"));
    }

    #[test]
    fn old_keys_stay_readable_and_others_are_refused() {
        let old = Key::generate();
        let new = Key::generate();
        let sealed_old = vault_with(&old, &[]).seal("reply body");
        let rotated = vault_with(&new, std::slice::from_ref(&old));
        assert_eq!(rotated.open(&sealed_old).unwrap(), "reply body");
        assert!(!rotated.is_current(&sealed_old));
        let stranger = vault_with(&Key::generate(), &[]);
        assert!(stranger.open(&sealed_old).is_err());
        // A changed byte does not authenticate.
        let mut tampered = sealed_old.clone().into_bytes();
        let last = tampered.len() - 3;
        tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(tampered).unwrap();
        assert!(vault_with(&old, &[]).open(&tampered).is_err());
    }

    #[test]
    fn the_blind_index_survives_rotation_and_refuses_a_change() {
        let first = Key::generate();
        let v1 = vault_with(&first, &[]);
        let record = v1.blind_index_record().clone();
        let sealed = record.sealed_key.clone().unwrap();
        assert!(
            sealed.starts_with(&format!("enc1:{}:", first.id())),
            "sealed, never clear"
        );
        let second = Key::generate();
        let settings = KeySettings {
            current: Some(second.clone()),
            old: vec![first.clone()],
            blind_index: None,
        };
        let v2 = Vault::new(second.clone(), &settings, Some(&record)).unwrap();
        assert_eq!(v1.blind("+14155552671"), v2.blind("+14155552671"));
        assert_ne!(v1.blind("+14155552671"), v1.blind("+14155552672"));
        // Once the record is re-sealed under the second key, the first may go.
        let resealed = v2.blind_index_record().clone();
        assert!(resealed.sealed_key.unwrap().contains(&second.id()));
        let alone = KeySettings {
            old: vec![],
            ..settings.clone()
        };
        let v3 = Vault::new(second.clone(), &alone, Some(v2.blind_index_record())).unwrap();
        assert_eq!(v3.blind("+14155552671"), v1.blind("+14155552671"));
        // ... but not before: the record cannot be opened, and the error says what to do.
        let err = Vault::new(second.clone(), &alone, Some(&record)).unwrap_err();
        assert!(format!("{err:?}").contains("DATA_ENCRYPTION_OLD_KEYS"));
        // A BLIND_INDEX_KEY set later would change every index: refused.
        let explicit = KeySettings {
            blind_index: Some(Key::generate()),
            ..settings
        };
        assert!(Vault::new(second, &explicit, Some(&record)).is_err());
    }

    #[test]
    fn keys_parse_from_base64_of_32_bytes() {
        let key = Key::generate();
        assert_eq!(Key::parse(&key.to_base64()).unwrap(), key);
        assert!(Key::parse("c2hvcnQ=").unwrap_err().contains("32"));
        assert!(Key::parse("not base64!").is_err());
    }

    #[test]
    fn key_files_sit_beside_sqlite_files_only() {
        assert_eq!(
            sqlite_key_file("sqlite://prism-messaging.db"),
            Some(PathBuf::from("prism-messaging.db.key"))
        );
        assert_eq!(
            sqlite_key_file("sqlite:///var/lib/prism/db.sqlite?mode=rwc"),
            Some(PathBuf::from("/var/lib/prism/db.sqlite.key"))
        );
        assert_eq!(sqlite_key_file("sqlite::memory:"), None);
        assert_eq!(sqlite_key_file("postgres://localhost/prism"), None);
        let settings = KeySettings::default();
        assert!(settings
            .current_key("postgres://localhost/prism", true)
            .is_err());
        let dir = std::env::temp_dir().join(format!("vault-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let url = format!("sqlite://{}", dir.join("db.sqlite").display());
        assert!(
            settings.current_key(&url, false).is_err(),
            "no key file for a database already sealed"
        );
        let key = settings.current_key(&url, true).unwrap();
        assert_eq!(
            settings.current_key(&url, false).unwrap(),
            key,
            "then reused"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join("db.sqlite.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
