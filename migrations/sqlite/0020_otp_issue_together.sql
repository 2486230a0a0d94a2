-- The write path (issue 14): PostgreSQL's migration 20 decides and writes most of an OTP batch's
-- codes in one statement; SQLite's writer runs its statements in Rust
-- (`src/store/sqlite/hot_writes.rs`), where a statement costs no executor start. This keeps the
-- two backends' versions matching.
SELECT 1;
