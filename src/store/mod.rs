//! Storage: the only code that speaks SQL.
//!
//! One trait per area ([`ConsentStore`], [`MessageStore`], [`OtpStore`], [`InboundStore`],
//! [`ScheduleStore`]) and [`Store`], their sum, with two implementations chosen by the scheme of
//! `DATABASE_URL`: [`sqlite::SqliteStore`] (the embedded default) and [`postgres::PostgresStore`]
//! (for several instances). A service holds only the areas it uses (`Arc<dyn ConsentStore>`, ...),
//! upcast from the one [`DynStore`].
//!
//! The SQL both backends accept lives once per area in `portable/*.rs`, which each backend
//! compiles against its own concrete sqlx types (`include!`), so there is no duplicated query and
//! no generic-bound maze; what differs (row locking, claiming) lives in each backend's file.
//! `.ci/run` checks the included files' formatting (`cargo fmt` cannot see them).
//! Migrations: `migrations/sqlite` and `migrations/postgres`, with matching versions.

/// The portable SQL, one module per area, compiled inside a backend's `portable` module against
/// the `ThisStore`, `Db` and constants that backend defines there. One list, so a new area
/// reaches both backends at once.
macro_rules! include_portable_sql {
    () => {
        include_portable_sql!(
            admin, consent, inbound, messages, otp, schedule, privacy, retention, sessions,
            sealing
        );
    };
    ($($area:ident),+) => {
        $(
            pub(super) mod $area {
                include!(concat!("portable/", stringify!($area), ".rs"));
            }
        )+
    };
}

/// A parked callback that is not an opt-out owed (`PARKED_OPT_OUTS_OWED`): what pruning and
/// retention may delete. An owed one waits for its opt-out, however old. A macro, for `concat!`.
macro_rules! parked_not_owed_sql {
    () => {
        "NOT (COALESCE(error_code, 0) = 21610 AND EXISTS (SELECT 1 FROM messages m \
         WHERE m.provider_sid = unmatched_status_callbacks.provider_sid))"
    };
}

pub mod group_sync;
pub mod postgres;
mod records;
pub mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::error::{AppError, AppResult};
pub use crate::status::{ItemStatus, MessageStatus, SkipReason};
pub use records::*;

/// Consent records and their audit trail.
#[async_trait]
pub trait ConsentStore: Send + Sync + 'static {
    async fn get_consent(&self, user_id: &str) -> AppResult<Option<Consent>>;
    /// Apply `edit` to the user's record (creating it when needed) and append one audit row per
    /// changed field, in one transaction.
    async fn update_consent(
        &self,
        user_id: &str,
        edit: ConsentEdit<'_>,
        ctx: &ChangeContext,
    ) -> AppResult<Consent>;
    /// As `update_consent`, but only a record that exists: `None` when the user has none (never
    /// had one, or was erased since they were listed). A patient's STOP or START, or the
    /// carrier's opt-out, changes the records of the users with the number; it never makes one.
    async fn update_existing_consent(
        &self,
        user_id: &str,
        edit: ConsentEdit<'_>,
        ctx: &ChangeContext,
    ) -> AppResult<Option<Consent>>;
    async fn consent_audit(&self, user_id: &str) -> AppResult<Vec<ConsentAuditRecord>>;
    /// The records of these users (those that have one), in no particular order.
    async fn get_consents(&self, user_ids: &[String]) -> AppResult<Vec<Consent>>;
    /// Users whose stored number is this one.
    async fn users_with_phone(&self, phone_number: &str) -> AppResult<Vec<String>>;
}

/// The outbox and message log: queueing, claiming, dispatch outcomes, delivery statuses.
#[async_trait]
pub trait MessageStore: Send + Sync + 'static {
    /// Return once every commit made before the call is durable (SQLite: a group fsync of the
    /// log; PostgreSQL: already). Whatever is acknowledged to a caller, or sent to the provider
    /// as marked `sending`, waits for this first.
    async fn durable(&self) -> AppResult<()>;
    /// Queue a message. With an idempotency key that is already taken, nothing is written and the
    /// existing message is returned with `false`.
    async fn insert_message(&self, message: &NewMessage) -> AppResult<(MessageRecord, bool)>;
    async fn get_message(&self, id: &str) -> AppResult<Option<MessageRecord>>;
    async fn message_events(&self, id: &str) -> AppResult<Vec<MessageEvent>>;
    async fn message_by_sid(&self, provider_sid: &str) -> AppResult<Option<MessageRecord>>;
    /// How many messages are in each status (for `/metrics`).
    async fn message_status_counts(&self) -> AppResult<Vec<(String, i64)>>;
    /// Whether another message (not `id`, whose attempt began at `started`) to `to_number` with
    /// exactly `body` must settle before this one is looked up: one being sent now, its SID not
    /// yet recorded (a match could be its), or one whose outcome is also unknown and whose
    /// attempt began earlier (twins are looked up one at a time, the earliest first, each
    /// adopting the earliest match left).
    async fn sibling_in_flight(
        &self,
        id: &str,
        to_number: &str,
        body: &str,
        started: DateTime<Utc>,
    ) -> AppResult<bool>;
    /// Mark a claimed message whose attempt's outcome is unknown as being looked up, so that its
    /// twins tell it from a message being sent now ([`MessageStore::sibling_in_flight`]).
    async fn mark_lookup_needed(&self, id: &str, fence: DateTime<Utc>) -> AppResult<()>;
    /// The user the most recent message to this number was for (sent or being sent).
    async fn last_recipient(&self, to_number: &str) -> AppResult<Option<String>>;
    /// The user's messages, newest first.
    async fn user_messages(&self, user_id: &str, limit: i64) -> AppResult<Vec<MessageRecord>>;
    /// Claim up to `limit` messages: queued ones that are due, and `sending` ones without a
    /// provider SID whose lease has run out (their process died mid-send; the dispatcher looks
    /// them up at the provider before sending again). Claimed messages are leased until
    /// `lease_until` so no other dispatcher takes them meanwhile. Oldest first. One that cannot
    /// be opened is leased but left out (`open_claimed`).
    async fn claim_due_messages(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: i64,
    ) -> AppResult<Vec<MessageRecord>> {
        self.claim_messages(now, lease_until, limit, Stale::Include)
            .await
    }
    /// `claim_due_messages`, looking for sends that died mid-way only with `Stale::Include`.
    /// Why: on PostgreSQL every message sent leaves a dead `sending` entry in `messages_due`
    /// until vacuum, so the search for stale sends costs more the more was sent lately, while
    /// stale sends are rare (a process died); the dispatcher looks for them once a second.
    async fn claim_messages(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: i64,
        stale: Stale,
    ) -> AppResult<Vec<MessageRecord>>;
    /// Give a claimed message back unsent (shutdown): its lease ends now.
    async fn release_claim(
        &self,
        id: &str,
        now: DateTime<Utc>,
        fence: DateTime<Utc>,
    ) -> AppResult<()>;
    /// Reserve the next send slot for `sender`, at least `interval_us` after the previous one and
    /// not before `now_us` (microseconds since the epoch), if it starts by `latest_us`; else take
    /// none and answer when the next one is free. A dispatcher asks for no slot later than its
    /// claim lasts: one it could not use before its lease ran out would be spent on nothing, and
    /// each claim after would reserve further ahead (the queue stalled for good).
    async fn reserve_send_slot(
        &self,
        sender: &str,
        now_us: i64,
        interval_us: i64,
        latest_us: i64,
    ) -> AppResult<SendSlotAnswer>;
    /// Mark a claimed message `sending` (one more attempt) just before the provider call, if
    /// `guard` still holds (the number has not opted out of the channel; consent as asked).
    /// `fence` is the lease the claim set; the lease is renewed to `new_lease` for the call.
    async fn mark_sending(
        &self,
        id: &str,
        attempt: &SendAttempt,
        guard: SendGuard,
        now: DateTime<Utc>,
        fence: DateTime<Utc>,
        new_lease: DateTime<Utc>,
    ) -> AppResult<MarkSending>;
    /// Record what happened to a claimed message and release its lease, if the claim (`fence`,
    /// the current lease) is still ours; `false` and nothing written otherwise.
    async fn record_dispatch(
        &self,
        id: &str,
        result: &DispatchResult,
        now: DateTime<Utc>,
        fence: DateTime<Utc>,
    ) -> AppResult<bool>;
    /// Record a send the provider accepted (`record_dispatch` with `Sent`) and, in the same
    /// transaction, the statuses already known for its SID: `news`, what the provider answered
    /// beyond `status` (the mock answers `delivered`), written with the send in one update (an
    /// event for each), then the callbacks that arrived before the SID was recorded, taken and
    /// applied as callbacks (returned, for what follows them). `None`, and nothing written, when
    /// the claim (`fence`) is no longer ours.
    #[allow(clippy::too_many_arguments)]
    async fn record_sent(
        &self,
        id: &str,
        provider_sid: &str,
        status: MessageStatus,
        news: Option<MessageStatus>,
        now: DateTime<Utc>,
        fence: DateTime<Utc>,
    ) -> AppResult<Option<Vec<KnownStatus>>>;
    /// Forget unmatched callbacks older than `before` (their message was never ours), but an
    /// opt-out owed (`parked_opt_outs_owed`).
    async fn prune_unmatched_statuses(&self, before: DateTime<Utc>) -> AppResult<u64>;
    /// SIDs (at most `limit`) of recorded messages whose carrier opt-out (21610) arrived before
    /// their send recorded the SID and may not be on record yet, each with when it first
    /// arrived and the statuses it came with: `record_sent` applies such a callback but leaves
    /// it parked until `forget_parked_opt_outs`. Pruning and retention leave these alone.
    async fn parked_opt_outs_owed(&self, limit: i64) -> AppResult<Vec<OwedOptOut>>;
    /// The carrier opt-out parked for this SID is on record: forget it.
    async fn forget_parked_opt_outs(&self, provider_sid: &str) -> AppResult<()>;
    /// Keep in `message_id`'s history a provider report that did not move its status but took
    /// effect (a carrier opt-out reported after a final status), so that a replay of it is found
    /// already seen. A repeat is a no-op.
    async fn record_report(
        &self,
        message_id: &str,
        status: MessageStatus,
        error_code: Option<i64>,
        at: DateTime<Utc>,
    ) -> AppResult<()>;
    /// Apply a delivery status to the message with this provider SID: record the event (a repeat
    /// is a no-op) and move the status only from one of `status.allowed_from()`, so it never goes
    /// back.
    async fn apply_status(
        &self,
        provider_sid: &str,
        status: MessageStatus,
        error_code: Option<i64>,
        at: DateTime<Utc>,
    ) -> AppResult<StatusApplied>;
}

