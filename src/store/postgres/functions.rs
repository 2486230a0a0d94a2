//! The hot writes on PostgreSQL, each one call of a batch function that migration 17 installs
//! (`migrations/postgres/0017_hot_write_functions.sql`; migration 18 makes a batch take its send
//! slots at its end): OTPs issued, messages marked `sending`, sends' outcomes recorded.
//! Concurrent calls of one kind share a batch (`batch.rs`).
//!
//! Why: through the portable transactions each statement was a round trip, and PostgreSQL spent
//! most of an OTP send parsing, binding and answering 17 of them. A function runs the same
//! statements on cached plans inside the server, and a single statement outside a transaction
//! block is its own transaction: one round trip, one commit, for a whole batch. What the
//! functions write is what the portable twins write (`store_conformance` runs both backends
//! through the same tests).

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use sqlx::postgres::PgRow;
use sqlx::{Pool, Postgres};

use super::batch::{Abandoned, BatchError, Batcher, RunBatch};
use crate::error::AppResult;
use crate::status::MessageStatus;
use crate::store::{
    Consent, LimitRefusal, MarkSending, OtpChecks, OtpIssue, OtpIssueOutcome, SendAttempt,
    SendGuard, CONSENT_COLUMNS,
};
use crate::vault::Vault;

pub struct PgFunctions {
    issue: Batcher<IssueJob, IssueAnswer>,
    mark: Batcher<MarkJob, Outcome>,
    sent: Batcher<SentJob, Outcome>,
    consents: Batcher<String, Option<Consent>>,
}

/// What recording a send came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SentCall {
    Recorded,
    ClaimLost,
    /// Callbacks for the SID wait to be applied: nothing written; the full transaction applies
    /// them with the send.
    CallbacksParked,
}

/// A time as PostgreSQL's JSON input reads it, cut to microseconds as sqlx binds one: a lease
/// written here must equal the fence another path binds later.
fn micros(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// One job of a batch, as the batch function's JSON array holds it.
#[derive(Serialize)]
struct NumberedJob<'a, T> {
    n: usize,
    #[serde(flatten)]
    job: &'a T,
}

/// The jobs as the batch function's JSON array.
fn jobs_json<T: Serialize>(jobs: &[T]) -> AppResult<String> {
    let numbered: Vec<NumberedJob<T>> = jobs
        .iter()
        .enumerate()
        .map(|(n, job)| NumberedJob { n, job })
        .collect();
    Ok(serde_json::to_string(&numbered).map_err(anyhow::Error::new)?)
}

/// A job of a batch function: the advisory locks it needs (taken for the whole batch, first).
trait BatchJob: Serialize + Clone + Send + Sync + 'static {
    fn locks(&self) -> &[String];
}

/// A row a batch function answers: the job's number `n`, then its outcome.
trait Numbered {
    fn n(&self) -> i64;
}

/// Every lock the batch's jobs need, sorted, each once: taken first, in this order, so two
/// batches never wait on each other in a circle.
fn batch_locks<T: BatchJob>(jobs: &[T]) -> Vec<String> {
    let mut all: Vec<String> = jobs
        .iter()
        .flat_map(|j| j.locks().iter().cloned())
        .collect();
    all.sort();
    all.dedup();
    all
}

/// Rows numbered `n` back into job order; an error if any job has no row.
fn in_job_order<R: Numbered>(count: usize, rows: Vec<R>, what: &str) -> Result<Vec<R>, BatchError> {
    let mut slots: Vec<Option<R>> = (0..count).map(|_| None).collect();
    for row in rows {
        if let Some(slot) = usize::try_from(row.n()).ok().and_then(|n| slots.get_mut(n)) {
            *slot = Some(row);
        }
    }
    slots
        .into_iter()
        .map(|r| {
            r.ok_or_else(|| {
                BatchError::Failed(anyhow::anyhow!("{what}: a job had no answer").into())
            })
        })
        .collect()
}

