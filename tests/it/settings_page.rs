//! The settings page over HTTP (the browser test drives it in Chromium): one-time links, the
//! session cookie, CSRF, the form's errors, sessions that slide and end, and CORS for browser
//! front ends.

use crate::common::*;
use chrono::{Duration, Utc};
use prism_messaging::clock::ManualClock;
use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};
use reqwest::redirect::Policy;
use serde_json::{json, Value};

both_backends!(
    links_open_once_and_set_a_safe_cookie,
    the_form_needs_the_session_token_and_keeps_what_was_typed,
    sessions_slide_expire_and_are_cleaned_up,
    cors_opens_only_the_user_and_otp_calls,
    dates_are_in_the_patients_zone,
    a_public_url_with_a_path_keeps_the_page_under_it,
    an_opted_out_number_is_shown_in_the_app_and_on_the_page,
);

const PATIENT: &str = "+14155552671";

/// A client that does not follow redirects, so 303s can be checked.
fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(Policy::none())
        .build()
        .unwrap()
}

async fn link(app: &TestApp, body: Value) -> reqwest::Response {
    app.client
        .post(app.url("/api/settings-links"))
        .bearer_auth(API_KEY)
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// Open a fresh link for `user`: the session cookie's `name=value`.
async fn sign_in(app: &TestApp, user: &str) -> String {
    let r: Value = link(app, json!({"user_id": user}))
        .await
        .json()
        .await
        .unwrap();
    let url = r["url"]
        .as_str()
        .unwrap()
        .replace(PUBLIC_URL, &app.base_url);
    let r = no_redirects().get(url).send().await.unwrap();
    assert_eq!(r.status(), 303);
    let cookie = r.headers()[SET_COOKIE].to_str().unwrap().to_string();
    cookie.split(';').next().unwrap().to_string()
}

/// The settings page served to this session.
async fn page_html(app: &TestApp, cookie: &str) -> String {
    app.client
        .get(app.url("/settings/messaging"))
        .header(COOKIE, cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The CSRF token in the page served to this session.
async fn csrf(app: &TestApp, cookie: &str) -> String {
    let html = page_html(app, cookie).await;
    let start = html.find("name=\"csrf_token\" value=\"").unwrap() + 25;
    html[start..start + 64].to_string()
}

async fn post_form(
    app: &TestApp,
    cookie: Option<&str>,
    form: &[(&str, &str)],
) -> reqwest::Response {
    let mut request = no_redirects()
        .post(app.url("/settings/messaging"))
        .header("user-agent", "settings-test/1.0")
        .form(form);
    if let Some(cookie) = cookie {
        request = request.header(COOKIE, cookie);
    }
    request.send().await.unwrap()
}

async fn links_open_once_and_set_a_safe_cookie(backend: Backend) {
    let clock = ManualClock::new(Utc::now());
    let app = TestApp::spawn_with(backend, TestConfig::new().with_clock(&clock)).await;
    // The host app's key is required; return_url must be under APP_URL.
    let r = app
        .client
        .post(app.url("/api/settings-links"))
        .json(&json!({"user_id": "p1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = link(
        &app,
        json!({"user_id": "p1", "return_url": "https://evil.example/x"}),
    )
    .await;
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "invalid_return_url");
    // A browser resolves `..` (written, percent-encoded, or after a backslash) out of a
    // path-prefixed APP_URL.
    for climbing in [
        "/../admin",
        "/%2e%2E/admin",
        "/a/./b",
        "/..\\admin",
        "\\..\\admin",
    ] {
        let r = link(
            &app,
            json!({"user_id": "p1", "return_url": format!("{APP_URL}{climbing}")}),
        )
        .await;
        assert_eq!(r.status(), 400, "{climbing}");
        assert_eq!(error_code(r).await, "invalid_return_url", "{climbing}");
    }
    let r = link(
        &app,
        json!({"user_id": "p1", "return_url": format!("{APP_URL}.evil.io/")}),
    )
    .await;
    assert_eq!(r.status(), 400);

    let r: Value = link(
        &app,
        json!({"user_id": "p1", "return_url": format!("{APP_URL}/home")}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(r["success"], true);
    assert_eq!(r["expires_in"], 300);
    let url = r["url"].as_str().unwrap();
    assert!(url.starts_with(&format!("{PUBLIC_URL}/settings/messaging?handoff=")));
    let local = url.replace(PUBLIC_URL, &app.base_url);
    let syncs = app.state.store.group_syncs();
    let r = no_redirects().get(&local).send().await.unwrap();
    assert_eq!(r.status(), 303);
    if backend == Backend::Sqlite {
        // A GET, yet it used the link up: the answer waited for the group fsync.
        assert!(
            app.state.store.group_syncs() > syncs,
            "the link's use was on disk before the cookie left"
        );
    }
    assert_eq!(
        r.headers()[LOCATION],
        "/settings/messaging",
        "no code in the address"
    );
    let cookie = r.headers()[SET_COOKIE].to_str().unwrap();
    for attribute in ["HttpOnly", "SameSite=Lax", "Path=/settings", "Secure"] {
        assert!(cookie.contains(attribute), "{attribute} in {cookie}");
    }
    // Used, unknown and expired links all answer 410 with the same page.
    let used = no_redirects().get(&local).send().await.unwrap();
    assert_eq!(used.status(), 410);
    let used = used.text().await.unwrap();
    assert!(used.contains("This link has expired"));
    let unknown = no_redirects()
        .get(app.url("/settings/messaging?handoff=nonsense"))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 410);
    assert_eq!(unknown.text().await.unwrap(), used);
    let r: Value = link(&app, json!({"user_id": "p1"}))
        .await
        .json()
        .await
        .unwrap();
    clock.advance(Duration::seconds(301));
    let expired = no_redirects()
        .get(
            r["url"]
                .as_str()
                .unwrap()
                .replace(PUBLIC_URL, &app.base_url),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(expired.status(), 410);
    assert_eq!(expired.text().await.unwrap(), used);
    // Without a session: a page saying to open settings from the app.
    let r = app
        .client
        .get(app.url("/settings/messaging"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Pages are never cached, sniffed, framed or scripted.
    let headers = r.headers();
    assert_eq!(headers["cache-control"], "no-store");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("frame-ancestors 'none'") && !csp.contains("script-src"),
        "{csp}"
    );
}

async fn the_form_needs_the_session_token_and_keeps_what_was_typed(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.consent("p1", PATIENT).await;
    let cookie = sign_in(&app, "p1").await;
    let token = csrf(&app, &cookie).await;
    let before = app.state.consent.audit_trail("p1").await.unwrap().len();
    // No token, a wrong one, or no session: 403, nothing changed.
    for (cookie, token) in [
        (Some(cookie.as_str()), ""),
        (Some(cookie.as_str()), "x"),
        (None, token.as_str()),
    ] {
        let r = post_form(&app, cookie, &[("phone_number", ""), ("csrf_token", token)]).await;
        assert_eq!(r.status(), 403);
    }
    assert_eq!(
        app.state.consent.audit_trail("p1").await.unwrap().len(),
        before
    );

    // A bad number: the form again, 400, the error beside the field, the typed value kept.
    let r = post_form(
        &app,
        Some(&cookie),
        &[
            ("phone_number", "+1 800 FLOWERS"),
            ("sms_consent", "on"),
            ("csrf_token", &token),
        ],
    )
    .await;
    assert_eq!(r.status(), 400);
    // The session was used: its cookie comes again with a fresh Max-Age, as on every save.
    assert!(r.headers()[SET_COOKIE]
        .to_str()
        .unwrap()
        .starts_with(&cookie));
    let html = r.text().await.unwrap();
    assert!(html.contains("id=\"phone_error\""), "{html}");
    assert!(html.contains("value=\"+1 800 FLOWERS\""));
    // In the page's words, not the API's: the patient typed into "Mobile number".
    assert!(
        html.contains("Enter your mobile number in international format"),
        "{html}"
    );
    assert!(!html.contains("phone_number must"), "{html}");
    // An empty number with SMS ticked: phone_required.
    let r = post_form(
        &app,
        Some(&cookie),
        &[
            ("phone_number", ""),
            ("sms_consent", "on"),
            ("csrf_token", &token),
        ],
    )
    .await;
    assert_eq!(r.status(), 400);
    let html = r.text().await.unwrap();
    assert!(html.contains("Enter your mobile number to get text or WhatsApp messages"));
    assert!(!html.contains("a phone_number is needed"), "{html}");
    assert_eq!(
        app.state.consent.audit_trail("p1").await.unwrap().len(),
        before
    );

    // A new number, saved with source web_settings, the client's address and browser.
    let r = post_form(
        &app,
        Some(&cookie),
        &[
            ("phone_number", "+447911123456"),
            ("sms_consent", "on"),
            ("csrf_token", &token),
        ],
    )
    .await;
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()[LOCATION], "/settings/messaging?saved=1");
    assert!(r.headers()[SET_COOKIE]
        .to_str()
        .unwrap()
        .starts_with(&cookie));
    let consent = app.state.consent.get("p1").await.unwrap().unwrap();
    assert_eq!(consent.phone_number.as_deref(), Some("+447911123456"));
    assert!(consent.sms_consent && !consent.whatsapp_consent && !consent.marketing_consent);
    let audit = app.state.consent.audit_trail("p1").await.unwrap();
    let last = audit.last().unwrap();
    assert_eq!(last.source, "web_settings");
    assert_eq!(last.user_agent.as_deref(), Some("settings-test/1.0"));
    assert_eq!(last.ip.as_deref(), Some("127.0.0.1"));
    let page = app
        .client
        .get(app.url("/settings/messaging?saved=1"))
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("Messaging preferences updated"));
    // An empty number with no box ticked removes it.
    let r = post_form(
        &app,
        Some(&cookie),
        &[("phone_number", ""), ("csrf_token", &token)],
    )
    .await;
    assert_eq!(r.status(), 303);
    let consent = app.state.consent.get("p1").await.unwrap().unwrap();
    assert_eq!(consent.phone_number, None);
    // Another patient's session cannot use this one's token.
    let other = sign_in(&app, "p2").await;
    let r = post_form(
        &app,
        Some(&other),
        &[("phone_number", ""), ("csrf_token", &token)],
    )
    .await;
    assert_eq!(r.status(), 403);
}

async fn sessions_slide_expire_and_are_cleaned_up(backend: Backend) {
    let clock = ManualClock::new(Utc::now());
    let app = TestApp::spawn_with(
        backend,
        TestConfig::new()
            .set("SESSION_TTL_SECONDS", "600")
            .with_clock(&clock),
    )
    .await;
    let cookie = sign_in(&app, "p1").await;
    let get = |cookie: String| {
        let request = app
            .client
            .get(app.url("/settings/messaging"))
            .header(COOKIE, cookie);
        async move { request.send().await.unwrap().status().as_u16() }
    };
    // Used within its time, a session slides on, and so does the browser's copy of the cookie:
    // every page view sends it again with a fresh Max-Age.
    for _ in 0..3 {
        clock.advance(Duration::seconds(500));
        assert_eq!(get(cookie.clone()).await, 200);
    }
    let r = app
        .client
        .get(app.url("/settings/messaging"))
        .header(COOKIE, cookie.clone())
        .send()
        .await
        .unwrap();
    let set: Vec<_> = r.headers().get_all(SET_COOKIE).iter().collect();
    assert_eq!(set.len(), 1, "{set:?}");
    let set = set[0].to_str().unwrap();
    assert!(
        set.starts_with(&cookie) && set.contains("Max-Age=600"),
        "{set}"
    );
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Lax"),
        "{set}"
    );
    clock.advance(Duration::seconds(601));
    assert_eq!(
        get(cookie.clone()).await,
        401,
        "idle past SESSION_TTL_SECONDS"
    );
    let r: Value = app
        .client
        .post(app.url("/cron/cleanup-expired-otps"))
        .bearer_auth(CRON_SECRET)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["success"], true);
    let deleted = app.state.settings_pages.prune().await.unwrap();
    assert_eq!(deleted, 2, "the expired session and its used link");
}

async fn cors_opens_only_the_user_and_otp_calls(backend: Backend) {
    let origin = "https://web.example.com";
    let app = TestApp::spawn_with(
        backend,
        TestConfig::new().set(
            "CORS_ALLOWED_ORIGINS",
            &format!("{origin},https://m.example.com"),
        ),
    )
    .await;
    let preflight = |path: &str, from: &str, method: &str| {
        let request = app
            .client
            .request(reqwest::Method::OPTIONS, app.url(path))
            .header("origin", from)
            .header("access-control-request-method", method)
            .header(
                "access-control-request-headers",
                "authorization,content-type",
            );
        async move { request.send().await.unwrap() }
    };
    for (path, method) in [
        ("/api/messaging/preferences", "PUT"),
        ("/api/messaging/history", "GET"),
        ("/api/messaging/send-otp", "POST"),
        ("/api/messaging/verify-otp", "POST"),
    ] {
        let r = preflight(path, origin, method).await;
        assert!(r.status().is_success(), "{path}: {}", r.status());
        assert_eq!(r.headers()["access-control-allow-origin"], origin, "{path}");
    }
    for (path, method) in [
        ("/api/notifications", "POST"),
        ("/api/settings-links", "POST"),
        ("/cron/cleanup-expired-otps", "POST"),
        ("/webhooks/twilio/status", "POST"),
        ("/settings/messaging", "POST"),
    ] {
        let r = preflight(path, origin, method).await;
        assert!(
            !r.headers().contains_key("access-control-allow-origin"),
            "{path} opened to other origins"
        );
    }
    let r = preflight("/api/messaging/preferences", "https://evil.example", "PUT").await;
    assert!(!r.headers().contains_key("access-control-allow-origin"));
    // A real call from the front end carries the header too.
    let r = app
        .client
        .get(app.url("/api/messaging/preferences"))
        .bearer_auth(app.user_token("p1"))
        .header("origin", origin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["access-control-allow-origin"], origin);
    // And lets the page read a refusal's wait (found by review: browsers hide `Retry-After`
    // from scripts unless it is exposed).
    assert_eq!(
        r.headers()["access-control-expose-headers"]
            .to_str()
            .unwrap()
            .to_ascii_lowercase(),
        "retry-after"
    );

    // With no origins configured, no cross-origin access at all.
    let closed = TestApp::spawn(backend).await;
    let r = closed
        .client
        .request(
            reqwest::Method::OPTIONS,
            closed.url("/api/messaging/preferences"),
        )
        .header("origin", origin)
        .header("access-control-request-method", "GET")
        .send()
        .await
        .unwrap();
    assert!(!r.headers().contains_key("access-control-allow-origin"));
}

async fn dates_are_in_the_patients_zone(backend: Backend) {
    // 04:00 UTC is 09:30 in Kolkata.
    let clock = ManualClock::new(
        chrono::DateTime::parse_from_rfc3339("2027-01-12T04:00:00Z")
            .unwrap()
            .with_timezone(&Utc),
    );
    let app = TestApp::spawn_with(backend, TestConfig::new().with_clock(&clock)).await;
    let r = app
        .put_preferences(
            "p1",
            json!({"phone_number": PATIENT, "sms_consent": true, "time_zone": "Asia/Kolkata"}),
        )
        .await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    app.notify_ok(json!({
        "user_id": "p1",
        "template": "payment_received",
        "variables": {"amount": "INR 1.00", "date": "2027-01-12"},
    }))
    .await;
    let cookie = sign_in(&app, "p1").await;
    let page = app
        .client
        .get(app.url("/settings/messaging"))
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // minijinja escapes the slash.
    assert!(page.contains("Your time zone: Asia&#x2f;Kolkata"), "{page}");
    assert!(page.contains("Times in Asia&#x2f;Kolkata"), "{page}");
    assert!(page.contains("12 Jan 2027, 09:30"), "{page}");

    // The day the number was verified is the patient's day too: 20:00 UTC on the 12th is the
    // 13th in Kolkata.
    clock.advance(Duration::hours(16));
    verify_number(&app, "p1").await;
    let page = page_html(&app, &sign_in(&app, "p1").await).await;
    assert!(page.contains("Verified 13 Jan 2027"), "{page}");
}

/// Verify `user`'s number on file with a code read from the dev outbox.
async fn verify_number(app: &TestApp, user: &str) {
    let r = app
        .client
        .post(app.url("/api/messaging/send-otp"))
        .json(&json!({"user_id": user, "phone_number": PATIENT}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let outbox = app.outbox_json().await;
    let code = code_in(outbox["messages"][0]["body"].as_str().unwrap());
    let r = app
        .client
        .post(app.url("/api/messaging/verify-otp"))
        .json(&json!({"user_id": user, "otp_code": code}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

/// Behind a proxy that serves the service under a path (`PUBLIC_URL` with a path, stripped
/// before the request arrives), the page's redirects, cookie, form and stylesheet carry the
/// path, or the browser would leave the proxy's prefix and lose its session.
async fn a_public_url_with_a_path_keeps_the_page_under_it(backend: Backend) {
    let public_url = "https://clinic.example.com/messaging";
    let app = TestApp::spawn_with(backend, TestConfig::new().set("PUBLIC_URL", public_url)).await;
    app.consent("p1", PATIENT).await;
    let r: Value = link(&app, json!({"user_id": "p1"}))
        .await
        .json()
        .await
        .unwrap();
    let url = r["url"].as_str().unwrap();
    assert!(
        url.starts_with(&format!("{public_url}/settings/messaging?handoff=")),
        "{url}"
    );
    // What the proxy forwards: the same request without its prefix.
    let r = no_redirects()
        .get(url.replace(public_url, &app.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()[LOCATION], "/messaging/settings/messaging");
    let cookie = r.headers()[SET_COOKIE].to_str().unwrap().to_string();
    assert!(cookie.contains("; Path=/messaging/settings;"), "{cookie}");
    let cookie = cookie.split(';').next().unwrap().to_string();
    let html = page_html(&app, &cookie).await;
    for path in [
        // minijinja escapes the base's slash; the browser reads it back.
        "href=\"&#x2f;messaging/settings/settings.css\"",
        "action=\"&#x2f;messaging/settings/messaging\"",
        "action=\"&#x2f;messaging/settings/sign-out\"",
    ] {
        assert!(html.contains(path), "{path} in {html}");
    }
    assert!(!html.contains("\"/settings/"), "{html}");
    let token = csrf(&app, &cookie).await;
    let r = post_form(
        &app,
        Some(&cookie),
        &[("phone_number", PATIENT), ("csrf_token", &token)],
    )
    .await;
    assert_eq!(r.status(), 303);
    assert_eq!(
        r.headers()[LOCATION],
        "/messaging/settings/messaging?saved=1"
    );
    let r = no_redirects()
        .post(app.url("/settings/sign-out"))
        .header(COOKIE, &cookie)
        .form(&[("csrf_token", token.as_str())])
        .send()
        .await
        .unwrap();
    let cleared = r.headers()[SET_COOKIE].to_str().unwrap();
    assert!(cleared.contains("; Path=/messaging/settings;"), "{cleared}");
    assert!(cleared.contains("Max-Age=0"), "{cleared}");
    // The notice pages' stylesheet too.
    let notice = no_redirects()
        .get(app.url("/settings/messaging?handoff=nonsense"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        notice.contains("href=\"&#x2f;messaging/settings/settings.css\""),
        "{notice}"
    );
}

/// A number that replied STOP gets nothing on that channel, whatever its user's consent says
/// (the user may tick SMS again in the app, or take a number that opted out): the preferences
/// and the page say so, per channel, until the patient texts START.
async fn an_opted_out_number_is_shown_in_the_app_and_on_the_page(backend: Backend) {
    // A reference, so the helpers below can each hold it.
    let app = &TestApp::spawn_live(backend, TestConfig::new()).await;
    let preferences = |sms: bool| {
        json!({"phone_number": PATIENT, "sms_consent": sms, "whatsapp_consent": true,
               "marketing_consent": false})
    };
    let answer = |r: reqwest::Response| async move {
        assert_eq!(r.status(), 200);
        r.json::<Value>().await.unwrap()["preferences"].clone()
    };
    let get = || async {
        let token = app.user_token("p1");
        app.get_json("/api/messaging/preferences", Some(&token))
            .await["preferences"]
            .clone()
    };
    let stored = answer(app.put_preferences("p1", preferences(true)).await).await;
    assert_eq!(stored["sms_opted_out"], false, "{stored}");
    assert_eq!(stored["whatsapp_opted_out"], false, "{stored}");
    let cookie = sign_in(app, "p1").await;
    assert!(!page_html(app, &cookie).await.contains("replied STOP"));

    app.incoming("SMstop-shown", PATIENT, "STOP").await;
    let after_stop = get().await;
    assert_eq!(after_stop["sms_consent"], false, "{after_stop}");
    assert_eq!(after_stop["sms_opted_out"], true, "{after_stop}");
    assert_eq!(
        after_stop["whatsapp_opted_out"], false,
        "SMS only: {after_stop}"
    );
    // The user ticks SMS again in the app: stored, but the answer says nothing will be sent.
    let ticked = answer(app.put_preferences("p1", preferences(true)).await).await;
    assert_eq!(ticked["sms_consent"], true, "{ticked}");
    assert_eq!(ticked["sms_opted_out"], true, "{ticked}");
    let html = page_html(app, &cookie).await;
    assert!(
        html.contains("id=\"sms_opted_out\"") && html.contains("text START to us"),
        "{html}"
    );
    assert!(!html.contains("id=\"whatsapp_opted_out\""), "{html}");
    // The user's copy of their data says so too.
    let export = app
        .get_json("/api/messaging/export", Some(&app.user_token("p1")))
        .await;
    assert_eq!(export["preferences"]["sms_opted_out"], true, "{export}");
    assert_eq!(
        export["preferences"]["whatsapp_opted_out"], false,
        "{export}"
    );
    // Another user taking the number sees it too; a user without a number sees nothing.
    let other = answer(app.put_preferences("p2", preferences(false)).await).await;
    assert_eq!(other["sms_opted_out"], true, "{other}");
    let none = answer(
        app.put_preferences("p3", json!({"marketing_consent": true}))
            .await,
    )
    .await;
    assert_eq!(none["sms_opted_out"], false, "{none}");

    app.incoming("SMstart-shown", PATIENT, "START").await;
    let after_start = get().await;
    assert_eq!(after_start["sms_opted_out"], false, "{after_start}");
    assert!(!page_html(app, &cookie).await.contains("replied STOP"));
    let export = app
        .get_json("/api/messaging/export", Some(&app.user_token("p1")))
        .await;
    assert_eq!(export["preferences"]["sms_opted_out"], false, "{export}");
}
