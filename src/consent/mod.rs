//! Consent: per user, a phone number and three separate consents (SMS, WhatsApp, marketing).
//! Marketing consent is never implied by the others. Every change is audited by the store, in the
//! same transaction as the change.
//!
//! [`ConsentService`] is the one way consent changes: the patient's own settings, their STOP and
//! START keywords, and the carrier's opt-out report.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use serde::Deserialize;

use crate::channel::Channel;
use crate::clock::DynClock;
use crate::error::{AppError, AppResult};
use crate::phone::{self, PhoneNumber};
use crate::store::{
    ChangeContext, Consent, ConsentAuditRecord, ConsentSource, ConsentStore, InboundStore,
};

/// A requested change: `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct ConsentPatch {
    pub phone_number: Option<String>,
    /// Remove the stored number (refused while SMS or WhatsApp consent stays on).
    pub clear_phone_number: bool,
    pub sms_consent: Option<bool>,
    pub whatsapp_consent: Option<bool>,
    pub marketing_consent: Option<bool>,
    /// An IANA zone, already checked.
    pub time_zone: Option<String>,
    /// Remove the stored zone (the patient's reminders then use `DEFAULT_TIME_ZONE`).
    pub clear_time_zone: bool,
}

/// An IANA time zone name as `chrono-tz` knows it (exact case), or 400 `invalid_time_zone`.
pub fn parse_time_zone(name: &str) -> AppResult<Tz> {
    name.parse::<Tz>().map_err(|_| {
        AppError::bad_request(
            "invalid_time_zone",
            "time_zone must be an IANA zone such as Asia/Kolkata",
        )
    })
}

impl ConsentPatch {
    /// `current` after this patch, or an error when the result would be inconsistent (consent to
    /// be messaged with no number to message).
    pub fn apply(&self, current: &Consent) -> AppResult<Consent> {
        let next = Consent {
            user_id: current.user_id.clone(),
            phone_number: if self.clear_phone_number {
                None
            } else {
                self.phone_number
                    .clone()
                    .or_else(|| current.phone_number.clone())
            },
            sms_consent: self.sms_consent.unwrap_or(current.sms_consent),
            whatsapp_consent: self.whatsapp_consent.unwrap_or(current.whatsapp_consent),
            marketing_consent: self.marketing_consent.unwrap_or(current.marketing_consent),
            updated_at: current.updated_at,
            phone_verified_at: current.phone_verified_at,
            time_zone: if self.clear_time_zone {
                None
            } else {
                self.time_zone.clone().or_else(|| current.time_zone.clone())
            },
        };
        let mut next = next;
        // A verification proves one number: a new number is not verified.
        if next.phone_number != current.phone_number {
            next.phone_verified_at = None;
        }
        if next.phone_number.is_none() && (next.sms_consent || next.whatsapp_consent) {
            return Err(AppError::bad_request(
                "phone_required",
                "a phone_number is needed to consent to SMS or WhatsApp messages",
            ));
        }
        Ok(next)
    }

    /// One channel's consent, on or off.
    pub fn channel(channel: Channel, consent: bool) -> ConsentPatch {
        match channel {
            Channel::Sms => ConsentPatch {
                sms_consent: Some(consent),
                ..ConsentPatch::default()
            },
            Channel::Whatsapp => ConsentPatch {
                whatsapp_consent: Some(consent),
                ..ConsentPatch::default()
            },
        }
    }
}

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
    /// An IANA time zone (`Asia/Kolkata`); `null` removes it.
    #[serde(default, deserialize_with = "present")]
    pub time_zone: Option<Option<String>>,
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
        let clear_time_zone = matches!(self.time_zone, Some(None));
        let time_zone = match self.time_zone.flatten() {
            Some(name) => Some(parse_time_zone(&name)?.name().to_string()),
            None => None,
        };
        Ok((
            ConsentPatch {
                phone_number,
                clear_phone_number,
                sms_consent: self.sms_consent,
                whatsapp_consent: self.whatsapp_consent,
                marketing_consent: self.marketing_consent,
                time_zone,
                clear_time_zone,
            },
            source,
        ))
    }
}

/// Reads and changes consent; records opt-outs that come with a change of consent.
#[derive(Clone)]
pub struct ConsentService {
    consent: Arc<dyn ConsentStore>,
    opt_outs: Arc<dyn InboundStore>,
    clock: DynClock,
}

