-- The channel the host app asked for (a WhatsApp message may go by SMS; `channel` says how it
-- went). NULL: the same as `channel`.
ALTER TABLE messages ADD COLUMN requested_channel TEXT;

-- A status callback can arrive before the send that created it has recorded the SID. It waits
-- here and is applied as soon as the SID is recorded.
CREATE TABLE unmatched_status_callbacks (
    provider_sid TEXT NOT NULL,
    status       TEXT NOT NULL,
    error_code   INTEGER,
    received_at  TEXT NOT NULL,
    PRIMARY KEY (provider_sid, status)
);
