-- The write path (issue 14): PostgreSQL's migration 20 inserts an issued code's events in one
-- statement inside its OTP batch function; SQLite's writer runs its statements in Rust
-- (`src/store/sqlite/hot_writes.rs`). This keeps the two backends' versions matching.
SELECT 1;
