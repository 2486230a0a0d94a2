-- Encryption at rest (issue 12). Numbers, message variables and bodies, and reply bodies are
-- stored sealed (AES-256-GCM, see src/vault.rs); lookups by number go through a keyed blind
-- index. The values are sealed by the service itself right after this migration, before it
-- serves (SQL has no key): this only makes room for the indexes.

-- What the database remembers about its blind index key, so it never changes under it.
CREATE TABLE vault_meta (
    name  TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);

ALTER TABLE messaging_consent ADD COLUMN phone_index TEXT;
DROP INDEX IF EXISTS messaging_consent_phone;
CREATE INDEX messaging_consent_phone_index ON messaging_consent (phone_index);

ALTER TABLE messages ADD COLUMN to_index TEXT;
DROP INDEX IF EXISTS messages_to_number;
CREATE INDEX messages_to_index ON messages (to_index, created_at);

ALTER TABLE otp_send_log ADD COLUMN phone_index TEXT;
DROP INDEX IF EXISTS otp_send_log_phone;
CREATE INDEX otp_send_log_phone_index ON otp_send_log (phone_index, created_at);

-- Opt-outs and WhatsApp windows belong to a number and keep no number: their key becomes the
-- number's blind index (clear keys are replaced by the service's pass).
ALTER TABLE opt_outs RENAME COLUMN phone_number TO phone_index;
ALTER TABLE whatsapp_sessions RENAME COLUMN phone_number TO phone_index;

-- The consent audit trail stays append-only in meaning. Besides anonymisation at erasure, the
-- one change allowed is re-sealing a number's row under another key: every other column as it
-- was, and each value either unchanged or newly sealed under a different key id than before.
DROP TRIGGER consent_audit_trail_no_update;
CREATE TRIGGER consent_audit_trail_no_update BEFORE UPDATE ON consent_audit_trail
WHEN NOT (
    (OLD.user_id NOT LIKE 'erased:%' AND NEW.user_id LIKE 'erased:%'
        AND NEW.id = OLD.id AND NEW.field = OLD.field AND NEW.source = OLD.source
        AND NEW.created_at = OLD.created_at AND NEW.ip IS NULL AND NEW.user_agent IS NULL
        AND ((OLD.field = 'phone_number' AND NEW.old_value IS NULL AND NEW.new_value IS NULL)
             OR (OLD.field <> 'phone_number'
                 AND NEW.old_value IS OLD.old_value AND NEW.new_value IS OLD.new_value)))
    OR (OLD.field = 'phone_number'
        AND NEW.id = OLD.id AND NEW.user_id = OLD.user_id AND NEW.field = OLD.field
        AND NEW.source = OLD.source AND NEW.created_at = OLD.created_at
        AND NEW.ip IS OLD.ip AND NEW.user_agent IS OLD.user_agent
        AND (NEW.old_value IS OLD.old_value
             OR (NEW.old_value LIKE 'enc1:%' AND (OLD.old_value NOT LIKE 'enc1:%'
                 OR substr(OLD.old_value, 1, 22) <> substr(NEW.old_value, 1, 22))))
        AND (NEW.new_value IS OLD.new_value
             OR (NEW.new_value LIKE 'enc1:%' AND (OLD.new_value NOT LIKE 'enc1:%'
                 OR substr(OLD.new_value, 1, 22) <> substr(NEW.new_value, 1, 22)))))
)
BEGIN
    SELECT RAISE(ABORT, 'consent_audit_trail is append-only');
END;
