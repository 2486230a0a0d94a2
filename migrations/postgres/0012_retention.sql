-- Retention: a receipt per cleanup run, and the indexes its age scans use.
CREATE TABLE cleanup_runs (
    id         BIGSERIAL PRIMARY KEY,
    ran_at     TIMESTAMPTZ NOT NULL,
    as_of      TIMESTAMPTZ NOT NULL,
    -- The counts deleted per data class, as a JSON object.
    counts     TEXT NOT NULL
);
CREATE INDEX messages_created ON messages (created_at);
CREATE INDEX consent_audit_trail_created ON consent_audit_trail (created_at);
CREATE INDEX reminder_log_starts ON reminder_log (starts_at);
CREATE INDEX unmatched_status_callbacks_received ON unmatched_status_callbacks (received_at);
