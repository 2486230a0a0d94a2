-- The write path (issue 14): the dispatcher claims in index order instead of sorting the whole due
-- queue on every claim (which made dispatch slower the longer the queue). OTPs go first; a queued
-- OTP is rare (codes are sent as they are written), so this index is usually empty and costs the
-- OTP path no writes.
CREATE INDEX messages_due_otp ON messages (next_attempt_at)
    WHERE status = 'queued' AND template_name = 'otp';
