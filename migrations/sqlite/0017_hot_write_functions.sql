-- The write path (issue 14): PostgreSQL's migration 17 adds its hot writes as functions (one
-- round trip each). SQLite runs them on its writer thread instead (`src/store/sqlite/`), so
-- nothing changes here; this keeps the two backends' versions matching.
SELECT 1;
