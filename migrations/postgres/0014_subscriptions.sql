-- Subscriptions, pushed by the host app like appointments (its id is the key), and the sweep
-- indexes: each reminder sweep reads one index range, (status, time, id), in the order it pages
-- through it, so its cost follows the rows in its window, not the rows stored.
CREATE TABLE subscriptions (
    id          TEXT PRIMARY KEY NOT NULL,
    user_id     TEXT NOT NULL,
    plan        TEXT NOT NULL,
    renews_at   TIMESTAMPTZ,
    expires_at  TIMESTAMPTZ,
    status      TEXT NOT NULL CHECK (status IN ('active', 'cancelled', 'expired')),
    created_at  TIMESTAMPTZ NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL,
    CHECK (renews_at IS NOT NULL OR expires_at IS NOT NULL)
);
CREATE INDEX subscriptions_expiry_sweep ON subscriptions (status, expires_at, id);
CREATE INDEX subscriptions_renewal_sweep ON subscriptions (status, renews_at, id);

DROP INDEX IF EXISTS appointments_due;
CREATE INDEX appointments_sweep ON appointments (status, starts_at, id);
DROP INDEX IF EXISTS follow_ups_due;
CREATE INDEX follow_ups_sweep ON follow_ups (status, due_at, id);

-- A subscription's expiry and its renewal are reminder subjects of their own (each has its own
-- time).
ALTER TABLE reminder_log DROP CONSTRAINT IF EXISTS reminder_log_subject_type_check;
ALTER TABLE reminder_log ADD CONSTRAINT reminder_log_subject_type_check CHECK
    (subject_type IN ('appointment', 'follow_up', 'subscription_expiry', 'subscription_renewal'));
