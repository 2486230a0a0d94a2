//! Wiring: the shared state, building the application from configuration, and running it until
//! SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;
use crate::clock::{DynClock, SystemClock};
use crate::config::Config;
use crate::outbox::dispatcher::Dispatcher;
use crate::provider::mock::MockProvider;
use crate::provider::twilio::TwilioProvider;
use crate::provider::DynProvider;
use crate::store::{self, DynStore};

/// What every handler and background job shares. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub store: DynStore,
    pub provider: DynProvider,
    /// Present in mock mode: the dev outbox lives here.
    pub mock: Option<Arc<MockProvider>>,
    pub auth: Arc<Authenticator>,
    pub clock: DynClock,
    pub otp_hasher: Arc<crate::otp::CodeHasher>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Poked when a message is queued, so the dispatcher sends it without waiting for its poll.
    pub dispatch_wakeup: Arc<Notify>,
}

impl AppState {
    /// Connect the store (applying migrations) and set up the provider and authentication.
    pub async fn build(config: Config, clock: DynClock) -> anyhow::Result<AppState> {
        let store = store::connect(&config.database_url).await?;
        store.migrate().await?;
        let (provider, mock): (DynProvider, Option<Arc<MockProvider>>) = if config.mock_mode {
            let mock = Arc::new(MockProvider::new());
            (mock.clone(), Some(mock))
        } else {
            let twilio =
                TwilioProvider::new(config.twilio()?, &config.public_url, config.twilio_timeout)?;
            (Arc::new(twilio), None)
        };
        let auth = Authenticator::from_config(&config).await?;
        let otp_hasher = Arc::new(crate::otp::CodeHasher::from_config(&config));
        Ok(AppState {
            otp_hasher,
            metrics: Arc::default(),
            config: Arc::new(config),
            store,
            provider,
            mock,
            auth: Arc::new(auth),
            clock,
            dispatch_wakeup: Arc::new(Notify::new()),
        })
    }

    pub async fn from_config(config: Config) -> anyhow::Result<AppState> {
        Self::build(config, Arc::new(SystemClock)).await
    }

    pub fn dispatcher(&self) -> Dispatcher {
        Dispatcher::new(
            self.store.clone(),
            self.provider.clone(),
            self.config.clone(),
            self.clock.clone(),
        )
        .with_metrics(self.metrics.clone())
    }
}

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
        let background = self.run_dispatcher && config.role.dispatches();
        let dispatcher = background.then(|| {
            let d = self.state.dispatcher();
            tokio::spawn(d.run(self.state.dispatch_wakeup.clone(), shutdown.clone()))
        });
        let scheduler = background
            .then(|| tokio::spawn(crate::scheduler::run(self.state.clone(), shutdown.clone())));
        let router = if config.role.serves_api() {
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
        if tokio::time::timeout(config.shutdown_grace, background_tasks)
            .await
            .is_err()
        {
            tracing::warn!(
                grace_seconds = config.shutdown_grace.as_secs(),
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