/// One-time passcodes and their send limits.
#[async_trait]
pub trait OtpStore: Send + Sync + 'static {
    /// Check the OTP send limits and, within them, log the send and, unless a number opted out
    /// (`OtpIssueOutcome::OptedOut`) or the number the code goes to had its codes
    /// (`OtpIssueOutcome::DestinationLimited`), replace the (user, purpose) code and write its
    /// message, all in one transaction. Limits are checked under a lock on the number named,
    /// the number the code goes to, the user and the IP, so concurrent requests cannot slip
    /// past them together.
    async fn issue_otp(&self, issue: &OtpIssue) -> AppResult<OtpIssueOutcome>;
    /// The wait a limit imposes, read from committed state without a lock, where such a read is
    /// cheap (a SQLite file: an inline read); `None` where it is not (`issue_otp` checks
    /// anyway) or when no limit refuses now. A refusal read here stands: the send log only
    /// grows within its window, so `issue_otp` at the same `now` would refuse as well.
    async fn otp_refusal(&self, limits: &OtpLimits<'_>) -> AppResult<Option<LimitRefusal>>;
    /// Count a send refused before its issue (a WhatsApp number outside its window) against the
    /// limits, as a send: one send-log row and nothing else (no code replaced, no message), so a
    /// refusal that depends on a number's history cannot be probed without limit. When a limit
    /// refuses already, nothing is logged and its wait (seconds) is answered instead: over the
    /// limits every caller hears 429, whatever the number's history. Under the issue's locks,
    /// so simultaneous refusals and sends cannot slip past a limit together.
    async fn log_refused_otp(&self, limits: &OtpLimits<'_>) -> AppResult<Option<LimitRefusal>>;
    /// Whether `issue_otp` looks up the number on file itself (`OtpIssue::unless_on_file`):
    /// where reading it first costs a round trip (PostgreSQL), the lookup rides in the issue's
    /// batch, and a code for a user with another number on file goes there in the same trip.
    fn checks_number_on_file(&self) -> bool {
        false
    }
    async fn get_otp(&self, user_id: &str, purpose: &str) -> AppResult<Option<OtpRecord>>;
    /// Mark the code used if it is still the live one (same hash), unused, unexpired, and the
    /// (user, purpose) has fewer than `max_attempts` wrong tries in its window. `true` for
    /// exactly one caller.
    async fn consume_otp(
        &self,
        user_id: &str,
        purpose: &str,
        code_hash: &str,
        max_attempts: i64,
        now: DateTime<Utc>,
    ) -> AppResult<bool>;
    /// `consume_otp` for a `verification` code that went to `number` and, in the same
    /// transaction, when `number` is still the user's number on file, its `phone_verified_at`
    /// (audited, source `otp`). A fault between the two cannot use the code up and leave the
    /// number unverified: nothing is written, and the patient's code still works. Never creates
    /// a consent record.
    async fn consume_verification_otp(
        &self,
        user_id: &str,
        code_hash: &str,
        max_attempts: i64,
        now: DateTime<Utc>,
        number: &str,
    ) -> AppResult<VerificationUse>;
    /// Wrong tries for (user, purpose) in the current window, whether or not a code exists.
    async fn otp_failures(
        &self,
        user_id: &str,
        purpose: &str,
        now: DateTime<Utc>,
    ) -> AppResult<i64>;
    /// Count one wrong try; a new window (ending at `window_ends_at`) starts when the last one
    /// ended. The new count.
    async fn record_otp_failure(
        &self,
        user_id: &str,
        purpose: &str,
        now: DateTime<Utc>,
        window_ends_at: DateTime<Utc>,
    ) -> AppResult<i64>;
    /// Delete used and expired codes and rate-limit records older than an hour.
    async fn cleanup_otps(&self, now: DateTime<Utc>) -> AppResult<OtpCleanup>;
}

/// Patient replies, opt-outs (STOP) and WhatsApp sessions.
#[async_trait]
pub trait InboundStore: Send + Sync + 'static {
    /// Whether the number texted STOP on this channel (and not START since).
    async fn is_opted_out(&self, phone_number: &str, channel: Channel) -> AppResult<bool>;
    /// `is_opted_out` for many numbers in one read: each (number, channel) opted out.
    async fn opted_out_among(&self, phone_numbers: &[String]) -> AppResult<Vec<(String, Channel)>>;
    async fn set_opt_out(
        &self,
        phone_number: &str,
        channel: Channel,
        source: ConsentSource,
        at: DateTime<Utc>,
    ) -> AppResult<()>;
    async fn clear_opt_out(&self, phone_number: &str, channel: Channel) -> AppResult<()>;
    /// Store an incoming message; `false` (and nothing written) when its SID was seen before.
    async fn insert_incoming(&self, message: &IncomingMessage) -> AppResult<bool>;
    async fn incoming_by_sid(&self, provider_sid: &str) -> AppResult<Option<IncomingMessage>>;
    /// Incoming messages received after `since` (all when `None`), oldest first.
    /// Only messages received at or before `until` are listed, so a reader that moves its
    /// `since` forward never passes a message still being written.
    async fn list_incoming(
        &self,
        since: Option<DateTime<Utc>>,
        until: DateTime<Utc>,
        limit: i64,
    ) -> AppResult<Vec<IncomingMessage>>;
    /// Remember a WhatsApp message from this number (opens its 24-hour window).
    async fn touch_whatsapp_session(&self, phone_number: &str, at: DateTime<Utc>) -> AppResult<()>;
    async fn last_whatsapp_inbound(&self, phone_number: &str) -> AppResult<Option<DateTime<Utc>>>;
}

