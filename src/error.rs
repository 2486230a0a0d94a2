//! One error type for the whole service. Every handler returns `Result<_, AppError>`, and an
//! `AppError` becomes the contract's JSON envelope:
//! `{"success": false, "error": {"code": "snake_case", "message": "..."}}`.
//! Caller mistakes are typed 4xx answers; the service's own faults are an opaque 500 whose cause
//! chain is logged, never returned.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The request is malformed or a value is invalid: 400 with a specific code.
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    #[error("authentication required")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("request body too large")]
    PayloadTooLarge,
    /// The client did not send its whole body in time.
    #[error("the request body did not arrive in time")]
    RequestTimeout,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    #[error("{message}")]
    TooManyRequests {
        code: &'static str,
        message: String,
        retry_after_secs: Option<u64>,
    },
    /// A feature needs configuration that this deployment does not have.
    #[error("{0}")]
    NotConfigured(String),
    /// A dependency (database, provider) is down: 503, the caller may retry.
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl AppError {
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        AppError::BadRequest {
            code,
            message: message.into(),
        }
    }

    /// The same error for another caller (one batch's failure goes to each of its callers, and
    /// an `anyhow` cause cannot be cloned): the same kind, status and code, with an internal
    /// cause carried as its full text, still known as the database out of reach when it is.
    pub fn shared(&self) -> AppError {
        match self {
            AppError::Internal(cause) if database_out_of_reach(cause) => {
                AppError::Internal(anyhow::Error::new(OutOfReach(format!("{cause:#}"))))
            }
            AppError::Internal(cause) if self.is_unique_violation() => {
                AppError::Internal(anyhow::Error::new(UniqueViolation(format!("{cause:#}"))))
            }
            AppError::Internal(cause) => AppError::Internal(anyhow::anyhow!("{cause:#}")),
            AppError::BadRequest { code, message } => AppError::BadRequest {
                code,
                message: message.clone(),
            },
            AppError::Unauthorized => AppError::Unauthorized,
            AppError::Forbidden(m) => AppError::Forbidden(m.clone()),
            AppError::NotFound(what) => AppError::NotFound(what),
            AppError::PayloadTooLarge => AppError::PayloadTooLarge,
            AppError::RequestTimeout => AppError::RequestTimeout,
            AppError::MethodNotAllowed => AppError::MethodNotAllowed,
            AppError::Conflict { code, message } => AppError::Conflict {
                code,
                message: message.clone(),
            },
            AppError::TooManyRequests {
                code,
                message,
                retry_after_secs,
            } => AppError::TooManyRequests {
                code,
                message: message.clone(),
                retry_after_secs: *retry_after_secs,
            },
            AppError::NotConfigured(m) => AppError::NotConfigured(m.clone()),
            AppError::Unavailable(m) => AppError::Unavailable(m.clone()),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            AppError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            AppError::Unauthorized => StatusCode::UNAUTHORIZED,
            AppError::Forbidden(_) => StatusCode::FORBIDDEN,
            AppError::NotFound(_) => StatusCode::NOT_FOUND,
            AppError::Conflict { .. } => StatusCode::CONFLICT,
            AppError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            AppError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            AppError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            AppError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            AppError::NotConfigured(_) | AppError::Unavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            AppError::Internal(cause) if database_out_of_reach(cause) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            AppError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            AppError::BadRequest { code, .. }
            | AppError::Conflict { code, .. }
            | AppError::TooManyRequests { code, .. } => code,
            AppError::Unauthorized => "unauthorized",
            AppError::Forbidden(_) => "forbidden",
            AppError::NotFound(_) => "not_found",
            AppError::PayloadTooLarge => "payload_too_large",
            AppError::RequestTimeout => "request_timeout",
            AppError::MethodNotAllowed => "method_not_allowed",
            AppError::NotConfigured(_) => "not_configured",
            AppError::Unavailable(_) => "unavailable",
            AppError::Internal(cause) if database_out_of_reach(cause) => "unavailable",
            AppError::Internal(_) => "internal_error",
        }
    }
}

impl AppError {
    /// Whether the failure is a write refused by a unique index (both backends).
    pub fn is_unique_violation(&self) -> bool {
        let AppError::Internal(cause) = self else {
            return false;
        };
        cause.chain().any(|c| {
            if c.is::<UniqueViolation>() {
                return true;
            }
            if let Some(sqlx::Error::Database(db)) = c.downcast_ref::<sqlx::Error>() {
                return db.is_unique_violation();
            }
            matches!(
                c.downcast_ref::<rusqlite::Error>(),
                Some(rusqlite::Error::SqliteFailure(e, _))
                    if e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
            )
        })
    }
}

