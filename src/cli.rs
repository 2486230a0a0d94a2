//! The command line: `serve` (the default), `migrate`, `health`, `send`, `otp`, `job`, `import`,
//! `consent`, `token`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

use crate::app::Services;
use crate::config::{Config, ConfigError};
use crate::http::AppState;
use crate::outbox::NotificationRequest;
use crate::reminders::import::{import_csv, ImportKind, ImportSummary};
use crate::scheduler::Job;
use crate::server::{cancel_on_signal, Application};
use crate::status::MessageStatus;

#[derive(Parser)]
#[command(
    name = "prism-messaging",
    version,
    about = "SMS and WhatsApp messaging for a healthcare practice platform, through Twilio.\n\nConfiguration comes from the environment and a .env file; see README.md."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP server with the dispatcher (the default when no command is given).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Re-encrypt every sealed value (numbers, bodies, variables) under DATA_ENCRYPTION_KEY, a
    /// batch at a time, and print how many rows per table. The old key must be in
    /// DATA_ENCRYPTION_OLD_KEYS while this runs; if interrupted, run it again: it continues with
    /// the rows not yet under the current key.
    RotateKey,
    /// Check the provider: in live mode, that Twilio accepts the credentials; in mock mode, say so.
    Health,
    /// Queue one notification for a user and dispatch it now, printing the outcome. Consent is
    /// checked as for any message.
    Send {
        /// The user to message (their stored phone number and consent apply).
        #[arg(long)]
        user: String,
        /// Template name (GET /api/templates lists them).
        #[arg(long)]
        template: String,
        /// A template variable, NAME=VALUE; repeat for each.
        #[arg(long = "var", value_name = "NAME=VALUE")]
        vars: Vec<String>,
        /// sms or whatsapp.
        #[arg(long, default_value = "sms")]
        channel: String,
    },
    /// Send or verify a one-time passcode, as the public API would (same limits and checks).
    #[command(subcommand)]
    Otp(OtpCommand),
    /// Run one scheduled job now and print what it did.
    Job {
        /// The job to run (the same jobs the embedded scheduler runs and /cron/* calls).
        #[arg(value_parser = job_names())]
        name: String,
        /// messaging-cleanup only: print what would be deleted, delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// messaging-cleanup only: measure the retention periods from this instant (RFC 3339)
        /// instead of now.
        #[arg(long, value_name = "RFC3339")]
        as_of: Option<String>,
    },
    /// Import a clinic's calendar from a CSV file with a header row, validated as the host app's
    /// PUT calls are. Importing the same file again changes nothing. Prints how many rows were
    /// created, updated, unchanged and refused (each refusal with its line and reason); exit
    /// code 1 when a row was refused (the others are imported).
    #[command(subcommand)]
    Import(ImportCommand),
    /// Show a user's consent record and its audit trail.
    Consent {
        #[arg(long)]
        user: String,
    },
    /// Print a user bearer token signed with AUTH_JWT_SECRET, for trying the API by hand.
    Token {
        #[arg(long)]
        user: String,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
}

#[derive(Subcommand)]
enum ImportCommand {
    /// Columns id,user_id,starts_at,time_zone,status (time_zone and status may be empty).
    Appointments { file: PathBuf },
    /// Columns id,user_id,due_at,time_zone (time_zone may be empty).
    FollowUps { file: PathBuf },
    /// Columns id,user_id,plan,renews_at,expires_at,status (one of the dates may be empty, and
    /// status).
    Subscriptions { file: PathBuf },
}

#[derive(Subcommand)]
enum OtpCommand {
    /// Send a code (in mock mode the code is printed, as the dev outbox would show it).
    Send {
        #[arg(long)]
        user: String,
        /// E.164, e.g. +919876543210.
        #[arg(long)]
        phone: String,
        #[arg(long, default_value = "verification")]
        purpose: String,
        /// sms or whatsapp.
        #[arg(long, default_value = "sms")]
        channel: String,
    },
    /// Verify a code; exit code 0 when it is valid.
    Verify {
        #[arg(long)]
        user: String,
        #[arg(long, default_value = "verification")]
        purpose: String,
        #[arg(long)]
        code: String,
    },
}

