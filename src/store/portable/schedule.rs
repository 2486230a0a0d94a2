// `ScheduleStore` for both backends: included by `sqlite.rs` and `postgres.rs` inside a module that
// has `Db`, `ThisStore`, `LOCK_FOR_UPDATE` and `SKIP_LOCKED` in scope (see `store/mod.rs`).

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
#[allow(unused_imports)]
use chrono::{DateTime, Utc};
use sqlx::query_builder::{QueryBuilder, Separated};

use super::messages::{insert_event, release_reminder};
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
        sqlx::query(&format!(
            "INSERT INTO {table} (id, user_id, {column}, time_zone, status, notice_seconds, \
             created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $7) \
             ON CONFLICT (id) DO UPDATE SET {}",
            scheduled_update_sql(table, column)
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
        let zone = kind.zone_column();
        // A subscription without that date (no renewal planned) is not that subject any more.
        Ok(sqlx::query_as::<Db, ScheduledItem>(&format!(
            "SELECT t.id, t.user_id, t.{column} AS scheduled_at, {zone} AS time_zone, t.status \
             FROM {table} t WHERE t.id = $1 AND t.{column} IS NOT NULL"
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
        let skipped =
            skip_queued_reminders(&mut tx, kind, id, kind.cancelled_reason(), now).await?;
        tx.commit().await?;
        Ok(Some(skipped))
    }

    async fn due_without_reminder(
        &self,
        kind: SubjectType,
        reminder: &str,
        due: &DueFilter<'_>,
        after: Option<&SweepCursor>,
        limit: i64,
    ) -> AppResult<DuePage> {
        // The first page starts at (from, ''): every id sorts after the empty one.
        let (after_at, after_id) = after.map_or((due.from, ""), |c| (c.at, c.id.as_str()));
        // No other reminder to keep apart from: a kind none has.
        let (apart_kind, apart_since) = due.apart_from.unwrap_or(("", due.from));
        let rows: Vec<WindowRow> = sqlx::query_as::<Db, WindowRow>(&sweep_sql(kind))
            .bind(due.from)
            .bind(due.to)
            .bind(kind.as_str())
            .bind(reminder)
            .bind(after_at)
            .bind(after_id)
            .bind(limit)
            .bind(apart_kind)
            .bind(apart_since)
            .fetch_all(&self.pool)
            .await?;
        let next = match rows.last() {
            Some(last) if rows.len() as i64 >= limit => Some(SweepCursor {
                at: last.item.scheduled_at,
                id: last.item.id.clone(),
            }),
            _ => None,
        };
        let due = rows
            .into_iter()
            .filter(|row| row.is_due(due.min_notice_seconds))
            .map(|row| row.item)
            .collect();
        Ok(DuePage { due, next })
    }

    async fn queue_reminders(
        &self,
        kind: SubjectType,
        reminder: &str,
        planned: &[(ScheduledItem, NewMessage)],
    ) -> AppResult<usize> {
        let mut tx = self.pool.begin().await?;
        let mut queued = 0;
        for chunk in planned.chunks(CHUNK) {
            // Reminders carry no idempotency key and are never written claimed: plain `queued`
            // rows (see `insert_message_row`).
            let mut messages = QueryBuilder::<Db>::new(
                "INSERT INTO messages (id, user_id, template_name, variables, channel, status, \
                 attempts, next_attempt_at, created_at, updated_at) ",
            );
            messages.push_values(chunk, |mut row, (_, m)| {
                row.push_bind(&m.id)
                    .push_bind(&m.user_id)
                    .push_bind(&m.template_name)
                    .push_bind(self.vault.seal(&m.variables))
                    .push_bind(m.channel.as_str())
                    .push_bind(MessageStatus::Queued)
                    .push_bind(0_i64)
                    .push_bind(m.created_at)
                    .push_bind(m.created_at)
                    .push_bind(m.created_at);
            });
            messages.build().execute(&mut *tx).await?;
            // At most one pending or delivered reminder per (item, kind, time, patient): the
            // partial unique index (`WHERE active`) refuses a second one, also from another
            // instance (whose insert waits for ours to commit, then does nothing).
            let mut log = QueryBuilder::<Db>::new(
                "INSERT INTO reminder_log (subject_type, subject_id, kind, starts_at, user_id, \
                 active, message_id, created_at) ",
            );
            log.push_values(chunk, |mut row, (item, m)| {
                row.push_bind(kind.as_str())
                    .push_bind(&item.id)
                    .push_bind(reminder)
                    .push_bind(item.scheduled_at)
                    .push_bind(&item.user_id)
                    .push_bind(true)
                    .push_bind(&m.id)
                    .push_bind(m.created_at);
            });
            log.push(
                " ON CONFLICT (subject_type, subject_id, kind, starts_at, user_id) WHERE active \
                 DO NOTHING RETURNING message_id",
            );
            let logged: Vec<String> = log.build_query_scalar().fetch_all(&mut *tx).await?;
            if logged.len() < chunk.len() {
                // Already queued: its message goes too, so nothing is written for it.
                let logged: HashSet<&str> = logged.iter().map(String::as_str).collect();
                let mut orphans = QueryBuilder::<Db>::new("DELETE FROM messages WHERE id IN (");
                let mut ids = orphans.separated(", ");
                for (_, m) in chunk
                    .iter()
                    .filter(|(_, m)| !logged.contains(m.id.as_str()))
                {
                    ids.push_bind(&m.id);
                }
                ids.push_unseparated(")");
                orphans.build().execute(&mut *tx).await?;
            }
            queued += logged.len();
        }
        tx.commit().await?;
        Ok(queued)
    }

    async fn upsert_scheduled_many(
        &self,
        kind: SubjectType,
        items: &[ScheduledItem],
        now: DateTime<Utc>,
    ) -> AppResult<Vec<Upserted>> {
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
        let outcomes = upsert_many(&mut tx, kind, items, now).await?;
        tx.commit().await?;
        Ok(outcomes)
    }

    async fn upsert_subscriptions(
        &self,
        items: &[Subscription],
        now: DateTime<Utc>,
    ) -> AppResult<Vec<Upserted>> {
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
        let outcomes = upsert_many(&mut tx, SubjectType::SubscriptionExpiry, items, now).await?;
        tx.commit().await?;
        Ok(outcomes)
    }

    async fn get_subscription(&self, id: &str) -> AppResult<Option<Subscription>> {
        Ok(sqlx::query_as::<Db, Subscription>(&format!(
            "SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?)
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

/// A row of a sweep's window, and what else decides whether its reminder is due.
#[derive(sqlx::FromRow)]
struct WindowRow {
    #[sqlx(flatten)]
    item: ScheduledItem,
    /// It already has this reminder for its time.
    reminded: bool,
    /// Its other reminder is pending or went too recently ([`DueFilter::apart_from`]).
    too_close: bool,
    /// How long before its time it was booked; `None` for subscriptions.
    notice_seconds: Option<i64>,
}

impl WindowRow {
    fn is_due(&self, min_notice_seconds: Option<i64>) -> bool {
        let booked_in_time = match (min_notice_seconds, self.notice_seconds) {
            (Some(min), Some(notice)) => notice >= min,
            _ => true,
        };
        !self.reminded && !self.too_close && booked_in_time
    }
}

/// Rows per multi-row statement: well under SQLite's 32,766 bound parameters.
const CHUNK: usize = 500;

/// The `SET` list of an appointment's or follow-up's upsert. The notice (how long before its
/// time it was booked) is kept while the time, the patient and the status stay as they were: a
/// repeated PUT or import is not a new booking.
fn scheduled_update_sql(table: &str, column: &str) -> String {
    format!(
        "user_id = excluded.user_id, {column} = excluded.{column}, \
         time_zone = excluded.time_zone, status = excluded.status, notice_seconds = CASE \
         WHEN {table}.{column} = excluded.{column} AND {table}.user_id = excluded.user_id \
         AND {table}.status = excluded.status THEN {table}.notice_seconds \
         ELSE excluded.notice_seconds END, updated_at = excluded.updated_at"
    )
}

pub(super) const SUBSCRIPTION_COLUMNS: &str = "id, user_id, plan, renews_at, expires_at, status";

/// Skip the item's reminders not yet sent (queued; a dispatcher holding one finds it skipped and
/// leaves it), with `reason`; every subject in the item's table counts (a subscription's expiry
/// and renewal). How many were skipped.
async fn skip_queued_reminders(
    tx: &mut sqlx::Transaction<'_, Db>,
    kind: SubjectType,
    id: &str,
    reason: SkipReason,
    now: DateTime<Utc>,
) -> AppResult<u64> {
    let subjects = kind.same_table_sql();
    let skipped: Vec<String> = sqlx::query_scalar(&format!(
        "UPDATE messages SET status = 'skipped', reason = $2, updated_at = $3 \
         WHERE status = 'queued' AND id IN \
         (SELECT message_id FROM reminder_log WHERE subject_type IN {subjects} \
         AND subject_id = $1) RETURNING id"
    ))
    .bind(id)
    .bind(reason)
    .bind(now)
    .fetch_all(&mut **tx)
    .await?;
    for message_id in &skipped {
        release_reminder(tx, message_id).await?;
        insert_event(
            tx,
            message_id,
            MessageStatus::Skipped,
            None,
            Some(reason.as_str()),
            now,
        )
        .await?;
    }
    Ok(skipped.len() as u64)
}

/// An item the host app pushes, as [`upsert_many`] writes it.
trait Pushed:
    Clone + PartialEq + Send + Sync + Unpin + for<'r> sqlx::FromRow<'r, <Db as sqlx::Database>::Row>
{
    /// `SELECT` of the stored rows (aliased `t`), up to `WHERE`.
    fn select(kind: SubjectType) -> String;
    /// `INSERT INTO table (columns) `, each row bound by [`Pushed::bind`].
    fn insert(kind: SubjectType) -> String;
    /// `ON CONFLICT (id) DO UPDATE SET` every column but `created_at`.
    fn update(kind: SubjectType) -> String;
    fn bind<'a>(&'a self, row: Separated<'_, 'a, Db, &'static str>, now: &'a DateTime<Utc>);
    fn id(&self) -> &str;
    fn status(&self) -> ItemStatus;
}

impl Pushed for ScheduledItem {
    fn select(kind: SubjectType) -> String {
        let (table, column) = kind.table();
        let zone = kind.zone_column();
        format!(
            "SELECT t.id, t.user_id, t.{column} AS scheduled_at, {zone} AS time_zone, t.status \
             FROM {table} t WHERE "
        )
    }
    fn insert(kind: SubjectType) -> String {
        let (table, column) = kind.table();
        format!(
            "INSERT INTO {table} (id, user_id, {column}, time_zone, status, notice_seconds, \
             created_at, updated_at) "
        )
    }
    fn update(kind: SubjectType) -> String {
        let (table, column) = kind.table();
        format!(
            " ON CONFLICT (id) DO UPDATE SET {}",
            scheduled_update_sql(table, column)
        )
    }
    fn bind<'a>(&'a self, mut row: Separated<'_, 'a, Db, &'static str>, now: &'a DateTime<Utc>) {
        row.push_bind(&self.id)
            .push_bind(&self.user_id)
            .push_bind(self.scheduled_at)
            .push_bind(&self.time_zone)
            .push_bind(self.status)
            .push_bind((self.scheduled_at - *now).num_seconds())
            .push_bind(now)
            .push_bind(now);
    }
    fn id(&self) -> &str {
        &self.id
    }
    fn status(&self) -> ItemStatus {
        self.status
    }
}

impl Pushed for Subscription {
    fn select(_: SubjectType) -> String {
        format!("SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions t WHERE ")
    }
    fn insert(_: SubjectType) -> String {
        "INSERT INTO subscriptions (id, user_id, plan, renews_at, expires_at, status, \
         created_at, updated_at) "
            .to_string()
    }
    fn update(_: SubjectType) -> String {
        " ON CONFLICT (id) DO UPDATE SET user_id = excluded.user_id, plan = excluded.plan, \
         renews_at = excluded.renews_at, expires_at = excluded.expires_at, \
         status = excluded.status, updated_at = excluded.updated_at"
            .to_string()
    }
    fn bind<'a>(&'a self, mut row: Separated<'_, 'a, Db, &'static str>, now: &'a DateTime<Utc>) {
        row.push_bind(&self.id)
            .push_bind(&self.user_id)
            .push_bind(&self.plan)
            .push_bind(self.renews_at)
            .push_bind(self.expires_at)
            .push_bind(self.status)
            .push_bind(now)
            .push_bind(now);
    }
    fn id(&self) -> &str {
        &self.id
    }
    fn status(&self) -> ItemStatus {
        self.status
    }
}

/// Write `items` in `tx`, a chunk at a time: read the stored rows (locked), leave the ones
/// stored exactly so, upsert the others in one statement (the last version of an id pushed
/// twice), and skip the reminders not yet sent of those written with a status that is not on.
async fn upsert_many<T: Pushed>(
    tx: &mut sqlx::Transaction<'_, Db>,
    kind: SubjectType,
    items: &[T],
    now: DateTime<Utc>,
) -> AppResult<Vec<Upserted>> {
    let mut outcomes = Vec::with_capacity(items.len());
    // What each id holds now, as far as this import has seen or written it.
    let mut current: HashMap<String, T> = HashMap::new();
    for chunk in items.chunks(CHUNK) {
        let mut select = QueryBuilder::<Db>::new(T::select(kind));
        select.push("t.id IN (");
        let mut ids = select.separated(", ");
        for item in chunk {
            ids.push_bind(item.id());
        }
        ids.push_unseparated(")");
        select.push(LOCK_FOR_UPDATE);
        let stored: Vec<T> = select.build_query_as().fetch_all(&mut **tx).await?;
        for row in stored {
            current.entry(row.id().to_string()).or_insert(row);
        }
        // Positions in `writes` by id: an id pushed twice is written once, as its last version.
        let mut writes: Vec<&T> = Vec::new();
        let mut position: HashMap<&str, usize> = HashMap::new();
        for item in chunk {
            let outcome = match current.get(item.id()) {
                None => Upserted::Created,
                Some(stored) if stored == item => Upserted::Unchanged,
                Some(_) => Upserted::Updated,
            };
            outcomes.push(outcome);
            if outcome == Upserted::Unchanged {
                continue;
            }
            current.insert(item.id().to_string(), item.clone());
            match position.get(item.id()) {
                Some(&i) => writes[i] = item,
                None => {
                    position.insert(item.id(), writes.len());
                    writes.push(item);
                }
            }
        }
        if writes.is_empty() {
            continue;
        }
        let mut upsert = QueryBuilder::<Db>::new(T::insert(kind));
        upsert.push_values(writes.iter().copied(), |row, item| item.bind(row, &now));
        upsert.push(T::update(kind));
        upsert.build().execute(&mut **tx).await?;
        for item in writes.iter().filter(|item| !item.status().is_on()) {
            let reason = kind.ended_reason(item.status());
            skip_queued_reminders(tx, kind, item.id(), reason, now).await?;
        }
    }
    Ok(outcomes)
}
