// `OtpStore` for both backends: included by `sqlite.rs` and `postgres.rs` inside a module that
// has `Db`, `ThisStore`, `LOCK_FOR_UPDATE` and `SKIP_LOCKED` in scope (see `store/mod.rs`).

use async_trait::async_trait;
#[allow(unused_imports)]
use chrono::{DateTime, Utc};

use super::messages::insert_message_row;
use super::*;
use crate::error::AppResult;
#[allow(unused_imports)]
use crate::store::*;

#[async_trait]
impl OtpStore for ThisStore {
    async fn issue_otp(&self, issue: &OtpIssue) -> AppResult<OtpIssueOutcome> {
        let mut tx = self.pool.begin().await?;
        let mut keys = vec![
            format!("otp:phone:{}", issue.phone_number),
            format!("otp:user:{}", issue.user_id),
        ];
        if let Some(ip) = &issue.ip {
            keys.push(format!("otp:ip:{ip}"));
        }
        ThisStore::lock_keys(&mut tx, &mut keys).await?;
        // Log this send first: on SQLite the write takes the database's write lock, serialising
        // concurrent requests before they read the counts.
        let log_id: i64 = sqlx::query_scalar(
            "INSERT INTO otp_send_log (phone_number, user_id, ip, created_at) VALUES ($1, $2, \
             $3, $4) RETURNING id",
        )
        .bind(&issue.phone_number)
        .bind(&issue.user_id)
        .bind(&issue.ip)
        .bind(issue.now)
        .fetch_one(&mut *tx)
        .await?;
        if let Some(wait) = otp_retry_after(&mut tx, issue, log_id).await? {
            tx.rollback().await?;
            return Ok(OtpIssueOutcome::RateLimited {
                retry_after_seconds: wait,
            });
        }
        let Some(new_message) = &issue.message else {
            tx.commit().await?;
            return Ok(OtpIssueOutcome::Logged);
        };
        let message = insert_message_row(&mut tx, new_message)
            .await?
            .ok_or_else(|| anyhow::anyhow!("OTP message id collided"))?;
        sqlx::query(
            "INSERT INTO otp_codes (user_id, purpose, phone_number, channel, code_hash, \
             attempts, expires_at, \
             used_at, message_id, created_at) VALUES ($1, $2, $3, $4, $5, 0, $6, NULL, $7, $8) \
             ON CONFLICT (user_id, purpose) DO UPDATE SET phone_number = excluded.phone_number, \
             channel = excluded.channel, code_hash = excluded.code_hash, attempts = 0, \
             expires_at = excluded.expires_at, used_at = NULL, message_id = excluded.message_id, \
             created_at = excluded.created_at",
        )
        .bind(&issue.user_id)
        .bind(&issue.purpose)
        .bind(&issue.phone_number)
        .bind(issue.channel.as_str())
        .bind(&issue.code_hash)
        .bind(issue.expires_at)
        .bind(&message.id)
        .bind(issue.now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(OtpIssueOutcome::Issued(Box::new(message)))
    }

    async fn get_otp(&self, user_id: &str, purpose: &str) -> AppResult<Option<OtpRecord>> {
        Ok(sqlx::query_as::<Db, OtpRecord>(
            "SELECT user_id, purpose, phone_number, channel, code_hash, attempts, expires_at, \
             used_at, created_at \
             FROM otp_codes WHERE user_id = $1 AND purpose = $2",
        )
        .bind(user_id)
        .bind(purpose)
        .fetch_optional(&self.pool)
        .await?)
    }

    async fn consume_otp(
        &self,
        user_id: &str,
        purpose: &str,
        code_hash: &str,
        max_attempts: i64,
        now: DateTime<Utc>,
    ) -> AppResult<bool> {
        let done = sqlx::query(
            "UPDATE otp_codes SET used_at = $4 WHERE user_id = $1 AND purpose = $2 AND \
             code_hash = $3 \
             AND used_at IS NULL AND expires_at > $4 AND attempts < $5",
        )
        .bind(user_id)
        .bind(purpose)
        .bind(code_hash)
        .bind(now)
        .bind(max_attempts)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn record_otp_failure(
        &self,
        user_id: &str,
        purpose: &str,
        code_hash: &str,
    ) -> AppResult<Option<i64>> {
        Ok(sqlx::query_scalar(
            "UPDATE otp_codes SET attempts = attempts + 1 WHERE user_id = $1 AND purpose = $2 \
             AND code_hash = $3 AND used_at IS NULL RETURNING attempts",
        )
        .bind(user_id)
        .bind(purpose)
        .bind(code_hash)
        .fetch_optional(&self.pool)
        .await?)
    }

    async fn cleanup_otps(&self, now: DateTime<Utc>) -> AppResult<OtpCleanup> {
        let used_deleted = sqlx::query("DELETE FROM otp_codes WHERE used_at IS NOT NULL")
            .execute(&self.pool)
            .await?
            .rows_affected();
        let expired_deleted = sqlx::query("DELETE FROM otp_codes WHERE expires_at <= $1")
            .bind(now)
            .execute(&self.pool)
            .await?
            .rows_affected();
        let send_log_pruned = sqlx::query("DELETE FROM otp_send_log WHERE created_at <= $1")
            .bind(now - chrono::Duration::hours(1))
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(OtpCleanup {
            expired_deleted,
            used_deleted,
            send_log_pruned,
        })
    }
}

/// Seconds until the send limits allow another OTP, or `None` when this one may go.
/// `log_id` is this request's own (already inserted) send-log row, excluded from the counts.
pub(super) async fn otp_retry_after(
    tx: &mut sqlx::Transaction<'_, Db>,
    issue: &OtpIssue,
    log_id: i64,
) -> AppResult<Option<i64>> {
    let now = issue.now;
    // The cooldown, per number.
    let last: Option<DateTime<Utc>> = sqlx::query_scalar(
        "SELECT created_at FROM otp_send_log WHERE phone_number = $1 AND id <> $2 \
         ORDER BY created_at DESC LIMIT 1",
    )
    .bind(&issue.phone_number)
    .bind(log_id)
    .fetch_optional(&mut **tx)
    .await?;
    let mut wait = 0i64;
    if let Some(last) = last {
        let ready = last + chrono::Duration::seconds(issue.cooldown_seconds);
        if ready > now {
            wait = wait.max((ready - now).num_seconds().max(1));
        }
    }
    // The hourly limits, per number, per user and per client IP. When over, the wait is until
    // enough of the window's sends have aged out.
    let window_start = now - chrono::Duration::hours(1);
    let limits: [(&str, Option<&str>); 3] = [
        ("phone_number", Some(issue.phone_number.as_str())),
        ("user_id", Some(issue.user_id.as_str())),
        ("ip", issue.ip.as_deref()),
    ];
    for (column, value) in limits {
        let Some(value) = value else { continue };
        let sql = format!(
            "SELECT created_at FROM otp_send_log WHERE {column} = $1 AND id <> $2 AND \
             created_at > $3 \
             ORDER BY created_at LIMIT 1 OFFSET $4"
        );
        // With `max` sends already in the window, the (count - max + 1)-th oldest must age out.
        let count: i64 = sqlx::query_scalar(&format!(
            "SELECT COUNT(*) FROM otp_send_log WHERE {column} = $1 AND id <> $2 AND created_at > $3"
        ))
        .bind(value)
        .bind(log_id)
        .bind(window_start)
        .fetch_one(&mut **tx)
        .await?;
        if count >= issue.max_sends_per_hour {
            let oldest_blocking: Option<DateTime<Utc>> = sqlx::query_scalar(&sql)
                .bind(value)
                .bind(log_id)
                .bind(window_start)
                .bind(count - issue.max_sends_per_hour)
                .fetch_optional(&mut **tx)
                .await?;
            let until = oldest_blocking
                .map(|t| t + chrono::Duration::hours(1))
                .unwrap_or(now);
            wait = wait.max((until - now).num_seconds().max(1));
        }
    }
    Ok((wait > 0).then_some(wait))
}
