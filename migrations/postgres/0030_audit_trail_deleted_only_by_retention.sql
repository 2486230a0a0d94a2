-- The consent audit trail is append-only (DESIGN: no update, no delete outside retention). Its
-- update trigger (0001, 0013) was there; nothing stopped a delete. A row may now be deleted only
-- while the deleting transaction has said, in `audit_deletion_allowed`, up to when rows may go:
-- the retention run inserts its cutoff, deletes a batch older than it, and clears the row again,
-- all in one transaction (another transaction's row is not visible to it). Any other delete (a
-- stray statement, a bug) fails.
CREATE TABLE audit_deletion_allowed (
    before TIMESTAMPTZ NOT NULL
);
CREATE FUNCTION consent_audit_trail_delete_guard() RETURNS trigger AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM audit_deletion_allowed WHERE OLD.created_at < before) THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'consent_audit_trail is append-only: rows leave it only at the end of retention';
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER consent_audit_trail_no_delete BEFORE DELETE ON consent_audit_trail
    FOR EACH ROW EXECUTE FUNCTION consent_audit_trail_delete_guard();
