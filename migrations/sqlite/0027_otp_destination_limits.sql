-- Codes are limited by the number they go to, not only by the number named (issue 14's follow-up
-- to the right-person work of issue 9).
--
-- A code for any purpose but `verification` goes to the user's number on file, whatever number
-- the request names; the send log counted the number named. So one phone could get the hour's
-- codes through every account that has it on file, plus the hour's codes naming it directly,
-- with no cooldown between the routes. Each code that goes out now also records the blind index
-- of the number it went to, and a code going to a number on file in place of the number named,
-- while that number had its cooldown's or hour's codes (whichever way they were asked for), is
-- dropped (logged against the number named, the user and the address, as any send is, and
-- answered as a send). It must be silent: a 429 would tell the caller that the number they named
-- is someone's number on file, or whose. A code to the number named stays held by that number's
-- own limits only.
ALTER TABLE otp_send_log ADD COLUMN send_to_index TEXT;
CREATE INDEX otp_send_log_send_to ON otp_send_log (send_to_index, created_at);
