//! The state every handler shares: the domain services and the caller checks.

use std::sync::Arc;

use crate::app::Services;
use crate::auth::Authenticator;
use crate::clock::{DynClock, SystemClock};
use crate::config::Config;

/// What every handler shares: the services and the caller checks. Cheap to clone: axum clones
/// the state for every request and layer, and `Services` holds a hundred-odd `Arc`s whose
/// counts every core would then bump and drop (15-20% of a `/healthz` request's CPU), so it
/// sits behind one.
#[derive(Clone)]
pub struct AppState {
    pub services: Arc<Services>,
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
            services: Arc::new(services),
            auth: Arc::new(auth),
        })
    }

    pub async fn from_config(config: Config) -> anyhow::Result<AppState> {
        Self::build(config, Arc::new(SystemClock)).await
    }
}
