//! Logging. Log lines never carry a full phone number, an OTP or a message body: numbers go
//! through `phone::mask`, and bodies are only ever shown in mock mode's dev outbox.

use std::io::IsTerminal;

use tracing_subscriber::{fmt, EnvFilter};

use crate::config::LogFormat;

/// Install the global subscriber. `RUST_LOG` overrides the default level (`info`).
pub fn init(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    // Logs go to stderr, so command output on stdout (a token, a JSON report) stays clean.
    let builder = fmt()
        .with_env_filter(filter)
        .with_target(false)
        // Colours only on a terminal: a log redirected to a file stays plain text to grep.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        // A line that cannot be written (stderr a broken pipe: the log shipper died, `| head`
        // exited) is dropped. Reporting the failure would go through `eprintln!`, which panics
        // on that same stderr, in whatever task was logging: a handler after its commit, the
        // dispatcher, the signal handler before it could start the shutdown.
        .log_internal_errors(false);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
}
