-- Erasure: the consent audit trail stays append-only in meaning, but an erased user's rows are
-- anonymised in place (user id replaced by its keyed hash, number, IP and user agent removed).
-- The trigger lets exactly that change through; anything else still fails.
DROP TRIGGER consent_audit_trail_no_update;
CREATE TRIGGER consent_audit_trail_no_update BEFORE UPDATE ON consent_audit_trail
WHEN NOT (
    OLD.user_id NOT LIKE 'erased:%' AND NEW.user_id LIKE 'erased:%'
    AND NEW.id = OLD.id AND NEW.field = OLD.field AND NEW.source = OLD.source
    AND NEW.created_at = OLD.created_at AND NEW.ip IS NULL AND NEW.user_agent IS NULL
    AND ((OLD.field = 'phone_number' AND NEW.old_value IS NULL AND NEW.new_value IS NULL)
         OR (OLD.field <> 'phone_number'
             AND NEW.old_value IS OLD.old_value AND NEW.new_value IS OLD.new_value))
)
BEGIN
    SELECT RAISE(ABORT, 'consent_audit_trail is append-only');
END;

-- One row per erasure: who (a keyed hash of the user id), when, and at whose request.
CREATE TABLE erasures (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    user_hash TEXT NOT NULL,
    erased_at TEXT NOT NULL,
    erased_by TEXT NOT NULL
);