/// Run a batch function `function(locks, jobs)` (each of migration 17's takes the batch's sorted
/// locks and its jobs as a JSON array, and answers one numbered row per job).
fn batch_runner<J, R>(pool: Pool<Postgres>, function: &'static str) -> RunBatch<J, R>
where
    J: BatchJob,
    R: for<'r> sqlx::FromRow<'r, PgRow> + Numbered + Send + Unpin + 'static,
{
    Arc::new(move |jobs: Arc<[J]>| {
        let pool = pool.clone();
        Box::pin(async move {
            let rows: Vec<R> = sqlx::query_as(&format!("SELECT * FROM {function}($1, $2::jsonb)"))
                .bind(batch_locks(&jobs))
                .bind(jobs_json(&jobs)?)
                .fetch_all(&pool)
                .await?;
            in_job_order(jobs.len(), rows, function)
        })
    })
}

/// Consent records by user id, as many as are asked for at once in one query; `None` for a user
/// with none. The one hot read: a code for any purpose but `verification` goes to the number on
/// file, so every such send reads it first, and one query per send was a quarter of the
/// server's work for a code (the protocol round trip and the executor, not the index lookup).
/// A batch runs after its reads were asked for, so each sees every write committed before.
fn consent_runner(pool: Pool<Postgres>) -> RunBatch<String, Option<Consent>> {
    Arc::new(move |user_ids: Arc<[String]>| {
        let pool = pool.clone();
        Box::pin(async move {
            let sql =
                format!("SELECT {CONSENT_COLUMNS} FROM messaging_consent WHERE user_id = ANY($1)");
            let rows: Vec<Consent> = sqlx::query_as(&sql)
                .bind(user_ids.to_vec())
                .fetch_all(&pool)
                .await?;
            let by_user: HashMap<&str, &Consent> =
                rows.iter().map(|c| (c.user_id.as_str(), c)).collect();
            // The same user may be asked for twice in one batch: each asker gets the record.
            Ok(user_ids
                .iter()
                .map(|id| by_user.get(id.as_str()).map(|c| (*c).clone()))
                .collect())
        })
    })
}

/// `otp_issue_batch`'s row: the job's outcome and the checks it was decided on.
#[derive(sqlx::FromRow)]
struct IssueAnswer {
    n: i64,
    outcome: String,
    last_send: Option<DateTime<Utc>>,
    number_full: Option<DateTime<Utc>>,
    user_full: Option<DateTime<Utc>>,
    address_full: Option<DateTime<Utc>>,
    named_opted_out: bool,
    send_to_opted_out: bool,
    /// The user's number on file (sealed), where the code went instead of the number named.
    redirected_to: Option<String>,
}

/// The row of the other batch functions: the job's outcome.
#[derive(sqlx::FromRow)]
struct Outcome {
    n: i64,
    outcome: String,
}

impl Numbered for IssueAnswer {
    fn n(&self) -> i64 {
        self.n
    }
}

impl Numbered for Outcome {
    fn n(&self) -> i64 {
        self.n
    }
}

#[derive(Clone, Serialize)]
struct IssueJob {
    #[serde(skip)]
    locks: Vec<String>,
    phone_index: String,
    sealed_phone: String,
    user_id: String,
    ip: Option<String>,
    now: String,
    window_start: String,
    per_number: i64,
    per_address: i64,
    /// `None` without a cooldown: the function's comparisons with it are then never true.
    cooldown_after: Option<String>,
    refuse_all: bool,
    channel: &'static str,
    send_to_index: String,
    message_id: String,
    template: String,
    variables: String,
    message_channel: String,
    created_at: String,
    lease: Option<String>,
    attempt_started: Option<String>,
    to_number: Option<String>,
    to_index: Option<String>,
    encoding: Option<String>,
    segments: Option<i64>,
    body: Option<String>,
    slot_sender: Option<String>,
    slot_now_us: Option<i64>,
    slot_interval_us: Option<i64>,
    purpose: String,
    code_to: String,
    code_hash: String,
    expires_at: String,
    /// The message's status, and an in-process provider's acceptance (`OtpIssue::accepted`).
    status: &'static str,
    sid: Option<String>,
    news: Option<&'static str>,
    unless_on_file: bool,
    /// The claim a dropped code's message is written with (`OtpIssue::dropped_record`).
    claimed_until: Option<String>,
}

#[derive(Clone, Serialize)]
struct MarkJob {
    id: String,
    to_number: String,
    encoding: Option<String>,
    segments: Option<i64>,
    now: String,
    channel: &'static str,
    fence: String,
    lease: String,
    body: Option<String>,
    to_index: String,
    consent: bool,
    marketing: bool,
    slot_sender: Option<String>,
    slot_now_us: Option<i64>,
    slot_interval_us: Option<i64>,
}

impl BatchJob for IssueJob {
    fn locks(&self) -> &[String] {
        &self.locks
    }
}

/// Marks take no advisory lock: each message is claimed by one dispatcher.
impl BatchJob for MarkJob {
    fn locks(&self) -> &[String] {
        &[]
    }
}

impl BatchJob for SentJob {
    fn locks(&self) -> &[String] {
        &self.locks
    }
}

#[derive(Clone, Serialize)]
struct SentJob {
    #[serde(skip)]
    locks: Vec<String>,
    id: String,
    fence: String,
    status: &'static str,
    news: Option<&'static str>,
    sid: String,
    now: String,
}

impl PgFunctions {
    /// Start the batchers (on the current tokio runtime).
    pub fn new(pool: Pool<Postgres>) -> PgFunctions {
        PgFunctions {
            issue: Batcher::start(
                "issuing OTPs",
                Abandoned::Skip,
                batch_runner(pool.clone(), "otp_issue_batch"),
            ),
            mark: Batcher::start(
                "marking messages sending",
                Abandoned::Skip,
                batch_runner(pool.clone(), "message_mark_sending_batch"),
            ),
            // A send's record runs even for a caller that has gone: the message went out.
            sent: Batcher::start(
                "recording sends",
                Abandoned::Run,
                batch_runner(pool.clone(), "message_sent_batch"),
            ),
            consents: Batcher::start("reading consents", Abandoned::Skip, consent_runner(pool)),
        }
    }

    /// A user's consent record as stored (sealed), read in a batch with the others asked for.
    pub async fn consent(&self, user_id: &str) -> AppResult<Option<Consent>> {
        self.consents.call(user_id.to_string()).await
    }

    pub async fn issue_otp(&self, vault: &Vault, issue: &OtpIssue) -> AppResult<OtpIssueOutcome> {
        let phone_index = vault.blind(&issue.phone_number);
        let send_to_index = vault.blind(&issue.send_to);
        let mut locks = vec![
            format!("otp:phone:{phone_index}"),
            format!("otp:user:{}", issue.user_id),
        ];
        // The number the code goes to, when it is known here and not the number named (the
        // function takes the lock of a number it finds on file itself).
        if issue.redirected() {
            locks.push(format!("otp:phone:{send_to_index}"));
        }
        if let Some(ip) = &issue.ip {
            locks.push(format!("otp:ip:{ip}"));
        }
        let (window_start, per_number, per_address) = issue.window();
        let message = issue.issued_record();
        let attempt = issue.attempt.as_ref();
        let accepted = issue.accepted_send();
        let slot = attempt.and_then(|a| a.take_slot.as_ref());
        let (to_number, to_index, body) = match attempt.map(|a| a.sealed(vault)) {
            Some(sealed) => (Some(sealed.to_number), Some(sealed.to_index), sealed.body),
            None => (None, None, None),
        };
        let job = IssueJob {
            locks,
            sealed_phone: vault.seal(&issue.phone_number),
            phone_index,
            user_id: issue.user_id.clone(),
            ip: issue.ip.clone(),
            now: micros(issue.now),
            window_start: micros(window_start),
            per_number,
            per_address,
            // The limits `OtpIssue::refusal` applies, as the function's refusal test: a
            // send within the cooldown (none when it is zero: a send logged by a request
            // stamped a moment after this one must not hold it back), a full window, or a
            // limit of zero.
            cooldown_after: (issue.cooldown_seconds > 0)
                .then(|| micros(issue.now - chrono::Duration::seconds(issue.cooldown_seconds))),
            refuse_all: issue.max_sends_per_hour <= 0
                || (issue.ip.is_some() && issue.max_sends_per_ip_per_hour <= 0),
            channel: issue.channel.as_str(),
            send_to_index,
            message_id: message.id.clone(),
            template: message.template_name.clone(),
            variables: vault.seal(&message.variables),
            message_channel: message.channel.clone(),
            created_at: micros(message.created_at),
            lease: issue.written_lease().map(micros),
            attempt_started: message.attempt_started_at.map(micros),
            to_number,
            to_index,
            encoding: message.encoding.clone(),
            segments: message.segments,
            body,
            slot_sender: slot.map(|s| s.sender.clone()),
            slot_now_us: slot.map(|s| s.now_us),
            slot_interval_us: slot.map(|s| s.interval_us),
            purpose: issue.purpose.clone(),
            code_to: vault.seal(&issue.send_to),
            code_hash: issue.code_hash.clone(),
            expires_at: micros(issue.expires_at),
            status: issue.written_status().as_str(),
            sid: accepted.map(|a| a.provider_sid.clone()),
            news: accepted.and_then(|a| a.news).map(|n| n.as_str()),
            unless_on_file: issue.unless_on_file,
            claimed_until: issue.message.claimed_until.map(micros),
        };
        let answer = self.issue.call(job).await?;
        let checks = OtpChecks {
            last_send: answer.last_send,
            number_full: answer.number_full,
            user_full: answer.user_full,
            address_full: answer.address_full,
            named_opted_out: answer.named_opted_out,
            send_to_opted_out: answer.send_to_opted_out,
            // Decided in the function (`destination_limited`); not handed back.
            destination_last_send: None,
            destination_full: None,
        };
        match answer.outcome.as_str() {
            // The function's test is `OtpIssue::refusal`'s, so one is found; a second otherwise.
            "rate_limited" => Ok(OtpIssueOutcome::RateLimited(
                issue
                    .refusal(&checks)
                    .unwrap_or_else(|| LimitRefusal::new(issue.now, None, None, None)),
            )),
            "opted_out" => Ok(OtpIssueOutcome::OptedOut {
                named: checks.named_opted_out,
            }),
            "issued" => match answer.redirected_to {
                None => Ok(OtpIssueOutcome::Issued(Box::new(message))),
                Some(sealed) => {
                    let to = vault.open(&sealed)?;
                    let mut message = message;
                    if message.to_number.is_some() {
                        message.to_number = Some(to.clone());
                    }
                    Ok(OtpIssueOutcome::IssuedToNumberOnFile {
                        message: Box::new(message),
                        to,
                    })
                }
            },
            "on_file_elsewhere" => Ok(OtpIssueOutcome::OnFileElsewhere),
            "destination_limited" => Ok(OtpIssueOutcome::DestinationLimited(Box::new(
                issue.dropped_record(),
            ))),
            other => Err(anyhow::anyhow!("otp_issue_batch answered {other:?}").into()),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn mark_sending(
        &self,
        vault: &Vault,
        id: &str,
        attempt: &SendAttempt,
        guard: SendGuard,
        now: DateTime<Utc>,
        fence: DateTime<Utc>,
        new_lease: DateTime<Utc>,
    ) -> AppResult<MarkSending> {
        let slot = attempt.take_slot.as_ref();
        let sealed = attempt.sealed(vault);
        let job = MarkJob {
            id: id.to_string(),
            to_number: sealed.to_number,
            encoding: attempt.encoding.clone(),
            segments: attempt.segments,
            now: micros(now),
            channel: attempt.channel.as_str(),
            fence: micros(fence),
            lease: micros(new_lease),
            body: sealed.body,
            to_index: sealed.to_index,
            consent: guard.consent,
            marketing: guard.marketing,
            slot_sender: slot.map(|s| s.sender.clone()),
            slot_now_us: slot.map(|s| s.now_us),
            slot_interval_us: slot.map(|s| s.interval_us),
        };
        match self.mark.call(job).await?.outcome.as_str() {
            "marked" => Ok(MarkSending::Marked),
            "policy_changed" => Ok(MarkSending::PolicyChanged),
            "claim_lost" => Ok(MarkSending::ClaimLost),
            other => Err(anyhow::anyhow!("message_mark_sending_batch answered {other:?}").into()),
        }
    }

    /// `news` must already be checked to follow `status` (`MessageStatus::may_follow`).
    pub async fn record_sent(
        &self,
        id: &str,
        provider_sid: &str,
        status: MessageStatus,
        news: Option<MessageStatus>,
        now: DateTime<Utc>,
        fence: DateTime<Utc>,
    ) -> AppResult<SentCall> {
        let job = SentJob {
            // The SID's lock, as `apply_status` takes it: recording a SID and parking a status
            // for it never interleave.
            locks: vec![format!("sid:{provider_sid}")],
            id: id.to_string(),
            fence: micros(fence),
            status: status.as_str(),
            news: news.map(|n| n.as_str()),
            sid: provider_sid.to_string(),
            now: micros(now),
        };
        match self.sent.call(job).await?.outcome.as_str() {
            "recorded" => Ok(SentCall::Recorded),
            "claim_lost" => Ok(SentCall::ClaimLost),
            "parked" => Ok(SentCall::CallbacksParked),
            other => Err(anyhow::anyhow!("message_sent_batch answered {other:?}").into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_go_to_the_database_cut_to_microseconds_as_sqlx_binds_them() {
        let t = DateTime::parse_from_rfc3339("2027-01-02T03:04:05.123456789Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(micros(t), "2027-01-02T03:04:05.123456Z");
    }

    #[test]
    fn a_batch_takes_each_lock_once_in_sorted_order() {
        #[derive(Clone, Serialize)]
        struct Locking(Vec<String>);
        impl BatchJob for Locking {
            fn locks(&self) -> &[String] {
                &self.0
            }
        }
        let jobs = [
            Locking(vec!["otp:user:b".into(), "otp:phone:x".into()]),
            Locking(vec!["otp:user:a".into(), "otp:phone:x".into()]),
        ];
        assert_eq!(
            batch_locks(&jobs),
            ["otp:phone:x", "otp:user:a", "otp:user:b"]
        );
    }

    #[test]
    fn jobs_are_numbered_in_the_json_array() {
        #[derive(Serialize)]
        struct J {
            id: &'static str,
        }
        let json = jobs_json(&[J { id: "a" }, J { id: "b" }]).unwrap();
        assert_eq!(json, r#"[{"n":0,"id":"a"},{"n":1,"id":"b"}]"#);
    }
}
