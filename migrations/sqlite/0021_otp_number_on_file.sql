-- The write path (issue 14): PostgreSQL's migration 21 checks a code's number on file inside its
-- OTP batch; SQLite reads it inline before the write (a reader connection, no round trip), as
-- before. This keeps the two backends' versions matching.
SELECT 1;
