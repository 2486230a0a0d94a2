// `SealingStore` for both backends: included by `sqlite.rs` and `postgres.rs` inside a module
// that has `Db`, `ThisStore`, `LOCK_FOR_UPDATE` and `SKIP_LOCKED` in scope (see `store/mod.rs`).
//
// Which columns are sealed, and which blind indexes go with them, is listed once here; the
// queries of each area seal and open the same columns (see `crate::vault`).

use async_trait::async_trait;
use std::sync::Arc;

use super::*;
use crate::error::AppResult;
#[allow(unused_imports)]
use crate::store::*;
use crate::vault::{BlindIndexRecord, KeySettings, Vault, SEALED_PREFIX};

/// A table with sealed columns: its key, the sealed columns, and the blind index computed from
/// the first sealed column (the number), if any.
struct Sealed {
    table: &'static str,
    /// The row's key, read as text.
    key: &'static str,
    /// Matches the row whose key (as text) is `$1`.
    key_match: &'static str,
    /// Columns a row must match to be re-sealed (besides the key).
    only: &'static str,
    columns: &'static [&'static str],
    index: Option<&'static str>,
}

const SEALED: [Sealed; 7] = [
    // The derived blind index key, sealed: it follows rotation, so the first key may go.
    Sealed {
        table: "vault_meta",
        key: "name",
        key_match: "name = $1",
        only: " AND name = 'blind_index_key'",
        columns: &["value"],
        index: None,
    },
    Sealed {
        table: "messaging_consent",
        key: "user_id",
        key_match: "user_id = $1",
        only: "",
        columns: &["phone_number"],
        index: Some("phone_index"),
    },
    Sealed {
        table: "consent_audit_trail",
        key: "CAST(id AS TEXT)",
        key_match: "id = CAST($1 AS BIGINT)",
        only: " AND field = 'phone_number'",
        columns: &["old_value", "new_value"],
        index: None,
    },
    Sealed {
        table: "messages",
        key: "id",
        key_match: "id = $1",
        only: "",
        columns: &["to_number", "variables", "attempt_body"],
        index: Some("to_index"),
    },
    Sealed {
        table: "incoming_messages",
        key: "id",
        key_match: "id = $1",
        only: "",
        columns: &["from_number", "body"],
        index: None,
    },
    Sealed {
        table: "otp_codes",
        // A purpose has no ':', so the last one splits the two.
        key: "user_id || ':' || purpose",
        key_match: "user_id || ':' || purpose = $1",
        only: "",
        columns: &["phone_number"],
        index: None,
    },
    // An erased user's rows keep no number (`erase_user`), only the indexes the limits count.
    Sealed {
        table: "otp_send_log",
        key: "CAST(id AS TEXT)",
        key_match: "id = CAST($1 AS BIGINT)",
        only: " AND user_id NOT LIKE 'erased:%'",
        columns: &["phone_number"],
        index: Some("phone_index"),
    },
];

/// Tables keyed by a number's blind index alone (no number kept): written clear before
/// encryption, their keys become indexes once.
const INDEXED: [&str; 2] = ["opt_outs", "whatsapp_sessions"];

#[async_trait]
impl SealingStore for ThisStore {
    async fn reseal_round(&self, limit: i64, clear_only: bool) -> AppResult<ResealReport> {
        let mut report = ResealReport::default();
        for table in &SEALED {
            let n = reseal_table(&self.pool, &self.vault, table, limit, clear_only).await?;
            report.tables.push((table.table, n));
        }
        for table in INDEXED {
            let n = index_clear_keys(&self.pool, &self.vault, table, limit).await?;
            report.tables.push((table, n));
        }
        Ok(report)
    }
}

