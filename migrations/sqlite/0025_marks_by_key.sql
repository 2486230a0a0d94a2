-- The write path (issue 14): PostgreSQL's migration 25 rewrites its mark batch function so its
-- messages are found by primary key; SQLite's writer marks messages in Rust
-- (`src/store/sqlite/hot_writes.rs`). This keeps the two backends' versions matching.
SELECT 1;
