//! The state every handler shares: the domain services and the caller checks.

use std::sync::Arc;

use crate::app::Services;
use crate::auth::Authenticator;
use crate::clock::{DynClock, SystemClock};
use crate::config::Config;

/// What every handler shares: the services and the caller checks. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub services: Services,
    pub auth: Arc<Authenticator>,
}

/// Handlers reach the services directly (`state.outbox`, `state.otp`, ...).
impl std::ops::Deref for AppState {
    type Target = Services;
    fn deref(&self) -> &Services {
        &self.services
    }
}

impl AppState {
    /// The services plus authentication (which may fetch a key set).
    pub async fn build(config: Config, clock: DynClock) -> anyhow::Result<AppState> {
        let auth = Authenticator::from_config(&config, clock.clone()).await?;
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
