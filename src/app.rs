//! Wiring: builds the domain services from configuration. [`Services`] is what the command line,
//! the scheduler and the HTTP state (`http::AppState`) hold; running the server is `server`'s job.
//! Nothing here knows HTTP or callers.

use std::sync::Arc;

use tokio::sync::Notify;

use crate::clock::{DynClock, SystemClock};
use crate::config::Config;
use crate::consent::ConsentService;
use crate::delivery::Delivery;
use crate::inbound::Inbound;
use crate::metrics::Metrics;
use crate::otp::{CodeHasher, Otp, OtpContext};
use crate::outbox::dispatcher::{Dispatcher, DispatcherParts};
use crate::outbox::{DispatchWakeup, Outbox};
use crate::privacy::Privacy;
use crate::provider::mock::MockProvider;
use crate::provider::twilio::TwilioProvider;
use crate::provider::{DynProvider, ProviderHealth};
use crate::reminders::Reminders;
use crate::retention::Retention;
use crate::settings::SettingsPages;
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
    /// Whether the provider currently refuses our credentials (`/readyz` reports it).
    pub provider_health: Arc<ProviderHealth>,
    pub consent: ConsentService,
    pub delivery: Delivery,
    pub outbox: Outbox,
    pub dispatcher: Dispatcher,
    pub otp: Otp,
    pub inbound: Inbound,
    pub reminders: Reminders,
    pub settings_pages: SettingsPages,
    pub retention: Retention,
    pub privacy: Privacy,
    /// Poked when a message is queued, so the dispatcher sends it without waiting for its poll.
    pub dispatch_wakeup: DispatchWakeup,
}

impl Services {
    /// Connect the store (applying migrations), set up the provider, and build the services.
    pub async fn build(config: Config, clock: DynClock) -> anyhow::Result<Services> {
        let store = store::connect(&config.database_url, &config.encryption).await?;
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
        let provider_health = Arc::new(ProviderHealth::default());
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
            clock: clock.clone(),
            settings: config.dispatch,
            messaging: messaging.clone(),
            twilio: config.twilio.clone(),
            metrics: Some(metrics.clone()),
            provider_health: provider_health.clone(),
        });
        // One key for codes and erasure hashes: without a configured secret it is random, and
        // made once it is one key (and one warning) for the process.
        let code_hasher = Arc::new(CodeHasher::from_config(&config));
        let otp = Otp::new(
            store.clone(),
            consent.clone(),
            dispatcher.clone(),
            code_hasher.clone(),
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
            store.clone(),
            consent.clone(),
            clock.clone(),
            render.clone(),
        );
        let reminders = Reminders::new(
            store.clone(),
            store.clone(),
            clock.clone(),
            messaging.reminder_late_booking,
            render,
            wakeup.clone(),
        );
        let settings_pages = SettingsPages::new(
            store.clone(),
            consent.clone(),
            outbox.clone(),
            clock.clone(),
            &config.messaging.app_url,
            &config.messaging.public_url,
            config.web.session_ttl,
            config.messaging.default_time_zone,
        );
        let retention = Retention::new(store.clone(), clock.clone(), config.retention);
        let privacy = Privacy::new(store.clone(), clock.clone(), code_hasher);
        Services {
            config: Arc::new(config),
            store,
            provider,
            mock,
            clock,
            metrics,
            provider_health,
            consent,
            delivery,
            outbox,
            dispatcher,
            otp,
            inbound,
            reminders,
            settings_pages,
            retention,
            privacy,
            dispatch_wakeup: wakeup,
        }
    }
}
