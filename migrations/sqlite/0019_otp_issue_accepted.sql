-- The write path (issue 14): PostgreSQL's migration 19 lets its OTP batch write an in-process
-- provider's send where it ends. SQLite's writer does the same in Rust
-- (`src/store/sqlite/hot_writes.rs`, `store::INSERT_OTP_MESSAGE`); this keeps the two backends'
-- versions matching.
SELECT 1;