/// The vault for this database: the current key (configured, or the SQLite key file), the old
/// ones, and the blind index key the database recorded on its first start (recorded now if this
/// is it).
pub(in super::super) async fn open_vault(
    pool: &sqlx::Pool<Db>,
    database_url: &str,
    keys: &KeySettings,
) -> AppResult<Arc<Vault>> {
    let rows: Vec<(String, String)> = sqlx::query_as("SELECT name, value FROM vault_meta")
        .fetch_all(pool)
        .await?;
    let current = keys.current_key(database_url, rows.is_empty())?;
    let value = |name: &str| rows.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
    let recorded = value("blind_index_fingerprint").map(|fingerprint| BlindIndexRecord {
        sealed_key: value("blind_index_key"),
        fingerprint,
    });
    let vault = Vault::new(current, keys, recorded.as_ref())?;
    if recorded.is_none() {
        let record = vault.blind_index_record();
        let mut tx = pool.begin().await?;
        let entries = [
            ("blind_index_fingerprint", Some(record.fingerprint.clone())),
            ("blind_index_key", record.sealed_key.clone()),
        ];
        for (name, value) in entries {
            let Some(value) = value else { continue };
            sqlx::query(
                "INSERT INTO vault_meta (name, value) VALUES ($1, $2) \
                 ON CONFLICT (name) DO NOTHING",
            )
            .bind(name)
            .bind(value)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
    }
    Ok(Arc::new(vault))
}

/// Seal whatever clear text the database still holds (rows written before encryption), a batch
/// at a time, before the store serves.
pub(in super::super) async fn seal_clear_text(store: &ThisStore) -> AppResult<u64> {
    let mut total = 0;
    loop {
        let done = store.reseal_round(1_000, true).await?.total();
        if done == 0 {
            break;
        }
        total += done;
    }
    if total > 0 {
        for statement in AFTER_SEALING {
            sqlx::query(statement).execute(&store.pool).await?;
        }
        if !REWRITE_SEALED_TABLE.is_empty() {
            for table in SEALED.iter().map(|t| t.table).chain(INDEXED) {
                sqlx::query(&format!("{REWRITE_SEALED_TABLE} {table}"))
                    .execute(&store.pool)
                    .await?;
            }
        }
        tracing::info!(
            rows = total,
            "sealed clear-text rows written before encryption"
        );
    }
    Ok(total)
}

async fn reseal_table(
    pool: &sqlx::Pool<Db>,
    vault: &Vault,
    t: &Sealed,
    limit: i64,
    clear_only: bool,
) -> AppResult<u64> {
    // Rows with a value not sealed under the current key (or not sealed at all).
    let pattern = if clear_only {
        format!("{SEALED_PREFIX}%")
    } else {
        format!("{SEALED_PREFIX}{}:%", vault.current_key_id())
    };
    let stale = t
        .columns
        .iter()
        .map(|c| format!("({c} IS NOT NULL AND {c} NOT LIKE $1)"))
        .collect::<Vec<_>>()
        .join(" OR ");
    let select = t.columns.join(", ");
    let sql = format!(
        "SELECT {key}, {select} FROM {table} WHERE ({stale}){only} \
         ORDER BY {key} LIMIT $2",
        key = t.key,
        table = t.table,
        only = t.only,
    );
    let rows = sqlx::query(&sql)
        .bind(&pattern)
        .bind(limit)
        .fetch_all(pool)
        .await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let sets = t
        .columns
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{c} = ${}", i + 2))
        .chain(t.index.map(|ix| format!("{ix} = ${}", t.columns.len() + 2)))
        .collect::<Vec<_>>()
        .join(", ");
    // $1 the key, then the new values, the index (if any), and the values as read.
    let first_old = t.columns.len() + 2 + usize::from(t.index.is_some());
    let unchanged = t
        .columns
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{c} IS NOT DISTINCT FROM ${}", first_old + i))
        .collect::<Vec<_>>()
        .join(" AND ");
    let update = format!(
        "UPDATE {table} SET {sets} WHERE {key_match} AND {unchanged}",
        table = t.table,
        key_match = t.key_match,
    );
    let mut done = 0;
    let mut tx = pool.begin().await?;
    for row in rows {
        use sqlx::Row;
        let key: String = row.try_get(0)?;
        let old: Vec<Option<String>> = (1..=t.columns.len())
            .map(|i| row.try_get::<Option<String>, _>(i))
            .collect::<Result<_, _>>()?;
        let mut query = sqlx::query(&update).bind(&key);
        let mut number = None;
        for (i, value) in old.iter().enumerate() {
            let plain = vault.open_opt(value.as_deref())?;
            if i == 0 {
                number = plain.clone();
            }
            query = query.bind(plain.map(|p| vault.seal(&p)));
        }
        if t.index.is_some() {
            query = query.bind(vault.blind_opt(number.as_deref()));
        }
        for value in &old {
            query = query.bind(value.clone());
        }
        done += query.execute(&mut *tx).await?.rows_affected();
    }
    tx.commit().await?;
    Ok(done)
}

/// Replace clear numbers (`+...`) used as keys by their blind index.
async fn index_clear_keys(
    pool: &sqlx::Pool<Db>,
    vault: &Vault,
    table: &str,
    limit: i64,
) -> AppResult<u64> {
    let clear: Vec<String> = sqlx::query_scalar(&format!(
        "SELECT DISTINCT phone_index FROM {table} WHERE phone_index LIKE '+%' \
         ORDER BY phone_index LIMIT $1"
    ))
    .bind(limit)
    .fetch_all(pool)
    .await?;
    let mut done = 0;
    let mut tx = pool.begin().await?;
    for number in clear {
        done += sqlx::query(&format!(
            "UPDATE {table} SET phone_index = $1 WHERE phone_index = $2"
        ))
        .bind(vault.blind(&number))
        .bind(&number)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    }
    tx.commit().await?;
    Ok(done)
}