/// Appointments, follow-ups and the reminders queued for them.
#[async_trait]
pub trait ScheduleStore: Send + Sync + 'static {
    /// Create or update an appointment or follow-up (the host app's id is the key). The time it
    /// was booked (its notice, how long before its time) is recorded when it is new and whenever
    /// its time, patient or status changes; a repeated PUT keeps it.
    async fn upsert_scheduled(
        &self,
        kind: SubjectType,
        item: &ScheduledItem,
        now: DateTime<Utc>,
    ) -> AppResult<ScheduledItem>;
    async fn get_scheduled(&self, kind: SubjectType, id: &str) -> AppResult<Option<ScheduledItem>>;
    /// Cancel it and skip its reminders not yet sent (reason `{kind}_cancelled`). `None` when
    /// there is no such item; else how many reminders were skipped.
    async fn cancel_scheduled(
        &self,
        kind: SubjectType,
        id: &str,
        now: DateTime<Utc>,
    ) -> AppResult<Option<u64>>;
    /// A page of the sweep's window: up to `limit` items that are on and whose time lies in
    /// `[due.from, due.to]`, in (time, id) order, after `after` (the previous page's `next`) when
    /// given; of those, the ones `due` takes that have no `reminder` for that time. One range of
    /// the `(status, time, id)` index: the cost follows the rows in the window, not the rows
    /// stored, and paging never reads a row twice.
    async fn due_without_reminder(
        &self,
        kind: SubjectType,
        reminder: &str,
        due: &DueFilter<'_>,
        after: Option<&SweepCursor>,
        limit: i64,
    ) -> AppResult<DuePage>;
    /// Write the reminder's message and its `reminder_log` row in one transaction; `false` (and
    /// nothing written) when that reminder of that version was already queued.
    async fn queue_reminder(
        &self,
        kind: SubjectType,
        item: &ScheduledItem,
        reminder: &str,
        message: &NewMessage,
    ) -> AppResult<bool> {
        let planned = [(item.clone(), message.clone())];
        Ok(self.queue_reminders(kind, reminder, &planned).await? == 1)
    }
    /// [`ScheduleStore::queue_reminder`] for many items in one transaction: each message with
    /// its `reminder_log` row, or neither when that reminder of that version was already queued
    /// (by an earlier sweep or another instance at the same moment). How many were queued.
    async fn queue_reminders(
        &self,
        kind: SubjectType,
        reminder: &str,
        planned: &[(ScheduledItem, NewMessage)],
    ) -> AppResult<usize>;
    /// Create or update many appointments or follow-ups in one transaction; what happened to
    /// each, in order. A row stored exactly so is left alone (`Unchanged`). An item written with
    /// a status that is not on has its reminders not yet sent skipped, in the same transaction.
    async fn upsert_scheduled_many(
        &self,
        kind: SubjectType,
        items: &[ScheduledItem],
        now: DateTime<Utc>,
    ) -> AppResult<Vec<Upserted>>;
    /// The same for subscriptions.
    async fn upsert_subscriptions(
        &self,
        items: &[Subscription],
        now: DateTime<Utc>,
    ) -> AppResult<Vec<Upserted>>;
    async fn get_subscription(&self, id: &str) -> AppResult<Option<Subscription>>;
    /// What a reminder message is for: its subject and the time it was queued for.
    async fn reminder_subject(
        &self,
        message_id: &str,
    ) -> AppResult<Option<(SubjectType, String, DateTime<Utc>)>>;
}

/// The settings page's one-time links and sessions (only hashes of their secrets).
#[async_trait]
pub trait SessionStore: Send + Sync + 'static {
    async fn create_settings_link(
        &self,
        code_hash: &str,
        user_id: &str,
        return_url: Option<&str>,
        now: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    ) -> AppResult<()>;
    /// Mark the link used if it is unused and unexpired: its user, for exactly one caller.
    async fn consume_settings_link(
        &self,
        code_hash: &str,
        now: DateTime<Utc>,
    ) -> AppResult<Option<OpenedLink>>;
    async fn create_settings_session(&self, session: &SettingsSession) -> AppResult<()>;
    /// The live session with this token hash, its expiry slid to `expires_at` (sliding
    /// sessions); `None` when unknown or expired.
    async fn touch_settings_session(
        &self,
        token_hash: &str,
        now: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    ) -> AppResult<Option<SettingsSession>>;
    async fn delete_settings_session(&self, token_hash: &str) -> AppResult<()>;
    /// Delete expired sessions and links past their expiry (used or not); how many.
    async fn prune_settings_sessions(&self, now: DateTime<Utc>) -> AppResult<u64>;
}

/// Retention: deleting what is past its period, in bounded batches, and the receipts.
#[async_trait]
pub trait RetentionStore: Send + Sync + 'static {
    /// Delete up to `limit` rows of `class` older than `before` (never a message still queued or
    /// sending); how many. With `dry_run`, count them all and delete nothing.
    async fn expire(
        &self,
        class: DataClass,
        before: DateTime<Utc>,
        limit: i64,
        dry_run: bool,
    ) -> AppResult<u64>;
    /// Keep a run's receipt; then, on SQLite, fold the log into the file so what the run
    /// deleted is gone from the file's bytes as well.
    async fn record_cleanup_run(
        &self,
        ran_at: DateTime<Utc>,
        as_of: DateTime<Utc>,
        counts: &str,
    ) -> AppResult<()>;
    /// The latest receipts, newest first.
    async fn cleanup_runs(&self, limit: i64) -> AppResult<Vec<CleanupRun>>;
}

/// A user's own data: their copy, and their erasure.
#[async_trait]
pub trait PrivacyStore: Send + Sync + 'static {
    async fn export_user(&self, user_id: &str, now: DateTime<Utc>) -> AppResult<UserData>;
    /// Erase the user in one transaction: pending messages never go out after it. The consent
    /// audit rows stay, anonymised (`erased:` + `user_hash`); opt-outs stay (they belong to the
    /// number). One erasure record. Erasing twice removes nothing more.
    async fn erase_user(
        &self,
        user_id: &str,
        user_hash: &str,
        erased_by: &str,
        now: DateTime<Utc>,
    ) -> AppResult<ErasureCounts>;
}

/// Encryption at rest: sealing clear text and re-sealing under the current key.
#[async_trait]
pub trait SealingStore: Send + Sync + 'static {
    /// One round of re-sealing: up to `limit` rows of each table whose sealed values are not all
    /// under the current key (or, with `clear_only`, are still clear text), re-sealed and their
    /// blind indexes set, each table's batch in one transaction. What it did; a round that
    /// re-sealed nothing means nothing is left. Rows changed meanwhile are left for the next.
    async fn reseal_round(&self, limit: i64, clear_only: bool) -> AppResult<ResealReport>;
}

/// Every area, plus what the whole database answers for.
#[async_trait]
pub trait Store:
    ConsentStore
    + MessageStore
    + OtpStore
    + InboundStore
    + ScheduleStore
    + SessionStore
    + RetentionStore
    + PrivacyStore
    + SealingStore
{
    /// Apply this backend's pending migrations.
    async fn migrate(&self) -> AppResult<()>;
    /// A cheap round trip, for `/readyz`.
    async fn ping(&self) -> AppResult<()>;
    /// Group fsyncs of the SQLite log so far (0 on PostgreSQL, whose commits need none).
    fn group_syncs(&self) -> u64;
    /// Claimed messages this store left out since it started because they could not be opened
    /// (each one counted at every claim that finds it: see `claim_due_messages`).
    fn unreadable_claims(&self) -> u64;
}

pub type DynStore = Arc<dyn Store>;

pub use crate::vault::KeySettings;

/// What a round of re-sealing did: rows re-sealed per table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ResealReport {
    pub tables: Vec<(&'static str, u64)>,
}

impl ResealReport {
    pub fn total(&self) -> u64 {
        self.tables.iter().map(|(_, n)| n).sum()
    }
}

/// Open the store named by `database_url` (`sqlite://...` or `postgres://...`): connect, apply
/// the migrations, set up the keys (see [`crate::vault`]) and seal any clear text left from
/// before encryption.
pub async fn connect(database_url: &str, keys: &KeySettings) -> AppResult<DynStore> {
    if database_url.starts_with("sqlite:") {
        Ok(Arc::new(
            sqlite::SqliteStore::connect(database_url, keys).await?,
        ))
    } else if database_url.starts_with("postgres://") || database_url.starts_with("postgresql://") {
        Ok(Arc::new(
            postgres::PostgresStore::connect(database_url, keys).await?,
        ))
    } else {
        Err(AppError::Internal(anyhow::anyhow!(
            "DATABASE_URL must start with sqlite:// or postgres://"
        )))
    }
}

