-- One-time passcodes: only a keyed hash of the code is stored; one live code per (user, purpose).
CREATE TABLE otp_codes (
    user_id      TEXT NOT NULL,
    purpose      TEXT NOT NULL,
    phone_number TEXT NOT NULL,
    channel      TEXT NOT NULL,
    code_hash    TEXT NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    expires_at   TEXT NOT NULL,
    used_at      TEXT,
    message_id   TEXT,
    created_at   TEXT NOT NULL,
    PRIMARY KEY (user_id, purpose)
);
CREATE INDEX otp_codes_expires ON otp_codes (expires_at);

-- Every accepted OTP send, for the per-number, per-user and per-IP limits.
CREATE TABLE otp_send_log (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    phone_number TEXT NOT NULL,
    user_id      TEXT NOT NULL,
    ip           TEXT,
    created_at   TEXT NOT NULL
);
CREATE INDEX otp_send_log_phone ON otp_send_log (phone_number, created_at);
CREATE INDEX otp_send_log_user ON otp_send_log (user_id, created_at);
CREATE INDEX otp_send_log_ip ON otp_send_log (ip, created_at);

-- Numbers that texted STOP on a channel: nothing but the confirmation goes to them there.
CREATE TABLE opt_outs (
    phone_number TEXT NOT NULL,
    channel      TEXT NOT NULL,
    source       TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    PRIMARY KEY (phone_number, channel)
);
