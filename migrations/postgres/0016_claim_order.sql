-- The write path (issue 14): the dispatcher claims in index order instead of sorting the whole due
-- queue on every claim (which made dispatch slower the longer the queue). OTPs go first; a queued
-- OTP is rare (codes are sent as they are written), so this index is usually empty and costs the
-- OTP path no writes. Its leading columns are the query's equalities, so SQLite's planner (which
-- keeps no statistics here) prefers it to `messages_due` for that claim.
CREATE INDEX messages_due_otp ON messages (template_name, status, next_attempt_at)
    WHERE status = 'queued' AND template_name = 'otp';