/// The sweep's query ([`ScheduleStore::due_without_reminder`]), the same on both backends; public
/// so that the benchmark can show its plan. Binds: `$1` from, `$2` to, `$3` subject type, `$4`
/// reminder kind, `$5`/`$6` the (time, id) to page after, `$7` the limit, `$8`/`$9` the other
/// reminder kind to keep apart from and since when ([`DueFilter::apart_from`]).
///
/// It reads a page of the window in (time, id) order from the `(status, time, id)` index,
/// stopping at the limit, and says of each row whether it already has its reminder: a probe of
/// `reminder_log_once` with every column of that index. How it is written keeps PostgreSQL's plan
/// to exactly that, whatever its statistics say (right after a sweep queued thousands of
/// reminders they still say the log is nearly empty):
/// - not a `NOT EXISTS` filter, which becomes an anti-join planned from the log's statistics: on
///   stale ones it scanned the whole log for each row (in a 1,000,000-appointment benchmark one
///   page took over a minute); and a filter whose pass rate the planner cannot tell made it read
///   the whole rest of the window to sort it, for every page;
/// - not `EXISTS` in the select list either, which may run as one hashed scan of every
///   appointment reminder ever logged, for every page;
/// - but a scalar subquery (`LIMIT 1`): a per-row index probe, always.
///
/// The other reminder (`too_close`) is probed the same way, and the minimum notice is a column
/// read: the sweep filters on them, not the database, so a page stays one index range.
pub fn sweep_sql(kind: SubjectType) -> String {
    let (table, column) = kind.table();
    let zone = kind.zone_column();
    let notice = kind.notice_column();
    let on = kind.on_status().as_str();
    format!(
        "SELECT t.id, t.user_id, t.{column} AS scheduled_at, {zone} AS time_zone, t.status, \
         {notice} AS notice_seconds, \
         (SELECT 1 FROM reminder_log r WHERE r.subject_type = $3 \
         AND r.subject_id = t.id AND r.kind = $4 AND r.starts_at = t.{column} \
         AND r.user_id = t.user_id AND r.active LIMIT 1) IS NOT NULL AS reminded, \
         (SELECT 1 FROM reminder_log o JOIN messages m ON m.id = o.message_id \
         WHERE o.subject_type = $3 AND o.subject_id = t.id AND o.kind = $8 \
         AND o.starts_at = t.{column} AND o.user_id = t.user_id AND o.active \
         AND (m.status IN ('queued', 'sending') OR m.attempt_started_at > $9) LIMIT 1) \
         IS NOT NULL AS too_close \
         FROM {table} t \
         WHERE t.status = '{on}' AND t.{column} >= $1 AND t.{column} <= $2 \
         AND (t.{column}, t.id) > ($5, $6) \
         ORDER BY t.{column}, t.id LIMIT $7"
    )
}

/// The columns of `messages`, in `MessageRecord` order.
pub(crate) const MESSAGE_COLUMNS: &str =
    "id, user_id, template_name, variables, channel, status, reason, \
     to_number, provider_sid, error_code, error_message, encoding, segments, attempts, \
     idempotency_key, next_attempt_at, lease_until, created_at, updated_at, requested_channel, \
     attempt_started_at, attempt_body, lookup_needed";

/// Take a sender's next send slot (microseconds since the epoch) in one statement: atomic under
/// PostgreSQL's row lock and SQLite's write lock alike. `$1` sender, `$2` now, `$3` interval.
pub(crate) const RESERVE_SEND_SLOT: &str =
    "INSERT INTO send_rate (sender, next_slot_us) VALUES ($1, $2 + $3) \
     ON CONFLICT (sender) DO UPDATE SET next_slot_us = \
     (CASE WHEN send_rate.next_slot_us > $2 THEN send_rate.next_slot_us ELSE $2 END) + $3 \
     WHERE send_rate.next_slot_us <= $4 \
     RETURNING next_slot_us - $3";

/// When sender `$1`'s next send slot is free (after a `RESERVE_SEND_SLOT` that took none).
pub(crate) const NEXT_SEND_SLOT: &str = "SELECT next_slot_us FROM send_rate WHERE sender = $1";

/// What `MessageStore::reserve_send_slot` answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendSlotAnswer {
    /// The slot taken: its time (microseconds since the epoch).
    Reserved(i64),
    /// None taken: the sender's next slot starts after the latest time asked for, at this time.
    NextFreeAt(i64),
}

impl SendSlotAnswer {
    /// `RESERVE_SEND_SLOT`'s row, or else `NEXT_SEND_SLOT`'s.
    pub(crate) fn from_rows(reserved: Option<i64>, next_free_at: Option<i64>) -> AppResult<Self> {
        match (reserved, next_free_at) {
            (Some(slot), _) => Ok(SendSlotAnswer::Reserved(slot)),
            (None, Some(at)) => Ok(SendSlotAnswer::NextFreeAt(at)),
            (None, None) => Err(anyhow::anyhow!("reserving a send slot returned no row").into()),
        }
    }
}

/// Record a send the provider accepted, if the claim is still ours: `$1` id, `$2` fence, `$3`
/// status, `$4` SID, `$5` now.
pub(crate) const RECORD_SENT: &str =
    "UPDATE messages SET status = $3, provider_sid = $4, reason = NULL, error_code = NULL, \
     error_message = NULL, lease_until = NULL, updated_at = $5 \
     WHERE id = $1 AND lease_until = $2";

/// A value bound to a statement, the same for both backends (times bound as each backend's
/// driver writes them).
pub(crate) enum SqlArg {
    Text(String),
    OptText(Option<String>),
    OptInt(Option<i64>),
    Bool(bool),
    Time(DateTime<Utc>),
}

/// An event to record with a dispatch result: status, error code, detail.
pub(crate) type DispatchEvent = (MessageStatus, Option<i64>, Option<String>);

/// The row a write's `RETURNING` gave, if any, read by stepping the statement to its end.
/// Why not `fetch_optional`: on SQLite, a statement left after its first row commits when sqlx
/// resets it, and a commit by reset skips the log's automatic checkpoint (SQLite runs it only
/// when a statement steps to its end). Messages queued one by one through the pool that way grew
/// the log without bound (780 MB for 20,000) until the next start replayed it.
pub(crate) async fn returned_row<'q, 'c, DB, O, A, E>(
    write: sqlx::query::QueryAs<'q, DB, O, A>,
    executor: E,
) -> Result<Option<O>, sqlx::Error>
where
    DB: sqlx::Database,
    A: 'q + sqlx::IntoArguments<'q, DB>,
    O: 'q + Send + Unpin + for<'r> sqlx::FromRow<'r, DB::Row>,
    E: 'q + sqlx::Executor<'c, Database = DB>,
    'c: 'q,
{
    Ok(write.fetch_all(executor).await?.into_iter().next())
}

/// How `MessageStore::record_dispatch` records a result: one UPDATE fenced by the claim's lease
/// (`$1` id, `$2` fence, then `args` from `$3`), and the event it adds, if any. Retries add no
/// event (the history keeps one row per status; a retry shows in the error fields).
pub(crate) fn dispatch_write(
    result: &DispatchResult,
    now: DateTime<Utc>,
) -> (&'static str, Vec<SqlArg>, Option<DispatchEvent>) {
    use SqlArg::*;
    match result {
        DispatchResult::Sent {
            provider_sid,
            status,
        } => (
            RECORD_SENT,
            vec![
                Text(status.as_str().into()),
                Text(provider_sid.clone()),
                Time(now),
            ],
            Some((*status, None, None)),
        ),
        DispatchResult::Skipped { reason } => (
            "UPDATE messages SET status = 'skipped', reason = $3, lease_until = NULL, \
             updated_at = $4 WHERE id = $1 AND lease_until = $2",
            vec![Text(reason.as_str().into()), Time(now)],
            Some((MessageStatus::Skipped, None, Some(reason.as_str().into()))),
        ),
        DispatchResult::Failed { code, message } => (
            "UPDATE messages SET status = 'failed', error_code = $3, error_message = $4, \
             lease_until = NULL, updated_at = $5 WHERE id = $1 AND lease_until = $2",
            vec![OptInt(*code), OptText(Some(message.clone())), Time(now)],
            Some((MessageStatus::Failed, *code, Some(message.clone()))),
        ),
        DispatchResult::Retry {
            code,
            message,
            next_attempt_at,
            lookup,
        } => (
            "UPDATE messages SET status = 'queued', error_code = $3, error_message = $4, \
             next_attempt_at = $5, lease_until = NULL, updated_at = $6, \
             lookup_needed = $7 WHERE id = $1 AND lease_until = $2",
            vec![
                OptInt(*code),
                OptText(Some(message.clone())),
                Time(*next_attempt_at),
                Time(now),
                Bool(*lookup),
            ],
            None,
        ),
        DispatchResult::LookupFailed {
            message,
            next_attempt_at,
            counted,
        } => (
            if *counted {
                "UPDATE messages SET status = 'queued', error_message = $3, \
                 attempts = attempts + 1, next_attempt_at = $4, lease_until = NULL, \
                 lookup_needed = TRUE, updated_at = $5 WHERE id = $1 AND lease_until = $2"
            } else {
                "UPDATE messages SET status = 'queued', error_message = $3, \
                 next_attempt_at = $4, lease_until = NULL, \
                 lookup_needed = TRUE, updated_at = $5 WHERE id = $1 AND lease_until = $2"
            },
            vec![
                OptText(Some(message.clone())),
                Time(*next_attempt_at),
                Time(now),
            ],
            None,
        ),
        DispatchResult::Unknown { code, message } => (
            "UPDATE messages SET status = 'unknown', error_message = $3, \
             error_code = COALESCE($5, error_code), lease_until = NULL, \
             lookup_needed = FALSE, updated_at = $4 WHERE id = $1 AND lease_until = $2",
            vec![OptText(Some(message.clone())), Time(now), OptInt(*code)],
            Some((MessageStatus::Unknown, *code, Some(message.clone()))),
        ),
        // The attempt is given back: it was never the message's to spend.
        DispatchResult::Held {
            code,
            until,
            message,
        } => (
            "UPDATE messages SET status = 'queued', error_message = $3, \
             attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END, \
             next_attempt_at = $4, lease_until = NULL, updated_at = $5, error_code = $6 \
             WHERE id = $1 AND lease_until = $2",
            vec![
                OptText(Some(message.clone())),
                Time(*until),
                Time(now),
                OptInt(*code),
            ],
            None,
        ),
        // Deferred only after any lookup found nothing (or none was needed): the mark goes, so the
        // message's twins do not wait for it through the deferral (found by review).
        DispatchResult::Deferred { until, .. } => (
            "UPDATE messages SET status = 'queued', next_attempt_at = $3, lease_until = NULL, \
             lookup_needed = FALSE, updated_at = $4 WHERE id = $1 AND lease_until = $2",
            vec![Time(*until), Time(now)],
            None,
        ),
    }
}

