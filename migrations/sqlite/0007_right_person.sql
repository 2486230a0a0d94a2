-- Right person, right number.

-- A verified number: set when a `verification` code sent to the number on file is entered; cleared
-- when the number changes.
ALTER TABLE messaging_consent ADD COLUMN phone_verified_at TEXT;

-- Wrong OTP tries per (user, purpose), whether or not a code exists, so that an unknown user
-- answers like a known one. The count ends with its window or when a new code is sent.
CREATE TABLE otp_failures (
    user_id        TEXT NOT NULL,
    purpose        TEXT NOT NULL,
    failures       INTEGER NOT NULL,
    window_ends_at TEXT NOT NULL,
    PRIMARY KEY (user_id, purpose)
);

-- Every user whose number sent a reply (a family may share one), as a JSON array.
ALTER TABLE incoming_messages ADD COLUMN user_ids TEXT;

-- A reply is attributed to the user the last message to that number went to.
CREATE INDEX messages_to_number ON messages (to_number, created_at);

-- A reminder is planned for a patient; once-only means one pending or delivered reminder per
-- (item, kind, time, patient): a reminder skipped because its item was cancelled, moved or
-- reassigned no longer counts, so the item moved back gets its reminder again.
CREATE TABLE reminder_log_new (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    subject_type TEXT NOT NULL CHECK (subject_type IN ('appointment', 'follow_up')),
    subject_id   TEXT NOT NULL,
    kind         TEXT NOT NULL,
    starts_at    TEXT NOT NULL,
    user_id      TEXT NOT NULL,
    active       BOOLEAN NOT NULL DEFAULT TRUE,
    message_id   TEXT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    created_at   TEXT NOT NULL
);
INSERT INTO reminder_log_new (subject_type, subject_id, kind, starts_at, user_id, active, message_id, created_at)
SELECT r.subject_type, r.subject_id, r.kind, r.starts_at, m.user_id,
       NOT (m.status = 'skipped' AND m.reason IN ('appointment_cancelled', 'follow_up_cancelled',
            'appointment_rescheduled', 'follow_up_rescheduled')),
       r.message_id, r.created_at
FROM reminder_log r JOIN messages m ON m.id = r.message_id;
DROP TABLE reminder_log;
ALTER TABLE reminder_log_new RENAME TO reminder_log;
CREATE UNIQUE INDEX reminder_log_once ON reminder_log (subject_type, subject_id, kind, starts_at, user_id)
    WHERE active;
CREATE INDEX reminder_log_message ON reminder_log (message_id);
