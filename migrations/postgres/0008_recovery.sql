-- Recovery: the `unknown` status (Twilio may or may not hold the message and no lookup could
-- tell), what each attempt sent and when it started (a lookup adopts only that), whether the last
-- attempt's outcome is unknown, and one event per status change or distinct error code.
ALTER TABLE messages DROP CONSTRAINT messages_status_check;
ALTER TABLE messages ADD CONSTRAINT messages_status_check CHECK (status IN ('queued', 'sending',
    'sent', 'delivered', 'read', 'undelivered', 'failed', 'unknown', 'skipped'));
ALTER TABLE messages ADD COLUMN attempt_started_at TIMESTAMPTZ;
ALTER TABLE messages ADD COLUMN attempt_body TEXT;
ALTER TABLE messages ADD COLUMN lookup_needed BOOLEAN NOT NULL DEFAULT FALSE;
-- A queued retry with no provider code had an unknown outcome (a timeout, a dropped connection).
UPDATE messages SET lookup_needed = TRUE
WHERE status = 'queued' AND attempts > 0 AND error_code IS NULL;

-- An event per status change; a repeat of a status adds one only with an error code not yet kept.
ALTER TABLE message_events DROP CONSTRAINT message_events_message_id_status_key;
CREATE UNIQUE INDEX message_events_once ON message_events (message_id, status, COALESCE(error_code, -1));
