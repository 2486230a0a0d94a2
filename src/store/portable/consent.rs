// `ConsentStore` for both backends: included by `sqlite.rs` and `postgres.rs` inside a module that
// has `Db`, `ThisStore`, `LOCK_FOR_UPDATE` and `SKIP_LOCKED` in scope (see `store/mod.rs`).

use async_trait::async_trait;
#[allow(unused_imports)]
use chrono::{DateTime, Utc};

use super::*;
use crate::error::AppResult;
#[allow(unused_imports)]
use crate::store::*;

#[async_trait]
impl ConsentStore for ThisStore {
    async fn get_consent(&self, user_id: &str) -> AppResult<Option<Consent>> {
        let sql = format!("SELECT {CONSENT_COLUMNS} FROM messaging_consent WHERE user_id = $1");
        let stored = if let Some(readers) = self.readers() {
            readers.consent(&sql, user_id)?
        } else if let Some(functions) = self.functions() {
            functions.consent(user_id).await?
        } else {
            sqlx::query_as::<Db, Consent>(&sql)
                .bind(user_id)
                .fetch_optional(&self.pool)
                .await?
        };
        stored.map(|c| open_consent(&self.vault, c)).transpose()
    }

    async fn get_consents(&self, user_ids: &[String]) -> AppResult<Vec<Consent>> {
        let mut records = Vec::with_capacity(user_ids.len());
        // A chunk at a time: well under SQLite's 32,766 bound parameters.
        for chunk in user_ids.chunks(500) {
            let mut query = sqlx::QueryBuilder::<Db>::new(format!(
                "SELECT {CONSENT_COLUMNS} FROM messaging_consent WHERE user_id IN ("
            ));
            let mut ids = query.separated(", ");
            for id in chunk {
                ids.push_bind(id);
            }
            ids.push_unseparated(")");
            for record in query
                .build_query_as::<Consent>()
                .fetch_all(&self.pool)
                .await?
            {
                records.push(open_consent(&self.vault, record)?);
            }
        }
        Ok(records)
    }

    async fn update_consent(
        &self,
        user_id: &str,
        edit: ConsentEdit<'_>,
        ctx: &ChangeContext,
    ) -> AppResult<Consent> {
        let mut tx = self.pool.begin().await?;
        let edited = edit_consent_in(&mut tx, &self.vault, user_id, edit, ctx, true).await?;
        tx.commit().await?;
        edited.ok_or_else(|| {
            anyhow::anyhow!("a consent record created in this transaction is missing").into()
        })
    }

    async fn update_existing_consent(
        &self,
        user_id: &str,
        edit: ConsentEdit<'_>,
        ctx: &ChangeContext,
    ) -> AppResult<Option<Consent>> {
        // The write lock first (SQLite), so no erasure commits between the read and the update;
        // on PostgreSQL the read locks the row, and waits out an erasure that holds it.
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
        let edited = edit_consent_in(&mut tx, &self.vault, user_id, edit, ctx, false).await?;
        tx.commit().await?;
        Ok(edited)
    }

    async fn consent_audit(&self, user_id: &str) -> AppResult<Vec<ConsentAuditRecord>> {
        sqlx::query_as::<Db, ConsentAuditRecord>(
            "SELECT id, user_id, field, old_value, new_value, source, ip, user_agent, created_at \
             FROM consent_audit_trail WHERE user_id = $1 ORDER BY id",
        )
        .bind(user_id)
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(|r| open_audit(&self.vault, r))
        .collect()
    }

    async fn users_with_phone(&self, phone_number: &str) -> AppResult<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT user_id FROM messaging_consent WHERE phone_index = $1 ORDER BY user_id",
        )
        .bind(self.vault.blind(phone_number))
        .fetch_all(&self.pool)
        .await?)
    }
}

/// A consent record as stored, with its number opened.
pub(super) fn open_consent(vault: &crate::vault::Vault, mut c: Consent) -> AppResult<Consent> {
    c.phone_number = vault.open_opt(c.phone_number.as_deref())?;
    Ok(c)
}

