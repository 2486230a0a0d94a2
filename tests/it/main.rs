//! The integration tests, as one binary (one link instead of one per file): the application on a
//! loopback port with a fresh database per test, a fake Twilio over HTTP, and the built binary.

#[macro_use]
mod common;

mod api;
mod auth;
mod binary;
mod browser;
mod delivery;
mod encryption;
mod ops;
mod otp;
mod privacy;
mod recipients;
mod recovery;
mod reminder_times;
mod reminders;
mod retention;
mod settings_page;
mod store_conformance;
mod subscriptions;
mod webhooks;
