-- Foundation: consent with its audit trail, and the messages outbox/log with its events.
-- Times are RFC 3339 UTC text written by the service (they sort and compare as text).

CREATE TABLE messaging_consent (
    user_id           TEXT PRIMARY KEY NOT NULL,
    phone_number      TEXT,
    sms_consent       BOOLEAN NOT NULL DEFAULT FALSE,
    whatsapp_consent  BOOLEAN NOT NULL DEFAULT FALSE,
    marketing_consent BOOLEAN NOT NULL DEFAULT FALSE,
    created_at        TEXT NOT NULL,
    updated_at        TEXT NOT NULL
);
CREATE INDEX messaging_consent_phone ON messaging_consent (phone_number);

-- Append-only: one row per changed field.
CREATE TABLE consent_audit_trail (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id    TEXT NOT NULL,
    field      TEXT NOT NULL,
    old_value  TEXT,
    new_value  TEXT,
    source     TEXT NOT NULL,
    ip         TEXT,
    user_agent TEXT,
    created_at TEXT NOT NULL
);
CREATE INDEX consent_audit_trail_user ON consent_audit_trail (user_id, id);
CREATE TRIGGER consent_audit_trail_no_update BEFORE UPDATE ON consent_audit_trail
BEGIN
    SELECT RAISE(ABORT, 'consent_audit_trail is append-only');
END;

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
    error_code       INTEGER,
    error_message    TEXT,
    encoding         TEXT,
    segments         INTEGER,
    attempts         INTEGER NOT NULL DEFAULT 0,
    idempotency_key  TEXT UNIQUE,
    next_attempt_at  TEXT NOT NULL,
    lease_until      TEXT,
    created_at       TEXT NOT NULL,
    updated_at       TEXT NOT NULL
);
CREATE INDEX messages_due ON messages (status, next_attempt_at);
CREATE INDEX messages_user ON messages (user_id, created_at);

CREATE TABLE message_events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id  TEXT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    status      TEXT NOT NULL,
    error_code  INTEGER,
    detail      TEXT,
    occurred_at TEXT NOT NULL,
    UNIQUE (message_id, status)
);