/// Whether a failure is the database being out of reach (down, restarting, dropped, its
/// connections ended, none free in time, SQLite's lock not had in time) rather than a fault in
/// this service: answered 503 `unavailable`, which a caller may retry. As after any lost
/// connection, a write that failed this way may still have committed (its retry meets its own
/// idempotency: a key, a unique row, a fresh code).
fn database_out_of_reach(cause: &anyhow::Error) -> bool {
    cause.chain().any(|c| {
        if c.is::<OutOfReach>() {
            return true;
        }
        if let Some(e) = c.downcast_ref::<sqlx::Error>() {
            return match e {
                sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::Io(_)
                | sqlx::Error::Tls(_) => true,
                sqlx::Error::Database(db) => db.code().is_some_and(|code| out_of_reach_code(&code)),
                _ => false,
            };
        }
        matches!(
            c.downcast_ref::<rusqlite::Error>(),
            Some(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
        )
    })
}

/// A write refused by a unique index, as text: what `shared` makes of one for a batch's callers.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UniqueViolation(String);

/// A database out of reach, as text: what `shared` makes of one for each caller of a batch.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct OutOfReach(String);

/// PostgreSQL's SQLSTATEs for a server or database out of reach (class 08: the connection;
/// 57P01-57P03: shut down or starting; 3D000: the database does not exist, as when dropped;
/// 53300: too many connections), and SQLite's busy codes (5 and its extended forms).
fn out_of_reach_code(code: &str) -> bool {
    code.starts_with("08")
        || matches!(
            code,
            "57P01" | "57P02" | "57P03" | "3D000" | "53300" | "5" | "261" | "517"
        )
}

impl From<sqlx::Error> for AppError {
    fn from(err: sqlx::Error) -> Self {
        AppError::Internal(anyhow::Error::new(err).context("database error"))
    }
}

impl From<rusqlite::Error> for AppError {
    fn from(err: rusqlite::Error) -> Self {
        AppError::Internal(anyhow::Error::new(err).context("database error"))
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        self.into_response_with(None)
    }
}

impl AppError {
    /// The envelope with `"valid": false` beside `success` unless the answer is a 500: how
    /// `verify-otp` refuses (the seed's mobile client reads `valid`), a database out of reach
    /// (503) included.
    pub fn into_refusal_of_validity(self) -> Response {
        self.into_response_with(Some(false))
    }

    fn into_response_with(self, valid: Option<bool>) -> Response {
        let message = match &self {
            AppError::Internal(cause) if database_out_of_reach(cause) => {
                tracing::error!(error = format!("{cause:#}"), "database out of reach");
                "the database is out of reach; try again shortly".to_string()
            }
            AppError::Internal(cause) => {
                // The cause chain may hold SQL or provider details: log it, never return it.
                tracing::error!(error = format!("{cause:#}"), "internal error");
                "internal error".to_string()
            }
            other => other.to_string(),
        };
        let status = self.status();
        let mut body = json!({
            "success": false,
            "error": {"code": self.code(), "message": message},
        });
        if let Some(valid) = valid.filter(|_| status != StatusCode::INTERNAL_SERVER_ERROR) {
            body["valid"] = json!(valid);
        }
        let mut response = (status, Json(body)).into_response();
        if let AppError::TooManyRequests {
            retry_after_secs: Some(secs),
            ..
        } = self
        {
            if let Ok(value) = HeaderValue::from_str(&secs.to_string()) {
                response.headers_mut().insert("retry-after", value);
            }
        }
        response
    }
}

pub type AppResult<T> = Result<T, AppError>;

/// The first configuration problem found, naming the variable.
#[derive(Debug, thiserror::Error)]
#[error("configuration error: {variable}: {problem}")]
pub struct ConfigError {
    pub variable: &'static str,
    pub problem: String,
}

impl ConfigError {
    pub fn new(variable: &'static str, problem: impl Into<String>) -> Self {
        ConfigError {
            variable,
            problem: problem.into(),
        }
    }

    /// Whether a start failed on a setting: a `ConfigError` anywhere in the error's causes,
    /// including inside an `AppError::Internal` (whose display forwards to it). The command line
    /// exits 2 for those, as it does for the settings `Config::from_env` refuses.
    pub fn is_cause_of(error: &anyhow::Error) -> bool {
        error.chain().any(|cause| {
            cause.is::<ConfigError>()
                || matches!(
                    cause.downcast_ref::<AppError>(),
                    Some(AppError::Internal(inner))
                        if inner.chain().any(|c| c.is::<ConfigError>())
                )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sqlite_failure(code: std::ffi::c_int) -> AppError {
        rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None).into()
    }

    /// The database out of reach is a 503 `unavailable` (the caller may retry), also once one
    /// batch's failure is shared among its callers; any other database failure stays a 500.
    #[test]
    fn a_database_out_of_reach_is_503_and_stays_so_when_shared() {
        let cases = [
            (AppError::from(sqlx::Error::PoolTimedOut), true),
            (AppError::from(sqlx::Error::PoolClosed), true),
            (
                AppError::from(sqlx::Error::Io(std::io::Error::from(
                    std::io::ErrorKind::ConnectionReset,
                ))),
                true,
            ),
            (sqlite_failure(rusqlite::ffi::SQLITE_BUSY), true),
            (sqlite_failure(rusqlite::ffi::SQLITE_CONSTRAINT), false),
            (AppError::from(sqlx::Error::RowNotFound), false),
            (AppError::Internal(anyhow::anyhow!("a bug")), false),
        ];
        for (error, out_of_reach) in cases {
            let expected = if out_of_reach {
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
            } else {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal_error")
            };
            let shared = error.shared();
            assert_eq!((error.status(), error.code()), expected, "{error:#}");
            assert_eq!((shared.status(), shared.code()), expected, "{shared:#}");
            assert_eq!(
                format!("{shared:#}"),
                format!("{error:#}"),
                "the cause is kept"
            );
        }
        for code in ["08006", "57P01", "3D000", "53300"] {
            assert!(out_of_reach_code(code), "{code}");
        }
        for code in ["23505", "40001", "42P01", "19", "8"] {
            assert!(!out_of_reach_code(code), "{code}");
        }
        let refused = AppError::bad_request("invalid_phone", "no");
        assert_eq!(refused.shared().code(), "invalid_phone");
        assert_eq!(refused.shared().status(), StatusCode::BAD_REQUEST);
    }
}
