-- The write path (issue 14): PostgreSQL's migration 23 indexes the messages' idempotency key and
-- provider SID only where they are set. SQLite's stay whole: its UNIQUE columns cannot be dropped
-- without rebuilding the table, and its writer is not bound by index writes. This keeps the two
-- backends' versions matching.
SELECT 1;
