-- The write path (issue 14): PostgreSQL's migration 29 restates its OTP batch function with a
-- leaner statement for the common code; SQLite issues codes on its writer thread
-- (`src/store/sqlite/`). This keeps the two backends' versions matching.
SELECT 1;