impl ConsentService {
    pub fn new(
        consent: Arc<dyn ConsentStore>,
        opt_outs: Arc<dyn InboundStore>,
        clock: DynClock,
    ) -> Self {
        ConsentService {
            consent,
            opt_outs,
            clock,
        }
    }

    pub async fn get(&self, user_id: &str) -> AppResult<Option<Consent>> {
        self.consent.get_consent(user_id).await
    }

    pub async fn audit_trail(&self, user_id: &str) -> AppResult<Vec<ConsentAuditRecord>> {
        self.consent.consent_audit(user_id).await
    }

    /// The user's own change (app or web settings, or the API), audited with where it came from.
    pub async fn update_preferences(
        &self,
        user_id: &str,
        update: PreferencesUpdate,
        mut ctx: ChangeContext,
    ) -> AppResult<Consent> {
        let (patch, source) = update.into_patch(ctx.source)?;
        ctx.source = source;
        let consent = self
            .consent
            .update_consent(user_id, &|current| patch.apply(current), &ctx)
            .await?;
        tracing::info!(
            user_id,
            phone = consent
                .phone_number
                .as_deref()
                .map(phone::mask)
                .unwrap_or_default(),
            sms = consent.sms_consent,
            whatsapp = consent.whatsapp_consent,
            marketing = consent.marketing_consent,
            source = source.as_str(),
            "consent updated"
        );
        Ok(consent)
    }

    /// Set one channel's consent for every user with this number, audited with `source`. The
    /// users listed with the number (one erased since is listed, and left without a record).
    pub async fn set_channel_consent_for_number(
        &self,
        number: &str,
        channel: Channel,
        consent: bool,
        source: ConsentSource,
        at: DateTime<Utc>,
    ) -> AppResult<Vec<String>> {
        let users = self.consent.users_with_phone(number).await?;
        let patch = ConsentPatch::channel(channel, consent);
        let ctx = from_twilio(source, at);
        for user in &users {
            // A user erased since the list was read stays erased.
            self.consent
                .update_existing_consent(user, &|current| patch.apply(current), &ctx)
                .await?;
        }
        Ok(users)
    }

    /// The patient texted STOP: record the number's opt-out and revoke that channel's consent for
    /// every user with the number. The users with the number.
    pub async fn keyword_stop(&self, number: &str, channel: Channel) -> AppResult<Vec<String>> {
        let now = self.clock.now();
        self.opt_outs
            .set_opt_out(number, channel, ConsentSource::SmsKeyword, now)
            .await?;
        self.set_channel_consent_for_number(number, channel, false, ConsentSource::SmsKeyword, now)
            .await
    }

    /// The patient texted START: lift the number's opt-out and give back that channel's consent
    /// to each user with the number whose consent a STOP (or the carrier's opt-out) took away.
    /// A user who said no themselves (in the app, on the settings page, through the host app)
    /// keeps their no: on a family phone one person's START must not sign up another, and a
    /// `YES` texted back is no consent to what the user refused. The users with the number.
    pub async fn keyword_start(&self, number: &str, channel: Channel) -> AppResult<Vec<String>> {
        let now = self.clock.now();
        self.opt_outs.clear_opt_out(number, channel).await?;
        let users = self.consent.users_with_phone(number).await?;
        let ctx = from_twilio(ConsentSource::SmsKeyword, now);
        for user in &users {
            self.give_back_after_start(user, number, channel, &ctx)
                .await?;
        }
        Ok(users)
    }

    /// One user's part of a START: consent on `channel` again if an opt-out took it. The audit
    /// trail is read outside the write, so the write goes ahead only if the record is still the
    /// one that trail ended at (the same `updated_at` and number); if the user changed it in
    /// between (on and off again in the app, or another number), their change may be the last
    /// word now, so it is read again.
    async fn give_back_after_start(
        &self,
        user: &str,
        number: &str,
        channel: Channel,
        ctx: &ChangeContext,
    ) -> AppResult<()> {
        let patch = ConsentPatch::channel(channel, true);
        for _ in 0..START_READS {
            // The record first, then its trail: a change after the record was read shows in
            // its `updated_at` at the write.
            let Some(seen) = self.consent.get_consent(user).await? else {
                return Ok(());
            };
            if seen.phone_number.as_deref() != Some(number)
                || !revoked_by_an_opt_out(&self.consent.consent_audit(user).await?, channel)
            {
                return Ok(());
            }
            let moved = AtomicBool::new(false);
            let still_seen = |current: &Consent| {
                if current.updated_at != seen.updated_at
                    || current.phone_number != seen.phone_number
                {
                    moved.store(true, Ordering::Relaxed);
                    return Ok(current.clone());
                }
                patch.apply(current)
            };
            self.consent
                .update_existing_consent(user, &still_seen, ctx)
                .await?;
            if !moved.load(Ordering::Relaxed) {
                return Ok(());
            }
        }
        // Changed under every read: the user is changing it now, and their word stands.
        Ok(())
    }

