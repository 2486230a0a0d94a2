-- Right person, right number.

-- A verified number: set when a `verification` code sent to the number on file is entered; cleared
-- when the number changes.
ALTER TABLE messaging_consent ADD COLUMN phone_verified_at TIMESTAMPTZ;

-- Wrong OTP tries per (user, purpose), whether or not a code exists, so that an unknown user
-- answers like a known one. The count ends with its window or when a new code is sent.
CREATE TABLE otp_failures (
    user_id        TEXT NOT NULL,
    purpose        TEXT NOT NULL,
    failures       BIGINT NOT NULL,
    window_ends_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (user_id, purpose)
);

-- Every user whose number sent a reply (a family may share one), as a JSON array.
ALTER TABLE incoming_messages ADD COLUMN user_ids TEXT;

-- A reply is attributed to the user the last message to that number went to.
CREATE INDEX messages_to_number ON messages (to_number, created_at);

-- A reminder is planned for a patient; once-only means one pending or delivered reminder per
-- (item, kind, time, patient): a reminder skipped because its item was cancelled, moved or
-- reassigned no longer counts, so the item moved back gets its reminder again.
ALTER TABLE reminder_log ADD COLUMN user_id TEXT;
ALTER TABLE reminder_log ADD COLUMN active BOOLEAN NOT NULL DEFAULT TRUE;
UPDATE reminder_log r SET user_id = m.user_id,
    active = NOT (m.status = 'skipped' AND m.reason IN ('appointment_cancelled', 'follow_up_cancelled',
            'appointment_rescheduled', 'follow_up_rescheduled'))
FROM messages m WHERE m.id = r.message_id;
ALTER TABLE reminder_log ALTER COLUMN user_id SET NOT NULL;
ALTER TABLE reminder_log DROP CONSTRAINT reminder_log_pkey;
CREATE UNIQUE INDEX reminder_log_once ON reminder_log (subject_type, subject_id, kind, starts_at, user_id)
    WHERE active;