/// An audit row as stored, with its values opened (only a number's are sealed).
pub(super) fn open_audit(
    vault: &crate::vault::Vault,
    mut r: ConsentAuditRecord,
) -> AppResult<ConsentAuditRecord> {
    r.old_value = vault.open_opt(r.old_value.as_deref())?;
    r.new_value = vault.open_opt(r.new_value.as_deref())?;
    Ok(r)
}

/// Apply `edit` to the user's record inside `tx` and append one audit row per changed field: the
/// record as it now stands, or `None` when there is none and `create` is false. With `create`,
/// a missing record is made first. Without it, on SQLite the transaction must already hold the
/// write lock (a write before this one, or `BEGIN_WRITE`), so no writer commits between the read
/// and the update.
pub(super) async fn edit_consent_in(
    tx: &mut sqlx::Transaction<'_, Db>,
    vault: &crate::vault::Vault,
    user_id: &str,
    edit: ConsentEdit<'_>,
    ctx: &ChangeContext,
    create: bool,
) -> AppResult<Option<Consent>> {
    // Create the row if missing (this write also takes SQLite's lock), then read it locked so
    // concurrent changes audit the true old values. On PostgreSQL the row the insert found can be
    // gone by the read, deleted by an erasure that committed in between (found by review: the
    // change answered 500); the insert is then tried again, and makes the record afresh.
    let sql = format!(
        "SELECT {CONSENT_COLUMNS} FROM messaging_consent WHERE user_id = $1{LOCK_FOR_UPDATE}"
    );
    let mut tries = 0;
    let (current, created) = loop {
        let created = create
            && sqlx::query(
                "INSERT INTO messaging_consent (user_id, created_at, updated_at) \
                 VALUES ($1, $2, $2) ON CONFLICT (user_id) DO NOTHING",
            )
            .bind(user_id)
            .bind(ctx.at)
            .execute(&mut **tx)
            .await?
            .rows_affected()
                == 1;
        let current = sqlx::query_as::<Db, Consent>(&sql)
            .bind(user_id)
            .fetch_optional(&mut **tx)
            .await?;
        match current {
            Some(current) => break (current, created),
            None if create && tries < 3 => tries += 1,
            None => return Ok(None),
        }
    };
    let current = open_consent(vault, current)?;
    let mut next = edit(&current)?;
    let changes = current.changes_to(&next, created);
    if changes.is_empty() {
        return Ok(Some(current));
    }
    next.updated_at = ctx.at;
    sqlx::query(
        "UPDATE messaging_consent SET phone_number = $2, sms_consent = $3, \
         whatsapp_consent = $4, marketing_consent = $5, updated_at = $6, \
         phone_verified_at = $7, time_zone = $8, phone_index = $9 WHERE user_id = $1",
    )
    .bind(user_id)
    .bind(vault.seal_opt(next.phone_number.as_deref()))
    .bind(next.sms_consent)
    .bind(next.whatsapp_consent)
    .bind(next.marketing_consent)
    .bind(next.updated_at)
    .bind(next.phone_verified_at)
    .bind(&next.time_zone)
    .bind(vault.blind_opt(next.phone_number.as_deref()))
    .execute(&mut **tx)
    .await?;
    for (field, old_value, new_value) in changes {
        // A number in the trail is sealed like the number itself.
        let (old_value, new_value) = if field == "phone_number" {
            (
                vault.seal_opt(old_value.as_deref()),
                vault.seal_opt(new_value.as_deref()),
            )
        } else {
            (old_value, new_value)
        };
        sqlx::query(
            "INSERT INTO consent_audit_trail \
             (user_id, field, old_value, new_value, source, ip, user_agent, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(user_id)
        .bind(field)
        .bind(old_value)
        .bind(new_value)
        .bind(ctx.source.as_str())
        .bind(&ctx.ip)
        .bind(&ctx.user_agent)
        .bind(ctx.at)
        .execute(&mut **tx)
        .await?;
    }
    Ok(Some(next))
}
