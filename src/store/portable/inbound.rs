// `InboundStore` for both backends: included by `sqlite.rs` and `postgres.rs` inside a module that
// has `Db`, `ThisStore`, `LOCK_FOR_UPDATE` and `SKIP_LOCKED` in scope (see `store/mod.rs`).

use async_trait::async_trait;
#[allow(unused_imports)]
use chrono::{DateTime, Utc};

use super::*;
use crate::error::AppResult;
#[allow(unused_imports)]
use crate::store::*;

pub(super) const INCOMING_COLUMNS: &str =
    "id, provider_sid, channel, from_number, to_number, user_id, body, keyword, \
     reply_template, opt_out_type, received_at, user_ids";

#[async_trait]
impl InboundStore for ThisStore {
    async fn is_opted_out(&self, phone_number: &str, channel: Channel) -> AppResult<bool> {
        let found: i64 = sqlx::query_scalar(IS_OPTED_OUT)
            .bind(self.vault.blind(phone_number))
            .bind(channel.as_str())
            .fetch_one(&self.pool)
            .await?;
        Ok(found > 0)
    }

    async fn opted_out_among(&self, phone_numbers: &[String]) -> AppResult<Vec<(String, Channel)>> {
        // The numbers are stored as blind indexes: map each back to the number asked about.
        let by_index: std::collections::HashMap<String, &String> = phone_numbers
            .iter()
            .map(|number| (self.vault.blind(number), number))
            .collect();
        let indexes: Vec<&String> = by_index.keys().collect();
        let mut found = Vec::new();
        // A chunk at a time: well under SQLite's 32,766 bound parameters.
        for chunk in indexes.chunks(500) {
            let mut query = sqlx::QueryBuilder::<Db>::new(
                "SELECT phone_index, channel FROM opt_outs WHERE phone_index IN (",
            );
            let mut bound = query.separated(", ");
            for index in chunk {
                bound.push_bind(index.as_str());
            }
            bound.push_unseparated(")");
            let rows: Vec<(String, String)> = query.build_query_as().fetch_all(&self.pool).await?;
            for (index, channel) in rows {
                if let (Some(number), Some(channel)) =
                    (by_index.get(&index), Channel::parse(&channel))
                {
                    found.push(((*number).clone(), channel));
                }
            }
        }
        Ok(found)
    }

    async fn set_opt_out(
        &self,
        phone_number: &str,
        channel: Channel,
        source: ConsentSource,
        at: DateTime<Utc>,
    ) -> AppResult<()> {
        sqlx::query(
            "INSERT INTO opt_outs (phone_index, channel, source, created_at) VALUES ($1, $2, \
             $3, $4) \
             ON CONFLICT (phone_index, channel) DO NOTHING",
        )
        .bind(self.vault.blind(phone_number))
        .bind(channel.as_str())
        .bind(source.as_str())
        .bind(at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn clear_opt_out(&self, phone_number: &str, channel: Channel) -> AppResult<()> {
        sqlx::query("DELETE FROM opt_outs WHERE phone_index = $1 AND channel = $2")
            .bind(self.vault.blind(phone_number))
            .bind(channel.as_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn insert_incoming(&self, m: &IncomingMessage) -> AppResult<bool> {
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
        // The reply names only users who still have a record. One erased since the reply was
        // attributed is left out; an erasure still running is waited for (on PostgreSQL it
        // locks the record first; on SQLite the write lock orders the two), or runs after this
        // commits and deletes the reply with the rest (found by review: a reply that came
        // during an erasure outlived it, still the erased user's).
        let mut kept = Vec::new();
        for user in m.user_ids() {
            let sql = format!(
                "SELECT user_id FROM messaging_consent WHERE user_id = $1{LOCK_FOR_UPDATE}"
            );
            let found: Option<String> = sqlx::query_scalar(&sql)
                .bind(&user)
                .fetch_optional(&mut *tx)
                .await?;
            kept.extend(found);
        }
        let user_id = m.user_id.as_ref().filter(|u| kept.contains(u));
        let user_ids = match &m.user_ids {
            Some(_) => Some(serde_json::to_string(&kept).map_err(anyhow::Error::from)?),
            None => None,
        };
        let done = sqlx::query(
            "INSERT INTO incoming_messages (id, provider_sid, channel, from_number, to_number, \
             user_id, body, keyword, reply_template, opt_out_type, received_at, user_ids) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
             ON CONFLICT (provider_sid) DO NOTHING",
        )
        .bind(&m.id)
        .bind(&m.provider_sid)
        .bind(&m.channel)
        .bind(self.vault.seal(&m.from_number))
        .bind(&m.to_number)
        .bind(user_id)
        .bind(self.vault.seal(&m.body))
        .bind(&m.keyword)
        .bind(&m.reply_template)
        .bind(&m.opt_out_type)
        .bind(m.received_at)
        .bind(user_ids)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    async fn incoming_by_sid(&self, provider_sid: &str) -> AppResult<Option<IncomingMessage>> {
        let sql =
            format!("SELECT {INCOMING_COLUMNS} FROM incoming_messages WHERE provider_sid = $1");
        sqlx::query_as::<Db, IncomingMessage>(&sql)
            .bind(provider_sid)
            .fetch_optional(&self.pool)
            .await?
            .map(|m| open_incoming(&self.vault, m))
            .transpose()
    }

    async fn list_incoming(
        &self,
        since: Option<DateTime<Utc>>,
        until: DateTime<Utc>,
        limit: i64,
    ) -> AppResult<Vec<IncomingMessage>> {
        let sql = format!(
            "SELECT {INCOMING_COLUMNS} FROM incoming_messages WHERE received_at > $1 AND \
             received_at <= $3 \
             ORDER BY received_at, id LIMIT $2"
        );
        let since = since.unwrap_or(DateTime::<Utc>::UNIX_EPOCH);
        sqlx::query_as::<Db, IncomingMessage>(&sql)
            .bind(since)
            .bind(limit)
            .bind(until)
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(|m| open_incoming(&self.vault, m))
            .collect()
    }

    async fn touch_whatsapp_session(&self, phone_number: &str, at: DateTime<Utc>) -> AppResult<()> {
        sqlx::query(
            "INSERT INTO whatsapp_sessions (phone_index, last_inbound_at) VALUES ($1, $2) \
             ON CONFLICT (phone_index) DO UPDATE SET last_inbound_at = excluded.last_inbound_at \
             WHERE whatsapp_sessions.last_inbound_at < excluded.last_inbound_at",
        )
        .bind(self.vault.blind(phone_number))
        .bind(at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn last_whatsapp_inbound(&self, phone_number: &str) -> AppResult<Option<DateTime<Utc>>> {
        Ok(sqlx::query_scalar(
            "SELECT last_inbound_at FROM whatsapp_sessions WHERE phone_index = $1",
        )
        .bind(self.vault.blind(phone_number))
        .fetch_optional(&self.pool)
        .await?)
    }
}

/// A reply as stored, with its sender and body opened.
pub(super) fn open_incoming(
    vault: &crate::vault::Vault,
    mut m: IncomingMessage,
) -> AppResult<IncomingMessage> {
    m.from_number = vault.open(&m.from_number)?;
    m.body = vault.open(&m.body)?;
    Ok(m)
}
