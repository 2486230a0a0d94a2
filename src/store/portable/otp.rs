// `OtpStore` for both backends: included by `sqlite.rs` and `postgres.rs` inside a module that
// has `Db`, `ThisStore`, `LOCK_FOR_UPDATE` and `SKIP_LOCKED` in scope (see `store/mod.rs`).

use async_trait::async_trait;
#[allow(unused_imports)]
use chrono::{DateTime, Utc};

use super::messages::{accepted_events, marked_sending};
use super::*;
use crate::error::AppResult;
#[allow(unused_imports)]
use crate::store::*;

#[async_trait]
impl OtpStore for ThisStore {
    async fn otp_refusal(&self, limits: &OtpLimits<'_>) -> AppResult<Option<LimitRefusal>> {
        match self.readers() {
            Some(readers) => readers.otp_refusal(&self.vault, limits),
            None => Ok(None),
        }
    }

    fn checks_number_on_file(&self) -> bool {
        self.functions().is_some()
    }

    async fn log_refused_otp(&self, limits: &OtpLimits<'_>) -> AppResult<Option<LimitRefusal>> {
        // As `issue_otp` does: under the same locks (PostgreSQL: the advisory locks the OTP
        // batches take; SQLite: the write lock the first insert takes), log first, then read
        // the counts leaving that row out, so simultaneous refusals cannot slip past a limit.
        let mut tx = self.pool.begin().await?;
        let send = SendLogged {
            phone_number: limits.phone_number,
            destination: None,
            user_id: limits.user_id,
            ip: limits.ip,
            now: limits.now,
        };
        let (phone_index, log_id) = send.lock_and_log(&mut tx, &self.vault).await?;
        let (window_start, per_number, per_address) = limits.window();
        let row: ChecksRow = sqlx::query_as(OTP_CHECKS)
            .bind(&phone_index)
            .bind(limits.user_id)
            .bind(limits.ip)
            .bind(window_start)
            .bind(per_number)
            .bind(per_address)
            .bind(log_id)
            .bind(limits.channel.as_str())
            .bind(&phone_index)
            .bind(None::<String>)
            .fetch_one(&mut *tx)
            .await?;
        if let Some(refusal) = limits.refusal(&checks_from_row(row)) {
            tx.rollback().await?;
            return Ok(Some(refusal));
        }
        tx.commit().await?;
        Ok(None)
    }

