// `ScheduleStore` for both backends: included by `sqlite.rs` and `postgres.rs` inside a module that
// has `Db`, `ThisStore`, `LOCK_FOR_UPDATE` and `SKIP_LOCKED` in scope (see `store/mod.rs`).

use async_trait::async_trait;
#[allow(unused_imports)]
use chrono::{DateTime, Utc};

use super::messages::{insert_event, insert_message_row, release_reminder};
use super::*;
use crate::error::AppResult;
#[allow(unused_imports)]
use crate::store::*;

#[async_trait]
impl ScheduleStore for ThisStore {
    async fn upsert_scheduled(
        &self,
        kind: SubjectType,
        item: &ScheduledItem,
        now: DateTime<Utc>,
    ) -> AppResult<ScheduledItem> {
        let (table, column) = kind.table();
        // The notice (how long before its time it was booked) is kept while the time, the
        // patient and the status stay as they were: a repeated PUT is not a new booking.
        sqlx::query(&format!(
            "INSERT INTO {table} (id, user_id, {column}, time_zone, status, notice_seconds, \
             created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $7) \
             ON CONFLICT (id) DO UPDATE SET user_id = excluded.user_id, \
             {column} = excluded.{column}, time_zone = excluded.time_zone, \
             status = excluded.status, notice_seconds = CASE \
             WHEN {table}.{column} = excluded.{column} AND {table}.user_id = excluded.user_id \
             AND {table}.status = excluded.status THEN {table}.notice_seconds \
             ELSE excluded.notice_seconds END, updated_at = excluded.updated_at"
        ))
        .bind(&item.id)
        .bind(&item.user_id)
        .bind(item.scheduled_at)
        .bind(&item.time_zone)
        .bind(item.status)
        .bind((item.scheduled_at - now).num_seconds())
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(item.clone())
    }

    async fn get_scheduled(&self, kind: SubjectType, id: &str) -> AppResult<Option<ScheduledItem>> {
        let (table, column) = kind.table();
        Ok(sqlx::query_as::<Db, ScheduledItem>(&format!(
            "SELECT id, user_id, {column} AS scheduled_at, time_zone, status FROM {table} WHERE \
             id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?)
    }

    async fn cancel_scheduled(
        &self,
        kind: SubjectType,
        id: &str,
        now: DateTime<Utc>,
    ) -> AppResult<Option<u64>> {
        let (table, _) = kind.table();
        let mut tx = self.pool.begin().await?;
        let found = sqlx::query(&format!(
            "UPDATE {table} SET status = 'cancelled', updated_at = $2 WHERE id = $1"
        ))
        .bind(id)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !found {
            tx.rollback().await?;
            return Ok(None);
        }
        let reason = kind.cancelled_reason();
        // Not yet sent: queued (a dispatcher holding one finds it skipped and leaves it).
        let skipped: Vec<String> = sqlx::query_scalar(
            "UPDATE messages SET status = 'skipped', reason = $3, updated_at = $4 \
             WHERE status = 'queued' AND id IN \
             (SELECT message_id FROM reminder_log WHERE subject_type = $1 AND subject_id = $2) \
             RETURNING id",
        )
        .bind(kind.as_str())
        .bind(id)
        .bind(reason)
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        for message_id in &skipped {
            release_reminder(&mut tx, message_id).await?;
            insert_event(
                &mut tx,
                message_id,
                MessageStatus::Skipped,
                None,
                Some(reason.as_str()),
                now,
            )
            .await?;
        }
        tx.commit().await?;
        Ok(Some(skipped.len() as u64))
    }

    async fn due_without_reminder(
        &self,
        kind: SubjectType,
        reminder: &str,
        due: &DueFilter<'_>,
        limit: i64,
    ) -> AppResult<Vec<ScheduledItem>> {
        let (table, column) = kind.table();
        // No minimum notice: any. No other reminder to keep apart from: a kind none has.
        let (apart_kind, apart_since) = due.apart_from.unwrap_or(("", due.from));
        Ok(sqlx::query_as::<Db, ScheduledItem>(&format!(
            "SELECT t.id, t.user_id, t.{column} AS scheduled_at, t.time_zone, t.status \
             FROM {table} t \
             WHERE t.status = 'scheduled' AND t.{column} >= $1 AND t.{column} <= $2 \
             AND t.notice_seconds >= $6 \
             AND NOT EXISTS (SELECT 1 FROM reminder_log r WHERE r.subject_type = $3 \
             AND r.subject_id = t.id AND r.kind = $4 AND r.starts_at = t.{column} \
             AND r.user_id = t.user_id AND r.active) \
             AND NOT EXISTS (SELECT 1 FROM reminder_log o JOIN messages m ON m.id = o.message_id \
             WHERE o.subject_type = $3 AND o.subject_id = t.id AND o.kind = $7 \
             AND o.starts_at = t.{column} AND o.user_id = t.user_id AND o.active \
             AND (m.status IN ('queued', 'sending') OR m.attempt_started_at > $8)) \
             ORDER BY t.{column} LIMIT $5"
        ))
        .bind(due.from)
        .bind(due.to)
        .bind(kind.as_str())
        .bind(reminder)
        .bind(limit)
        .bind(due.min_notice_seconds.unwrap_or(i64::MIN))
        .bind(apart_kind)
        .bind(apart_since)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn queue_reminder(
        &self,
        kind: SubjectType,
        item: &ScheduledItem,
        reminder: &str,
        message: &NewMessage,
    ) -> AppResult<bool> {
        let mut tx = self.pool.begin().await?;
        if insert_message_row(&mut tx, message).await?.is_none() {
            tx.rollback().await?;
            return Ok(false);
        }
        // At most one pending or delivered reminder per (item, kind, time, patient): the partial
        // unique index (`WHERE active`) refuses a second one, also from another instance.
        let logged = sqlx::query(
            "INSERT INTO reminder_log (subject_type, subject_id, kind, starts_at, user_id, \
             active, message_id, created_at) VALUES ($1, $2, $3, $4, $5, TRUE, $6, $7) \
             ON CONFLICT (subject_type, subject_id, kind, starts_at, user_id) WHERE active \
             DO NOTHING",
        )
        .bind(kind.as_str())
        .bind(&item.id)
        .bind(reminder)
        .bind(item.scheduled_at)
        .bind(&item.user_id)
        .bind(&message.id)
        .bind(message.created_at)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !logged {
            tx.rollback().await?;
            return Ok(false);
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn reminder_subject(
        &self,
        message_id: &str,
    ) -> AppResult<Option<(SubjectType, String, DateTime<Utc>)>> {
        let row: Option<(String, String, DateTime<Utc>)> = sqlx::query_as(
            "SELECT subject_type, subject_id, starts_at FROM reminder_log WHERE message_id = $1",
        )
        .bind(message_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.and_then(|(kind, id, at)| Some((SubjectType::parse(&kind)?, id, at))))
    }
}
