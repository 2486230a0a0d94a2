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
use crate::consent::ConsentService;
use crate::delivery::Delivery;
use crate::inbound::Inbound;
use crate::metrics::Metrics;
use crate::otp::{CodeHasher, Otp, OtpContext};
use crate::outbox::dispatcher::{Dispatcher, DispatcherParts};
use crate::outbox::{DispatchWakeup, Outbox};
use crate::provider::mock::MockProvider;
use crate::provider::twilio::TwilioProvider;
use crate::provider::DynProvider;
use crate::reminders::Reminders;
use crate::store::{self, DynStore};

/// The domain services, each built from exactly the stores, settings and collaborators it uses.
/// What the command line and the scheduler need: no HTTP, no authentication.
#[derive(Clone)]
pub struct Services {
    pub config: Arc<Config>,
    /// The whole store, for operations (`/readyz`, `/metrics`) and for tests to inspect.
    pub store: DynStore,
    pub provider: DynProvider,
    /// Present in mock mode: the dev outbox lives here.
    pub mock: Option<Arc<MockProvider>>,
    pub clock: DynClock,
    pub metrics: Arc<Metrics>,
    pub consent: ConsentService,
    pub delivery: Delivery,
    pub outbox: Outbox,
    pub dispatcher: Dispatcher,
    pub otp: Otp,
    pub inbound: Inbound,
    pub reminders: Reminders,
    /// Poked when a message is queued, so the dispatcher sends it without waiting for its poll.
    pub dispatch_wakeup: DispatchWakeup,
}

impl Services {
    /// Connect the store (applying migrations), set up the provider, and build the services.
    pub async fn build(config: Config, clock: DynClock) -> anyhow::Result<Services> {
        let store = store::connect(&config.database_url).await?;
        store.migrate().await?;
        let (provider, mock): (DynProvider, Option<Arc<MockProvider>>) =
            if config.messaging.mock_mode {
                let mock = Arc::new(MockProvider::new());
                (mock.clone(), Some(mock))
            } else {
                let twilio = TwilioProvider::new(
                    config.twilio.live()?,
                    &config.messaging.public_url,
                    config.twilio.timeout,
                )?;
                (Arc::new(twilio), None)
            };
        Ok(Self::assemble(config, store, provider, mock, clock))
    }

    pub async fn from_config(config: Config) -> anyhow::Result<Services> {
        Self::build(config, Arc::new(SystemClock)).await
    }

    fn assemble(
        config: Config,
        store: DynStore,
        provider: DynProvider,
        mock: Option<Arc<MockProvider>>,
        clock: DynClock,
    ) -> Services {
        let metrics = Arc::new(Metrics::default());
        let wakeup: DispatchWakeup = Arc::new(Notify::new());
        let messaging = &config.messaging;
        let render = messaging.render_context();
        let consent = ConsentService::new(store.clone(), store.clone(), clock.clone());
        let delivery = Delivery::new(store.clone(), consent.clone());
        let outbox = Outbox::new(store.clone(), clock.clone(), render.clone(), wakeup.clone());
        let dispatcher = Dispatcher::new(DispatcherParts {
            messages: store.clone(),
            consent_records: store.clone(),
            inbound: store.clone(),
            schedule: store.clone(),
            provider: provider.clone(),
            delivery: delivery.clone(),
            consent: consent.clone(),
            clock: clock.clone(),
            settings: config.dispatch,
            messaging: messaging.clone(),
            twilio: config.twilio.clone(),
            metrics: Some(metrics.clone()),
        });
        let otp = Otp::new(
            store.clone(),
            store.clone(),
            dispatcher.clone(),
            CodeHasher::from_config(&config),
            clock.clone(),
            OtpContext {
                settings: config.otp.clone(),
                messaging_enabled: messaging.enabled,
                mock_mode: messaging.mock_mode,
                clinic_name: messaging.clinic_name.clone(),
                sms_sender: config
                    .twilio
                    .phone_number
                    .as_ref()
                    .map(|n| n.as_str().to_string()),
                whatsapp_sender: config
                    .twilio
                    .whatsapp_number
                    .as_ref()
                    .map(|n| n.as_str().to_string()),
                lease: config.dispatch.lease,
            },
        );
        let inbound = Inbound::new(
            store.clone(),
            consent.clone(),
            clock.clone(),
            render.clone(),
        );
        let reminders = Reminders::new(
            store.clone(),
            store.clone(),
            clock.clone(),
            messaging.default_time_zone,
            render,
            wakeup.clone(),
        );
        Services {
            config: Arc::new(config),
            store,
            provider,
            mock,
            clock,
            metrics,
            consent,
            delivery,
            outbox,
            dispatcher,
            otp,
            inbound,
            reminders,
            dispatch_wakeup: wakeup,
        }
    }
}

/// What every handler shares: the services and the caller checks. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub services: Services,
    pub auth: Arc<Authenticator>,
}

impl std::ops::Deref for AppState {
    type Target = Services;
    fn deref(&self) -> &Services {
        &self.services
    }
}

impl AppState {
    /// The services plus authentication (which may fetch a key set).
    pub async fn build(config: Config, clock: DynClock) -> anyhow::Result<AppState> {
        let auth = Authenticator::from_config(&config).await?;
        let services = Services::build(config, clock).await?;
        Ok(AppState {
            services,
            auth: Arc::new(auth),
        })
    }

    pub async fn from_config(config: Config) -> anyhow::Result<AppState> {
        Self::build(config, Arc::new(SystemClock)).await
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
