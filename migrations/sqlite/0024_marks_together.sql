-- The write path (issue 14): PostgreSQL's migration 24 marks a batch's messages `sending` with
-- one statement; SQLite's writer runs its statements in Rust (`src/store/sqlite/hot_writes.rs`).
-- This keeps the two backends' versions matching.
SELECT 1;
