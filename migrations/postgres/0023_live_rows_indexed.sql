-- The write path (issue 14): the messages' idempotency key and provider SID are indexed only
-- where they are set.
--
-- PostgreSQL indexes NULLs, and an UPDATE that changes an indexed column (every status change
-- does) adds an entry to every index of the table. So every version of every message had an
-- entry under `idempotency_key` (almost always NULL) and under `provider_sid` (NULL until sent),
-- though keys and SIDs are only ever looked up by value. Both UNIQUE constraints become unique
-- indexes WHERE ... IS NOT NULL: uniqueness is as before (NULLs never conflicted), a lookup by
-- key or SID (`= $1`) implies the value is not NULL so the planner uses them, and the insert that
-- names a key infers its index with `ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT
-- NULL` (src/store/portable/messages.rs). Each version of a message writes one or two index
-- entries fewer (two while it is queued or sending, one once it has a SID).
--
-- `messages_due (status, next_attempt_at)` stays whole, though only queued and sending messages
-- are claimed through it: the metrics' count by status reads it instead of the table (made
-- partial, in a first form of this migration, the count read the whole table every 15 s).
--
-- Like every migration here it runs in one transaction: `messages` is locked while the two
-- indexes are built (the time to read the table and sort what it indexes), so on a large
-- deployment run it at a quiet time; `CREATE INDEX CONCURRENTLY` cannot run in a transaction.
--
-- SQLite's 0023 changes nothing: its UNIQUE columns cannot be dropped without rebuilding the
-- table, and its writer is not bound by index writes (dropping `messages_due` altogether did not
-- move its `send-otp` rate; see the README).

ALTER TABLE messages DROP CONSTRAINT messages_idempotency_key_key;
CREATE UNIQUE INDEX messages_idempotency_key ON messages (idempotency_key)
    WHERE idempotency_key IS NOT NULL;

ALTER TABLE messages DROP CONSTRAINT messages_provider_sid_key;
CREATE UNIQUE INDEX messages_provider_sid ON messages (provider_sid)
    WHERE provider_sid IS NOT NULL;
