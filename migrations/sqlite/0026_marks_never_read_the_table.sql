-- The write path (issue 14): PostgreSQL's migration 26 sets how its mark batch function is
-- planned; SQLite's writer marks messages in Rust (`src/store/sqlite/hot_writes.rs`). This keeps
-- the two backends' versions matching.
SELECT 1;
