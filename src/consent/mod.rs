//! Consent: per user, a phone number and three separate consents (SMS, WhatsApp, marketing).
//! Marketing consent is never implied by the others. Every change is audited by the store.

use serde::Deserialize;

use crate::error::{AppError, AppResult};
use crate::phone::PhoneNumber;
use crate::store::{ChangeContext, Consent, ConsentPatch, ConsentSource, DynStore};

/// The body of `PUT /api/messaging/preferences` (and the settings form). A field left out keeps
/// its current value; `"phone_number": null` removes the number.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PreferencesUpdate {
    #[serde(default, deserialize_with = "present")]
    pub phone_number: Option<Option<String>>,
    pub sms_consent: Option<bool>,
    pub whatsapp_consent: Option<bool>,
    pub marketing_consent: Option<bool>,
    /// `app_settings` (default for the API), `web_settings` or `api`. Keyword and provider
    /// changes come only from Twilio's webhooks.
    pub source: Option<String>,
}

/// Tells a field sent as `null` (`Some(None)`) from one left out (`None`, via `default`).
fn present<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

impl PreferencesUpdate {
    /// Validate into a patch and the source it claims. Nothing is written on error.
    pub fn into_patch(
        self,
        default_source: ConsentSource,
    ) -> AppResult<(ConsentPatch, ConsentSource)> {
        let source = match self.source.as_deref() {
            None => default_source,
            Some(s) => match ConsentSource::parse(s) {
                Some(
                    src @ (ConsentSource::AppSettings
                    | ConsentSource::WebSettings
                    | ConsentSource::Api),
                ) => src,
                _ => {
                    return Err(AppError::bad_request(
                        "invalid_source",
                        "source must be app_settings, web_settings or api",
                    ))
                }
            },
        };
        let clear_phone_number = matches!(self.phone_number, Some(None));
        let phone_number = self
            .phone_number
            .flatten()
            .as_deref()
            .map(PhoneNumber::parse)
            .transpose()?
            .map(String::from);
        Ok((
            ConsentPatch {
                phone_number,
                clear_phone_number,
                sms_consent: self.sms_consent,
                whatsapp_consent: self.whatsapp_consent,
                marketing_consent: self.marketing_consent,
            },
            source,
        ))
    }
}

pub async fn update_preferences(
    store: &DynStore,
    user_id: &str,
    update: PreferencesUpdate,
    mut ctx: ChangeContext,
) -> AppResult<Consent> {
    let (patch, source) = update.into_patch(ctx.source)?;
    ctx.source = source;
    let consent = store.update_consent(user_id, &patch, &ctx).await?;
    tracing::info!(
        user_id,
        phone = consent
            .phone_number
            .as_deref()
            .map(crate::phone::mask)
            .unwrap_or_default(),
        sms = consent.sms_consent,
        whatsapp = consent.whatsapp_consent,
        marketing = consent.marketing_consent,
        source = source.as_str(),
        "consent updated"
    );
    Ok(consent)
}