    async fn issue_otp(&self, issue: &OtpIssue) -> AppResult<OtpIssueOutcome> {
        if let Some(functions) = self.functions() {
            return functions.issue_otp(&self.vault, issue).await;
        }
        if issue.unless_on_file {
            // A code must never go to the number named past a number on file unchecked.
            return Err(anyhow::anyhow!("this store does not check the number on file").into());
        }
        if let Some(writer) = self.writer() {
            return writer.issue_otp(&self.vault, issue).await;
        }
        let mut tx = self.pool.begin().await?;
        let send_to_index = self.vault.blind(&issue.send_to);
        let send = SendLogged {
            phone_number: &issue.phone_number,
            destination: issue.checked_destination(&send_to_index),
            user_id: &issue.user_id,
            ip: issue.ip.as_deref(),
            now: issue.now,
        };
        // Log this send first: on SQLite the write takes the database's write lock, serialising
        // concurrent requests before they read the counts.
        let (phone_index, log_id) = send.lock_and_log(&mut tx, &self.vault).await?;
        let checks = otp_checks(&mut tx, issue, &phone_index, &send_to_index, log_id).await?;
        if let Some(refusal) = issue.refusal(&checks) {
            tx.rollback().await?;
            return Ok(OtpIssueOutcome::RateLimited(refusal));
        }
        if let Some(named) = issue.opted_out(&checks) {
            tx.commit().await?;
            return Ok(OtpIssueOutcome::OptedOut { named });
        }
        let dropped = issue.destination_limited(&checks);
        let (attempt, message) = issue.written(dropped);
        // Logged without its destination (the checks above must not count it there); a code
        // that goes out is counted against the number it goes to.
        let destination = issue.logged_destination(&send_to_index, attempt.is_some());
        if destination.send_to_index.is_some() || destination.went_to_named {
            sqlx::query(
                "UPDATE otp_send_log SET send_to_index = $1, went_to_named = $2 WHERE id = $3",
            )
            .bind(destination.send_to_index)
            .bind(destination.went_to_named)
            .bind(log_id)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(INSERT_OTP_MESSAGE)
            .bind(&message.id)
            .bind(&message.user_id)
            .bind(&message.template_name)
            .bind(self.vault.seal(&message.variables))
            .bind(&message.channel)
            .bind(message.created_at)
            .bind(message.lease_until)
            .bind(message.attempt_started_at)
            .bind(attempt.map(|a| self.vault.seal(&a.to_number)))
            .bind(attempt.map(|a| self.vault.blind(&a.to_number)))
            .bind(&message.encoding)
            .bind(message.segments)
            .bind(self.vault.seal_opt(message.attempt_body.as_deref()))
            .bind(message.status)
            .bind(&message.provider_sid)
            .execute(&mut *tx)
            .await?;
        if let Some(attempt) = attempt {
            marked_sending(&mut tx, &message.id, attempt, message.created_at).await?;
            if let Some(accepted) = issue.accepted_send() {
                accepted_events(&mut tx, &message.id, accepted, message.created_at).await?;
            }
        }
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
        .bind(self.vault.seal(&issue.send_to))
        .bind(issue.channel.as_str())
        .bind(&issue.code_hash)
        .bind(issue.expires_at)
        .bind(&message.id)
        .bind(issue.now)
        .execute(&mut *tx)
        .await?;
        // A new code starts a new count of wrong tries.
        sqlx::query("DELETE FROM otp_failures WHERE user_id = $1 AND purpose = $2")
            .bind(&issue.user_id)
            .bind(&issue.purpose)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(OtpIssueOutcome::written(message, dropped))
    }

    async fn get_otp(&self, user_id: &str, purpose: &str) -> AppResult<Option<OtpRecord>> {
        let record = sqlx::query_as::<Db, OtpRecord>(
            "SELECT user_id, purpose, phone_number, channel, code_hash, attempts, expires_at, \
             used_at, created_at \
             FROM otp_codes WHERE user_id = $1 AND purpose = $2",
        )
        .bind(user_id)
        .bind(purpose)
        .fetch_optional(&self.pool)
        .await?;
        record
            .map(|mut r| {
                r.phone_number = self.vault.open(&r.phone_number)?;
                Ok(r)
            })
            .transpose()
    }

    async fn consume_otp(
        &self,
        user_id: &str,
        purpose: &str,
        code_hash: &str,
        max_attempts: i64,
        now: DateTime<Utc>,
    ) -> AppResult<bool> {
        if let Some(writer) = self.writer() {
            return writer
                .consume_otp(user_id, purpose, code_hash, max_attempts, now)
                .await;
        }
        let done = sqlx::query(CONSUME_OTP)
            .bind(user_id)
            .bind(purpose)
            .bind(code_hash)
            .bind(now)
            .bind(max_attempts)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn consume_verification_otp(
        &self,
        user_id: &str,
        code_hash: &str,
        max_attempts: i64,
        now: DateTime<Utc>,
        number: &str,
    ) -> AppResult<VerificationUse> {
        // Not through SQLite's writer thread: the consent edit is the portable one (its audit
        // rows and sealing). The write lock is taken at `BEGIN`, as the writer would hold it.
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
        let used = sqlx::query(CONSUME_OTP)
            .bind(user_id)
            .bind(crate::store::VERIFICATION_PURPOSE)
            .bind(code_hash)
            .bind(now)
            .bind(max_attempts)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            == 1;
        if !used {
            tx.rollback().await?;
            return Ok(VerificationUse::Refused);
        }
        let ctx = ChangeContext {
            source: ConsentSource::Otp,
            ip: None,
            user_agent: None,
            at: now,
        };
        let verify = |current: &Consent| {
            let mut next = current.clone();
            if current.phone_number.as_deref() == Some(number) {
                next.phone_verified_at = Some(now);
            }
            Ok(next)
        };
        let edited =
            super::consent::edit_consent_in(&mut tx, &self.vault, user_id, &verify, &ctx, false)
                .await?;
        tx.commit().await?;
        let number_verified = edited.is_some_and(|c| {
            c.phone_number.as_deref() == Some(number) && c.phone_verified_at == Some(now)
        });
        Ok(VerificationUse::Used { number_verified })
    }

    async fn otp_failures(
        &self,
        user_id: &str,
        purpose: &str,
        now: DateTime<Utc>,
    ) -> AppResult<i64> {
        let failures: Option<i64> = sqlx::query_scalar(
            "SELECT failures FROM otp_failures WHERE user_id = $1 AND purpose = $2 \
             AND window_ends_at > $3",
        )
        .bind(user_id)
        .bind(purpose)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        Ok(failures.unwrap_or(0))
    }

    async fn record_otp_failure(
        &self,
        user_id: &str,
        purpose: &str,
        now: DateTime<Utc>,
        window_ends_at: DateTime<Utc>,
    ) -> AppResult<i64> {
        if let Some(writer) = self.writer() {
            return writer
                .record_otp_failure(user_id, purpose, now, window_ends_at)
                .await;
        }
        Ok(sqlx::query_scalar(RECORD_OTP_FAILURE)
            .bind(user_id)
            .bind(purpose)
            .bind(now)
            .bind(window_ends_at)
            .fetch_one(&self.pool)
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
        let failures_pruned = sqlx::query("DELETE FROM otp_failures WHERE window_ends_at <= $1")
            .bind(now)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(OtpCleanup {
            failures_pruned,
            expired_deleted,
            used_deleted,
            send_log_pruned,
        })
    }
}

/// A send about to be counted in the send log (an issue, or a refusal counted as one).
struct SendLogged<'a> {
    phone_number: &'a str,
    /// The blind index of the number on file the code goes to in place of the number named
    /// (`OtpIssue::checked_destination`): its lock is taken too.
    destination: Option<&'a str>,
    user_id: &'a str,
    ip: Option<&'a str>,
    now: DateTime<Utc>,
}

impl SendLogged<'_> {
    /// Take the locks of its number, the number its code goes to, its user and its address
    /// (PostgreSQL: the advisory locks the OTP batches take; SQLite: the first insert takes the
    /// write lock) and log it; its number's blind index and its log row's id, which the checks
    /// leave out.
    async fn lock_and_log(
        &self,
        tx: &mut sqlx::Transaction<'_, Db>,
        vault: &crate::vault::Vault,
    ) -> AppResult<(String, i64)> {
        let phone_index = vault.blind(self.phone_number);
        let mut keys = vec![
            format!("otp:phone:{phone_index}"),
            format!("otp:user:{}", self.user_id),
        ];
        if let Some(destination) = self.destination {
            keys.push(format!("otp:phone:{destination}"));
        }
        if let Some(ip) = self.ip {
            keys.push(format!("otp:ip:{ip}"));
        }
        ThisStore::lock_keys(tx, &mut keys).await?;
        let log_id: i64 = sqlx::query_scalar(
            "INSERT INTO otp_send_log (phone_number, user_id, ip, created_at, phone_index) \
             VALUES ($1, $2, $3, $4, $5) RETURNING id",
        )
        .bind(vault.seal(self.phone_number))
        .bind(self.user_id)
        .bind(self.ip)
        .bind(self.now)
        .bind(&phone_index)
        .fetch_one(&mut **tx)
        .await?;
        Ok((phone_index, log_id))
    }
}

/// `OTP_CHECKS` for this issue (its code going to the number with blind index `send_to_index`),
/// leaving out its own send-log row (`log_id`).
async fn otp_checks(
    tx: &mut sqlx::Transaction<'_, Db>,
    issue: &OtpIssue,
    phone_index: &str,
    send_to_index: &str,
    log_id: i64,
) -> AppResult<OtpChecks> {
    let (window_start, per_number, per_address) = issue.window();
    let row: ChecksRow = sqlx::query_as(OTP_CHECKS)
        .bind(phone_index)
        .bind(&issue.user_id)
        .bind(&issue.ip)
        .bind(window_start)
        .bind(per_number)
        .bind(per_address)
        .bind(log_id)
        .bind(issue.channel.as_str())
        .bind(send_to_index)
        .bind(issue.checked_destination(send_to_index))
        .fetch_one(&mut **tx)
        .await?;
    Ok(checks_from_row(row))
}

/// A row of `OTP_CHECKS`, as it comes back.
type ChecksRow = (
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
    i64,
    i64,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
);

fn checks_from_row(row: ChecksRow) -> OtpChecks {
    OtpChecks {
        last_send: row.0,
        number_full: row.1,
        user_full: row.2,
        address_full: row.3,
        named_opted_out: row.4 > 0,
        send_to_opted_out: row.5 > 0,
        destination_last_send: row.6,
        destination_full: row.7,
    }
}