/// Every job's name, so `job --help` lists them all and a wrong name is refused with the list.
fn job_names() -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(Job::ALL.map(|job| job.name()))
}

pub fn run() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(e) => {
            tell_stderr(format_args!("{e}"));
            return ExitCode::from(2);
        }
    };
    crate::telemetry::init(config.server.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            tell_stderr(format_args!("cannot start the async runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(cli.command.unwrap_or(Command::Serve), config)) {
        Ok(code) => code,
        Err(e) if ConfigError::is_cause_of(&e) => {
            tell_stderr(format_args!("{e:#}"));
            ExitCode::from(2)
        }
        Err(e) => {
            tell_stderr(format_args!("error: {e:#}"));
            ExitCode::FAILURE
        }
    }
}

/// Why the process stops, on stderr if it can still be written: `eprintln!` would panic on a
/// closed stderr and turn the exit code into 101.
fn tell_stderr(message: std::fmt::Arguments) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{message}");
}

async fn execute(command: Command, config: Config) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve => serve(config).await,
        Command::Migrate => {
            let store = crate::store::connect(&config.database_url, &config.encryption).await?;
            store.migrate().await?;
            println!("migrations applied");
            Ok(ExitCode::SUCCESS)
        }
        Command::RotateKey => rotate_key(config).await,
        Command::Health => {
            let services = Services::from_config(config).await?;
            match services.provider.health().await {
                Ok(summary) => {
                    println!("ok: {summary}");
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    println!("failed: {e}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Command::Send {
            user,
            template,
            vars,
            channel,
        } => send(config, user, template, vars, channel).await,
        Command::Otp(otp_command) => otp(config, otp_command).await,
        Command::Job {
            name,
            dry_run,
            as_of,
        } => {
            let Some(job) = Job::parse(&name) else {
                let names: Vec<&str> = Job::ALL.iter().map(|j| j.name()).collect();
                anyhow::bail!("unknown job {name:?}; jobs: {}", names.join(", "));
            };
            let as_of = as_of
                .map(|t| {
                    chrono::DateTime::parse_from_rfc3339(&t)
                        .map(|t| t.with_timezone(&chrono::Utc))
                        .map_err(|_| anyhow::anyhow!("--as-of must be an RFC 3339 time, got {t:?}"))
                })
                .transpose()?;
            if (dry_run || as_of.is_some()) && job != Job::MessagingCleanup {
                anyhow::bail!("--dry-run and --as-of apply to messaging-cleanup only");
            }
            // A future instant deletes what is not yet due: a preview only. (A past one is a
            // catch-up and deletes less than a run now would.)
            if as_of.is_some_and(|t| t > chrono::Utc::now()) && !dry_run {
                anyhow::bail!(
                    "--as-of in the future would delete data before its retention period ends; \
                     add --dry-run to preview"
                );
            }
            let services = Services::from_config(config).await?;
            let output = if job == Job::MessagingCleanup {
                serde_json::to_value(services.retention.run(as_of, dry_run).await?)?
            } else {
                job.run(&services).await?
            };
            // What is printed as done is on disk first (SQLite's group fsync).
            services.store.durable().await?;
            println!("{}", serde_json::to_string_pretty(&output)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Import(command) => {
            let (kind, file) = match command {
                ImportCommand::Appointments { file } => (ImportKind::Appointments, file),
                ImportCommand::FollowUps { file } => (ImportKind::FollowUps, file),
                ImportCommand::Subscriptions { file } => (ImportKind::Subscriptions, file),
            };
            import(config, kind, file).await
        }
        Command::Consent { user } => {
            let services = Services::from_config(config).await?;
            let consent = services.consent.get(&user).await?;
            let audit = services.consent.audit_trail(&user).await?;
            let out = serde_json::json!({"consent": consent, "audit": audit});
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Token { user, ttl } => {
            let secret = config
                .auth
                .jwt_secret
                .as_ref()
                .ok_or_else(|| anyhow::anyhow!("AUTH_JWT_SECRET is not set"))?;
            crate::outbox::validate_user_id(&user)?;
            let mut extra = vec![];
            // The service reads the user from `AUTH_USER_CLAIM`: put it there too.
            if config.auth.user_claim != "sub" {
                extra.push((config.auth.user_claim.as_str(), user.as_str()));
            }
            if let Some(iss) = &config.auth.issuer {
                extra.push(("iss", iss.as_str()));
            }
            if let Some(aud) = &config.auth.audience {
                extra.push(("aud", aud.as_str()));
            }
            println!(
                "{}",
                crate::auth::mint_hs256(secret, &user, Duration::from_secs(ttl), &extra)?
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn otp(config: Config, command: OtpCommand) -> anyhow::Result<ExitCode> {
    let services = Services::from_config(config).await?;
    match command {
        OtpCommand::Send {
            user,
            phone,
            purpose,
            channel,
        } => {
            let request = crate::otp::SendOtpRequest {
                user_id: user,
                phone_number: phone,
                purpose,
                channel: Some(channel),
            };
            let sent = services.otp.send(request, None).await;
            // What is printed is on disk first (a send or a refusal both may have written).
            services.store.durable().await?;
            match sent {
                Ok(answer) => {
                    println!("sent: expires in {} s", answer.expires_in);
                    if let Some(entry) = services
                        .mock
                        .as_ref()
                        .and_then(|m| m.outbox().into_iter().next())
                    {
                        println!("[mock] would have sent: {}", entry.body);
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    println!("not sent: {} ({})", e, e.code());
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        OtpCommand::Verify {
            user,
            purpose,
            code,
        } => {
            let request = crate::otp::VerifyOtpRequest {
                user_id: user,
                otp_code: code,
                purpose,
                phone_number: None,
            };
            let verified = services.otp.verify(request).await;
            // A code used up (or a wrong try counted) stays so after a power cut.
            services.store.durable().await?;
            match verified {
                Ok(verified) => {
                    println!("valid: the code went to {}", verified.phone_number);
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    println!("not valid: {} ({})", e, e.code());
                    Ok(ExitCode::FAILURE)
                }
            }
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<ExitCode> {
    let addr = config.server.bind_addr;
    let mode = if config.messaging.mock_mode {
        "mock"
    } else {
        "twilio"
    };
    // Twilio posts delivery statuses to PUBLIC_URL: on a loopback host they never arrive, and
    // every message stays `sent` (found by review: live mode started silently so).
    let public_url = config.messaging.public_url.clone();
    let live_on_loopback = !config.messaging.mock_mode
        && reqwest::Url::parse(&public_url).is_ok_and(|url| {
            url.host_str().is_some_and(|host| {
                let host = host.trim_start_matches('[').trim_end_matches(']');
                host.eq_ignore_ascii_case("localhost")
                    || host
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            })
        });
    // Signals are handled before the port opens: a SIGTERM that arrives as soon as the
    // "listening" line is out stops the service cleanly instead of killing it.
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone());
    let state = AppState::from_config(config).await?;
    let app = Application::bind(state, addr).await?;
    tracing::info!(addr = %app.local_addr()?, provider = mode, "prism-messaging listening");
    if live_on_loopback {
        tracing::warn!(%public_url, "PUBLIC_URL is a loopback address: Twilio cannot post delivery statuses to it, so messages will stay `sent`; set PUBLIC_URL to this service's public https URL");
    }
    app.run(shutdown).await?;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

async fn send(
    config: Config,
    user: String,
    template: String,
    vars: Vec<String>,
    channel: String,
) -> anyhow::Result<ExitCode> {
    let mut variables = Map::new();
    for pair in vars {
        let (name, value) = pair
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--var takes NAME=VALUE, got {pair:?}"))?;
        variables.insert(name.to_string(), Value::String(value.to_string()));
    }
    let services = Services::from_config(config).await?;
    let request = NotificationRequest {
        user_id: user,
        template,
        variables: Value::Object(variables),
        channel: Some(channel),
        idempotency_key: None,
    };
    let (message, _) = services.outbox.queue_notification(request).await?;
    services.store.durable().await?;
    let dispatcher = &services.dispatcher;
    // Run rounds until this message leaves `queued` (other queued messages go out too, as they
    // would with the server running).
    for _ in 0..100 {
        dispatcher.run_once().await?;
        let current = services.outbox.get(&message.id).await?;
        if let Some(m) = current.filter(|m| !m.status.is_pending()) {
            // The send's outcome is on disk before it is reported.
            services.store.durable().await?;
            println!("{}", serde_json::to_string_pretty(&m)?);
            if let Some(mock) = &services.mock {
                if let Some(entry) = mock.outbox().into_iter().find(|e| e.id == m.id) {
                    println!("[mock] would have sent: {}", entry.body);
                }
            }
            return Ok(if m.status == MessageStatus::Failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            });
        }
    }
    if let Some(m) = services.outbox.get(&message.id).await? {
        if m.attempts == 0 && m.next_attempt_at > services.clock.now() {
            println!(
                "message {} is held back by quiet hours (QUIET_HOURS) until {}",
                m.id, m.next_attempt_at
            );
            return Ok(ExitCode::SUCCESS);
        }
    }
    println!(
        "message {} is still queued (provider retrying); see GET /api/messages/{}",
        message.id, message.id
    );
    Ok(ExitCode::FAILURE)
}

async fn import(config: Config, kind: ImportKind, file: PathBuf) -> anyhow::Result<ExitCode> {
    use anyhow::Context;
    let input =
        std::fs::File::open(&file).with_context(|| format!("cannot open {}", file.display()))?;
    let size = input.metadata().map(|m| m.len()).unwrap_or(0);
    let services = Services::from_config(config).await?;
    // A bar on a terminal only: a script reading the summary gets the summary alone.
    let bar = if std::io::stdout().is_terminal() {
        indicatif::ProgressBar::new(size)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} ({eta} left)",
        )?
        .progress_chars("=> "),
    );
    bar.set_message(format!("importing {}", kind.name()));
    let reader = std::io::BufReader::with_capacity(1 << 16, input);
    let result = import_csv(&services.reminders, kind, reader, |bytes| {
        bar.set_position(bytes)
    })
    .await;
    bar.finish_and_clear();
    let summary = result.with_context(|| format!("importing {}", file.display()))?;
    // The summary is printed once what it counts is on disk (SQLite's group fsync).
    services.store.durable().await?;
    print!("{}", summary_text(kind, &file, &summary));
    Ok(if summary.refused.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The import's summary, as printed.
fn summary_text(kind: ImportKind, file: &std::path::Path, summary: &ImportSummary) -> String {
    let mut text = format!(
        "{}: {} {} rows: {} created, {} updated, {} unchanged, {} refused\n",
        file.display(),
        summary.rows,
        kind.name(),
        summary.created,
        summary.updated,
        summary.unchanged,
        summary.refused.len()
    );
    for refusal in &summary.refused {
        text.push_str(&format!(
            "  line {}: {} ({})\n",
            refusal.line, refusal.message, refusal.code
        ));
    }
    text
}

/// `rotate-key`: rounds of re-sealing until one finds nothing left, then the counts.
async fn rotate_key(config: Config) -> anyhow::Result<ExitCode> {
    let store = crate::store::connect(&config.database_url, &config.encryption).await?;
    let mut totals: Vec<(&'static str, u64)> = Vec::new();
    loop {
        let round = store.reseal_round(1_000, false).await?;
        if round.total() == 0 {
            break;
        }
        for (table, n) in round.tables {
            match totals.iter_mut().find(|(t, _)| *t == table) {
                Some((_, total)) => *total += n,
                None => totals.push((table, n)),
            }
        }
    }
    // On disk before the operator is told, and may then drop the old key.
    store.durable().await?;
    let total: u64 = totals.iter().map(|(_, n)| n).sum();
    println!("re-encrypted {total} rows under the current key");
    for (table, n) in totals.iter().filter(|(_, n)| *n > 0) {
        println!("  {table}: {n}");
    }
    Ok(ExitCode::SUCCESS)
}
