//! Running the service: binds the HTTP server and runs it with the dispatcher and the scheduler
//! until SIGTERM or Ctrl-C, then drains in-flight work.

use std::net::SocketAddr;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::http::AppState;

/// A bound, not yet serving application. Tests bind port 0 and read `local_addr`.
pub struct Application {
    state: AppState,
    listener: TcpListener,
    run_dispatcher: bool,
}

impl Application {
    pub async fn bind(state: AppState, addr: SocketAddr) -> anyhow::Result<Application> {
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
                self.state.services.clone(),
                shutdown.clone(),
            ))
        });
        let router = if config.server.role.serves_api() {
            crate::http::router(self.state.clone())
        } else {
            crate::http::ops_router(self.state.clone())
        };
        let service = router.into_make_service_with_connect_info::<SocketAddr>();
        let stop = shutdown.clone();
        axum::serve(self.listener, service)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await?;
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
        Ok(())
    }
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
