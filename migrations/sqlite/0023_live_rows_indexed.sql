-- The write path (issue 14): PostgreSQL's migration 23 makes the messages' status, key and SID
-- indexes partial (only the rows each is searched for). SQLite's stay whole: dropping
-- `messages_due` did not move SQLite's `send-otp` rate when measured (its writer is not bound by
-- index writes), and its UNIQUE columns cannot be dropped without rebuilding the table. This
-- keeps the two backends' versions matching.
SELECT 1;
