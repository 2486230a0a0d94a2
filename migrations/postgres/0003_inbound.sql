-- Patient replies and keywords. Twilio retries a webhook with the same MessageSid: stored once.
CREATE TABLE incoming_messages (
    id             TEXT PRIMARY KEY NOT NULL,
    provider_sid   TEXT NOT NULL UNIQUE,
    channel        TEXT NOT NULL,
    from_number    TEXT NOT NULL,
    to_number      TEXT,
    user_id        TEXT,
    body           TEXT NOT NULL,
    keyword        TEXT,
    reply_template TEXT,
    opt_out_type   TEXT,
    received_at    TIMESTAMPTZ NOT NULL
);
CREATE INDEX incoming_messages_received ON incoming_messages (received_at, id);

-- The last WhatsApp message from each number: free text may go to it for 24 hours after.
CREATE TABLE whatsapp_sessions (
    phone_number     TEXT PRIMARY KEY NOT NULL,
    last_inbound_at  TIMESTAMPTZ NOT NULL
);