/// The callbacks parked for SID `$1` (by `apply_status`, for a SID no message had yet).
pub(crate) const PARKED_FOR_SID: &str =
    "SELECT status, error_code FROM unmatched_status_callbacks WHERE provider_sid = $1";

/// Drop the callbacks parked for SID `$1`, once the send that records the SID has applied them,
/// all but a carrier opt-out (21610): that one stays parked as the mark of an opt-out owed until
/// the opt-out is on record (`FORGET_PARKED_OPT_OUTS`), so a crash or a failed write between the
/// send's transaction and the opt-out cannot lose it (`Delivery::settle_parked_opt_outs`).
pub(crate) const DROP_APPLIED_PARKED: &str =
    "DELETE FROM unmatched_status_callbacks WHERE provider_sid = $1 \
     AND COALESCE(error_code, 0) <> 21610";

/// SID `$1`'s carrier opt-out is on record: its parked callback is no longer owed.
pub(crate) const FORGET_PARKED_OPT_OUTS: &str =
    "DELETE FROM unmatched_status_callbacks WHERE provider_sid = $1 AND error_code = 21610";

/// Parked carrier opt-outs (at most `$1` rows: SID, when it came) applied to a recorded message
/// but whose opt-out may not be on record (see `DROP_APPLIED_PARKED`).
pub(crate) const PARKED_OPT_OUTS_OWED: &str =
    "SELECT u.provider_sid, u.status, u.received_at FROM unmatched_status_callbacks u \
     WHERE u.error_code = 21610 AND u.provider_sid IN ( \
         SELECT o.provider_sid FROM unmatched_status_callbacks o WHERE o.error_code = 21610 \
         AND EXISTS (SELECT 1 FROM messages m WHERE m.provider_sid = o.provider_sid) \
         GROUP BY o.provider_sid ORDER BY o.provider_sid LIMIT $1) \
     ORDER BY u.provider_sid, u.received_at";

/// Unmatched callbacks older than `$1`, but an opt-out owed (`parked_not_owed_sql!`).
pub(crate) const PRUNE_UNMATCHED: &str = concat!(
    "DELETE FROM unmatched_status_callbacks WHERE received_at < $1 AND ",
    parked_not_owed_sql!()
);

/// The OTP purpose that proves a number: `consume_verification_otp` uses a code of this purpose
/// and may mark the number on file verified.
pub const VERIFICATION_PURPOSE: &str = "verification";

/// Use the code for (`$1` user, `$2` purpose) with hash `$3` at `$4`, if it is live and fewer
/// than `$5` wrong tries were made: the count is checked in the same statement, so a right guess
/// racing many wrong ones cannot slip in after the limit.
pub(crate) const CONSUME_OTP: &str =
    "UPDATE otp_codes SET used_at = $4 WHERE user_id = $1 AND purpose = $2 \
     AND code_hash = $3 AND used_at IS NULL AND expires_at > $4 \
     AND COALESCE((SELECT f.failures FROM otp_failures f WHERE f.user_id = $1 \
     AND f.purpose = $2 AND f.window_ends_at > $4), 0) < $5";

/// Count a wrong try for (`$1` user, `$2` purpose) at `$3`, in a window ending at `$4` if a new
/// one starts; the count so far. One statement: concurrent wrong tries each get their own count,
/// and a window that has ended starts again at one.
pub(crate) const RECORD_OTP_FAILURE: &str =
    "INSERT INTO otp_failures (user_id, purpose, failures, window_ends_at) \
     VALUES ($1, $2, 1, $4) ON CONFLICT (user_id, purpose) DO UPDATE SET \
     failures = CASE WHEN otp_failures.window_ends_at > $3 \
     THEN otp_failures.failures + 1 ELSE 1 END, \
     window_ends_at = CASE WHEN otp_failures.window_ends_at > $3 \
     THEN otp_failures.window_ends_at ELSE excluded.window_ends_at END \
     RETURNING failures";

/// Whether number `$1` (its blind index) opted out of channel `$2`: a 64-bit count on both
/// backends (a bare `1` is 32-bit on PostgreSQL).
pub(crate) const IS_OPTED_OUT: &str =
    "SELECT COUNT(*) FROM opt_outs WHERE phone_index = $1 AND channel = $2";

/// An attempt's number and body as stored: sealed, with the number's blind index. Each backend's
/// `mark_sending` writes these (the SQLite writer gets them sealed, so its thread spends no time
/// on cryptography).
pub(crate) struct SealedAttempt {
    pub to_number: String,
    pub to_index: String,
    pub body: Option<String>,
}

impl SendAttempt {
    pub(crate) fn sealed(&self, vault: &crate::vault::Vault) -> SealedAttempt {
        SealedAttempt {
            to_number: vault.seal(&self.to_number),
            to_index: vault.blind(&self.to_number),
            body: vault.seal_opt(self.body.as_deref()),
        }
    }
}

/// Mark a claimed message `sending` for an attempt, only while the number has not opted out of
/// the channel (and, with `guard.consent`, the user still consents to it there). Parameters:
/// `$1` id, `$2` sealed number, `$3` encoding, `$4` segments, `$5` now, `$6` channel, `$7` the
/// claim's fence, `$8` the new lease, `$9` sealed body, `$10` the number's blind index.
pub(crate) fn mark_sending_sql(guard: SendGuard, channel: Channel) -> String {
    // The consent column is chosen here from the channel, never from input.
    let consent = match guard.consent {
        false => String::new(),
        true => format!(
            " AND EXISTS (SELECT 1 FROM messaging_consent c WHERE c.user_id = messages.user_id \
             AND c.phone_index = $10 AND c.{}{})",
            channel.consent_field(),
            if guard.marketing {
                " AND c.marketing_consent"
            } else {
                ""
            }
        ),
    };
    // Right-hand sides read the row as it was, so `channel` in the CASE is the old channel.
    format!(
        "UPDATE messages SET status = 'sending', attempts = attempts + 1, to_number = $2, \
         to_index = $10, \
         encoding = $3, segments = $4, updated_at = $5, attempt_started_at = $5, \
         attempt_body = $9, lookup_needed = FALSE, \
         requested_channel = CASE WHEN channel <> $6 \
         THEN COALESCE(requested_channel, channel) ELSE requested_channel END, \
         channel = $6, lease_until = $8 \
         WHERE id = $1 AND lease_until = $7 AND status IN ('queued', 'sending') \
         AND NOT EXISTS (SELECT 1 FROM opt_outs o WHERE o.phone_index = $10 \
         AND o.channel = $6){consent}"
    )
}

/// Move the message with SID `$1` to status `$2` if the move is forward from where it is
/// (`MessageStatus::allowed_from`), keeping the latest error code `$3`; `$4` the time.
pub(crate) fn apply_status_sql(status: MessageStatus) -> String {
    // Our own status words, never caller input: safe to inline. An empty list still runs the
    // UPDATE (matching nothing), so on SQLite the transaction starts with a write and takes the
    // lock before it reads.
    let from_list = match status.allowed_from() {
        [] => "'-'".to_string(),
        from => from
            .iter()
            .map(|s| format!("'{s}'"))
            .collect::<Vec<_>>()
            .join(", "),
    };
    format!(
        "UPDATE messages SET status = $2, error_code = COALESCE($3, error_code), updated_at = $4 \
         WHERE provider_sid = $1 AND status IN ({from_list})"
    )
}

