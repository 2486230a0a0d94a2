// `SessionStore` for both backends: included by `sqlite.rs` and `postgres.rs` inside a module that
// has `Db`, `ThisStore`, `LOCK_FOR_UPDATE` and `SKIP_LOCKED` in scope (see `store/mod.rs`).

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::*;
use crate::error::AppResult;
#[allow(unused_imports)]
use crate::store::*;

const SESSION_COLUMNS: &str = "token_hash, user_id, return_url, ip, user_agent, created_at, \
     last_seen_at, expires_at";

#[async_trait]
impl SessionStore for ThisStore {
    async fn create_settings_link(
        &self,
        code_hash: &str,
        user_id: &str,
        return_url: Option<&str>,
        now: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    ) -> AppResult<()> {
        sqlx::query(
            "INSERT INTO settings_links (code_hash, user_id, return_url, expires_at, used_at, \
             created_at) VALUES ($1, $2, $3, $4, NULL, $5)",
        )
        .bind(code_hash)
        .bind(user_id)
        .bind(return_url)
        .bind(expires_at)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn consume_settings_link(
        &self,
        code_hash: &str,
        now: DateTime<Utc>,
    ) -> AppResult<Option<OpenedLink>> {
        // One statement: of two simultaneous opens, one wins.
        let write = sqlx::query_as::<Db, (String, Option<String>)>(
            "UPDATE settings_links SET used_at = $2 WHERE code_hash = $1 AND used_at IS NULL \
             AND expires_at > $2 RETURNING user_id, return_url",
        )
        .bind(code_hash)
        .bind(now);
        let row = returned_row(write, &self.pool).await?;
        Ok(row.map(|(user_id, return_url)| OpenedLink {
            user_id,
            return_url,
        }))
    }

    async fn create_settings_session(&self, s: &SettingsSession) -> AppResult<()> {
        sqlx::query(
            "INSERT INTO settings_sessions (token_hash, user_id, return_url, ip, user_agent, \
             created_at, last_seen_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&s.token_hash)
        .bind(&s.user_id)
        .bind(&s.return_url)
        .bind(&s.ip)
        .bind(&s.user_agent)
        .bind(s.created_at)
        .bind(s.last_seen_at)
        .bind(s.expires_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn touch_settings_session(
        &self,
        token_hash: &str,
        now: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    ) -> AppResult<Option<SettingsSession>> {
        let sql = format!(
            "UPDATE settings_sessions SET last_seen_at = $2, expires_at = $3 \
             WHERE token_hash = $1 AND expires_at > $2 RETURNING {SESSION_COLUMNS}"
        );
        let write = sqlx::query_as::<Db, SettingsSession>(&sql)
            .bind(token_hash)
            .bind(now)
            .bind(expires_at);
        Ok(returned_row(write, &self.pool).await?)
    }

    async fn delete_settings_session(&self, token_hash: &str) -> AppResult<()> {
        sqlx::query("DELETE FROM settings_sessions WHERE token_hash = $1")
            .bind(token_hash)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn prune_settings_sessions(&self, now: DateTime<Utc>) -> AppResult<u64> {
        let sessions = sqlx::query("DELETE FROM settings_sessions WHERE expires_at <= $1")
            .bind(now)
            .execute(&self.pool)
            .await?
            .rows_affected();
        let links = sqlx::query("DELETE FROM settings_links WHERE expires_at <= $1")
            .bind(now)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(sessions + links)
    }
}
