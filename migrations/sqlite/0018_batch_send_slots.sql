-- The write path (issue 14): PostgreSQL's migration 18 makes a batch take its send slots at its
-- end (a row lock held for the commit only). SQLite's writer has no row lock to wait on, so
-- nothing changes here; this keeps the two backends' versions matching.
SELECT 1;
