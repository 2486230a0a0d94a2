//! One conformance suite for the `Store` interface, run against SQLite and PostgreSQL alike.

use std::collections::HashSet;
use std::sync::Arc;

use crate::common::{event_statuses, Backend, TestDatabase};
use chrono::{Duration, TimeZone, Utc};
use prism_messaging::consent::ConsentPatch;
use prism_messaging::status::{MessageStatus, SkipReason};
/// Mark without the consent re-check (as for an OTP); opt-outs still apply.
const NO_GUARD: SendGuard = SendGuard {
    consent: false,
    marketing: false,
};

use prism_messaging::store::{
    self, ChangeContext, Channel, ConsentSource, DispatchResult, DynStore, NewMessage, SendAttempt,
};
use prism_messaging::store::{MarkSending, SendGuard, SendSlotAnswer};

both_backends!(
    readiness_needs_the_schema_this_build_runs_on,
    a_send_log_from_migration_27_is_converted,
    consent_changes_are_audited_per_field,
    audit_trail_is_append_only,
    idempotency_key_is_unique_but_optional,
    claiming_leases_due_messages_once,
    concurrent_claimers_never_share_a_message,
    dispatch_results_and_events,
    user_messages_newest_first,
    unmatched_status_callbacks_wait_for_their_sid,
    marking_sending_checks_opt_out_and_consent_in_the_same_statement,
    otps_are_claimed_first_then_the_oldest,
    concurrent_otp_issues_keep_every_limit,
    a_failing_otp_issue_fails_alone,
    an_otp_accepted_in_process_is_recorded_in_its_issue,
    otps_issued_together_each_take_a_send_slot,
    marks_together_each_take_a_send_slot,
    a_send_slot_after_the_latest_time_is_not_taken,
    opt_outs_are_read_for_many_numbers_at_once,
    consents_read_together_each_answer_their_own,
    otp_issues_together_each_get_their_own_outcome,
    a_cooldown_of_zero_holds_no_code_back_whatever_order_they_are_stamped_in,
    an_issue_unless_on_file_goes_to_the_number_on_file,
    sends_recorded_together_each_get_their_own_outcome,
    marks_together_each_get_their_own_outcome,
    claims_read_the_due_queue_in_index_order,
    a_message_that_cannot_be_opened_does_not_hold_up_the_queue,
);

fn t0() -> chrono::DateTime<Utc> {
    Utc.with_ymd_and_hms(2027, 1, 10, 9, 0, 0).unwrap()
}

async fn open(backend: Backend) -> (DynStore, TestDatabase) {
    let db = TestDatabase::new(backend).await;
    let store = store::connect(&db.url, &crate::common::test_keys())
        .await
        .unwrap();
    store.migrate().await.unwrap();
    // Migrations are idempotent.
    store.migrate().await.unwrap();
    (store, db)
}

fn ctx(source: ConsentSource) -> ChangeContext {
    ChangeContext {
        source,
        ip: Some("203.0.113.9".into()),
        user_agent: Some("ua".into()),
        at: t0(),
    }
}

/// `user` consents to SMS at `number` on file (through the API).
async fn sms_consent_on_file(store: &DynStore, user: &str, number: &str) {
    let patch = ConsentPatch {
        phone_number: Some(number.into()),
        sms_consent: Some(true),
        ..Default::default()
    };
    store
        .update_consent(user, &|c| patch.apply(c), &ctx(ConsentSource::Api))
        .await
        .unwrap();
}

/// An SMS attempt to `to` that takes no send slot.
fn sms_attempt(to: &str) -> SendAttempt {
    SendAttempt {
        to_number: to.into(),
        channel: Channel::Sms,
        encoding: Some("GSM-7".into()),
        segments: Some(1),
        body: Some("text".into()),
        take_slot: None,
    }
}

/// The send slot tests' clock and pace: slot k of a sender starts at `SLOT_NOW_US + k *
/// SLOT_INTERVAL_US`.
const SLOT_NOW_US: i64 = 1_800_000_000_000_000;
const SLOT_INTERVAL_US: i64 = 1_000;

fn slot(sender: &str) -> store::SendSlot {
    store::SendSlot {
        sender: sender.into(),
        now_us: SLOT_NOW_US,
        interval_us: SLOT_INTERVAL_US,
    }
}

fn message(id: &str, key: Option<&str>, at: chrono::DateTime<Utc>) -> NewMessage {
    NewMessage {
        id: id.into(),
        user_id: "u1".into(),
        template_name: "payment_received".into(),
        variables: r#"{"amount":"10","date":"2027-01-01"}"#.into(),
        channel: Channel::Sms,
        idempotency_key: key.map(String::from),
        created_at: at,
        claimed_until: None,
    }
}

async fn consent_changes_are_audited_per_field(backend: Backend) {
    let (store, _db) = open(backend).await;
    let patch = ConsentPatch {
        phone_number: Some("+14155552671".into()),
        sms_consent: Some(true),
        ..Default::default()
    };
    let c = store
        .update_consent("u1", &|c| patch.apply(c), &ctx(ConsentSource::Api))
        .await
        .unwrap();
    assert!(c.sms_consent && !c.whatsapp_consent && !c.marketing_consent);
    assert_eq!(c.updated_at, t0());
    assert_eq!(store.get_consent("u1").await.unwrap(), Some(c.clone()));
    assert_eq!(store.consent_audit("u1").await.unwrap().len(), 4);

    let revoke = ConsentPatch {
        sms_consent: Some(false),
        ..Default::default()
    };
    store
        .update_consent("u1", &|c| revoke.apply(c), &ctx(ConsentSource::SmsKeyword))
        .await
        .unwrap();
    let audit = store.consent_audit("u1").await.unwrap();
    let last = audit.last().unwrap();
    assert_eq!(
        (
            last.field.as_str(),
            last.old_value.as_deref(),
            last.new_value.as_deref()
        ),
        ("sms_consent", Some("true"), Some("false"))
    );
    assert_eq!(last.source, "sms_keyword");
    assert_eq!(last.ip.as_deref(), Some("203.0.113.9"));
    // Consent without a phone number is refused, and nothing is written.
    let bad = ConsentPatch {
        whatsapp_consent: Some(true),
        ..Default::default()
    };
    let err = store
        .update_consent("u2", &|c| bad.apply(c), &ctx(ConsentSource::Api))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "phone_required");
    assert!(store.get_consent("u2").await.unwrap().is_none());
    assert!(store.consent_audit("u2").await.unwrap().is_empty());
}

async fn audit_trail_is_append_only(backend: Backend) {
    let (store, db) = open(backend).await;
    let patch = ConsentPatch {
        phone_number: Some("+14155552671".into()),
        ..Default::default()
    };
    store
        .update_consent("u1", &|c| patch.apply(c), &ctx(ConsentSource::Api))
        .await
        .unwrap();
    let sql = "UPDATE consent_audit_trail SET new_value = 'forged'";
    let result = db.execute(sql).await;
    let err = result.expect_err("updating the audit trail must fail");
    assert!(err.to_string().contains("append-only"), "{err}");
}

async fn idempotency_key_is_unique_but_optional(backend: Backend) {
    let (store, _db) = open(backend).await;
    let (a, created) = store
        .insert_message(&message("m1", Some("k1"), t0()))
        .await
        .unwrap();
    assert!(created);
    assert_eq!(a.status, "queued");
    let (b, created) = store
        .insert_message(&message("m2", Some("k1"), t0()))
        .await
        .unwrap();
    assert!(!created);
    assert_eq!(b.id, "m1");
    assert!(store.get_message("m2").await.unwrap().is_none());
    // Messages without a key never collide.
    assert!(
        store
            .insert_message(&message("m3", None, t0()))
            .await
            .unwrap()
            .1
    );
    assert!(
        store
            .insert_message(&message("m4", None, t0()))
            .await
            .unwrap()
            .1
    );
}

async fn claiming_leases_due_messages_once(backend: Backend) {
    let (store, _db) = open(backend).await;
    store
        .insert_message(&message("due", None, t0()))
        .await
        .unwrap();
    store
        .insert_message(&message("later", None, t0() + Duration::hours(1)))
        .await
        .unwrap();
    let lease = t0() + Duration::minutes(2);
    let claimed = store.claim_due_messages(t0(), lease, 10).await.unwrap();
    assert_eq!(
        claimed.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
        ["due"]
    );
    assert_eq!(claimed[0].lease_until, Some(lease));
    // Leased: not claimed again until the lease runs out.
    assert!(store
        .claim_due_messages(t0() + Duration::minutes(1), lease, 10)
        .await
        .unwrap()
        .is_empty());
    let again = store
        .claim_due_messages(t0() + Duration::minutes(3), t0() + Duration::minutes(5), 10)
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    // The first claim's lease no longer fences anything: the second claim owns the message.
    let skipped = DispatchResult::Skipped {
        reason: SkipReason::NoConsent,
    };
    assert!(!store
        .record_dispatch("due", &skipped, t0(), lease)
        .await
        .unwrap());
    assert_eq!(
        store.get_message("due").await.unwrap().unwrap().status,
        "queued"
    );
    // Settled messages are never claimed.
    let fence = again[0].lease_until.unwrap();
    assert!(store
        .record_dispatch("due", &skipped, t0(), fence)
        .await
        .unwrap());
    let at_two_hours = store
        .claim_due_messages(t0() + Duration::hours(2), t0() + Duration::hours(3), 10)
        .await
        .unwrap();
    assert_eq!(
        at_two_hours
            .iter()
            .map(|m| m.id.as_str())
            .collect::<Vec<_>>(),
        ["later"]
    );
}

