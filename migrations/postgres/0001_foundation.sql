-- Foundation: consent with its audit trail, and the messages outbox/log with its events.

CREATE TABLE messaging_consent (
    user_id           TEXT PRIMARY KEY NOT NULL,
    phone_number      TEXT,
    sms_consent       BOOLEAN NOT NULL DEFAULT FALSE,
    whatsapp_consent  BOOLEAN NOT NULL DEFAULT FALSE,
    marketing_consent BOOLEAN NOT NULL DEFAULT FALSE,
    created_at        TIMESTAMPTZ NOT NULL,
    updated_at        TIMESTAMPTZ NOT NULL
);
CREATE INDEX messaging_consent_phone ON messaging_consent (phone_number);

-- Append-only: one row per changed field.
CREATE TABLE consent_audit_trail (
    id         BIGSERIAL PRIMARY KEY,
    user_id    TEXT NOT NULL,
    field      TEXT NOT NULL,
    old_value  TEXT,
    new_value  TEXT,
    source     TEXT NOT NULL,
    ip         TEXT,
    user_agent TEXT,
    created_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX consent_audit_trail_user ON consent_audit_trail (user_id, id);
CREATE FUNCTION consent_audit_trail_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'consent_audit_trail is append-only';
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER consent_audit_trail_no_update BEFORE UPDATE ON consent_audit_trail
    FOR EACH ROW EXECUTE FUNCTION consent_audit_trail_append_only();

CREATE TABLE messages (
    id               TEXT PRIMARY KEY NOT NULL,
    user_id          TEXT NOT NULL,
    template_name    TEXT NOT NULL,
    variables        TEXT NOT NULL,
    channel          TEXT NOT NULL CHECK (channel IN ('sms', 'whatsapp')),
    status           TEXT NOT NULL CHECK (status IN ('queued', 'sending', 'sent', 'delivered', 'read', 'undelivered', 'failed', 'skipped')),
    reason           TEXT,
    to_number        TEXT,
    provider_sid     TEXT UNIQUE,
    error_code       BIGINT,
    error_message    TEXT,
    encoding         TEXT,
    segments         BIGINT,
    attempts         BIGINT NOT NULL DEFAULT 0,
    idempotency_key  TEXT UNIQUE,
    next_attempt_at  TIMESTAMPTZ NOT NULL,
    lease_until      TIMESTAMPTZ,
    created_at       TIMESTAMPTZ NOT NULL,
    updated_at       TIMESTAMPTZ NOT NULL
);
CREATE INDEX messages_due ON messages (status, next_attempt_at);
CREATE INDEX messages_user ON messages (user_id, created_at);

CREATE TABLE message_events (
    id          BIGSERIAL PRIMARY KEY,
    message_id  TEXT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    status      TEXT NOT NULL,
    error_code  BIGINT,
    detail      TEXT,
    occurred_at TIMESTAMPTZ NOT NULL,
    UNIQUE (message_id, status)
);
