-- The write path (issue 14): the messages' secondary indexes hold only the rows they are
-- searched for, so a message written already finished (a mock-mode code, `delivered` at once)
-- and each later version of a sent message no longer add an entry to each of them.
--
-- PostgreSQL indexes NULLs, and an UPDATE that changes an indexed column (every status change
-- does) adds an entry to every index of the table. So every version of every message had an
-- entry under `idempotency_key` (almost always NULL), under `provider_sid` (NULL until sent) and
-- under `messages_due` (whatever its status), though only queued and sending messages are ever
-- searched for by status, and keys and SIDs only by value. An OTP batch writes about twenty
-- index entries per code; this removes two or three of them (a code's `delivered` row has a
-- SID), and one to three from each version a dispatched message goes through.
--
-- The claims (`store::claim_sql`) name `status = 'queued'` or `status = 'sending'` and order by
-- `next_attempt_at`, as the partial indexes do; a lookup by key or SID (`= $1`) implies the
-- value is not NULL, so the planner uses the partial unique indexes for it; the insert that
-- names a key infers its index with `ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT
-- NULL` (src/store/portable/messages.rs). Uniqueness is as before: NULLs never conflicted.
--
-- Like every migration here it runs in one transaction: `messages` is locked while the four
-- indexes are built (the time to read the table four times and sort what it indexes), so on a
-- large deployment run it at a quiet time; `CREATE INDEX CONCURRENTLY` cannot run in a
-- transaction.
--
-- SQLite's 0023 changes nothing: measured there, dropping `messages_due` altogether did not move
-- the `send-otp` rate (its writer is not bound by index writes; see the README), and its UNIQUE
-- columns cannot be dropped without rebuilding the table.

DROP INDEX messages_due;
CREATE INDEX messages_queued ON messages (next_attempt_at) WHERE status = 'queued';
CREATE INDEX messages_sending ON messages (next_attempt_at) WHERE status = 'sending';

ALTER TABLE messages DROP CONSTRAINT messages_idempotency_key_key;
CREATE UNIQUE INDEX messages_idempotency_key ON messages (idempotency_key)
    WHERE idempotency_key IS NOT NULL;

ALTER TABLE messages DROP CONSTRAINT messages_provider_sid_key;
CREATE UNIQUE INDEX messages_provider_sid ON messages (provider_sid)
    WHERE provider_sid IS NOT NULL;
