//! prism-messaging: SMS and WhatsApp messaging for a healthcare practice platform, through
//! Twilio, safely. See README.md for running it and DESIGN.md for the shape.

pub mod app;
pub mod auth;
pub mod cli;
pub mod clock;
pub mod config;
pub mod consent;
pub mod error;
pub mod http;
pub mod metrics;
pub mod otp;
pub mod outbox;
pub mod phone;
pub mod provider;
pub mod reminders;
pub mod scheduler;
pub mod segments;
pub mod store;
pub mod telemetry;
pub mod templates;
pub mod webhooks;
