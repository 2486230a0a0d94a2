//! The settings page and the dev outbox in a real browser: headless Chromium driven through
//! ChromeDriver (WebDriver) by fantoccini. Screenshots of the settings page (wide and phone width)
//! go to `target/screenshots/`.
//!
//! Needs `chromium` and `chromedriver` on the PATH (Debian's `chromium` and `chromium-driver`;
//! `.ci/run` installs them). Without them the test is skipped with a note, unless
//! `PRISM_BROWSER_TESTS=required` (CI), which makes a missing browser a failure.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use crate::common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

const PATIENT: &str = "+14155552671";
const NEW_NUMBER: &str = "+447911123456";

/// ChromeDriver on a free loopback port, stopped with the value.
struct Driver {
    child: tokio::process::Child,
    port: u16,
    _profile: tempfile::TempDir,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

fn browser_available() -> bool {
    ["chromium", "chromedriver"].iter().all(|tool| {
        std::process::Command::new("which")
            .arg(tool)
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

async fn start_driver() -> Driver {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let child = tokio::process::Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("chromedriver starts");
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Driver {
        child,
        port,
        _profile: tempfile::tempdir().unwrap(),
    }
}

async fn browser(driver: &Driver) -> Client {
    // Two TLS crypto providers are linked (reqwest's and the WebDriver client's): pick one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let profile = driver._profile.path().display().to_string();
    let caps = json!({
        "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1280,900",
                format!("--user-data-dir={profile}"),
            ],
        }
    });
    let serde_json::Value::Object(caps) = caps else {
        unreachable!()
    };
    ClientBuilder::rustls()
        .expect("TLS for the WebDriver client")
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("a browser session")
}

fn screenshots() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn settings_link(app: &TestApp, user: &str) -> String {
    let r: Value = app
        .client
        .post(app.url("/api/settings-links"))
        .bearer_auth(API_KEY)
        .json(&json!({"user_id": user, "return_url": format!("{APP_URL}/home")}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["expires_in"], 300);
    // The link names PUBLIC_URL; the test browser reaches the app on its loopback port.
    r["url"]
        .as_str()
        .unwrap()
        .replace(PUBLIC_URL, &app.base_url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_settings_page_in_a_real_browser() {
    if !browser_available() {
        assert!(
            std::env::var("PRISM_BROWSER_TESTS").as_deref() != Ok("required"),
            "PRISM_BROWSER_TESTS=required but chromium or chromedriver is missing"
        );
        eprintln!("chromium or chromedriver not found: skipping the browser test");
        return;
    }
    let app = TestApp::spawn(Backend::Sqlite).await;
    app.consent("p1", PATIENT).await;
    app.notify_ok(json!({
        "user_id": "p1",
        "template": "payment_received",
        "variables": {"amount": "INR 499.00", "date": "2027-01-12"},
    }))
    .await;
    assert_eq!(app.dispatch().await.sent, 1);
    let link = settings_link(&app, "p1").await;

    let driver = start_driver().await;
    let c = browser(&driver).await;
    let result = drive(&app, &c, &link).await;
    let _ = c.close().await;
    result.unwrap();
}

/// The element, once the page a click navigated to has it (a click does not wait for the load).
async fn settled(
    c: &Client,
    locator: Locator<'_>,
) -> Result<fantoccini::elements::Element, fantoccini::error::CmdError> {
    c.wait()
        .at_most(Duration::from_secs(10))
        .for_element(locator)
        .await
}

async fn drive(app: &TestApp, c: &Client, link: &str) -> Result<(), fantoccini::error::CmdError> {
    // Opening the link signs in and lands on the page without the code in the address.
    c.goto(link).await?;
    let url = c.current_url().await?;
    assert_eq!(url.path(), "/settings/messaging");
    assert!(
        url.query().is_none(),
        "the code left the address bar: {url}"
    );
    let phone = c.find(Locator::Id("phone_number")).await?;
    assert_eq!(phone.prop("value").await?.as_deref(), Some(PATIENT));
    let sms = c.find(Locator::Id("sms_consent")).await?;
    assert_eq!(sms.prop("checked").await?.as_deref(), Some("true"));
    // The history table lists the receipt sent above.
    let table = c.find(Locator::Css("table")).await?.text().await?;
    assert!(table.contains("Payment received"), "{table}");
    assert!(table.contains("SMS"), "{table}");
    let back = c.find(Locator::LinkText("Back to the app")).await?;
    assert_eq!(
        back.attr("href").await?.as_deref(),
        Some(format!("{APP_URL}/home").as_str())
    );

    // Screenshots, wide and phone width (one column under 600 px).
    let dir = screenshots();
    std::fs::write(dir.join("settings-wide.png"), c.screenshot().await?).unwrap();
    c.set_window_size(390, 844).await?;
    std::fs::write(dir.join("settings-phone.png"), c.screenshot().await?).unwrap();
    c.set_window_size(1280, 900).await?;

    // A bad number: the form again, the error beside the field, what was typed kept.
    phone.clear().await?;
    phone.send_keys("+91 98765 4321O").await?;
    c.find(Locator::Css("button[type=submit]"))
        .await?
        .click()
        .await?;
    let error = settled(c, Locator::Id("phone_error")).await?.text().await?;
    assert!(error.contains("international"), "{error}");
    let typed = c.find(Locator::Id("phone_number")).await?;
    assert_eq!(
        typed.prop("value").await?.as_deref(),
        Some("+91 98765 4321O")
    );

    // Change the number and the boxes, save, see the notice.
    typed.clear().await?;
    typed.send_keys(NEW_NUMBER).await?;
    c.find(Locator::Id("whatsapp_consent"))
        .await?
        .click()
        .await?;
    let whatsapp_was = app
        .state
        .consent
        .get("p1")
        .await
        .unwrap()
        .unwrap()
        .whatsapp_consent;
    c.find(Locator::Id("marketing_consent"))
        .await?
        .click()
        .await?;
    c.find(Locator::Css("button[type=submit]"))
        .await?
        .click()
        .await?;
    let notice = settled(c, Locator::Css(".notice")).await?.text().await?;
    assert_eq!(notice, "Messaging preferences updated");
    let prefs = app
        .get_json("/api/messaging/preferences", Some(&app.user_token("p1")))
        .await["preferences"]
        .clone();
    assert_eq!(prefs["phone_number"], NEW_NUMBER);
    assert_eq!(prefs["whatsapp_consent"], !whatsapp_was);
    assert_eq!(prefs["marketing_consent"], true);
    let audit = app.state.consent.audit_trail("p1").await.unwrap();
    let web: Vec<_> = audit
        .iter()
        .filter(|a| a.source == "web_settings")
        .collect();
    assert!(web
        .iter()
        .any(|a| a.field == "phone_number" && a.new_value.as_deref() == Some(NEW_NUMBER)));
    assert!(web.iter().all(|a| a
        .user_agent
        .as_deref()
        .is_some_and(|ua| ua.contains("Chrome"))));

    // The same link a second time: expired.
    c.goto(link).await?;
    let heading = c.find(Locator::Css("h1")).await?.text().await?;
    assert_eq!(heading, "This link has expired");

    // A forged cross-site post (a page elsewhere, posting to the form): refused, nothing changed.
    let forged = format!(
        "data:text/html,<form method=post action='{}/settings/messaging'>\
         <input name=phone_number value='+14155550000'><input name=sms_consent value=on>\
         <button id=go>go</button></form>",
        app.base_url
    );
    c.goto(&forged).await?;
    c.find(Locator::Id("go")).await?.click().await?;
    settled(c, Locator::XPath("//h1[text()='Not saved']")).await?;
    let consent = app.state.consent.get("p1").await.unwrap().unwrap();
    assert_eq!(consent.phone_number.as_deref(), Some(NEW_NUMBER));

    // Sign out: the session ends.
    c.goto(&app.url("/settings/messaging")).await?;
    c.find(Locator::Css("form[action='/settings/sign-out'] button"))
        .await?
        .click()
        .await?;
    settled(c, Locator::XPath("//h1[text()='Signed out']")).await?;
    c.goto(&app.url("/settings/messaging")).await?;
    assert_eq!(
        c.find(Locator::Css("h1")).await?.text().await?,
        "Open your settings from the app"
    );

    // The dev outbox page lists a mock OTP.
    let r = app
        .client
        .post(app.url("/api/messaging/send-otp"))
        .json(&json!({"user_id": "p2", "phone_number": "+14155552672", "purpose": "login"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    c.goto(&app.url("/dev/outbox")).await?;
    let page = c.find(Locator::Css("table")).await?.text().await?;
    assert!(
        page.contains("+14155552672") && page.contains("otp"),
        "{page}"
    );
    assert!(page.contains("verification code"), "{page}");
    Ok(())
}