/// A consent record's columns, as `Consent` reads them.
pub(crate) const CONSENT_COLUMNS: &str =
    "user_id, phone_number, sms_consent, whatsapp_consent, marketing_consent, updated_at, \
     phone_verified_at, time_zone";

/// Everything that decides whether an OTP may go, read in one statement: the last send to the
/// number named (the cooldown); for each hourly limit, the send that keeps its window full (the
/// `max`-th newest of the last hour, if there are that many); whether the number named and the
/// number the code goes to opted out of the channel; and the last code that went to the number
/// the code goes to and the one that keeps its hour full, whichever number was named for them
/// (the rows with its index in `send_to_index`, codes that went there in place of the number
/// named, and those with it in `phone_index` marked `went_to_named`: migration 28).
/// `$1` the named number's blind index, `$2` user, `$3` client address, `$4` the window's start,
/// `$5` and `$6` the per-number-and-user and per-address limits less one, `$7` a send-log id to
/// leave out (the request's own), `$8` channel, `$9` the blind index of the number the code goes
/// to, `$10` that index again when the code goes to a number on file in place of the number named
/// (`OtpIssue::destination_limited`), else NULL: its two reads then find nothing at once.
/// Public for the tests that check its plan on each backend.
pub const OTP_CHECKS: &str = "SELECT \
     (SELECT created_at FROM otp_send_log WHERE phone_index = $1 AND id <> $7 \
      ORDER BY created_at DESC LIMIT 1), \
     (SELECT created_at FROM otp_send_log WHERE phone_index = $1 AND id <> $7 \
      AND created_at > $4 ORDER BY created_at DESC LIMIT 1 OFFSET $5), \
     (SELECT created_at FROM otp_send_log WHERE user_id = $2 AND id <> $7 \
      AND created_at > $4 ORDER BY created_at DESC LIMIT 1 OFFSET $5), \
     (SELECT created_at FROM otp_send_log WHERE ip = $3 AND id <> $7 \
      AND created_at > $4 ORDER BY created_at DESC LIMIT 1 OFFSET $6), \
     (SELECT COUNT(*) FROM opt_outs WHERE phone_index = $1 AND channel = $8), \
     (SELECT COUNT(*) FROM opt_outs WHERE phone_index = $9 AND channel = $8), \
     (SELECT MAX(t) FROM ( \
      SELECT (SELECT created_at FROM otp_send_log WHERE send_to_index = $10 AND id <> $7 \
       ORDER BY created_at DESC LIMIT 1) AS t \
      UNION ALL \
      SELECT (SELECT created_at FROM otp_send_log WHERE phone_index = $10 AND went_to_named \
       AND id <> $7 ORDER BY created_at DESC LIMIT 1)) AS d), \
     (SELECT t FROM ( \
      SELECT created_at AS t FROM otp_send_log WHERE send_to_index = $10 AND id <> $7 \
       AND created_at > $4 \
      UNION ALL \
      SELECT created_at FROM otp_send_log WHERE phone_index = $10 AND went_to_named \
       AND id <> $7 AND created_at > $4) AS d ORDER BY t DESC LIMIT 1 OFFSET $5)";

/// Whether a claim also takes `sending` messages whose lease ran out with no SID (their process
/// died mid-send).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stale {
    Include,
    Skip,
}

/// The dispatcher's claim, in index-ordered steps (each an UPDATE of up to `$3` rows leased
/// until `$1`, due at `$2`, returning `MESSAGE_COLUMNS`), so no claim sorts the whole due queue:
/// OTPs (queued, through `messages_due_otp`, or whose send died mid-way); then any other message
/// whose send died mid-way (its lease ran out with no SID); then queued messages, oldest first
/// (`messages_due`). With `Stale::Skip`, only the queued. `skip_locked` is the backend's
/// row-lock clause.
/// Public for the tests that check each step's plan on each backend.
pub fn claim_sql(skip_locked: &str, stale: Stale) -> Vec<String> {
    // `COALESCE(...) = ''`, not `IS NULL`: SQLite would otherwise walk the SID index through
    // every message not yet sent (all the queued ones) instead of the few `sending`.
    let stale_send = "status = 'sending' AND COALESCE(provider_sid, '') = '' AND lease_until < $2";
    let queued = "status = 'queued' AND next_attempt_at <= $2 \
                  AND (lease_until IS NULL OR lease_until < $2)";
    let claim = |filter: String| {
        format!(
            "UPDATE messages SET lease_until = $1 WHERE id IN ( \
             SELECT id FROM messages WHERE {filter} \
             ORDER BY next_attempt_at LIMIT $3{skip_locked}) \
             RETURNING {MESSAGE_COLUMNS}"
        )
    };
    match stale {
        Stale::Include => vec![
            claim(format!(
                "template_name = 'otp' AND (({queued}) OR ({stale_send}))"
            )),
            claim(format!("template_name <> 'otp' AND {stale_send}")),
            claim(format!("template_name <> 'otp' AND {queued}")),
        ],
        Stale::Skip => vec![
            claim(format!("template_name = 'otp' AND {queued}")),
            claim(format!("template_name <> 'otp' AND {queued}")),
        ],
    }
}

/// The planner settings a PostgreSQL claim runs under (transaction-local, like `SET LOCAL`, in
/// the claim's own transaction; `claim_sql`'s steps are written for them). Why: a step should
/// read the due queue in `messages_due` order and stop at its limit, but the planner takes that
/// path only when it believes the queue is long. Its statistics count the queued rows as of the
/// last `ANALYZE`: none on a new database, a handful in a steady state. So when a backlog builds
/// (the moment claims matter), it fetched every due row with a bitmap scan and sorted them all to
/// keep the first few hundred: 26 ms and 31,000 rows per claim with 30,000 queued, against 2.4 ms
/// and 128 rows in index order. With sorts priced out, a step that can read in index order does;
/// the OTP step (queued or stale, which no index orders) plans as it did. JIT is off with it: a
/// priced-out sort makes every plan of the OTP step cost more than `jit_above_cost`, and
/// compiling it took 140 ms per claim.
pub const POSTGRES_CLAIM_PLAN: &str =
    "SELECT set_config('enable_sort', 'off', true), set_config('jit', 'off', true)";

/// A message as stored, with its number, variables and last attempt's body opened.
pub(crate) fn open_message(
    vault: &crate::vault::Vault,
    mut m: MessageRecord,
) -> AppResult<MessageRecord> {
    m.to_number = vault.open_opt(m.to_number.as_deref())?;
    m.variables = vault.open(&m.variables)?;
    m.attempt_body = vault.open_opt(m.attempt_body.as_deref())?;
    Ok(m)
}

/// Claimed messages, as stored, opened and put in the order they go out. One that cannot be
/// opened (a value damaged on disk, or sealed with a key that is no longer configured) is left
/// out and logged: it keeps the lease the claim gave it, so it is claimed again when that runs
/// out, by which time the missing key may be back. Why not fail the claim: every message behind
/// it would wait, claim after claim. Why not fail the message: a key left out of
/// `DATA_ENCRYPTION_OLD_KEYS` by mistake would fail every message it sealed.
pub(crate) fn open_claimed(
    vault: &crate::vault::Vault,
    sealed: Vec<MessageRecord>,
    unreadable: &std::sync::atomic::AtomicU64,
) -> Vec<MessageRecord> {
    let mut claimed: Vec<MessageRecord> = sealed
        .into_iter()
        .filter_map(|m| {
            let (id, lease_until) = (m.id.clone(), m.lease_until);
            open_message(vault, m)
                .map_err(|e| {
                    unreadable.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::error!(
                        message_id = %id,
                        ?lease_until,
                        error = format!("{e:#}"),
                        "a claimed message could not be opened: left out of this claim, to be \
                         claimed again when its lease runs out"
                    )
                })
                .ok()
        })
        .collect();
    claim_order(&mut claimed);
    claimed
}

/// The order claimed messages are sent in: OTPs first (a patient is waiting), then the longest
/// waiting.
pub(crate) fn claim_order(claimed: &mut [MessageRecord]) {
    claimed.sort_by(|a, b| {
        (a.template_name != "otp")
            .cmp(&(b.template_name != "otp"))
            .then(a.next_attempt_at.cmp(&b.next_attempt_at))
            .then(a.id.cmp(&b.id))
    });
}

