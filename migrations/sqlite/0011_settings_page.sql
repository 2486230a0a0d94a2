-- The settings page: one-time links from the host app, and the sessions they open. Only hashes
-- of the link codes and session tokens are stored.
CREATE TABLE settings_links (
    code_hash  TEXT PRIMARY KEY NOT NULL,
    user_id    TEXT NOT NULL,
    return_url TEXT,
    expires_at TEXT NOT NULL,
    used_at    TEXT,
    created_at TEXT NOT NULL
);
CREATE INDEX settings_links_expires ON settings_links (expires_at);

CREATE TABLE settings_sessions (
    token_hash   TEXT PRIMARY KEY NOT NULL,
    user_id      TEXT NOT NULL,
    return_url   TEXT,
    ip           TEXT,
    user_agent   TEXT,
    created_at   TEXT NOT NULL,
    last_seen_at TEXT NOT NULL,
    expires_at   TEXT NOT NULL
);
CREATE INDEX settings_sessions_user ON settings_sessions (user_id);
CREATE INDEX settings_sessions_expires ON settings_sessions (expires_at);
