-- Reminders in the patient's own time (issue 11).

-- The patient's IANA time zone, when they gave one (preferences; audited like the rest).
ALTER TABLE messaging_consent ADD COLUMN time_zone TEXT;

-- An appointment or follow-up keeps a zone only when the host app gave one (NULL otherwise; rows
-- written before keep the zone they hold), and how far ahead its current time, patient and status
-- were booked (`notice_seconds`, for late bookings; rows written before: since they were created).
-- SQLite cannot drop NOT NULL in place, so both tables are rebuilt; nothing references them.
CREATE TABLE appointments_new (
    id             TEXT PRIMARY KEY NOT NULL,
    user_id        TEXT NOT NULL,
    starts_at      TEXT NOT NULL,
    time_zone      TEXT,
    status         TEXT NOT NULL CHECK (status IN ('scheduled', 'cancelled')),
    notice_seconds INTEGER NOT NULL,
    created_at     TEXT NOT NULL,
    updated_at     TEXT NOT NULL
);
INSERT INTO appointments_new (id, user_id, starts_at, time_zone, status, notice_seconds,
    created_at, updated_at)
SELECT id, user_id, starts_at, time_zone, status, unixepoch(starts_at) - unixepoch(created_at),
    created_at, updated_at
FROM appointments;
DROP TABLE appointments;
ALTER TABLE appointments_new RENAME TO appointments;
CREATE INDEX appointments_due ON appointments (status, starts_at);

CREATE TABLE follow_ups_new (
    id             TEXT PRIMARY KEY NOT NULL,
    user_id        TEXT NOT NULL,
    due_at         TEXT NOT NULL,
    time_zone      TEXT,
    status         TEXT NOT NULL CHECK (status IN ('scheduled', 'cancelled')),
    notice_seconds INTEGER NOT NULL,
    created_at     TEXT NOT NULL,
    updated_at     TEXT NOT NULL
);
INSERT INTO follow_ups_new (id, user_id, due_at, time_zone, status, notice_seconds, created_at,
    updated_at)
SELECT id, user_id, due_at, time_zone, status, unixepoch(due_at) - unixepoch(created_at),
    created_at, updated_at
FROM follow_ups;
DROP TABLE follow_ups;
ALTER TABLE follow_ups_new RENAME TO follow_ups;
CREATE INDEX follow_ups_due ON follow_ups (status, due_at);

-- Reminder templates now carry the item's instant, rendered ("today at 10:30") when sent. Reminders
-- not yet sent get their item's time from the reminder log.
UPDATE messages SET variables = json_object(
        'starts_at', (SELECT r.starts_at FROM reminder_log r WHERE r.message_id = messages.id),
        'link', json_extract(variables, '$.link'))
WHERE status IN ('queued', 'sending')
    AND template_name IN ('appointment_reminder_24h', 'appointment_reminder_2h')
    AND EXISTS (SELECT 1 FROM reminder_log r WHERE r.message_id = messages.id);
UPDATE messages SET variables = json_object(
        'due_at', (SELECT r.starts_at FROM reminder_log r WHERE r.message_id = messages.id),
        'link', json_extract(variables, '$.link'))
WHERE status IN ('queued', 'sending')
    AND template_name = 'follow_up_reminder'
    AND EXISTS (SELECT 1 FROM reminder_log r WHERE r.message_id = messages.id);