/// Write an OTP's message, claimed, and (with an attempt) already marked `sending` for it: `$1`
/// id, `$2` user, `$3` template, `$4` sealed variables, `$5` channel, `$6` now, `$7` the lease,
/// `$8` the attempt's start (NULL without one), `$9` sealed number, `$10` its blind index, `$11`
/// encoding, `$12` segments, `$13` sealed body, `$14` the status, `$15` the provider's SID. A send
/// an in-process provider accepted (`OtpIssue::accepted`) is written where it ends instead:
/// its status, its SID, no lease (`OtpIssue::written_status` and `written_lease`).
pub(crate) const INSERT_OTP_MESSAGE: &str =
    "INSERT INTO messages (id, user_id, template_name, variables, channel, status, attempts, \
     idempotency_key, next_attempt_at, lease_until, created_at, updated_at, to_number, to_index, \
     encoding, segments, attempt_started_at, attempt_body, lookup_needed, provider_sid) \
     VALUES ($1, $2, $3, $4, $5, $14, CASE WHEN $8 IS NULL THEN 0 ELSE 1 END, NULL, $6, \
     $7, $6, $6, $9, $10, $11, $12, $8, $13, FALSE, $15)";

/// The row `OTP_CHECKS` reads.
#[derive(Debug, Clone)]
pub(crate) struct OtpChecks {
    pub last_send: Option<DateTime<Utc>>,
    pub number_full: Option<DateTime<Utc>>,
    pub user_full: Option<DateTime<Utc>>,
    pub address_full: Option<DateTime<Utc>>,
    pub named_opted_out: bool,
    pub send_to_opted_out: bool,
    /// The last code that went to the number the code goes to, and the send that keeps that
    /// number's hour full.
    pub destination_last_send: Option<DateTime<Utc>>,
    pub destination_full: Option<DateTime<Utc>>,
}

impl OtpIssue {
    /// The accepted send to record, when there is an attempt to record it for.
    pub(crate) fn accepted_send(&self) -> Option<&AcceptedSend> {
        self.accepted.as_ref().filter(|_| self.attempt.is_some())
    }

    /// The status the message is written in: `sending`, or where an accepted send ends.
    pub(crate) fn written_status(&self) -> MessageStatus {
        self.accepted_send()
            .map_or(MessageStatus::Sending, AcceptedSend::status)
    }

    /// The claim the message is written with: none once its send is recorded.
    pub(crate) fn written_lease(&self) -> Option<DateTime<Utc>> {
        self.message
            .claimed_until
            .filter(|_| self.accepted_send().is_none())
    }

    /// The message as `INSERT_OTP_MESSAGE` writes it (clear text where the row is sealed).
    pub(crate) fn issued_record(&self) -> MessageRecord {
        let m = &self.message;
        let attempt = self.attempt.as_ref();
        let accepted = self.accepted_send();
        MessageRecord {
            id: m.id.clone(),
            user_id: m.user_id.clone(),
            template_name: m.template_name.clone(),
            variables: m.variables.clone(),
            channel: attempt
                .map_or(m.channel, |a| a.channel)
                .as_str()
                .to_string(),
            status: self.written_status(),
            reason: None,
            to_number: attempt.map(|a| a.to_number.clone()),
            provider_sid: accepted.map(|a| a.provider_sid.clone()),
            error_code: None,
            error_message: None,
            encoding: attempt.and_then(|a| a.encoding.clone()),
            segments: attempt.and_then(|a| a.segments),
            attempts: i64::from(attempt.is_some()),
            idempotency_key: None,
            next_attempt_at: m.created_at,
            lease_until: self.written_lease(),
            created_at: m.created_at,
            updated_at: m.created_at,
            requested_channel: None,
            attempt_started_at: attempt.map(|_| m.created_at),
            attempt_body: attempt.and_then(|a| a.body.clone()),
            lookup_needed: false,
        }
    }

    /// The message as written for a code dropped at its destination's limits
    /// (`OtpIssueOutcome::DestinationLimited`): as the issue's, but claimed with no attempt (no
    /// number, no event, no sender's slot), for the caller to record as skipped.
    pub(crate) fn dropped_record(&self) -> MessageRecord {
        let m = &self.message;
        MessageRecord {
            channel: m.channel.as_str().to_string(),
            status: MessageStatus::Sending,
            to_number: None,
            provider_sid: None,
            encoding: None,
            segments: None,
            attempts: 0,
            lease_until: m.claimed_until,
            attempt_started_at: None,
            attempt_body: None,
            ..self.issued_record()
        }
    }

    /// The limits this issue is checked against.
    pub(crate) fn limits(&self) -> OtpLimits<'_> {
        OtpLimits {
            user_id: &self.user_id,
            phone_number: &self.phone_number,
            channel: self.channel,
            ip: self.ip.as_deref(),
            now: self.now,
            cooldown_seconds: self.cooldown_seconds,
            max_sends_per_hour: self.max_sends_per_hour,
            max_sends_per_ip_per_hour: self.max_sends_per_ip_per_hour,
        }
    }

    /// `OtpLimits::window` for this issue.
    pub(crate) fn window(&self) -> (DateTime<Utc>, i64, i64) {
        self.limits().window()
    }

    /// `OtpLimits::refusal` for this issue.
    pub(crate) fn refusal(&self, checks: &OtpChecks) -> Option<LimitRefusal> {
        self.limits().refusal(checks)
    }

    /// A code about to go to a number on file in place of the number named (it has an attempt:
    /// nothing goes out for a skipped send) while that number is within its cooldown or has its
    /// hour's codes, whichever way they were asked for: dropped, silently
    /// (`OtpIssueOutcome::DestinationLimited`). A code to the number named is held by that
    /// number's own limits only: if codes through accounts could hold it back, a caller naming a
    /// number for their own account could tell, from their own history, whether that number is
    /// on file for an account they had just asked a code for.
    pub(crate) fn destination_limited(&self, checks: &OtpChecks) -> bool {
        let cooling = self
            .limits()
            .cooling_until(checks.destination_last_send)
            .is_some();
        self.attempt.is_some()
            && self.redirected()
            && (cooling || checks.destination_full.is_some())
    }

    /// The code goes to a number on file in place of the number named.
    pub(crate) fn redirected(&self) -> bool {
        self.send_to != self.phone_number
    }

    /// The attempt and the message record to write for this issue: a dropped code
    /// (`destination_limited`) is written as an issued one, but for its send (no attempt).
    pub(crate) fn written(&self, dropped: bool) -> (Option<&SendAttempt>, MessageRecord) {
        if dropped {
            (None, self.dropped_record())
        } else {
            (self.attempt.as_ref(), self.issued_record())
        }
    }

    /// `OTP_CHECKS`' `$10`: the blind index of the number on file the code goes to in place of
    /// the number named, whose limits `destination_limited` applies; `None` for the number named.
    /// `send_to_index`: the blind index of `send_to`.
    pub(crate) fn checked_destination<'a>(&self, send_to_index: &'a str) -> Option<&'a str> {
        self.redirected().then_some(send_to_index)
    }

    /// Where the send log records this code as gone, for `destination_limited`'s reads, when
    /// `goes_out` (it has an attempt, and was neither refused for an opt-out nor dropped).
    /// `send_to_index`: the blind index of `send_to`.
    pub(crate) fn logged_destination<'a>(
        &self,
        send_to_index: &'a str,
        goes_out: bool,
    ) -> LoggedDestination<'a> {
        let goes_out = goes_out && self.attempt.is_some();
        LoggedDestination {
            send_to_index: (goes_out && self.redirected()).then_some(send_to_index),
            went_to_named: goes_out && !self.redirected(),
        }
    }

    /// `Some(true)` when the number named opted out of the channel, `Some(false)` when the number
    /// the code would go to did, `None` when neither.
    pub(crate) fn opted_out(&self, checks: &OtpChecks) -> Option<bool> {
        if checks.named_opted_out {
            Some(true)
        } else if checks.send_to_opted_out {
            Some(false)
        } else {
            None
        }
    }
}

/// The send log's record of where a code went (migration 28): a code that went out to a number on
/// file in place of the number named is logged under that number's blind index; one that went
/// out to the number named is only marked, since the row's `phone_index` is that number's (no
/// second index entry for the common code); one that went nowhere, neither.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LoggedDestination<'a> {
    pub send_to_index: Option<&'a str>,
    pub went_to_named: bool,
}

