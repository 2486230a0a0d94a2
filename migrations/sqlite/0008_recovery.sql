-- Recovery: the `unknown` status (Twilio may or may not hold the message and no lookup could
-- tell), what each attempt sent and when it started (a lookup adopts only that), whether the last
-- attempt's outcome is unknown, and one event per status change or distinct error code.
--
-- SQLite cannot change a CHECK constraint in place, so `messages` is rebuilt. Its children are
-- rebuilt first and dropped before it: dropping a parent with foreign keys on would cascade.
CREATE TABLE messages_new (
    id                 TEXT PRIMARY KEY NOT NULL,
    user_id            TEXT NOT NULL,
    template_name      TEXT NOT NULL,
    variables          TEXT NOT NULL,
    channel            TEXT NOT NULL CHECK (channel IN ('sms', 'whatsapp')),
    status             TEXT NOT NULL CHECK (status IN ('queued', 'sending', 'sent', 'delivered', 'read', 'undelivered', 'failed', 'unknown', 'skipped')),
    reason             TEXT,
    to_number          TEXT,
    provider_sid       TEXT UNIQUE,
    error_code         INTEGER,
    error_message      TEXT,
    encoding           TEXT,
    segments           INTEGER,
    attempts           INTEGER NOT NULL DEFAULT 0,
    idempotency_key    TEXT UNIQUE,
    next_attempt_at    TEXT NOT NULL,
    lease_until        TEXT,
    created_at         TEXT NOT NULL,
    updated_at         TEXT NOT NULL,
    requested_channel  TEXT,
    attempt_started_at TEXT,
    attempt_body       TEXT,
    lookup_needed      BOOLEAN NOT NULL DEFAULT FALSE
);
INSERT INTO messages_new (id, user_id, template_name, variables, channel, status, reason, to_number,
    provider_sid, error_code, error_message, encoding, segments, attempts, idempotency_key,
    next_attempt_at, lease_until, created_at, updated_at, requested_channel, lookup_needed)
SELECT id, user_id, template_name, variables, channel, status, reason, to_number, provider_sid,
    error_code, error_message, encoding, segments, attempts, idempotency_key, next_attempt_at,
    lease_until, created_at, updated_at, requested_channel,
    -- A queued retry with no provider code had an unknown outcome (a timeout, a dropped connection).
    (status = 'queued' AND attempts > 0 AND error_code IS NULL)
FROM messages;

CREATE TABLE message_events_new (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id  TEXT NOT NULL REFERENCES messages_new (id) ON DELETE CASCADE,
    status      TEXT NOT NULL,
    error_code  INTEGER,
    detail      TEXT,
    occurred_at TEXT NOT NULL
);
INSERT INTO message_events_new (id, message_id, status, error_code, detail, occurred_at)
SELECT id, message_id, status, error_code, detail, occurred_at FROM message_events;

CREATE TABLE reminder_log_new (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    subject_type TEXT NOT NULL CHECK (subject_type IN ('appointment', 'follow_up')),
    subject_id   TEXT NOT NULL,
    kind         TEXT NOT NULL,
    starts_at    TEXT NOT NULL,
    user_id      TEXT NOT NULL,
    active       BOOLEAN NOT NULL DEFAULT TRUE,
    message_id   TEXT NOT NULL REFERENCES messages_new (id) ON DELETE CASCADE,
    created_at   TEXT NOT NULL
);
INSERT INTO reminder_log_new (id, subject_type, subject_id, kind, starts_at, user_id, active,
    message_id, created_at)
SELECT id, subject_type, subject_id, kind, starts_at, user_id, active, message_id, created_at
FROM reminder_log;

DROP TABLE message_events;
DROP TABLE reminder_log;
DROP TABLE messages;
ALTER TABLE messages_new RENAME TO messages;
ALTER TABLE message_events_new RENAME TO message_events;
ALTER TABLE reminder_log_new RENAME TO reminder_log;

CREATE INDEX messages_due ON messages (status, next_attempt_at);
CREATE INDEX messages_user ON messages (user_id, created_at);
CREATE INDEX messages_to_number ON messages (to_number, created_at);
-- An event per status change; a repeat of a status adds one only with an error code not yet kept.
CREATE UNIQUE INDEX message_events_once ON message_events (message_id, status, COALESCE(error_code, -1));
CREATE UNIQUE INDEX reminder_log_once ON reminder_log (subject_type, subject_id, kind, starts_at, user_id)
    WHERE active;
CREATE INDEX reminder_log_message ON reminder_log (message_id);
