//! prism-messaging: SMS and WhatsApp messaging for a healthcare practice platform, through
//! Twilio, safely. See README.md for running it and for the shape of the code.
//!
//! Dependencies point one way:
//! - edge: [`http`], [`cli`], [`scheduler`], [`server`], [`auth`] (callers, command line,
//!   periodic jobs, running the server);
//! - wiring: [`app`] builds the services from [`config`] and runs the server;
//! - domain services: [`consent`], [`outbox`] (with its dispatcher), [`delivery`], [`otp`],
//!   [`inbound`], [`reminders`], [`settings`] (the settings page), [`retention`], [`privacy`] (export and erasure), each built from exactly the stores and settings it uses;
//! - infrastructure: [`store`] (the only SQL) and [`provider`] (the only Twilio);
//! - base values: [`status`], [`channel`], [`phone`], [`templates`], [`segments`], [`clock`],
//!   [`error`], [`config`], [`metrics`], [`telemetry`].

pub mod app;
pub mod auth;
pub mod channel;
pub mod cli;
pub mod clock;
pub mod config;
pub mod consent;
pub mod delivery;
pub mod error;
pub mod http;
pub mod inbound;
pub mod metrics;
pub mod otp;
pub mod outbox;
pub mod phone;
pub mod privacy;
pub mod provider;
pub mod reminders;
pub mod retention;
pub mod scheduler;
pub mod segments;
pub mod server;
pub mod settings;
pub mod status;
pub mod store;
pub mod telemetry;
pub mod templates;
pub mod vault;