impl OtpLimits<'_> {
    /// The start of the hourly window and `OTP_CHECKS`' two offsets (`$4`, `$5`, `$6`).
    pub(crate) fn window(&self) -> (DateTime<Utc>, i64, i64) {
        (
            self.now - chrono::Duration::hours(1),
            (self.max_sends_per_hour - 1).max(0),
            (self.max_sends_per_ip_per_hour - 1).max(0),
        )
    }

    /// When the cooldown after a number's last send (`last`) lifts, while it holds. None at all
    /// when it is zero: a send logged by a request stamped a moment after this one (they ran side
    /// by side) is not "within the cooldown" of it.
    pub(crate) fn cooling_until(&self, last: Option<DateTime<Utc>>) -> Option<DateTime<Utc>> {
        last.filter(|_| self.cooldown_seconds > 0)
            .map(|last| last + chrono::Duration::seconds(self.cooldown_seconds))
            .filter(|ready| *ready > self.now)
    }

    /// What refuses this send, or `None` when it may go: the cooldown per number, then the
    /// hourly limits per number, per user and per client address, each until the send that
    /// keeps its window full ages out. A limit of no sends at all refuses a second at a time.
    pub(crate) fn refusal(&self, checks: &OtpChecks) -> Option<LimitRefusal> {
        let now = self.now;
        let cooling = self.cooling_until(checks.last_send);
        let hour = |applies: bool, full: Option<DateTime<Utc>>, max: i64| {
            if !applies {
                None
            } else if max <= 0 {
                Some(now + chrono::Duration::seconds(1))
            } else {
                full.map(|full| full + chrono::Duration::hours(1))
            }
        };
        let number_until = cooling.max(hour(true, checks.number_full, self.max_sends_per_hour));
        let user_until = hour(true, checks.user_full, self.max_sends_per_hour);
        let address_until = hour(
            self.ip.is_some(),
            checks.address_full,
            self.max_sends_per_ip_per_hour,
        );
        let refusal = LimitRefusal::new(now, number_until, user_until, address_until);
        refusal.lifts().is_some().then_some(refusal)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use chrono::Duration;

    /// A code for `u1` at a UK mobile with message `m1`, a 60 s cooldown and 5 sends an hour.
    pub(crate) fn issue(now: DateTime<Utc>, ip: Option<&str>) -> OtpIssue {
        OtpIssue {
            user_id: "u1".into(),
            purpose: "login".into(),
            phone_number: "+447700900123".into(),
            send_to: "+447700900123".into(),
            channel: Channel::Sms,
            code_hash: "h".into(),
            ip: ip.map(str::to_string),
            expires_at: now + Duration::minutes(10),
            now,
            cooldown_seconds: 60,
            max_sends_per_hour: 5,
            max_sends_per_ip_per_hour: 30,
            message: NewMessage {
                id: "m1".into(),
                user_id: "u1".into(),
                template_name: "otp".into(),
                variables: "{}".into(),
                channel: Channel::Sms,
                idempotency_key: None,
                created_at: now,
                claimed_until: Some(now + Duration::minutes(1)),
            },
            attempt: None,
            accepted: None,
            unless_on_file: false,
        }
    }

    fn clear() -> OtpChecks {
        OtpChecks {
            last_send: None,
            number_full: None,
            user_full: None,
            address_full: None,
            named_opted_out: false,
            send_to_opted_out: false,
            destination_last_send: None,
            destination_full: None,
        }
    }

    #[test]
    fn only_a_code_that_goes_out_to_a_number_on_file_is_held_to_its_limits() {
        let now = Utc::now();
        let mut issue = issue(now, None);
        let cooling = OtpChecks {
            destination_last_send: Some(now - Duration::seconds(59)),
            ..clear()
        };
        let cooled = OtpChecks {
            destination_last_send: Some(now - Duration::seconds(60)),
            ..clear()
        };
        let full = OtpChecks {
            destination_full: Some(now - Duration::minutes(59)),
            ..clear()
        };
        issue.send_to = "+447700900999".into();
        // A skipped send (no attempt) sends nothing: nothing to hold back.
        assert!(!issue.destination_limited(&cooling));
        assert!(!issue.destination_limited(&full));
        issue.attempt = Some(attempt_to(&issue.send_to));
        assert!(issue.destination_limited(&cooling));
        assert!(!issue.destination_limited(&cooled));
        assert!(issue.destination_limited(&full));
        assert!(!issue.destination_limited(&clear()));
        // Never a visible wait: the caller must not learn the number is someone's on file.
        assert_eq!(issue.refusal(&full).map(|r| r.retry_after_seconds), None);
        // A code to the number named is held by that number's own limits only.
        issue.send_to = issue.phone_number.clone();
        assert!(!issue.destination_limited(&cooling));
        assert!(!issue.destination_limited(&full));
    }

    fn attempt_to(number: &str) -> SendAttempt {
        SendAttempt {
            to_number: number.to_string(),
            channel: Channel::Sms,
            encoding: None,
            segments: None,
            body: None,
            take_slot: None,
        }
    }

    #[test]
    fn a_code_to_the_number_named_is_logged_with_no_index_of_its_own() {
        let mut issue = issue(Utc::now(), None);
        let nowhere = LoggedDestination {
            send_to_index: None,
            went_to_named: false,
        };
        // A skipped send (no attempt) went nowhere, whatever the caller says.
        assert_eq!(issue.logged_destination("d", true), nowhere);
        issue.attempt = Some(attempt_to(&issue.send_to));
        let named = LoggedDestination {
            send_to_index: None,
            went_to_named: true,
        };
        assert_eq!(issue.logged_destination("d", true), named);
        // Refused for an opt-out, or dropped.
        assert_eq!(issue.logged_destination("d", false), nowhere);
        issue.send_to = "+447700900999".into();
        let on_file = LoggedDestination {
            send_to_index: Some("d"),
            went_to_named: false,
        };
        assert_eq!(issue.logged_destination("d", true), on_file);
        assert_eq!(issue.logged_destination("d", false), nowhere);
    }

    #[test]
    fn the_longest_wait_of_cooldown_and_full_windows_wins() {
        let now = Utc::now();
        let issue = issue(now, Some("198.51.100.7"));
        assert_eq!(
            issue.window().1,
            4,
            "the 5th newest send fills a limit of 5"
        );
        assert_eq!(issue.refusal(&clear()).map(|r| r.retry_after_seconds), None);
        let cooling = OtpChecks {
            last_send: Some(now - Duration::seconds(20)),
            ..clear()
        };
        assert_eq!(
            issue.refusal(&cooling).map(|r| r.retry_after_seconds),
            Some(40)
        );
        let full = OtpChecks {
            last_send: Some(now - Duration::seconds(20)),
            user_full: Some(now - Duration::minutes(50)),
            ..clear()
        };
        assert_eq!(
            issue.refusal(&full).map(|r| r.retry_after_seconds),
            Some(600)
        );
        let address_full = OtpChecks {
            address_full: Some(now - Duration::minutes(59)),
            ..clear()
        };
        assert_eq!(
            issue.refusal(&address_full).map(|r| r.retry_after_seconds),
            Some(60)
        );
    }

    #[test]
    fn a_refusal_names_each_limit_that_refused_and_until_when() {
        let now = Utc::now();
        let issue = issue(now, Some("198.51.100.7"));
        // The number cooling (for 40 s) and full (for 5 minutes): the later of the two; the
        // user's hour full for 10 minutes; the address's hour not full.
        let checks = OtpChecks {
            last_send: Some(now - Duration::seconds(20)),
            number_full: Some(now - Duration::minutes(55)),
            user_full: Some(now - Duration::minutes(50)),
            ..clear()
        };
        let refusal = issue.refusal(&checks).unwrap();
        assert_eq!(refusal.number_until, Some(now + Duration::minutes(5)));
        assert_eq!(refusal.user_until, Some(now + Duration::minutes(10)));
        assert_eq!(refusal.address_until, None);
        assert_eq!(refusal.retry_after_seconds, 600);
        // Cooling only: the number's limit, until the cooldown ends.
        let cooling = OtpChecks {
            last_send: Some(now - Duration::seconds(20)),
            ..clear()
        };
        let refusal = issue.refusal(&cooling).unwrap();
        assert_eq!(refusal.number_until, Some(now + Duration::seconds(40)));
        assert_eq!((refusal.user_until, refusal.address_until), (None, None));
    }

    #[test]
    fn a_limit_of_zero_refuses_and_an_unknown_address_has_no_address_limit() {
        let now = Utc::now();
        let mut none_allowed = issue(now, None);
        none_allowed.max_sends_per_ip_per_hour = 0;
        assert_eq!(
            none_allowed
                .refusal(&clear())
                .map(|r| r.retry_after_seconds),
            None
        );
        none_allowed.ip = Some("198.51.100.7".into());
        assert_eq!(
            none_allowed
                .refusal(&clear())
                .map(|r| r.retry_after_seconds),
            Some(1)
        );
    }

    #[test]
    fn the_number_named_is_reported_before_the_number_on_file() {
        let issue = issue(Utc::now(), None);
        let both = OtpChecks {
            named_opted_out: true,
            send_to_opted_out: true,
            ..clear()
        };
        assert_eq!(issue.opted_out(&both), Some(true));
        let on_file = OtpChecks {
            send_to_opted_out: true,
            ..clear()
        };
        assert_eq!(issue.opted_out(&on_file), Some(false));
        assert_eq!(issue.opted_out(&clear()), None);
    }
}