    /// The carrier reports the patient opted out (Twilio 21610): record the number's opt-out and
    /// revoke that channel's consent for every user with the number, source `provider`.
    pub async fn carrier_opt_out(
        &self,
        number: &str,
        channel: Channel,
        at: DateTime<Utc>,
    ) -> AppResult<()> {
        self.opt_outs
            .set_opt_out(number, channel, ConsentSource::Provider, at)
            .await?;
        self.set_channel_consent_for_number(number, channel, false, ConsentSource::Provider, at)
            .await?;
        tracing::info!(to = %phone::mask(number), channel = channel.as_str(), "recipient opted out at the carrier: consent revoked");
        Ok(())
    }

    /// Whether anyone but the carrier (the patient's START, their settings, the host app) changed
    /// `channel`'s consent for a user with `number` after `since`, as the audit trail shows: a
    /// carrier opt-out reported at `since` and recorded late must not undo that later word.
    pub async fn channel_changed_since(
        &self,
        number: &str,
        channel: Channel,
        since: DateTime<Utc>,
    ) -> AppResult<bool> {
        let field = channel.consent_field();
        for user in self.consent.users_with_phone(number).await? {
            let changed = self.consent.consent_audit(&user).await?.iter().any(|a| {
                a.field == field
                    && a.created_at > since
                    && a.source != ConsentSource::Provider.as_str()
            });
            if changed {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The channels on which the user's number is opted out (a STOP, or the carrier's report):
    /// nothing goes to it there until the patient texts START, whatever their consent says, so
    /// the app and the settings page say so. None without a number.
    pub async fn opted_out_channels(&self, consent: &Consent) -> AppResult<OptedOut> {
        self.opted_out_number(consent.phone_number.as_deref()).await
    }

    /// The channels on which `number` is opted out; none without a number.
    pub async fn opted_out_number(&self, number: Option<&str>) -> AppResult<OptedOut> {
        let Some(number) = number else {
            return Ok(OptedOut::default());
        };
        let number = number.to_string();
        let among = self
            .opt_outs
            .opted_out_among(std::slice::from_ref(&number))
            .await?;
        let on = |channel| among.iter().any(|(n, c)| *n == number && *c == channel);
        Ok(OptedOut {
            sms: on(Channel::Sms),
            whatsapp: on(Channel::Whatsapp),
        })
    }

    /// Users whose stored number is this one.
    pub async fn users_with_phone(&self, number: &str) -> AppResult<Vec<String>> {
        self.consent.users_with_phone(number).await
    }
}

/// How many times a START reads a user's record and trail before it leaves the user to their own
/// change in progress.
const START_READS: usize = 3;

/// Where a user's number is opted out, channel by channel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct OptedOut {
    pub sms: bool,
    pub whatsapp: bool,
}

/// Whether the last word on `channel`'s consent in a user's audit trail is a revocation by an
/// opt-out (a STOP, or the carrier's), with no change of number since: what a START gives back.
fn revoked_by_an_opt_out(audit: &[ConsentAuditRecord], channel: Channel) -> bool {
    let field = channel.consent_field();
    audit
        .iter()
        .rev()
        .find(|a| a.field == field || a.field == "phone_number")
        .is_some_and(|last| {
            last.field == field
                && last.new_value.as_deref() == Some("false")
                && (last.source == ConsentSource::SmsKeyword.as_str()
                    || last.source == ConsentSource::Provider.as_str())
        })
}

/// A change that came through Twilio (a keyword, the carrier), as the audit trail records it.
fn from_twilio(source: ConsentSource, at: DateTime<Utc>) -> ChangeContext {
    ChangeContext {
        source,
        ip: None,
        user_agent: Some("twilio".into()),
        at,
    }
}
