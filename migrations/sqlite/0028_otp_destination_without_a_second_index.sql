-- Where a code went is logged without a second index entry for the common code (issue 14's
-- write path, after migration 27).
--
-- Migration 27 logged every code that goes out under the blind index of the number it went to
-- (`send_to_index`, indexed with `created_at`), so every code wrote one more index entry, under a
-- random key (one more page in the log at each commit), though nearly every code goes to the
-- number named, whose blind index the row already holds (`phone_index`, indexed).
--
-- Now a code that goes out to the number named is marked `went_to_named` (found through
-- `phone_index`), and only a code that goes out to a number on file in place of the number named
-- records that number's blind index; the index on it holds only those rows. A number's codes,
-- for its own limits (`OTP_CHECKS`' destination reads), are the rows with its index in
-- `send_to_index` and the rows with its index in `phone_index` marked `went_to_named`.
ALTER TABLE otp_send_log ADD COLUMN went_to_named INTEGER NOT NULL DEFAULT 0;
UPDATE otp_send_log SET went_to_named = 1, send_to_index = NULL WHERE send_to_index = phone_index;
DROP INDEX otp_send_log_send_to;
CREATE INDEX otp_send_log_send_to ON otp_send_log (send_to_index, created_at)
WHERE send_to_index IS NOT NULL;
