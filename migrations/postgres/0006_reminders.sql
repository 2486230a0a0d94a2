-- What the host app pushed: appointments and follow-ups, keyed by the host app's own id (a
-- repeated PUT is an update).
CREATE TABLE appointments (
    id          TEXT PRIMARY KEY NOT NULL,
    user_id     TEXT NOT NULL,
    starts_at   TIMESTAMPTZ NOT NULL,
    time_zone   TEXT NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('scheduled', 'cancelled')),
    created_at  TIMESTAMPTZ NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL
);
CREATE INDEX appointments_due ON appointments (status, starts_at);

CREATE TABLE follow_ups (
    id          TEXT PRIMARY KEY NOT NULL,
    user_id     TEXT NOT NULL,
    due_at      TIMESTAMPTZ NOT NULL,
    time_zone   TEXT NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('scheduled', 'cancelled')),
    created_at  TIMESTAMPTZ NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL
);
CREATE INDEX follow_ups_due ON follow_ups (status, due_at);

-- Which reminder of which version (its time) of an appointment or follow-up was queued, and as
-- which message: no reminder twice, and a rescheduled appointment gets its own.
CREATE TABLE reminder_log (
    subject_type TEXT NOT NULL CHECK (subject_type IN ('appointment', 'follow_up')),
    subject_id   TEXT NOT NULL,
    kind         TEXT NOT NULL,
    starts_at    TIMESTAMPTZ NOT NULL,
    message_id   TEXT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    created_at   TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (subject_type, subject_id, kind, starts_at)
);
CREATE INDEX reminder_log_message ON reminder_log (message_id);
