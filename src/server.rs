//! Running the service: binds the HTTP server and runs it with the dispatcher and the scheduler
//! until SIGTERM or Ctrl-C, then drains in-flight work.
//!
//! The HTTP server is an accept loop over hyper's HTTP/1.1 connections with a header read timeout
//! (`HEADER_READ_TIMEOUT_SECONDS`): a connection that has not sent a whole request head in time is
//! closed, so half-sent requests cannot hold connections (and file descriptors) open forever.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::app::Services;
use crate::http::AppState;

/// A bound, not yet serving application. Tests bind port 0 and read `local_addr`.
pub struct Application {
    state: AppState,
    listener: TcpListener,
    run_dispatcher: bool,
}

impl Application {
    pub async fn bind(state: AppState, addr: SocketAddr) -> anyhow::Result<Application> {
        // Before the port opens, so no request waits for it (see `phone::warm_up`).
        tokio::task::spawn_blocking(crate::phone::warm_up)
            .await
            .context("loading the phone number metadata")?;
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (BIND_ADDR)"))?;
        Ok(Application {
            state,
            listener,
            run_dispatcher: true,
        })
    }

    /// Serve HTTP only, without the dispatcher and the scheduler: the caller drives them itself
    /// (tests call `run_once` and the job functions).
    pub fn without_dispatcher(mut self) -> Self {
        self.run_dispatcher = false;
        self
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serve until `shutdown` is cancelled; then stop taking requests, let in-flight ones and the
    /// dispatcher's current round finish, and return.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let config = self.state.config.clone();
        let background = self.run_dispatcher && config.server.role.dispatches();
        let dispatcher = background.then(|| {
            let d = self.state.dispatcher.clone();
            tokio::spawn(d.run(self.state.dispatch_wakeup.clone(), shutdown.clone()))
        });
        let scheduler = background.then(|| {
            tokio::spawn(crate::scheduler::run(
                Services::clone(&self.state.services),
                shutdown.clone(),
            ))
        });
        let router = if config.server.role.serves_api() {
            crate::http::router(self.state.clone())
        } else {
            crate::http::ops_router(self.state.clone())
        };
        serve_http(
            self.listener,
            router,
            config.server.header_read_timeout,
            shutdown.clone(),
        )
        .await;
        // In-flight sends finish within the grace period; anything still claimed after it keeps
        // its lease and is recovered (looked up, then sent) by the next dispatcher.
        let background_tasks = async {
            for task in [dispatcher, scheduler].into_iter().flatten() {
                let _ = task.await;
            }
        };
        if tokio::time::timeout(config.server.shutdown_grace, background_tasks)
            .await
            .is_err()
        {
            tracing::warn!(
                grace_seconds = config.server.shutdown_grace.as_secs(),
                "in-flight sends did not finish within the grace period; their leases will expire and they will be recovered"
            );
        }
        // The last rounds' results (sends recorded, claims given back, a cleanup's receipt) on
        // disk before the process ends: recovery would find them, but need not.
        if let Err(e) = self.state.store.durable().await {
            tracing::error!(
                error = format!("{e:#}"),
                "the last writes could not be made durable at shutdown"
            );
        }
        Ok(())
    }
}

/// Accept connections and serve `router` on each until `shutdown` is cancelled; then stop
/// accepting, let requests in flight finish (idle connections close at once) and return.
///
/// HTTP/1.1 only: hyper's header read timeout is an HTTP/1 setting, and the protocol sniffing
/// that serves HTTP/2 too waits for a client's first bytes with no timeout at all. Every request
/// carries `ConnectInfo<SocketAddr>`, the peer's address, as axum's own server would give it.
async fn serve_http(
    listener: TcpListener,
    router: Router,
    header_read_timeout: Duration,
    shutdown: CancellationToken,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    // Out of file descriptors, typically: pause rather than spin.
                    tracing::warn!(error = format!("{e:#}"), "cannot accept connections; retrying in a second");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            router.clone().oneshot(request.map(axum::body::Body::new))
        });
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            // Timeouts, resets and malformed requests end here; they are the client's business.
            if let Err(e) = connection.await {
                tracing::debug!(error = format!("{e:#}"), "connection closed with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Accept errors that concern one connection only (the peer gave up before it was accepted).
fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

/// Cancel `token` on SIGTERM or Ctrl-C.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        #[cfg(unix)]
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let terminate = std::future::pending::<()>();
        tokio::select! {
            _ = ctrl_c => {}
            _ = terminate => {}
        }
        tracing::info!("shutdown requested: finishing in-flight work");
        token.cancel();
    });
}
