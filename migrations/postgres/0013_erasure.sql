-- Erasure: the consent audit trail stays append-only in meaning, but an erased user's rows are
-- anonymised in place (user id replaced by its keyed hash, number, IP and user agent removed).
-- The trigger lets exactly that change through; anything else still fails.
CREATE OR REPLACE FUNCTION consent_audit_trail_append_only() RETURNS trigger AS $$
BEGIN
    IF OLD.user_id NOT LIKE 'erased:%' AND NEW.user_id LIKE 'erased:%'
        AND NEW.id = OLD.id AND NEW.field = OLD.field AND NEW.source = OLD.source
        AND NEW.created_at = OLD.created_at AND NEW.ip IS NULL AND NEW.user_agent IS NULL
        AND ((OLD.field = 'phone_number' AND NEW.old_value IS NULL AND NEW.new_value IS NULL)
             OR (OLD.field <> 'phone_number'
                 AND NEW.old_value IS NOT DISTINCT FROM OLD.old_value
                 AND NEW.new_value IS NOT DISTINCT FROM OLD.new_value))
    THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'consent_audit_trail is append-only';
END;
$$ LANGUAGE plpgsql;

-- One row per erasure: who (a keyed hash of the user id), when, and at whose request.
CREATE TABLE erasures (
    id        BIGSERIAL PRIMARY KEY,
    user_hash TEXT NOT NULL,
    erased_at TIMESTAMPTZ NOT NULL,
    erased_by TEXT NOT NULL
);
