-- The consent audit trail is append-only (DESIGN: no update, no delete outside retention). Its
-- update trigger (0013) was there; nothing stopped a delete. A row may now be deleted only while
-- the deleting transaction has said, in `audit_deletion_allowed`, up to when rows may go: the
-- retention run inserts its cutoff, deletes a batch older than it, and clears the row again,
-- all in one transaction. Any other delete (a stray statement, a bug) fails.
CREATE TABLE audit_deletion_allowed (
    before TEXT NOT NULL
);
CREATE TRIGGER consent_audit_trail_no_delete BEFORE DELETE ON consent_audit_trail
WHEN NOT EXISTS (SELECT 1 FROM audit_deletion_allowed WHERE OLD.created_at < before)
BEGIN
    SELECT RAISE(ABORT, 'consent_audit_trail is append-only: rows leave it only at the end of retention');
END;