/// A message whose stored variables cannot be opened (here sealed with a key the service does
/// not hold, as when an old key is dropped from `DATA_ENCRYPTION_OLD_KEYS` too soon) is left out
/// of the claim, not the claim's failure: the messages behind it still go. It keeps its lease and
/// its status, so once it can be opened again (the key restored) it is claimed as any other.
async fn a_message_that_cannot_be_opened_does_not_hold_up_the_queue(backend: Backend) {
    let (store, db) = open(backend).await;
    for (id, at) in [("unreadable", t0()), ("next", t0() + Duration::seconds(1))] {
        store.insert_message(&message(id, None, at)).await.unwrap();
    }
    let sealed = db
        .text_pairs("SELECT id, variables FROM messages WHERE id = 'unreadable'")
        .await
        .remove(0)
        .1;
    assert!(sealed.starts_with("enc1:"), "stored sealed: {sealed}");
    db.execute(
        "UPDATE messages SET variables = 'enc1:retired:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA' \
         WHERE id = 'unreadable'",
    )
    .await
    .unwrap();
    let now = t0() + Duration::seconds(5);
    let lease = now + Duration::minutes(2);
    assert_eq!(store.unreadable_claims(), 0);
    let claimed = store.claim_due_messages(now, lease, 10).await.unwrap();
    assert_eq!(
        claimed.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
        ["next"]
    );
    // Counted for /metrics (`prism_claims_unreadable_total`).
    assert_eq!(store.unreadable_claims(), 1);
    // Untouched but for the claim's lease.
    let state = db
        .text_pairs(
            "SELECT status, CASE WHEN lease_until IS NULL THEN 'free' ELSE 'leased' END \
             FROM messages WHERE id = 'unreadable'",
        )
        .await;
    assert_eq!(state, [("queued".into(), "leased".into())]);
    // The key is back: nothing happens before the lease runs out, then it goes as any other.
    db.execute(&format!(
        "UPDATE messages SET variables = '{sealed}' WHERE id = 'unreadable'"
    ))
    .await
    .unwrap();
    assert!(store
        .claim_due_messages(now + Duration::minutes(1), lease, 10)
        .await
        .unwrap()
        .is_empty());
    let later = now + Duration::minutes(3);
    let again = store
        .claim_due_messages(later, later + Duration::minutes(2), 10)
        .await
        .unwrap();
    assert_eq!(
        again
            .iter()
            .map(|m| (m.id.as_str(), m.variables.as_str()))
            .collect::<Vec<_>>(),
        [
            ("unreadable", r#"{"amount":"10","date":"2027-01-01"}"#),
            // Claimed before and never settled here: its lease ran out too.
            ("next", r#"{"amount":"10","date":"2027-01-01"}"#)
        ]
    );
    assert_eq!(store.unreadable_claims(), 1, "opened this time");
}

async fn concurrent_claimers_never_share_a_message(backend: Backend) {
    let (store, _db) = open(backend).await;
    for i in 0..200 {
        store
            .insert_message(&message(&format!("m{i:03}"), None, t0()))
            .await
            .unwrap();
    }
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let store = store.clone();
        let seen = seen.clone();
        tasks.spawn(async move {
            loop {
                let batch = store
                    .claim_due_messages(t0(), t0() + Duration::minutes(2), 7)
                    .await
                    .unwrap();
                if batch.is_empty() {
                    break;
                }
                seen.lock().unwrap().extend(batch.into_iter().map(|m| m.id));
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let seen = seen.lock().unwrap();
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(seen.len(), 200, "every message claimed exactly once");
    assert_eq!(unique.len(), 200);
}

async fn dispatch_results_and_events(backend: Backend) {
    let (store, _db) = open(backend).await;
    for id in ["m1", "m2", "m3"] {
        store
            .insert_message(&message(id, None, t0()))
            .await
            .unwrap();
    }
    let lease = t0() + Duration::minutes(2);
    let claimed = store.claim_due_messages(t0(), lease, 10).await.unwrap();
    assert_eq!(claimed.len(), 3);
    let attempt = sms_attempt("+14155552671");
    let renewed = t0() + Duration::minutes(3);
    // A stale fence cannot mark a message sending; the claim's own can, renewing the lease.
    assert_eq!(
        store
            .mark_sending("m1", &attempt, NO_GUARD, t0(), t0(), renewed)
            .await
            .unwrap(),
        MarkSending::ClaimLost
    );
    assert_eq!(
        store
            .mark_sending("m1", &attempt, NO_GUARD, t0(), lease, renewed)
            .await
            .unwrap(),
        MarkSending::Marked
    );
    let sent = DispatchResult::Sent {
        provider_sid: "SM0001".into(),
        status: MessageStatus::Sent,
    };
    assert!(
        !store
            .record_dispatch("m1", &sent, t0(), lease)
            .await
            .unwrap(),
        "the old lease no longer fences"
    );
    assert!(store
        .record_dispatch("m1", &sent, t0(), renewed)
        .await
        .unwrap());
    // Recorded once: the lease is released, so a repeat matches nothing.
    assert!(!store
        .record_dispatch("m1", &sent, t0(), renewed)
        .await
        .unwrap());
    let m = store.get_message("m1").await.unwrap().unwrap();
    assert_eq!(
        (m.status.as_str(), m.provider_sid.as_deref(), m.attempts),
        ("sent", Some("SM0001"), 1)
    );
    assert_eq!(
        (m.to_number.as_deref(), m.segments, m.lease_until),
        (Some("+14155552671"), Some(1), None)
    );
    assert_eq!(event_statuses(&store, "m1").await, ["sending", "sent"]);
    assert_eq!(
        store.message_by_sid("SM0001").await.unwrap().unwrap().id,
        "m1"
    );

    // A provider SID belongs to one message only.
    assert_eq!(
        store
            .mark_sending("m2", &attempt, NO_GUARD, t0(), lease, renewed)
            .await
            .unwrap(),
        MarkSending::Marked
    );
    assert!(store
        .record_dispatch("m2", &sent, t0(), renewed)
        .await
        .is_err());
    let failed = DispatchResult::Failed {
        code: Some(21211),
        message: "invalid To".into(),
    };
    assert!(store
        .record_dispatch("m2", &failed, t0(), renewed)
        .await
        .unwrap());
    let m = store.get_message("m2").await.unwrap().unwrap();
    assert_eq!((m.status.as_str(), m.error_code), ("failed", Some(21211)));

    // A WhatsApp message that goes by SMS keeps the channel it was asked for.
    let wa = NewMessage {
        channel: Channel::Whatsapp,
        ..message("m4", None, t0())
    };
    store.insert_message(&wa).await.unwrap();
    let l4 = store
        .claim_due_messages(t0(), t0() + Duration::minutes(4), 10)
        .await
        .unwrap()[0]
        .lease_until
        .unwrap();
    assert_eq!(
        store
            .mark_sending("m4", &attempt, NO_GUARD, t0(), l4, renewed)
            .await
            .unwrap(),
        MarkSending::Marked
    );
    let m = store.get_message("m4").await.unwrap().unwrap();
    assert_eq!(
        (m.channel.as_str(), m.requested_channel.as_deref()),
        ("sms", Some("whatsapp"))
    );

    let retry_at = t0() + Duration::seconds(30);
    let retry = DispatchResult::Retry {
        code: Some(20500),
        message: "busy".into(),
        next_attempt_at: retry_at,
        lookup: false,
    };
    assert!(store
        .record_dispatch("m3", &retry, t0(), lease)
        .await
        .unwrap());
    let m = store.get_message("m3").await.unwrap().unwrap();
    assert_eq!(
        (m.status.as_str(), m.next_attempt_at, m.lease_until),
        ("queued", retry_at, None)
    );
    assert_eq!(
        store.message_events("m3").await.unwrap().len(),
        0,
        "a requeue adds no event"
    );
}

async fn unmatched_status_callbacks_wait_for_their_sid(backend: Backend) {
    let (store, _db) = open(backend).await;
    let applied = store
        .apply_status("SMearly", MessageStatus::Delivered, None, t0())
        .await
        .unwrap();
    assert!(applied.message.is_none());
    store
        .apply_status("SMearly", MessageStatus::Delivered, None, t0())
        .await
        .unwrap();
    // The send that records the SID takes what was parked for it, once, and applies it.
    let fence = t0() + Duration::minutes(1);
    let claimed = NewMessage {
        claimed_until: Some(fence),
        ..message("m1", None, t0())
    };
    store.insert_message(&claimed).await.unwrap();
    let known = store
        .record_sent("m1", "SMearly", MessageStatus::Sent, None, t0(), fence)
        .await
        .unwrap()
        .expect("the claim is ours");
    let known: Vec<_> = known.iter().map(|k| (k.status, k.error_code)).collect();
    assert_eq!(known, vec![(MessageStatus::Delivered, None)], "kept once");
    let m1 = store.get_message("m1").await.unwrap().unwrap();
    assert_eq!(m1.status, MessageStatus::Delivered);
    assert_eq!(
        store
            .prune_unmatched_statuses(t0() + Duration::days(2))
            .await
            .unwrap(),
        0,
        "taken once"
    );
    store
        .apply_status("SMold", MessageStatus::Failed, Some(30003), t0())
        .await
        .unwrap();
    assert_eq!(
        store
            .prune_unmatched_statuses(t0() + Duration::days(2))
            .await
            .unwrap(),
        1
    );
}

async fn user_messages_newest_first(backend: Backend) {
    let (store, _db) = open(backend).await;
    for i in 0..5 {
        store
            .insert_message(&message(
                &format!("m{i}"),
                None,
                t0() + Duration::seconds(i),
            ))
            .await
            .unwrap();
    }
    let listed = store.user_messages("u1", 3).await.unwrap();
    assert_eq!(
        listed.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
        ["m4", "m3", "m2"]
    );
    assert!(store.user_messages("nobody", 3).await.unwrap().is_empty());
}

async fn marking_sending_checks_opt_out_and_consent_in_the_same_statement(backend: Backend) {
    let (store, _db) = open(backend).await;
    sms_consent_on_file(&store, "u1", "+14155552671").await;
    for id in ["m1", "m2", "m3"] {
        store
            .insert_message(&message(id, None, t0()))
            .await
            .unwrap();
    }
    let lease = t0() + Duration::minutes(2);
    store.claim_due_messages(t0(), lease, 10).await.unwrap();
    let renewed = t0() + Duration::minutes(3);
    let guard = SendGuard {
        consent: true,
        marketing: false,
    };
    let mark = |id: &'static str, to: &'static str, guard: SendGuard| {
        let store = store.clone();
        let attempt = sms_attempt(to);
        async move {
            store
                .mark_sending(id, &attempt, guard, t0(), lease, renewed)
                .await
                .unwrap()
        }
    };
    // Another number than the one on file, or marketing without its consent: not sent.
    assert_eq!(
        mark("m1", "+14155550000", guard).await,
        MarkSending::PolicyChanged
    );
    let marketing = SendGuard {
        marketing: true,
        ..guard
    };
    assert_eq!(
        mark("m1", "+14155552671", marketing).await,
        MarkSending::PolicyChanged
    );
    // A STOP that landed after the check: not sent, even without the consent check (an OTP).
    store
        .set_opt_out(
            "+14155552671",
            Channel::Sms,
            ConsentSource::SmsKeyword,
            t0(),
        )
        .await
        .unwrap();
    assert_eq!(
        mark("m1", "+14155552671", guard).await,
        MarkSending::PolicyChanged
    );
    assert_eq!(
        mark("m2", "+14155552671", NO_GUARD).await,
        MarkSending::PolicyChanged
    );
    let m = store.get_message("m1").await.unwrap().unwrap();
    assert_eq!(
        (m.status.as_str(), m.attempts),
        ("queued", 0),
        "nothing written"
    );
    store
        .clear_opt_out("+14155552671", Channel::Sms)
        .await
        .unwrap();
    assert_eq!(mark("m1", "+14155552671", guard).await, MarkSending::Marked);
    // Consent withdrawn after the check.
    let revoke = ConsentPatch {
        sms_consent: Some(false),
        ..Default::default()
    };
    store
        .update_consent("u1", &|c| revoke.apply(c), &ctx(ConsentSource::Api))
        .await
        .unwrap();
    assert_eq!(
        mark("m3", "+14155552671", guard).await,
        MarkSending::PolicyChanged
    );
}

async fn otps_are_claimed_first_then_the_oldest(backend: Backend) {
    let (store, _db) = open(backend).await;
    for (id, minutes) in [("newer", 2), ("oldest", 0), ("middle", 1)] {
        store
            .insert_message(&message(id, None, t0() + Duration::minutes(minutes)))
            .await
            .unwrap();
    }
    // An OTP whose request died mid-send (written claimed, the lease long gone): recovered first.
    let otp = NewMessage {
        template_name: "otp".into(),
        claimed_until: Some(t0() + Duration::minutes(3)),
        ..message("otp", None, t0() + Duration::minutes(3))
    };
    store.insert_message(&otp).await.unwrap();
    let now = t0() + Duration::hours(1);
    let claimed = store
        .claim_due_messages(now, now + Duration::minutes(2), 10)
        .await
        .unwrap();
    let order: Vec<&str> = claimed.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(order, ["otp", "oldest", "middle", "newer"]);
}

/// An OTP for `user` to `number` from `ip`, with its message `id`, sent at once over SMS.
fn otp_issue(id: &str, user: &str, number: &str, ip: &str) -> store::OtpIssue {
    store::OtpIssue {
        user_id: user.into(),
        purpose: "login".into(),
        phone_number: number.into(),
        send_to: number.into(),
        channel: Channel::Sms,
        code_hash: format!("hash-{id}"),
        ip: Some(ip.into()),
        expires_at: t0() + Duration::minutes(10),
        now: t0(),
        cooldown_seconds: 0,
        max_sends_per_hour: 5,
        max_sends_per_ip_per_hour: 100,
        message: NewMessage {
            id: id.into(),
            user_id: user.into(),
            template_name: "otp".into(),
            variables: r#"{"code":"123456"}"#.into(),
            channel: Channel::Sms,
            idempotency_key: None,
            created_at: t0(),
            claimed_until: Some(t0() + Duration::minutes(2)),
        },
        attempt: Some(SendAttempt {
            to_number: number.into(),
            channel: Channel::Sms,
            encoding: Some("GSM-7".into()),
            segments: Some(1),
            body: None,
            take_slot: None,
        }),
        accepted: None,
        unless_on_file: false,
    }
}

/// A cooldown of zero is no cooldown. Side by side, a code stamped a moment later can be logged
/// first; it was taken for a send "within the cooldown" of the one stamped earlier, which was
/// then refused (429 with no wait) or, going to a number on file, silently dropped
/// (`destination_limited`), with the hour's limit not reached (found by review on PostgreSQL).
/// With a cooldown, the same order still holds a code back.
async fn a_cooldown_of_zero_holds_no_code_back_whatever_order_they_are_stamped_in(
    backend: Backend,
) {
    let (store, _db) = open(backend).await;
    const NUMBER: &str = "+14155553900";
    let at = |mut issue: store::OtpIssue, when: chrono::DateTime<Utc>| {
        issue.now = when;
        issue.message.created_at = when;
        issue
    };
    let later = t0() + Duration::seconds(1);
    let logged_first = at(
        otp_issue("m-later", "u-later", NUMBER, "198.51.100.1"),
        later,
    );
    assert!(matches!(
        store.issue_otp(&logged_first).await.unwrap(),
        store::OtpIssueOutcome::Issued(_)
    ));
    // Naming the number, stamped before the code logged for it.
    let named = otp_issue("m-named", "u-named", NUMBER, "198.51.100.2");
    let outcome = store.issue_otp(&named).await.unwrap();
    assert!(
        matches!(outcome, store::OtpIssueOutcome::Issued(_)),
        "{outcome:?}"
    );
    // Going to the number as a number on file, in place of the number named.
    let mut on_file = otp_issue("m-on-file", "u-on-file", "+14155553901", "198.51.100.3");
    on_file.send_to = NUMBER.into();
    if let Some(attempt) = on_file.attempt.as_mut() {
        attempt.to_number = NUMBER.into();
    }
    let outcome = store.issue_otp(&on_file).await.unwrap();
    assert!(
        matches!(outcome, store::OtpIssueOutcome::Issued(_)),
        "{outcome:?}"
    );
    // With a cooldown, the code logged a moment later holds the next back.
    let mut cooling = otp_issue("m-cooling", "u-cooling", NUMBER, "198.51.100.4");
    cooling.cooldown_seconds = 60;
    let outcome = store.issue_otp(&cooling).await.unwrap();
    assert!(
        matches!(outcome, store::OtpIssueOutcome::RateLimited(_)),
        "{outcome:?}"
    );
}

/// Thirty requests for one number at once, each from its own user and address: exactly the
/// hourly limit's five get a code, however the backend groups them (PostgreSQL runs concurrent
/// issues as batches, SQLite in its writer's transactions).
async fn concurrent_otp_issues_keep_every_limit(backend: Backend) {
    let (store, _db) = open(backend).await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..30 {
        let store = store.clone();
        tasks.spawn(async move {
            let issue = otp_issue(
                &format!("m{i}"),
                &format!("u{i}"),
                "+14155552671",
                &format!("203.0.113.{i}"),
            );
            store.issue_otp(&issue).await.unwrap()
        });
    }
    let (mut issued, mut limited) = (0, 0);
    while let Some(outcome) = tasks.join_next().await {
        match outcome.unwrap() {
            store::OtpIssueOutcome::Issued(_) => issued += 1,
            store::OtpIssueOutcome::RateLimited(refusal) => {
                assert!(refusal.retry_after_seconds > 0);
                limited += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((issued, limited), (5, 25));
    // Each code's message was written `sending`, ready for its provider call.
    for i in 0..30 {
        if let Some(m) = store.get_message(&format!("m{i}")).await.unwrap() {
            assert_eq!(m.status, MessageStatus::Sending);
            assert_eq!(m.attempts, 1);
        }
    }
}

/// An OTP that goes at once takes its sender's send slot, so paced messages leave room for it;
/// issued together (PostgreSQL takes a batch's slots in one statement per sender at the batch's
/// end), each issued code still takes exactly one slot of its own sender, and a refused one none.
async fn otps_issued_together_each_take_a_send_slot(backend: Backend) {
    let (store, _db) = open(backend).await;
    // The first sender has taken one slot already (its row exists); the second has none yet.
    assert_eq!(
        store
            .reserve_send_slot("sender-a", SLOT_NOW_US, SLOT_INTERVAL_US, i64::MAX)
            .await
            .unwrap(),
        SendSlotAnswer::Reserved(SLOT_NOW_US)
    );
    let mut tasks = tokio::task::JoinSet::new();
    // Sender a: twelve numbers once each, and one number eight times (five within the hourly
    // limit, three refused); sender b: five numbers.
    let mut requests = Vec::new();
    for i in 0..12 {
        requests.push(("sender-a", format!("+1415555{:04}", 1000 + i)));
    }
    for _ in 0..8 {
        requests.push(("sender-a", "+14155559999".to_string()));
    }
    for i in 0..5 {
        requests.push(("sender-b", format!("+1415555{:04}", 2000 + i)));
    }
    for (i, (sender, number)) in requests.into_iter().enumerate() {
        let store = store.clone();
        let mut issue = otp_issue(
            &format!("m{i}"),
            &format!("u{i}"),
            &number,
            &format!("203.0.113.{i}"),
        );
        if let Some(attempt) = issue.attempt.as_mut() {
            attempt.take_slot = Some(slot(sender));
        }
        tasks.spawn(async move { store.issue_otp(&issue).await.unwrap() });
    }
    let (mut issued, mut limited) = (0, 0);
    while let Some(outcome) = tasks.join_next().await {
        match outcome.unwrap() {
            store::OtpIssueOutcome::Issued(_) => issued += 1,
            store::OtpIssueOutcome::RateLimited(_) => limited += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((issued, limited), (22, 3));
    // The next slot of each sender comes after one slot per code issued for it.
    assert_eq!(
        store
            .reserve_send_slot("sender-a", SLOT_NOW_US, SLOT_INTERVAL_US, i64::MAX)
            .await
            .unwrap(),
        SendSlotAnswer::Reserved(SLOT_NOW_US + (1 + 17) * SLOT_INTERVAL_US),
        "sender a: one slot taken before, seventeen codes"
    );
    assert_eq!(
        store
            .reserve_send_slot("sender-b", SLOT_NOW_US, SLOT_INTERVAL_US, i64::MAX)
            .await
            .unwrap(),
        SendSlotAnswer::Reserved(SLOT_NOW_US + 5 * SLOT_INTERVAL_US),
        "sender b: five codes"
    );
}

/// A slot is taken only if it starts by the latest time asked for; otherwise none is taken (the
/// sender's next slot does not move) and the answer says when the next one is free.
async fn a_send_slot_after_the_latest_time_is_not_taken(backend: Backend) {
    let (store, _db) = open(backend).await;
    let reserve = |now: i64, latest: i64| {
        let store = store.clone();
        async move {
            store
                .reserve_send_slot("sender-d", now, SLOT_INTERVAL_US, latest)
                .await
                .unwrap()
        }
    };
    // A sender with no slot yet: now.
    assert_eq!(
        reserve(SLOT_NOW_US, SLOT_NOW_US).await,
        SendSlotAnswer::Reserved(SLOT_NOW_US)
    );
    let next = SLOT_NOW_US + SLOT_INTERVAL_US;
    for _ in 0..3 {
        assert_eq!(
            reserve(SLOT_NOW_US, next - 1).await,
            SendSlotAnswer::NextFreeAt(next),
            "a slot too late is not taken, however often asked"
        );
    }
    assert_eq!(
        reserve(SLOT_NOW_US, next).await,
        SendSlotAnswer::Reserved(next)
    );
    // Later than every slot taken: the slot is now, whatever the latest time.
    let later = next + 10 * SLOT_INTERVAL_US;
    assert_eq!(reserve(later, later).await, SendSlotAnswer::Reserved(later));
}

/// A queued OTP the dispatcher marks `sending` takes its sender's slot in the mark; marked
/// together (one PostgreSQL batch), each mark takes one, and a lost claim none.
async fn marks_together_each_take_a_send_slot(backend: Backend) {
    let (store, _db) = open(backend).await;
    for i in 0..6 {
        store
            .insert_message(&message(&format!("m{i}"), None, t0()))
            .await
            .unwrap();
    }
    let lease = t0() + Duration::minutes(2);
    assert_eq!(
        store
            .claim_due_messages(t0(), lease, 10)
            .await
            .unwrap()
            .len(),
        6
    );
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..6 {
        let store = store.clone();
        let attempt = SendAttempt {
            take_slot: Some(slot("sender-c")),
            ..sms_attempt("+14155552671")
        };
        // The last one's fence is not its claim's: it loses and takes no slot.
        let fence = if i == 5 { t0() } else { lease };
        tasks.spawn(async move {
            let renewed = t0() + Duration::minutes(3);
            store
                .mark_sending(&format!("m{i}"), &attempt, NO_GUARD, t0(), fence, renewed)
                .await
                .unwrap()
        });
    }
    let mut marked = 0;
    while let Some(outcome) = tasks.join_next().await {
        if outcome.unwrap() == MarkSending::Marked {
            marked += 1;
        }
    }
    assert_eq!(marked, 5);
    assert_eq!(
        store
            .reserve_send_slot("sender-c", SLOT_NOW_US, SLOT_INTERVAL_US, i64::MAX)
            .await
            .unwrap(),
        SendSlotAnswer::Reserved(SLOT_NOW_US + 5 * SLOT_INTERVAL_US)
    );
}

/// Issues that run together (one PostgreSQL batch, one SQLite writer transaction): one that
/// fails (its message id is taken) fails alone, and the others are written.
async fn a_failing_otp_issue_fails_alone(backend: Backend) {
    let (store, _db) = open(backend).await;
    store
        .insert_message(&message("taken", None, t0()))
        .await
        .unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..12 {
        let store = store.clone();
        tasks.spawn(async move {
            let id = if i == 5 {
                "taken".to_string()
            } else {
                format!("m{i}")
            };
            let number = format!("+1415555{:04}", 2600 + i);
            let issue = otp_issue(&id, &format!("u{i}"), &number, "203.0.113.1");
            (i, store.issue_otp(&issue).await)
        });
    }
    while let Some(done) = tasks.join_next().await {
        let (i, outcome) = done.unwrap();
        match (i, outcome) {
            (5, outcome) => assert!(outcome.is_err(), "{outcome:?}"),
            (_, Ok(store::OtpIssueOutcome::Issued(m))) => assert_eq!(m.id, format!("m{i}")),
            (_, other) => panic!("issue {i}: {other:?}"),
        }
    }
    for i in (0..12).filter(|i| *i != 5) {
        let m = store.get_message(&format!("m{i}")).await.unwrap().unwrap();
        assert_eq!(m.status, MessageStatus::Sending);
        let code = store.get_otp(&format!("u{i}"), "login").await.unwrap();
        assert!(code.is_some(), "u{i} has no code");
    }
    // The failed issue left nothing: no code, and the taken id is still the other message.
    assert!(store.get_otp("u5", "login").await.unwrap().is_none());
    let taken = store.get_message("taken").await.unwrap().unwrap();
    assert_eq!(taken.template_name, "payment_received");
}

/// An OTP whose provider accepted it in process (the mock) is written already recorded: `sent`
/// then the provider's `delivered`, its SID stored and its claim released, in the issue's own
/// write, beside an OTP issued the usual way (left `sending` for its caller) and one the limits
/// refuse (nothing written), all issued at once so the backends batch them together.
async fn an_otp_accepted_in_process_is_recorded_in_its_issue(backend: Backend) {
    let (store, _db) = open(backend).await;
    let accepted = |i: usize| store::AcceptedSend {
        provider_sid: format!("SM{i:032}"),
        news: Some(MessageStatus::Delivered),
    };
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..8usize {
        let store = store.clone();
        tasks.spawn(async move {
            // Two sends for one user: the second meets the hourly cap of one.
            let user = if i == 7 {
                "u6".to_string()
            } else {
                format!("u{i}")
            };
            let mut issue = otp_issue(
                &format!("m{i}"),
                &user,
                &format!("+1415555{:04}", 2700 + i),
                "203.0.113.9",
            );
            issue.max_sends_per_hour = 1;
            issue.accepted = (i != 3).then(|| accepted(i));
            (i, store.issue_otp(&issue).await.unwrap())
        });
    }
    let mut limited = 0;
    while let Some(done) = tasks.join_next().await {
        match done.unwrap() {
            (i, store::OtpIssueOutcome::Issued(m)) => {
                let want = if i == 3 {
                    MessageStatus::Sending
                } else {
                    MessageStatus::Delivered
                };
                assert_eq!(m.status, want, "the answer for m{i}");
            }
            (i @ (6 | 7), store::OtpIssueOutcome::RateLimited(_)) => {
                limited += 1;
                assert!(store.get_message(&format!("m{i}")).await.unwrap().is_none());
            }
            (i, other) => panic!("issue {i}: {other:?}"),
        }
    }
    assert_eq!(limited, 1, "one of u6's two sends is refused");
    for i in (0..6).filter(|i| *i != 3) {
        let id = format!("m{i}");
        let m = store.get_message(&id).await.unwrap().unwrap();
        assert_eq!(m.status, MessageStatus::Delivered, "{id}");
        assert_eq!(
            m.provider_sid.as_deref(),
            Some(accepted(i).provider_sid.as_str())
        );
        assert_eq!(
            (m.lease_until, m.attempts),
            (None, 1),
            "{id}: released, one attempt"
        );
        let events = event_statuses(&store, &id).await;
        assert_eq!(events, ["sending", "sent", "delivered"], "{id}");
        assert_eq!(
            store
                .message_by_sid(&accepted(i).provider_sid)
                .await
                .unwrap()
                .unwrap()
                .id,
            id
        );
        assert!(store
            .get_otp(&format!("u{i}"), "login")
            .await
            .unwrap()
            .is_some());
    }
    let usual = store.get_message("m3").await.unwrap().unwrap();
    assert_eq!(
        (usual.status, usual.provider_sid),
        (MessageStatus::Sending, None)
    );
    assert!(
        usual.lease_until.is_some(),
        "still claimed for its caller to send"
    );
}

/// The dispatcher reads a claim's opt-outs in one go: each number asked about comes back with
/// each channel it opted out of, and only those.
async fn opt_outs_are_read_for_many_numbers_at_once(backend: Backend) {
    let (store, _db) = open(backend).await;
    let (a, b, c) = ("+14155550001", "+14155550002", "+14155550003");
    store
        .set_opt_out(a, Channel::Sms, ConsentSource::SmsKeyword, t0())
        .await
        .unwrap();
    store
        .set_opt_out(a, Channel::Whatsapp, ConsentSource::SmsKeyword, t0())
        .await
        .unwrap();
    store
        .set_opt_out(c, Channel::Whatsapp, ConsentSource::SmsKeyword, t0())
        .await
        .unwrap();
    let numbers: Vec<String> = [a, b, c].iter().map(|n| n.to_string()).collect();
    let mut found = store.opted_out_among(&numbers).await.unwrap();
    found.sort_by_key(|(n, ch)| (n.clone(), ch.as_str()));
    assert_eq!(
        found,
        vec![
            (a.to_string(), Channel::Sms),
            (a.to_string(), Channel::Whatsapp),
            (c.to_string(), Channel::Whatsapp),
        ]
    );
    assert!(store.opted_out_among(&[]).await.unwrap().is_empty());
}

/// Consent records read at the same moment (PostgreSQL answers them in one query): each caller
/// gets its own user's record, callers asking for the same user each get it, a user with none
/// gets `None`; and a read after a change sees the change.
async fn consents_read_together_each_answer_their_own(backend: Backend) {
    let (store, _db) = open(backend).await;
    for (user, number) in [("u1", "+14155550001"), ("u2", "+14155550002")] {
        sms_consent_on_file(&store, user, number).await;
    }
    let mut reads = tokio::task::JoinSet::new();
    for i in 0..30usize {
        let store = store.clone();
        let user = ["u1", "u2", "u3"][i % 3];
        reads.spawn(async move { (user, store.get_consent(user).await.unwrap()) });
    }
    let mut answered = 0;
    while let Some(read) = reads.join_next().await {
        let (user, consent) = read.unwrap();
        let number = consent.map(|c| {
            assert_eq!(c.user_id, user);
            c.phone_number
        });
        let expected = match user {
            "u1" => Some(Some("+14155550001".to_string())),
            "u2" => Some(Some("+14155550002".to_string())),
            _ => None,
        };
        assert_eq!(number, expected, "{user}");
        answered += 1;
    }
    assert_eq!(answered, 30);

    sms_consent_on_file(&store, "u2", "+14155550009").await;
    let (u1, u2) = tokio::join!(store.get_consent("u1"), store.get_consent("u2"));
    assert_eq!(
        u1.unwrap().unwrap().phone_number.as_deref(),
        Some("+14155550001")
    );
    assert_eq!(
        u2.unwrap().unwrap().phone_number.as_deref(),
        Some("+14155550009")
    );
}

/// Codes asked for at once, most for different patients (PostgreSQL decides and writes those
/// together, in one statement) beside two for one user (one at a time, after the others): each
/// gets the outcome it would get alone, and writes what it would write alone.
async fn otp_issues_together_each_get_their_own_outcome(backend: Backend) {
    let (store, _db) = open(backend).await;
    let number = |i: usize| format!("+1415555{:04}", 3000 + i);
    // m6's number texted STOP; m7's number already had its one code this hour; u2 has a wrong
    // try on record, which its new code clears.
    store
        .set_opt_out(&number(6), Channel::Sms, ConsentSource::SmsKeyword, t0())
        .await
        .unwrap();
    let mut earlier = otp_issue("m-earlier", "u-earlier", &number(7), "198.51.100.250");
    earlier.max_sends_per_hour = 1;
    let earlier = store.issue_otp(&earlier).await.unwrap();
    assert!(matches!(earlier, store::OtpIssueOutcome::Issued(_)));
    let window_ends = t0() + Duration::minutes(15);
    store
        .record_otp_failure("u2", "login", t0(), window_ends)
        .await
        .unwrap();
    let accepted = |i: usize| store::AcceptedSend {
        provider_sid: format!("SM{i:032}"),
        news: Some(MessageStatus::Delivered),
    };
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..10usize {
        let store = store.clone();
        let (number, accepted) = (number(i), accepted(i));
        tasks.spawn(async move {
            let user = if i >= 8 {
                "u8".to_string()
            } else {
                format!("u{i}")
            };
            let ip = format!("198.51.100.{i}");
            let mut issue = otp_issue(&format!("m{i}"), &user, &number, &ip);
            issue.max_sends_per_hour = 1;
            issue.accepted = (i % 2 == 0).then_some(accepted);
            (i, store.issue_otp(&issue).await.unwrap())
        });
    }
    let mut u8_issued = 0;
    while let Some(done) = tasks.join_next().await {
        let (i, outcome) = done.unwrap();
        let id = format!("m{i}");
        match (i, outcome) {
            (0..=5 | 8 | 9, store::OtpIssueOutcome::Issued(m)) => {
                let stored = store.get_message(&id).await.unwrap().unwrap();
                assert_eq!(stored.status, m.status, "{id}");
                let events = event_statuses(&store, &id).await;
                if i % 2 == 0 {
                    assert_eq!(m.status, MessageStatus::Delivered, "{id}");
                    assert_eq!(events, ["sending", "sent", "delivered"], "{id}");
                } else {
                    assert_eq!(m.status, MessageStatus::Sending, "{id}");
                    assert_eq!(events, ["sending"], "{id}");
                }
                let code = store.get_otp(&m.user_id, "login").await.unwrap().unwrap();
                assert_eq!(code.code_hash, format!("hash-{id}"));
                u8_issued += usize::from(i >= 8);
            }
            (6, store::OtpIssueOutcome::OptedOut { named: true })
            | (7..=9, store::OtpIssueOutcome::RateLimited(_)) => {
                assert!(store.get_message(&id).await.unwrap().is_none(), "{id}");
            }
            (i, other) => panic!("issue {i}: {other:?}"),
        }
    }
    assert_eq!(
        u8_issued, 1,
        "one of u8's two codes is issued, the other refused"
    );
    assert_eq!(store.otp_failures("u2", "login", t0()).await.unwrap(), 0);
    // The opted-out request counted against its number's limit; the refused ones did not.
    let mut again = otp_issue("m6-again", "u6-again", &number(6), "198.51.100.60");
    again.max_sends_per_hour = 1;
    assert!(matches!(
        store.issue_otp(&again).await.unwrap(),
        store::OtpIssueOutcome::RateLimited(_)
    ));
    let mut again = otp_issue("m7-again", "u7-again", &number(7), "198.51.100.70");
    again.max_sends_per_hour = 2;
    assert!(matches!(
        store.issue_otp(&again).await.unwrap(),
        store::OtpIssueOutcome::Issued(_)
    ));
}

/// A code planned for the number named without reading the number on file first
/// (`OtpIssue::unless_on_file`, PostgreSQL): it goes to the number named when the user has no
/// number on file or named it, and to the number on file instead when that is another (the code,
/// its message and its opt-out check; the send still counts against the number named). Issued at
/// once, so batches decide most of them together, and two for one user, decided one at a time. A
/// store that does not look the number up refuses such an issue.
async fn an_issue_unless_on_file_goes_to_the_number_on_file(backend: Backend) {
    let (store, _db) = open(backend).await;
    let on_file = [
        ("u1", Some("+14155550001")),
        ("u5", Some("+14155550005")),
        ("u6", Some("+14155550006")),
        ("u4", None),
    ];
    for (user, number) in on_file {
        let patch = ConsentPatch {
            phone_number: number.map(Into::into),
            sms_consent: Some(number.is_some()),
            time_zone: Some("America/Los_Angeles".into()),
            ..Default::default()
        };
        store
            .update_consent(user, &|c| patch.apply(c), &ctx(ConsentSource::Api))
            .await
            .unwrap();
    }
    // u6's number on file texted STOP; the number it names did not.
    store
        .set_opt_out(
            "+14155550006",
            Channel::Sms,
            ConsentSource::SmsKeyword,
            t0(),
        )
        .await
        .unwrap();
    let issue = |id: &str, user: &str, number: &str| {
        let mut issue = otp_issue(id, user, number, "198.51.100.1");
        issue.unless_on_file = true;
        issue.ip = None;
        issue
    };
    if !store.checks_number_on_file() {
        assert!(store
            .issue_otp(&issue("m-a", "u1", "+14155559999"))
            .await
            .is_err());
        assert!(store.get_message("m-a").await.unwrap().is_none());
        return;
    }
    // (message, user, number named, where the code goes; None: not issued, on file opted out)
    let cases = [
        ("m-elsewhere", "u1", "+14155559991", Some("+14155550001")),
        ("m-none", "u3", "+14155550003", Some("+14155550003")),
        ("m-no-number", "u4", "+14155550004", Some("+14155550004")),
        ("m-u5-first", "u5", "+14155559995", Some("+14155550005")),
        ("m-u5-second", "u5", "+14155559995", Some("+14155550005")),
        ("m-own", "u7", "+14155550007", Some("+14155550007")),
        ("m-stopped", "u6", "+14155559996", None),
    ];
    sms_consent_on_file(&store, "u7", "+14155550007").await;
    let mut tasks = tokio::task::JoinSet::new();
    for (id, user, named, goes_to) in cases {
        let store = store.clone();
        let issue = issue(id, user, named);
        tasks.spawn(async move { (id, named, goes_to, store.issue_otp(&issue).await.unwrap()) });
    }
    while let Some(done) = tasks.join_next().await {
        let (id, named, goes_to, outcome) = done.unwrap();
        let stored = store.get_message(id).await.unwrap();
        match (goes_to, outcome) {
            (Some(to), store::OtpIssueOutcome::Issued(m)) if to == named => {
                assert_eq!(m.to_number.as_deref(), Some(named), "{id}");
                assert_eq!(stored.unwrap().to_number.as_deref(), Some(named), "{id}");
            }
            (Some(to), store::OtpIssueOutcome::IssuedToNumberOnFile { message, to: sent })
                if to != named =>
            {
                assert_eq!(sent, to, "{id}");
                assert_eq!(message.to_number.as_deref(), Some(to), "{id}");
                assert_eq!(stored.unwrap().to_number.as_deref(), Some(to), "{id}");
            }
            (None, store::OtpIssueOutcome::OptedOut { named: false }) => {
                assert!(stored.is_none(), "{id}")
            }
            (_, other) => panic!("{id}: {other:?}"),
        }
    }
    // Each code is bound to the number it went to.
    for (user, number) in [
        ("u1", "+14155550001"),
        ("u3", "+14155550003"),
        ("u5", "+14155550005"),
        ("u7", "+14155550007"),
    ] {
        let code = store.get_otp(user, "login").await.unwrap().unwrap();
        assert_eq!(code.phone_number, number, "{user}");
    }
    assert!(store.get_otp("u6", "login").await.unwrap().is_none());
    // The sends counted against the numbers named (u5's two used a limit of two).
    for (id, number, limit) in [
        ("m-again-1", "+14155559991", 1),
        ("m-again-5", "+14155559995", 2),
        ("m-again-6", "+14155559996", 1),
    ] {
        let mut again = otp_issue(id, &format!("other-{id}"), number, "198.51.100.99");
        again.max_sends_per_hour = limit;
        assert!(
            matches!(
                store.issue_otp(&again).await.unwrap(),
                store::OtpIssueOutcome::RateLimited(_)
            ),
            "{id}"
        );
    }
}

/// Sends recorded at once (PostgreSQL records a batch of them with one statement): each claimed
/// send is recorded with its SID, status and events (the provider's own news as a second status
/// and event); a send whose claim moved on (another fence) is refused and changes nothing; a send
/// whose SID already has a callback waiting gets it applied.
async fn sends_recorded_together_each_get_their_own_outcome(backend: Backend) {
    let (store, _db) = open(backend).await;
    let lease = t0() + Duration::minutes(2);
    for i in 0..10 {
        let claimed = NewMessage {
            claimed_until: Some(lease),
            ..message(&format!("m{i}"), None, t0())
        };
        store.insert_message(&claimed).await.unwrap();
    }
    // m9's delivery report came before its send was recorded.
    store
        .apply_status(
            &format!("SM{:032}", 9),
            MessageStatus::Delivered,
            None,
            t0(),
        )
        .await
        .unwrap();
    let unrecorded = store.get_message("m7").await.unwrap().unwrap().status;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..10usize {
        let store = store.clone();
        tasks.spawn(async move {
            let id = format!("m{i}");
            // m7 and m8 answer with a fence their claim no longer has.
            let fence = if i == 7 || i == 8 {
                lease + Duration::seconds(1)
            } else {
                lease
            };
            let news = (i % 2 == 0).then_some(MessageStatus::Delivered);
            let sid = format!("SM{i:032}");
            let recorded = store
                .record_sent(&id, &sid, MessageStatus::Sent, news, t0(), fence)
                .await
                .unwrap();
            (i, recorded.is_some())
        });
    }
    while let Some(done) = tasks.join_next().await {
        let (i, recorded) = done.unwrap();
        let id = format!("m{i}");
        let m = store.get_message(&id).await.unwrap().unwrap();
        let events = event_statuses(&store, &id).await;
        match i {
            7 | 8 => {
                assert!(!recorded, "{id}");
                assert_eq!(m.status, unrecorded, "{id}");
                assert_eq!(m.provider_sid, None, "{id}");
                assert_eq!(m.lease_until, Some(lease), "{id}");
                assert!(events.is_empty(), "{id}: {events:?}");
            }
            _ => {
                assert!(recorded, "{id}");
                assert_eq!(m.provider_sid, Some(format!("SM{i:032}")), "{id}");
                assert_eq!(m.lease_until, None, "{id}");
                if i % 2 == 0 || i == 9 {
                    assert_eq!(m.status, MessageStatus::Delivered, "{id}");
                    assert_eq!(events, ["sent", "delivered"], "{id}");
                } else {
                    assert_eq!(m.status, MessageStatus::Sent, "{id}");
                    assert_eq!(events, ["sent"], "{id}");
                }
            }
        }
    }
}

/// Many messages marked `sending` at once (on PostgreSQL, together in one batch; migration 24):
/// each gets its own outcome and only the marked ones change. On PostgreSQL a first mark is held
/// on a row lock so that the thirteen gather behind it and go as one batch. Marked: the number on
/// file with consent, and another number without the consent check (an OTP); not marked: a fence
/// the claim no longer has (`ClaimLost`), another number than the one on file, an opted-out
/// number, and marketing without its consent (`PolicyChanged`, nothing written); one message
/// marked by two callers at once: once.
async fn marks_together_each_get_their_own_outcome(backend: Backend) {
    use sqlx::Connection;
    let (store, db) = open(backend).await;
    let on_file = "+14155552671";
    sms_consent_on_file(&store, "u1", on_file).await;
    store
        .set_opt_out(
            "+14155550001",
            Channel::Sms,
            ConsentSource::SmsKeyword,
            t0(),
        )
        .await
        .unwrap();
    for i in 0..12 {
        store
            .insert_message(&message(&format!("m{i}"), None, t0()))
            .await
            .unwrap();
    }
    store
        .insert_message(&message("held", None, t0()))
        .await
        .unwrap();
    let lease = t0() + Duration::minutes(2);
    assert_eq!(
        store
            .claim_due_messages(t0(), lease, 20)
            .await
            .unwrap()
            .len(),
        13
    );
    let renewed = t0() + Duration::minutes(3);
    let consent = SendGuard {
        consent: true,
        marketing: false,
    };
    let marketing = SendGuard {
        marketing: true,
        ..consent
    };
    // (message, number, guard, fence, expected); m10 twice.
    let jobs = [
        (0, on_file, consent, lease, Some(MarkSending::Marked)),
        (1, on_file, consent, lease, Some(MarkSending::Marked)),
        (2, on_file, consent, lease, Some(MarkSending::Marked)),
        (3, on_file, consent, lease, Some(MarkSending::Marked)),
        (4, on_file, consent, lease, Some(MarkSending::Marked)),
        (5, on_file, NO_GUARD, lease, Some(MarkSending::Marked)),
        (
            6,
            on_file,
            consent,
            lease + Duration::seconds(1),
            Some(MarkSending::ClaimLost),
        ),
        (
            7,
            "+14155550000",
            consent,
            lease,
            Some(MarkSending::PolicyChanged),
        ),
        (
            8,
            "+14155550001",
            NO_GUARD,
            lease,
            Some(MarkSending::PolicyChanged),
        ),
        (
            9,
            on_file,
            marketing,
            lease,
            Some(MarkSending::PolicyChanged),
        ),
        (10, on_file, consent, lease, None),
        (10, on_file, consent, lease, None),
        (
            11,
            "+14155550002",
            NO_GUARD,
            lease,
            Some(MarkSending::Marked),
        ),
    ];
    // PostgreSQL: the batch runner's first mark waits on a row lock taken here, so the marks
    // below queue for the next batch, all together.
    let held = match backend {
        Backend::Postgres => {
            let mut lock = sqlx::PgConnection::connect(&db.url).await.unwrap();
            sqlx::query("BEGIN").execute(&mut lock).await.unwrap();
            sqlx::query("SELECT 1 FROM messages WHERE id = 'held' FOR UPDATE")
                .execute(&mut lock)
                .await
                .unwrap();
            let store = store.clone();
            let first = tokio::spawn(async move {
                store
                    .mark_sending("held", &sms_attempt(on_file), consent, t0(), lease, renewed)
                    .await
                    .unwrap()
            });
            // Until the held batch is waiting for the lock.
            let mut waiting = false;
            for _ in 0..100 {
                let n: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                     AND wait_event_type = 'Lock'",
                )
                .fetch_one(&mut lock)
                .await
                .unwrap();
                if n > 0 {
                    waiting = true;
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            assert!(waiting, "the first mark never waited for the row lock");
            Some((lock, first))
        }
        Backend::Sqlite => None,
    };
    let mut tasks = tokio::task::JoinSet::new();
    for (i, to, guard, fence, expected) in jobs {
        let store = store.clone();
        tasks.spawn(async move {
            let id = format!("m{i}");
            let outcome = store
                .mark_sending(&id, &sms_attempt(to), guard, t0(), fence, renewed)
                .await
                .unwrap();
            (i, outcome, expected)
        });
    }
    if let Some((mut lock, first)) = held {
        // The thirteen are queued behind the held batch by now (they wait for it).
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        sqlx::query("COMMIT").execute(&mut lock).await.unwrap();
        assert_eq!(first.await.unwrap(), MarkSending::Marked);
    }
    let mut twice = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let (i, outcome, expected) = done.unwrap();
        match expected {
            Some(expected) => assert_eq!(outcome, expected, "m{i}"),
            None => twice.push(outcome),
        }
    }
    twice.sort_by_key(|o| format!("{o:?}"));
    assert_eq!(twice, [MarkSending::ClaimLost, MarkSending::Marked], "m10");
    for i in 0..12 {
        let id = format!("m{i}");
        let m = store.get_message(&id).await.unwrap().unwrap();
        let events = event_statuses(&store, &id).await;
        if matches!(i, 0..=5 | 10 | 11) {
            assert_eq!((m.status, m.attempts), (MessageStatus::Sending, 1), "{id}");
            assert_eq!(m.lease_until, Some(renewed), "{id}");
            assert_eq!(events, ["sending"], "{id}");
        } else {
            assert_eq!((m.status, m.attempts), (MessageStatus::Queued, 0), "{id}");
            assert_eq!(m.lease_until, Some(lease), "{id}");
            assert!(events.is_empty(), "{id}: {events:?}");
        }
    }
}

/// A pooled PostgreSQL connection that sat idle is checked before it is handed out: one the
/// server closed meanwhile (a restart, a dropped link) is replaced and the query succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_postgres_connection_the_server_closed_is_replaced() {
    use sqlx::Connection;
    if crate::common::postgres_admin_url().is_none() {
        eprintln!("TEST_DATABASE_URL is not set: skipping the PostgreSQL run");
        return;
    }
    let (store, db) = open(Backend::Postgres).await;
    store.ping().await.unwrap();
    // The server ends every connection to this database but the one asking.
    let mut admin = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let ended: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid()) AS t",
    )
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert!(ended >= 1, "the store's connections were ended");
    admin.close().await.unwrap();
    // Past the idle time after which a connection is checked (5 s).
    tokio::time::sleep(std::time::Duration::from_millis(5_500)).await;
    store
        .ping()
        .await
        .expect("the closed connection was found and replaced");
}

/// A store on `db` after the database's default for `setting` was set to `value`, which any other
/// client of the database is checked to get.
async fn store_under_database_default(
    db: &TestDatabase,
    setting: &str,
    value: &str,
) -> prism_messaging::store::postgres::PostgresStore {
    use sqlx::Connection;
    db.execute(&format!(
        "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET {setting} = {value}', \
         current_database()); END $$"
    ))
    .await
    .unwrap();
    let mut other = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let theirs: String = sqlx::query_scalar("SELECT current_setting($1)")
        .bind(setting)
        .fetch_one(&mut other)
        .await
        .unwrap();
    assert_eq!(theirs, value, "what other clients get for {setting}");
    prism_messaging::store::postgres::PostgresStore::connect(&db.url, &crate::common::test_keys())
        .await
        .unwrap()
}

/// A PostgreSQL database set to `synchronous_commit = off` (acknowledged commits could be lost
/// in a crash) still gets durable commits from the store; a stronger setting is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_commits_are_durable_whatever_the_server_default() {
    if crate::common::postgres_admin_url().is_none() {
        eprintln!("TEST_DATABASE_URL is not set: skipping the PostgreSQL run");
        return;
    }
    let db = TestDatabase::new(Backend::Postgres).await;
    for (database_default, sessions) in [("off", "on"), ("remote_apply", "remote_apply")] {
        let store = store_under_database_default(&db, "synchronous_commit", database_default).await;
        assert_eq!(
            store.session_setting("synchronous_commit").await.unwrap(),
            sessions
        );
    }
}

/// The store's PostgreSQL sessions never JIT-compile a statement, whatever the server's default:
/// on a table without statistics the planner's estimates put `otp_issue_batch`'s statement over
/// `jit_above_cost`, and compiling it at every call took about 420 ms (`session_settings`). Other
/// clients of the database keep its default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_sessions_never_compile_their_statements() {
    if crate::common::postgres_admin_url().is_none() {
        eprintln!("TEST_DATABASE_URL is not set: skipping the PostgreSQL run");
        return;
    }
    let db = TestDatabase::new(Backend::Postgres).await;
    let store = store_under_database_default(&db, "jit", "on").await;
    assert_eq!(store.session_setting("jit").await.unwrap(), "off");
    // The durability setting beside it is unchanged.
    assert_eq!(
        store.session_setting("synchronous_commit").await.unwrap(),
        "on"
    );
}

/// SQL inserting `count` messages for user `backlog` (ids `{name}-00001` on) with status `status`,
/// due one a second from `first_seconds_before_t0` seconds before `t0()`; variables in clear,
/// which the store reads as written before encryption.
fn message_series(
    backend: Backend,
    name: &str,
    status: &str,
    count: i64,
    first_seconds_before_t0: i64,
) -> String {
    match backend {
        Backend::Postgres => format!(
            "INSERT INTO messages (id, user_id, template_name, variables, channel, status, \
             next_attempt_at, created_at, updated_at) \
             SELECT '{name}-' || lpad(i::text, 5, '0'), 'backlog', 'payment_received', '{{}}', \
             'sms', '{status}', t, t, t FROM generate_series(1, {count}) AS i, \
             LATERAL (SELECT TIMESTAMPTZ '2027-01-10 09:00:00+00' \
             - ({first_seconds_before_t0} - i) * INTERVAL '1 second' AS t) AS at"
        ),
        Backend::Sqlite => format!(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {count}), \
             at(i, t) AS (SELECT i, strftime('%Y-%m-%dT%H:%M:%S+00:00', '2027-01-10 09:00:00', \
             '-' || ({first_seconds_before_t0} - i) || ' seconds') FROM n) \
             INSERT INTO messages (id, user_id, template_name, variables, channel, status, \
             next_attempt_at, created_at, updated_at) \
             SELECT '{name}-' || substr('0000' || i, -5), 'backlog', 'payment_received', '{{}}', \
             'sms', '{status}', t, t, t FROM at"
        ),
    }
}

/// A backlog the planner has no statistics for (a table never analysed, as on a new database or
/// with autovacuum off): 2,000 delivered messages, 1,000 sends that died mid-way (`sending`, no
/// SID, their leases run out), then 5,000 queued and due. Every claim step that can read
/// `messages_due` in order does, and stops near its limit, instead of fetching and sorting every
/// due row (what PostgreSQL chose before `POSTGRES_CLAIM_PLAN`: 31,000 rows and 26 ms per claim in
/// the dispatch benchmark). The store's claim takes the oldest, in order, stale sends first, and
/// on PostgreSQL reads near its limit too (so it runs under the plan setting, as the test's do).
async fn claims_read_the_due_queue_in_index_order(backend: Backend) {
    use prism_messaging::store::{claim_sql, Stale};
    let (store, db) = open(backend).await;
    db.execute(&message_series(backend, "old", "delivered", 2_000, 100_000))
        .await
        .unwrap();
    db.execute(&message_series(backend, "stale", "sending", 1_000, 50_000))
        .await
        .unwrap();
    db.execute("UPDATE messages SET lease_until = created_at WHERE status = 'sending'")
        .await
        .unwrap();
    db.execute(&message_series(backend, "due", "queued", 5_000, 6_000))
        .await
        .unwrap();

    let limit = 64;
    // Each step, and whether it can read in index order: all but the OTP step (queued or stale).
    let steps: Vec<(String, bool)> = [Stale::Include, Stale::Skip]
        .into_iter()
        .flat_map(|stale| {
            claim_sql(" FOR UPDATE SKIP LOCKED", stale)
                .into_iter()
                .enumerate()
                .map(|(i, sql)| (sql, i > 0))
        })
        .collect();
    assert_eq!(steps.len(), 5);
    let sqlite = match backend {
        Backend::Sqlite => Some(sqlx::SqlitePool::connect(&db.url).await.unwrap()),
        Backend::Postgres => None,
    };
    for (sql, ordered) in &steps {
        match backend {
            Backend::Postgres => {
                for generic in [false, true] {
                    let plan = postgres_claim_plan(&db.url, sql, generic, limit).await;
                    // Sorts priced out put any plan that still sorts over `jit_above_cost`.
                    assert!(
                        !plan.contains("JIT"),
                        "the claim was compiled\n{sql}\n{plan}"
                    );
                    if !ordered {
                        continue;
                    }
                    assert!(!plan.contains("Sort"), "the claim sorts\n{sql}\n{plan}");
                    let scanned = plan
                        .lines()
                        .find(|line| line.contains("Index Scan using messages_due on messages"))
                        .and_then(|line| line.split("actual rows=").nth(1))
                        .and_then(|rest| rest.split(' ').next())
                        // A float from PostgreSQL 18 on (`rows=64.00`).
                        .and_then(|rows| rows.parse::<f64>().ok())
                        .unwrap_or_else(|| {
                            panic!("no ordered scan of messages_due\n{sql}\n{plan}")
                        });
                    assert!(
                        scanned <= 2.0 * limit as f64,
                        "{scanned} rows read\n{sql}\n{plan}"
                    );
                }
            }
            Backend::Sqlite if !ordered => {}
            Backend::Sqlite => {
                let sql = sql.replace(" FOR UPDATE SKIP LOCKED", "");
                let pool = sqlite.as_ref().expect("a SQLite pool");
                let plan: Vec<String> = sqlx::query_as::<_, (i64, i64, i64, String)>(&format!(
                    "EXPLAIN QUERY PLAN {sql}"
                ))
                .bind("2027-01-10T09:05:00+00:00")
                .bind("2027-01-10T09:00:00+00:00")
                .bind(limit)
                .fetch_all(pool)
                .await
                .unwrap()
                .into_iter()
                .map(|(_, _, _, detail)| detail)
                .collect();
                assert!(
                    plan.iter().any(|d| d.contains("USING INDEX messages_due ")),
                    "{sql}\n{plan:?}"
                );
                assert!(
                    !plan.iter().any(|d| d.contains("TEMP B-TREE")),
                    "the claim sorts\n{sql}\n{plan:?}"
                );
            }
        }
    }

    // The store's own claims. On PostgreSQL, what the store's queued claim reads of
    // `messages_due` is counted: the plans above are the test's own, and only this shows that the
    // store's claim runs under `POSTGRES_CLAIM_PLAN` too (without it, it reads every queued
    // entry). Counting ends every other session, so a store of its own makes each claim.
    let lease = t0() + Duration::minutes(5);
    let first_100 =
        |name: &str| -> Vec<String> { (1..=100).map(|i| format!("{name}-{i:05}")).collect() };
    let postgres = matches!(backend, Backend::Postgres);
    let reconnect = |store: DynStore| async {
        match postgres {
            true => store::connect(&db.url, &crate::common::test_keys())
                .await
                .unwrap(),
            false => store,
        }
    };
    let due_read_before = match postgres {
        true => postgres_index_reads_settled(&db.url, "messages_due", 0).await,
        false => 0,
    };
    let store = reconnect(store).await;
    let queued = store
        .claim_messages(t0(), lease, 100, Stale::Skip)
        .await
        .unwrap();
    let ids: Vec<&str> = queued.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, first_100("due"), "the oldest 100 queued, oldest first");
    if postgres {
        let read = postgres_index_reads_settled(&db.url, "messages_due", due_read_before).await
            - due_read_before;
        // 100 in index order, with the dead entries before them: the rolled-back plans above left
        // some for the first 64, and sealing the backlog's clear variables when this store
        // connected one for each row (359 in all when written). Reading every queued entry
        // would be over 5,000.
        assert!(
            (100..1_000).contains(&read),
            "the store's claim of 100 read {read} entries of messages_due"
        );
    }
    let store = reconnect(store).await;
    let stale = store.claim_due_messages(t0(), lease, 100).await.unwrap();
    let ids: Vec<&str> = stale.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(
        ids,
        first_100("stale"),
        "the oldest 100 stale sends, oldest first"
    );
}

/// PostgreSQL: how many entries scans of `index` have read (`idx_tup_read`), every other
/// session of this database ended first so that theirs are counted: a session hands its counts to
/// the shared statistics as it ends (while it runs it may hold them for up to ten seconds), just
/// after it leaves `pg_stat_activity`, so the count is read until it is above `floor` and has
/// not moved for 50 ms.
async fn postgres_index_reads_settled(url: &str, index: &str, floor: i64) -> i64 {
    use sqlx::{Connection, Executor};
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    // Client sessions only: an autovacuum worker is not ours to end (nor, without superuser,
    // can it be), and it reads no index scan into the count.
    let others = "FROM pg_stat_activity WHERE datname = current_database() \
                  AND pid <> pg_backend_pid() AND backend_type = 'client backend'";
    conn.execute(format!("SELECT pg_terminate_backend(pid) {others}").as_str())
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut read = -1;
    while std::time::Instant::now() < deadline {
        let last = read;
        let others: i64 = sqlx::query_scalar(&format!("SELECT count(*) {others}"))
            .fetch_one(&mut conn)
            .await
            .unwrap();
        conn.execute("SELECT pg_stat_clear_snapshot()")
            .await
            .unwrap();
        read = sqlx::query_scalar(
            "SELECT idx_tup_read FROM pg_stat_user_indexes WHERE indexrelname = $1",
        )
        .bind(index)
        .fetch_one(&mut conn)
        .await
        .unwrap();
        if others > 0 {
            // Only readings with every other session gone count as settled.
            read = -1;
        } else if read > floor && read == last {
            return read;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // A count that never moved is a failure, not a zero: a claim that stopped reading
    // `messages_due` altogether must not pass as one that read little.
    panic!("the reads of {index} did not settle above {floor} in 10 s (last {read})");
}

/// PostgreSQL: the dispatcher's mark batch finds its messages by primary key, on a backlog the
/// planner has no statistics for: not by also reading every queued and sending entry of
/// `messages_due` (where it ANDed the two indexes' bitmaps before migration 25), nor by reading
/// the whole table (a hash join it chose for 6,000 rows before migration 26). Read from the
/// statistics' scan counts, flushed from this session after the batch.
#[tokio::test]
async fn on_postgres_marks_find_messages_by_key() {
    use sqlx::{Connection, Executor};
    if crate::common::postgres_admin_url().is_none() {
        eprintln!("TEST_DATABASE_URL is not set: skipping the PostgreSQL run");
        return;
    }
    let (_store, db) = open(Backend::Postgres).await;
    db.execute(&message_series(
        Backend::Postgres,
        "due",
        "queued",
        5_000,
        6_000,
    ))
    .await
    .unwrap();
    let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
    // Claimed by hand: the oldest 64 leased.
    conn.execute(
        "UPDATE messages SET lease_until = '2027-01-10T09:05:00Z' \
         WHERE id IN (SELECT id FROM messages ORDER BY id LIMIT 64)",
    )
    .await
    .unwrap();
    // The jobs, built before the counts are read: building them reads all of `messages`.
    let jobs: String = sqlx::query_scalar(
        "SELECT jsonb_agg(jsonb_build_object('n', n, 'id', id, 'to_number', 'sealed', \
         'now', '2027-01-10T09:00:00Z', 'channel', 'sms', 'fence', lease_until, \
         'lease', '2027-01-10T09:10:00Z', 'body', 'sealed', 'to_index', 'blind', \
         'consent', false, 'marketing', false) ORDER BY n)::text \
         FROM (SELECT id, lease_until, row_number() OVER (ORDER BY id) AS n FROM messages \
         WHERE lease_until IS NOT NULL) AS claimed",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    let (due_before, table_before) = due_and_table_scans(&mut conn).await;
    let outcomes: Vec<String> =
        sqlx::query_scalar("SELECT outcome FROM message_mark_sending_batch('{}', $1::jsonb)")
            .bind(jobs)
            .fetch_all(&mut conn)
            .await
            .unwrap();
    assert_eq!(outcomes, vec!["marked"; 64]);
    let (due_after, table_after) = due_and_table_scans(&mut conn).await;
    assert_eq!(due_after, due_before, "the mark batch scanned messages_due");
    // Nor the table itself: what is left to find them by is the key. (The key's own scan count
    // would prove nothing: each event's foreign key check scans it whatever the plan.)
    assert_eq!(
        table_after, table_before,
        "the mark batch read all of messages"
    );
}

/// How many scans `messages_due` has had, and how many sequential scans `messages`, this
/// session's own included: its pending counts reach the shared statistics when it next goes idle,
/// so it is told to flush them first, and its cached snapshot of the statistics is dropped before
/// they are read.
async fn due_and_table_scans(conn: &mut sqlx::PgConnection) -> (i64, i64) {
    use sqlx::Executor;
    conn.execute("SELECT pg_stat_force_next_flush()")
        .await
        .unwrap();
    conn.execute("SELECT pg_stat_clear_snapshot()")
        .await
        .unwrap();
    sqlx::query_as(
        "SELECT (SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelname = 'messages_due'), \
         (SELECT seq_scan FROM pg_stat_user_tables WHERE relname = 'messages')",
    )
    .fetch_one(conn)
    .await
    .unwrap()
}

/// The plan PostgreSQL runs claim step `sql` with, under `POSTGRES_CLAIM_PLAN` in a transaction
/// as the store runs it (custom, or `generic`), executed and rolled back (`EXPLAIN ANALYZE`).
async fn postgres_claim_plan(url: &str, sql: &str, generic: bool, limit: i64) -> String {
    use sqlx::{Connection, Executor};
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    tx.execute(prism_messaging::store::POSTGRES_CLAIM_PLAN)
        .await
        .unwrap();
    if generic {
        tx.execute("SET LOCAL plan_cache_mode = force_generic_plan")
            .await
            .unwrap();
    }
    tx.execute(format!("PREPARE claim (timestamptz, timestamptz, bigint) AS {sql}").as_str())
        .await
        .unwrap();
    let plan: Vec<String> = sqlx::query_scalar(&format!(
        "EXPLAIN (ANALYZE, TIMING OFF, SUMMARY OFF) EXECUTE claim \
         ('2027-01-10T09:05:00Z', '2027-01-10T09:00:00Z', {limit})"
    ))
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    plan.join("\n")
}

/// PostgreSQL: every claim step, and every lookup by key or SID (partial indexes since migration
/// 23), can use an index in the generic plan a pooled prepared statement ends up with
/// (`force_generic_plan`: the values are `$n`, so only the query's own text can imply an index's
/// predicate). With sequential scans priced out, a plan no index serves shows a `Seq Scan`.
#[tokio::test]
async fn on_postgres_claims_and_lookups_use_their_indexes() {
    use prism_messaging::store::{claim_sql, Stale};
    if crate::common::postgres_admin_url().is_none() {
        eprintln!("TEST_DATABASE_URL is not set: skipping the PostgreSQL run");
        return;
    }
    let (_store, db) = open(Backend::Postgres).await;
    let mut conn = generic_planner(&db).await;
    // Each step: indexes of which the plan must use at least one (the OTP step's queued half
    // may take `messages_due_otp` or `messages_due`).
    let queued_otp = ["messages_due_otp", "messages_due "];
    let due = ["messages_due "];
    let steps = [
        (
            Stale::Include,
            vec![vec![&queued_otp[..], &due], vec![&due[..]], vec![&due[..]]],
        ),
        (Stale::Skip, vec![vec![&queued_otp[..]], vec![&due[..]]]),
    ];
    for (stale, expected) in steps {
        let sql = claim_sql(" FOR UPDATE SKIP LOCKED", stale);
        assert_eq!(sql.len(), expected.len());
        for (sql, wanted) in sql.iter().zip(expected) {
            let plan = generic_plan(
                &mut conn,
                "timestamptz, timestamptz, bigint",
                sql,
                "'2027-01-01T00:00:00Z', '2027-01-01T00:00:00Z', 10",
            )
            .await;
            assert!(!plan.contains("Seq Scan on messages"), "{sql}\n{plan}");
            for any_of in wanted {
                assert!(
                    any_of.iter().any(|index| plan.contains(index)),
                    "none of {any_of:?} used by {sql}\n{plan}"
                );
            }
        }
    }
    for (column, index) in [
        ("idempotency_key", "messages_idempotency_key"),
        ("provider_sid", "messages_provider_sid"),
    ] {
        let sql = format!("SELECT id FROM messages WHERE {column} = $1");
        let plan = generic_plan(&mut conn, "text", &sql, "'k'").await;
        assert!(
            plan.contains(&format!(" using {index} on ")),
            "{index} not used by {sql}\n{plan}"
        );
    }
    // Both unique where set (NULLs never conflicted), and the whole-column constraints gone.
    let definitions: Vec<String> = sqlx::query_scalar(
        "SELECT indexdef FROM pg_indexes WHERE tablename = 'messages' \
         AND indexname IN ('messages_idempotency_key', 'messages_provider_sid') ORDER BY 1",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(definitions.len(), 2, "{definitions:?}");
    for (definition, column) in definitions.iter().zip(["idempotency_key", "provider_sid"]) {
        assert!(
            definition.starts_with("CREATE UNIQUE INDEX")
                && definition.ends_with(&format!("WHERE ({column} IS NOT NULL)")),
            "{definition}"
        );
    }
    let constraints: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_constraint \
         WHERE conrelid = 'messages'::regclass AND contype = 'u'",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(
        constraints, 0,
        "a whole-column UNIQUE constraint is left on messages"
    );
}

/// A number's own OTP limits find its codes through indexes (migration 28): the codes that went
/// to it as a number on file through `otp_send_log_send_to`, which holds only those rows (a code
/// to the number named writes no entry there), and those that went to it as the number named
/// through `phone_index`. SQLite: `OTP_CHECKS`' plan. PostgreSQL, where the OTP batch function
/// makes these reads: the generic plan of its read of a number's hour, checked to be the read
/// both of the function's paths make (only the query's text can imply the index's predicate
/// there).
#[tokio::test]
async fn otp_destination_reads_use_their_indexes() {
    use prism_messaging::store::OTP_CHECKS;
    let (_store, db) = open(Backend::Sqlite).await;
    let pool = sqlx::SqlitePool::connect(&db.url).await.unwrap();
    let (definition,): (String,) =
        sqlx::query_as("SELECT sql FROM sqlite_master WHERE name = 'otp_send_log_send_to'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(
        definition.ends_with("WHERE send_to_index IS NOT NULL"),
        "{definition}"
    );
    let plan: Vec<String> =
        sqlx::query_as::<_, (i64, i64, i64, String)>(&format!("EXPLAIN QUERY PLAN {OTP_CHECKS}"))
            .bind("named-index")
            .bind("u1")
            .bind("198.51.100.1")
            .bind("2027-01-10T08:00:00+00:00")
            .bind(4i64)
            .bind(29i64)
            .bind(0i64)
            .bind("sms")
            .bind("on-file-index")
            .bind("on-file-index")
            .fetch_all(&pool)
            .await
            .unwrap()
            .into_iter()
            .map(|(_, _, _, detail)| detail)
            .collect();
    assert!(
        plan.iter()
            .any(|d| d.contains("INDEX otp_send_log_send_to (send_to_index=?")),
        "{plan:#?}"
    );
    assert!(
        !plan.iter().any(|d| d.contains("SCAN otp_send_log")),
        "a read of the whole send log\n{plan:#?}"
    );

    if crate::common::postgres_admin_url().is_none() {
        eprintln!("TEST_DATABASE_URL is not set: skipping the PostgreSQL run");
        return;
    }
    let (_store, db) = open(Backend::Postgres).await;
    let mut conn = generic_planner(&db).await;
    let (definition,): (String,) =
        sqlx::query_as("SELECT indexdef FROM pg_indexes WHERE indexname = 'otp_send_log_send_to'")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert!(
        definition.ends_with("WHERE (send_to_index IS NOT NULL)"),
        "{definition}"
    );
    // The batch function's read of a number's hour (`otp_issue_batch`, migration 28), its
    // columns as parameters. Since migration 29 only the function's one-at-a-time path makes
    // this read (its set-based statement leaves every code going to a number other than the
    // number named to that path), as its source shows, so the plan below is the plan of what
    // the function runs.
    let hour_read = |number: &str, window_start: &str, offset: &str| {
        format!(
            "SELECT u.t FROM ( \
             SELECT l.created_at AS t FROM otp_send_log l \
             WHERE l.send_to_index = {number} AND l.created_at > {window_start} \
             UNION ALL \
             SELECT l.created_at FROM otp_send_log l WHERE l.phone_index = {number} \
             AND l.went_to_named AND l.created_at > {window_start} \
             ) u ORDER BY u.t DESC LIMIT 1 OFFSET {offset}"
        )
    };
    let (source,): (String,) =
        sqlx::query_as("SELECT prosrc FROM pg_proc WHERE proname = 'otp_issue_batch'")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    let words = |text: &str| text.split_whitespace().collect::<Vec<_>>().join(" ");
    let read = hour_read("dest_index", "j.window_start", "(SELECT j.per_number)");
    assert!(
        words(&source).contains(&words(&read)),
        "otp_issue_batch's one-at-a-time path no longer reads a number's hour as\n{read}"
    );
    let sql = hour_read("$1", "$2", "$3");
    let plan = generic_plan(
        &mut conn,
        "text, timestamptz, bigint",
        &sql,
        "'on-file-index', '2027-01-10T08:00:00Z', 2",
    )
    .await;
    for index in ["otp_send_log_send_to", "otp_send_log_phone_index"] {
        assert!(
            plan.contains(&format!(" using {index} on ")),
            "{index} not used\n{sql}\n{plan}"
        );
    }
}

/// Migration 28 converts the send log migration 27 wrote, which logged every code that went out
/// under the blind index of the number it went to: a code to the number named (that index is its
/// `phone_index`) is marked `went_to_named` and its second entry dropped; a code to a number on
/// file in place of the number named keeps it; a code that went nowhere stays as it was.
async fn a_send_log_from_migration_27_is_converted(backend: Backend) {
    let db = TestDatabase::new(backend).await;
    let rows = "INSERT INTO otp_send_log (phone_number, user_id, ip, created_at, phone_index, \
                send_to_index) VALUES \
                ('sealed-t', 'u1', NULL, '2027-01-10T09:00:00+00:00', 'index-t', 'index-t'), \
                ('sealed-n', 'u2', NULL, '2027-01-10T09:00:01+00:00', 'index-n', 'index-t'), \
                ('sealed-t', 'u3', NULL, '2027-01-10T09:00:02+00:00', 'index-t', NULL)";
    match backend {
        Backend::Sqlite => {
            let options =
                <sqlx::sqlite::SqliteConnectOptions as std::str::FromStr>::from_str(&db.url)
                    .unwrap()
                    .create_if_missing(true);
            let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
            migrations_up_to(sqlx::migrate!("migrations/sqlite"), 27)
                .run(&pool)
                .await
                .unwrap();
            sqlx::query(rows).execute(&pool).await.unwrap();
            pool.close().await;
        }
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
            migrations_up_to(sqlx::migrate!("migrations/postgres"), 27)
                .run(&pool)
                .await
                .unwrap();
            sqlx::query(rows).execute(&pool).await.unwrap();
            pool.close().await;
        }
    }
    let _store = store::connect(&db.url, &crate::common::test_keys())
        .await
        .unwrap();
    let logged = db
        .text_pairs(
            "SELECT COALESCE(send_to_index, ''), \
             CASE WHEN went_to_named THEN 'named' ELSE '' END FROM otp_send_log ORDER BY id",
        )
        .await;
    let expected = [("", "named"), ("index-t", ""), ("", "")];
    let expected: Vec<(String, String)> = expected
        .iter()
        .map(|(index, named)| (index.to_string(), named.to_string()))
        .collect();
    assert_eq!(logged, expected);
}

/// A connection to `db` that plans as a pooled prepared statement ends up planning (the generic
/// plan: only the query's own text can imply an index's predicate), with sequential scans priced
/// out, so that a plan no index serves shows a `Seq Scan`.
async fn generic_planner(db: &TestDatabase) -> sqlx::PgConnection {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
    for setting in [
        "SET enable_seqscan = off",
        "SET plan_cache_mode = force_generic_plan",
    ] {
        sqlx::query(setting).execute(&mut conn).await.unwrap();
    }
    conn
}

/// `migrator` with its migrations up to `version` only: a database as an earlier release left it.
fn migrations_up_to(
    mut migrator: sqlx::migrate::Migrator,
    version: i64,
) -> sqlx::migrate::Migrator {
    migrator.migrations = migrator
        .migrations
        .iter()
        .filter(|m| m.version <= version)
        .cloned()
        .collect::<Vec<_>>()
        .into();
    migrator
}

/// The plan of `sql` prepared with parameters of `types` and executed with `values`, as text.
async fn generic_plan(
    conn: &mut sqlx::PgConnection,
    types: &str,
    sql: &str,
    values: &str,
) -> String {
    use sqlx::Executor;
    conn.execute(format!("PREPARE planned ({types}) AS {sql}").as_str())
        .await
        .unwrap();
    let plan: Vec<String> = sqlx::query_scalar(&format!("EXPLAIN EXECUTE planned ({values})"))
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    conn.execute("DEALLOCATE planned").await.unwrap();
    plan.join("\n")
}

/// `ping` (what `/readyz` asks) fails on a database that answers but lacks the schema this build
/// runs on: restored from a backup before the last migration, or emptied.
async fn readiness_needs_the_schema_this_build_runs_on(backend: Backend) {
    let (store, db) = open(backend).await;
    store.ping().await.unwrap();
    db.execute(
        "DELETE FROM _sqlx_migrations WHERE version = (SELECT MAX(version) FROM _sqlx_migrations)",
    )
    .await
    .unwrap();
    let behind = store
        .ping()
        .await
        .expect_err("a schema one migration behind is not ready");
    assert!(
        format!("{behind:#}").contains("prism-messaging migrate"),
        "{behind:#}"
    );
    db.execute("DROP TABLE _sqlx_migrations").await.unwrap();
    store
        .ping()
        .await
        .expect_err("a database without the schema is not ready");
}
