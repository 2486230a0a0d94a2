-- Subscriptions, pushed by the host app like appointments (its id is the key), and the sweep
-- indexes: each reminder sweep reads one index range, (status, time, id), in the order it pages
-- through it, so its cost follows the rows in its window, not the rows stored.
CREATE TABLE subscriptions (
    id          TEXT PRIMARY KEY NOT NULL,
    user_id     TEXT NOT NULL,
    plan        TEXT NOT NULL,
    renews_at   TEXT,
    expires_at  TEXT,
    status      TEXT NOT NULL CHECK (status IN ('active', 'cancelled', 'expired')),
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL,
    CHECK (renews_at IS NOT NULL OR expires_at IS NOT NULL)
);
CREATE INDEX subscriptions_expiry_sweep ON subscriptions (status, expires_at, id);
CREATE INDEX subscriptions_renewal_sweep ON subscriptions (status, renews_at, id);

DROP INDEX IF EXISTS appointments_due;
CREATE INDEX appointments_sweep ON appointments (status, starts_at, id);
DROP INDEX IF EXISTS follow_ups_due;
CREATE INDEX follow_ups_sweep ON follow_ups (status, due_at, id);

-- A subscription's expiry and its renewal are reminder subjects of their own (each has its own
-- time). SQLite cannot change a CHECK constraint in place, so `reminder_log` is rebuilt; nothing
-- references it, and it references `messages`, which stays.
CREATE TABLE reminder_log_new (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    subject_type TEXT NOT NULL CHECK (subject_type IN ('appointment', 'follow_up', 'subscription_expiry', 'subscription_renewal')),
    subject_id   TEXT NOT NULL,
    kind         TEXT NOT NULL,
    starts_at    TEXT NOT NULL,
    user_id      TEXT NOT NULL,
    active       BOOLEAN NOT NULL DEFAULT TRUE,
    message_id   TEXT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    created_at   TEXT NOT NULL
);
INSERT INTO reminder_log_new (id, subject_type, subject_id, kind, starts_at, user_id, active,
    message_id, created_at)
SELECT id, subject_type, subject_id, kind, starts_at, user_id, active, message_id, created_at
FROM reminder_log;
DROP TABLE reminder_log;
ALTER TABLE reminder_log_new RENAME TO reminder_log;
CREATE UNIQUE INDEX reminder_log_once ON reminder_log (subject_type, subject_id, kind, starts_at, user_id)
    WHERE active;
CREATE INDEX reminder_log_message ON reminder_log (message_id);
-- The rebuild dropped the retention sweep's index (0012): make it again.
CREATE INDEX reminder_log_starts ON reminder_log (starts_at);
