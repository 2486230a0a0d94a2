//! A patient's copy of their data, and erasure: what goes, what stays (anonymised audit rows,
//! opt-outs, one erasure record), pending messages never sent after, sessions revoked, and on
//! SQLite the number gone from the database files' bytes.

use crate::common::*;
use reqwest::header::{COOKIE, SET_COOKIE};
use serde_json::{json, Value};

both_backends!(
    the_export_holds_everything_about_me_and_nothing_of_others,
    erasure_removes_the_user_keeps_evidence_and_is_harmless_twice,
    erasure_takes_the_user_out_of_a_shared_numbers_replies,
    a_reply_that_listed_the_user_before_the_erasure_does_not_name_them,
    two_erasures_of_users_sharing_a_number_leave_neither_in_its_replies,
    a_preferences_change_racing_an_erasure_is_answered,
);

const FAMILY: &str = "+14155552671";

async fn erase_me(app: &TestApp, user: &str) -> Value {
    let r = app
        .client
        .delete(app.url("/api/messaging/me"))
        .bearer_auth(app.user_token(user))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

async fn sign_in(app: &TestApp, user: &str) -> String {
    let r: Value = app
        .client
        .post(app.url("/api/settings-links"))
        .bearer_auth(API_KEY)
        .json(&json!({"user_id": user}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let url = r["url"]
        .as_str()
        .unwrap()
        .replace(PUBLIC_URL, &app.base_url);
    let r = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(url)
        .header("user-agent", "privacy-test/1.0")
        .send()
        .await
        .unwrap();
    r.headers()[SET_COOKIE]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string()
}

async fn the_export_holds_everything_about_me_and_nothing_of_others(backend: Backend) {
    let app = TestApp::spawn_live(backend, TestConfig::new()).await;
    // A family phone: the parent was messaged last, so the reply is theirs.
    app.consent("child", FAMILY).await;
    app.consent("parent", FAMILY).await;
    app.notify_ok(reminder("child")).await;
    app.dispatch().await;
    app.notify_ok(reminder("parent")).await;
    app.dispatch().await;
    app.incoming("SMreply", FAMILY, "see you then").await;
    let r = app
        .client
        .put(app.url("/api/appointments/a1"))
        .bearer_auth(API_KEY)
        .json(&json!({"user_id": "child", "starts_at": "2030-01-12T10:00:00Z"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = app
        .client
        .put(app.url("/api/subscriptions/s1"))
        .bearer_auth(API_KEY)
        .json(&json!({"user_id": "child", "plan": "Pro", "expires_at": "2030-02-01T00:00:00Z"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = app
        .client
        .post(app.url("/api/messaging/send-otp"))
        .json(&json!({"user_id": "child", "phone_number": FAMILY, "purpose": "login"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let code = app.fake.as_ref().unwrap().last_code_for(FAMILY).unwrap();
    sign_in(&app, "child").await;

    let r = app
        .client
        .get(app.url("/api/messaging/export"))
        .bearer_auth(app.user_token("child"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let doc: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(doc["success"], true);
    assert_eq!(doc["preferences"]["phone_number"], FAMILY);
    assert!(doc["consent_audit_trail"].as_array().unwrap().len() >= 4);
    let messages = doc["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2, "the reminder and the code's message");
    let reminder_sent = messages
        .iter()
        .find(|m| m["template_name"] == "appointment_reminder_24h")
        .unwrap();
    assert!(reminder_sent["body"].as_str().unwrap().contains("reminder"));
    assert!(!reminder_sent["events"].as_array().unwrap().is_empty());
    assert!(!text.contains(&code), "never a code");
    assert!(
        doc["replies"].as_array().unwrap().is_empty(),
        "the parent's reply is not mine"
    );
    assert_eq!(doc["appointments"][0]["id"], "a1");
    assert_eq!(doc["subscriptions"][0]["plan"], "Pro");
    assert_eq!(doc["otp_sends"].as_array().unwrap().len(), 1);
    let sessions = doc["settings_sessions"].as_array().unwrap();
    assert_eq!(sessions[0]["user_agent"], "privacy-test/1.0");
    // The parent's copy holds the reply.
    let parent: Value = app
        .get_json("/api/messaging/export", Some(&app.user_token("parent")))
        .await;
    assert_eq!(parent["replies"][0]["body"], "see you then");
    // Only with a token.
    let r = app
        .client
        .get(app.url("/api/messaging/export"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

async fn erasure_removes_the_user_keeps_evidence_and_is_harmless_twice(backend: Backend) {
    let app = TestApp::spawn_live(backend, TestConfig::new()).await;
    app.consent("p1", FAMILY).await;
    app.notify_ok(reminder("p1")).await;
    app.dispatch().await;
    // Queued, not yet sent: it must never go after the erasure.
    let pending = app.notify_ok(reminder("p1")).await;
    let cookie = sign_in(&app, "p1").await;
    let r = app
        .client
        .put(app.url("/api/subscriptions/s1"))
        .bearer_auth(API_KEY)
        .json(&json!({"user_id": "p1", "plan": "Pro", "renews_at": "2030-02-01T00:00:00Z"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // p2 said STOP from another number, then is erased: the opt-out stays.
    app.consent("p2", "+14155552672").await;
    app.incoming("SMstop", "+14155552672", "STOP").await;

    // The number is stored sealed: what must leave the files is its sealed form.
    let sealed = app
        .db
        .text_pairs("SELECT user_id, phone_number FROM messaging_consent WHERE user_id = 'p1'")
        .await
        .remove(0)
        .1;
    let r = erase_me(&app, "p1").await;
    let erased = &r["erased"];
    assert_eq!(erased["preferences"], 1);
    assert_eq!(erased["messages"], 2);
    assert_eq!(erased["sessions"], 1);
    assert_eq!(erased["subscriptions"], 1);
    assert!(erased["audit_rows_anonymised"].as_u64().unwrap() >= 4);
    let created_before = app.fake.as_ref().unwrap().created_count();
    assert_eq!(app.dispatch().await.sent, 0);
    assert_eq!(app.fake.as_ref().unwrap().created_count(), created_before);
    let r = app
        .client
        .get(app.url(&format!("/api/messages/{pending}")))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let prefs: Value = app
        .get_json("/api/messaging/preferences", Some(&app.user_token("p1")))
        .await;
    assert_eq!(prefs["preferences"], json!({}));
    // The settings session is revoked.
    let r = app
        .client
        .get(app.url("/settings/messaging"))
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // The audit rows stay as evidence, anonymised: no user id, number, address or browser.
    let rows = app
        .db
        .text_pairs(
            "SELECT user_id, COALESCE(old_value, '') || '|' || COALESCE(new_value, '') || '|' || \
             COALESCE(ip, '') || '|' || COALESCE(user_agent, '') FROM consent_audit_trail \
             WHERE user_id LIKE 'erased:%'",
        )
        .await;
    assert!(rows.len() >= 4);
    for (user, rest) in &rows {
        assert!(user.starts_with("erased:") && !user.contains("p1"));
        assert!(
            !rest.contains("4155552671") && !rest.contains("prism-tests"),
            "{rest}"
        );
    }
    // ... and the trail is still append-only for anything else.
    let tamper = app
        .db
        .execute("UPDATE consent_audit_trail SET new_value = 'false' WHERE field = 'sms_consent'")
        .await;
    assert!(tamper.is_err(), "the audit trail accepted an edit");
    let record = app
        .db
        .text_pairs("SELECT user_hash, erased_by FROM erasures")
        .await;
    assert_eq!(record.len(), 1);
    assert_eq!(record[0].1, "user");

    // Twice: harmless.
    let again = erase_me(&app, "p1").await;
    assert_eq!(again["erased"]["preferences"], 0);
    assert_eq!(again["erased"]["messages"], 0);

    // The host app erases p2; their STOP still holds for the number.
    let r = app
        .client
        .delete(app.url("/api/users/p2"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = app
        .client
        .delete(app.url("/api/users/p2"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    app.consent("p3", "+14155552672").await;
    let id = app.notify_ok(reminder("p3")).await;
    app.dispatch().await;
    assert_eq!(app.message(&id).await["reason"], "opted_out");

    // On SQLite the erased number is gone from the files' bytes (secure_delete, WAL folded):
    // neither in clear nor as the sealed value the row held.
    if backend == Backend::Sqlite {
        let bytes = database_bytes(&app.db).await;
        assert!(
            contains(&bytes, "enc1:"),
            "other sealed rows are still there"
        );
        for needle in ["4155552671", sealed.as_str()] {
            assert!(
                !contains(&bytes, needle),
                "{needle} is still in the database files"
            );
        }
    }
}

/// Two users share a number and a reply comes from it (attributed to the one messaged, and
/// listing both): erasing the other leaves the reply to its user, without the erased user's id
/// anywhere in it (found by review: `user_ids` still named them).
async fn erasure_takes_the_user_out_of_a_shared_numbers_replies(backend: Backend) {
    let app = TestApp::spawn_live(backend, TestConfig::new()).await;
    app.consent("fam-a", FAMILY).await;
    app.consent("fam-b", FAMILY).await;
    app.notify_ok(reminder("fam-a")).await;
    app.dispatch().await;
    app.incoming("SMshared-reply", FAMILY, "hello").await;
    // (Read from the table: the inbox shows a reply two seconds after it came.)
    let replies = || {
        app.db.text_pairs(
            "SELECT COALESCE(user_id, ''), COALESCE(user_ids, '') FROM incoming_messages",
        )
    };
    let before = replies().await;
    assert_eq!(before.len(), 1);
    let listed: Vec<String> = serde_json::from_str(&before[0].1).unwrap();
    assert_eq!(listed, ["fam-a", "fam-b"], "{before:?}");
    let erased = erase_by_host(&app, "fam-b").await;
    assert_eq!(
        erased["erased"]["replies"], 0,
        "the reply is fam-a's: {erased}"
    );
    let after = replies().await;
    assert_eq!(after.len(), 1, "the reply stays");
    assert_eq!(after[0].0, "fam-a");
    let listed: Vec<String> = serde_json::from_str(&after[0].1).unwrap();
    assert_eq!(listed, ["fam-a"], "{after:?}");
}

/// A reply reads who has the number, then is stored; an erasure that commits in between (found by
/// review, racing them: the reply kept the erased user's id) leaves it nothing of the user. Here
/// the erasure runs between the two steps, as the race does. (A STOP in the same race:
/// `webhooks::a_stop_while_a_user_is_erased_leaves_them_erased`.)
async fn a_reply_that_listed_the_user_before_the_erasure_does_not_name_them(backend: Backend) {
    use prism_messaging::store::IncomingMessage;
    let app = TestApp::spawn(backend).await;
    app.consent("fam-a", FAMILY).await;
    app.consent("fam-b", FAMILY).await;
    let listed = app.state.store.users_with_phone(FAMILY).await.unwrap();
    assert_eq!(listed, ["fam-a", "fam-b"]);
    erase_by_host(&app, "fam-b").await;
    // The reply, attributed to the erased user.
    let reply = IncomingMessage {
        id: "in-race".into(),
        provider_sid: "SMrace".into(),
        channel: "sms".into(),
        from_number: FAMILY.into(),
        to_number: None,
        user_id: Some("fam-b".into()),
        user_ids: Some(serde_json::to_string(&listed).unwrap()),
        body: "see you then".into(),
        keyword: None,
        reply_template: None,
        opt_out_type: None,
        received_at: chrono::Utc::now(),
    };
    assert!(app.state.store.insert_incoming(&reply).await.unwrap());
    let stored = app
        .state
        .store
        .incoming_by_sid("SMrace")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.user_id, None);
    assert_eq!(stored.user_ids(), ["fam-a"]);
}

/// Three users share a number and each has replies from it listing all three; two of them are
/// erased at the same moment. Both erasures answer, the third user's replies stay and list only
/// them, and the erased users' replies are gone. Found by review on PostgreSQL: each erasure
/// deleted its own replies, then rewrote the lists of the other's, so the two deadlocked (one
/// answered 500), and a list read before the other committed was written back naming it.
async fn two_erasures_of_users_sharing_a_number_leave_neither_in_its_replies(backend: Backend) {
    use prism_messaging::store::IncomingMessage;
    let app = TestApp::spawn(backend).await;
    for round in 0..8 {
        let number = format!("+1415555267{round}");
        let users: Vec<String> = ["a", "b", "c"]
            .iter()
            .map(|u| format!("{u}-{round}"))
            .collect();
        for user in &users {
            app.consent(user, &number).await;
        }
        let listed = serde_json::to_string(&users).unwrap();
        for (n, user) in users.iter().cycle().take(9).enumerate() {
            let reply = IncomingMessage {
                id: format!("in-{round}-{n}"),
                provider_sid: format!("SM{round}x{n}"),
                channel: "sms".into(),
                from_number: number.clone(),
                to_number: None,
                user_id: Some(user.clone()),
                user_ids: Some(listed.clone()),
                body: "thanks".into(),
                keyword: None,
                reply_template: None,
                opt_out_type: None,
                received_at: chrono::Utc::now(),
            };
            assert!(app.state.store.insert_incoming(&reply).await.unwrap());
        }
        // Both erasures answer 200 (`erase_by_host` asserts it).
        let (a, b) = tokio::join!(
            erase_by_host(&app, &users[0]),
            erase_by_host(&app, &users[1])
        );
        assert_eq!(a["erased"]["replies"], 3, "{a}");
        assert_eq!(b["erased"]["replies"], 3, "{b}");
        let left = app
            .db
            .text_pairs(&format!(
                "SELECT COALESCE(user_id, ''), COALESCE(user_ids, '') FROM incoming_messages \
                 WHERE id LIKE 'in-{round}-%'"
            ))
            .await;
        assert_eq!(left.len(), 3, "round {round}: {left:?}");
        for (user, listed) in &left {
            assert_eq!(user, &users[2], "round {round}: {left:?}");
            let listed: Vec<String> = serde_json::from_str(listed).unwrap();
            assert_eq!(listed, [users[2].clone()], "round {round}: {left:?}");
        }
    }
}

/// A user changes their preferences while they are erased: the change is answered 200 whichever
/// commits first (after the erasure it makes a record afresh, as any write after an erasure
/// does), never 500. Found by review on PostgreSQL: the change found the record when it tried to
/// create it, then found it deleted when it read it.
async fn a_preferences_change_racing_an_erasure_is_answered(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    for round in 0..20 {
        let user = format!("racer-{round}");
        app.consent(&user, FAMILY).await;
        let change = json!({"phone_number": FAMILY, "sms_consent": false,
            "whatsapp_consent": true, "marketing_consent": true});
        let (changed, _) = tokio::join!(
            app.put_preferences(&user, change),
            erase_by_host(&app, &user)
        );
        let status = changed.status();
        assert_eq!(
            status,
            200,
            "round {round}: {}",
            changed.text().await.unwrap()
        );
    }
}

/// `DELETE /api/users/{id}` with the host key; its answer.
async fn erase_by_host(app: &TestApp, user: &str) -> Value {
    let r = app
        .client
        .delete(app.url(&format!("/api/users/{user}")))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}
