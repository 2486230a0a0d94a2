-- Where a code went is logged without a second index entry for the common code (issue 14's
-- write path, after migration 27).
--
-- Migration 27 logged every code that goes out under the blind index of the number it went to
-- (`send_to_index`, indexed with `created_at`), so every code wrote one more index entry, under a
-- random key, though nearly every code goes to the number named, whose blind index the row
-- already holds (`phone_index`, indexed). Measured on SQLite, where each such entry is one more
-- page in the log at each commit, that cost about a tenth of `send-otp`'s rate.
--
-- Now a code that goes out to the number named is marked `went_to_named` (no index of its own:
-- it is found through `phone_index`), and only a code that goes out to a number on file in
-- place of the number named records that number's blind index; the index on it holds only
-- those rows. A number's codes, for its own limits (`OTP_CHECKS`' destination reads, and this
-- function's), are the rows with its index in `send_to_index` and the rows with its index in
-- `phone_index` marked `went_to_named`. Those reads now run only for a code about to go out to
-- a number on file in place of the number named, the only code they decide.
--
-- `otp_issue_batch` is migration 27's, restated with those reads and that row.

ALTER TABLE otp_send_log ADD COLUMN went_to_named BOOLEAN NOT NULL DEFAULT FALSE;
UPDATE otp_send_log SET went_to_named = TRUE, send_to_index = NULL
WHERE send_to_index = phone_index;
DROP INDEX otp_send_log_send_to;
CREATE INDEX otp_send_log_send_to ON otp_send_log (send_to_index, created_at)
WHERE send_to_index IS NOT NULL;

CREATE OR REPLACE FUNCTION otp_issue_batch(p_lock_keys TEXT[], p_jobs JSONB) RETURNS TABLE (
    n BIGINT,
    outcome TEXT,
    last_send TIMESTAMPTZ,
    number_full TIMESTAMPTZ,
    user_full TIMESTAMPTZ,
    address_full TIMESTAMPTZ,
    named_opted_out BOOLEAN,
    send_to_opted_out BOOLEAN,
    -- The number on file the code went to instead of the number named (sealed), if it did.
    redirected_to TEXT
) LANGUAGE plpgsql AS $$
DECLARE
    j RECORD;
    r RECORD;
    file_number TEXT;
    file_index TEXT;
    elsewhere BOOLEAN;
    dest_index TEXT;
    dest_last TIMESTAMPTZ;
    dest_full TIMESTAMPTZ;
    v_locked TEXT[];
    v_together BIGINT[] := '{}';
    taken_senders TEXT[] := '{}';
    taken_now_us BIGINT[] := '{}';
    taken_interval_us BIGINT[] := '{}';
BEGIN
    -- The service's keys, and those of the numbers on file that `unless_on_file` jobs may go
    -- to, in the service's order (byte order).
    v_locked := ARRAY(
        SELECT k.key FROM (
            SELECT unnest(p_lock_keys) AS key
            UNION
            SELECT 'otp:phone:' || c.phone_index
            FROM otp_batch_jobs(p_jobs) b JOIN messaging_consent c ON c.user_id = b.user_id
            WHERE b.unless_on_file AND c.phone_index IS NOT NULL
        ) k ORDER BY k.key COLLATE "C");
    PERFORM lock_keys_in_order(v_locked);

    -- Jobs that share no number named, number sent to, user or address with another job of the
    -- batch: decided and written together, one statement for all of them. None can see
    -- another's writes here (one snapshot), and none needs to: their limits and opt-outs are
    -- about different rows. The events are inserted in job order and, within a message, in the
    -- VALUES' order (their ids).
    FOR r IN
        WITH jobs AS MATERIALIZED (SELECT * FROM otp_batch_jobs(p_jobs)
        ), on_file AS MATERIALIZED (
            -- The number on file of a job planned `unless_on_file`: one primary-key probe each.
            SELECT k.*, f.file_number, f.file_index,
                f.file_number IS NOT NULL AND f.file_index IS DISTINCT FROM k.send_to_index
                    AS elsewhere
            FROM jobs k LEFT JOIN LATERAL (
                SELECT c.phone_number AS file_number, c.phone_index AS file_index
                FROM messaging_consent c WHERE k.unless_on_file AND c.user_id = k.user_id
            ) f ON TRUE
        ), routed AS MATERIALIZED (
            -- Where each code goes: the number planned, or the number on file instead.
            SELECT o.*,
                CASE WHEN o.elsewhere THEN o.file_index ELSE o.send_to_index END AS d_index,
                CASE WHEN o.elsewhere THEN o.file_number ELSE o.code_to END AS d_code_to,
                CASE WHEN o.elsewhere AND o.to_number IS NOT NULL THEN o.file_number
                     ELSE o.to_number END AS d_to_number,
                CASE WHEN o.elsewhere AND o.to_index IS NOT NULL THEN o.file_index
                     ELSE o.to_index END AS d_to_index
            FROM on_file o
        ), alone AS MATERIALIZED (
            SELECT w.* FROM (
                SELECT t.*,
                    count(*) OVER (PARTITION BY t.phone_index) > 1
                    OR count(*) OVER (PARTITION BY t.user_id) > 1
                    OR (t.ip IS NOT NULL AND count(*) OVER (PARTITION BY t.ip) > 1)
                    OR count(*) OVER (PARTITION BY t.d_index) > 1 AS in_common
                FROM routed t
            ) w WHERE NOT w.in_common
        ), checked AS MATERIALIZED (
            SELECT k.*,
                (SELECT l.created_at FROM otp_send_log l WHERE l.phone_index = k.phone_index
                 ORDER BY l.created_at DESC LIMIT 1) AS c_last_send,
                (SELECT l.created_at FROM otp_send_log l WHERE l.phone_index = k.phone_index
                 AND l.created_at > k.window_start ORDER BY l.created_at DESC
                 LIMIT 1 OFFSET k.per_number) AS c_number_full,
                (SELECT l.created_at FROM otp_send_log l WHERE l.user_id = k.user_id
                 AND l.created_at > k.window_start ORDER BY l.created_at DESC
                 LIMIT 1 OFFSET k.per_number) AS c_user_full,
                (SELECT l.created_at FROM otp_send_log l WHERE l.ip = k.ip
                 AND l.created_at > k.window_start ORDER BY l.created_at DESC
                 LIMIT 1 OFFSET k.per_address) AS c_address_full,
                EXISTS (SELECT 1 FROM opt_outs o WHERE o.phone_index = k.phone_index
                        AND o.channel = k.channel) AS c_named_opted_out,
                EXISTS (SELECT 1 FROM opt_outs o WHERE o.phone_index = k.d_index
                        AND o.channel = k.channel) AS c_send_to_opted_out,
                CASE WHEN k.attempt_started IS NOT NULL
                     AND k.d_index IS DISTINCT FROM k.phone_index THEN GREATEST(
                    (SELECT l.created_at FROM otp_send_log l WHERE l.send_to_index = k.d_index
                     ORDER BY l.created_at DESC LIMIT 1),
                    (SELECT l.created_at FROM otp_send_log l WHERE l.phone_index = k.d_index
                     AND l.went_to_named ORDER BY l.created_at DESC LIMIT 1)) END AS c_dest_last,
                CASE WHEN k.attempt_started IS NOT NULL
                     AND k.d_index IS DISTINCT FROM k.phone_index THEN (
                    SELECT u.t FROM (
                        SELECT l.created_at AS t FROM otp_send_log l
                        WHERE l.send_to_index = k.d_index AND l.created_at > k.window_start
                        UNION ALL
                        SELECT l.created_at FROM otp_send_log l WHERE l.phone_index = k.d_index
                        AND l.went_to_named AND l.created_at > k.window_start
                    ) u ORDER BY u.t DESC LIMIT 1 OFFSET k.per_number) END AS c_dest_full
            FROM alone k
        ), decided AS MATERIALIZED (
            SELECT c.*, CASE
                WHEN c.refuse_all OR c.c_last_send > c.cooldown_after
                     OR c.c_number_full IS NOT NULL OR c.c_user_full IS NOT NULL
                     OR (c.ip IS NOT NULL AND c.c_address_full IS NOT NULL) THEN 'rate_limited'
                WHEN c.elsewhere AND (c.file_index IS NULL
                     OR NOT ('otp:phone:' || c.file_index) = ANY(v_locked))
                     THEN 'on_file_elsewhere'
                WHEN c.c_named_opted_out OR c.c_send_to_opted_out THEN 'opted_out'
                WHEN c.attempt_started IS NOT NULL AND c.d_index IS DISTINCT FROM c.phone_index
                     AND (c.c_dest_last > c.cooldown_after OR c.c_dest_full IS NOT NULL)
                     THEN 'destination_limited'
                ELSE 'issued' END AS c_outcome
            FROM checked c
        ), logged AS (
            INSERT INTO otp_send_log (phone_number, user_id, ip, created_at, phone_index,
                send_to_index, went_to_named)
            SELECT d.sealed_phone, d.user_id, d.ip, d.now, d.phone_index,
                CASE WHEN d.c_outcome = 'issued' AND d.attempt_started IS NOT NULL
                     AND d.d_index IS DISTINCT FROM d.phone_index THEN d.d_index END,
                d.c_outcome = 'issued' AND d.attempt_started IS NOT NULL
                    AND d.d_index IS NOT DISTINCT FROM d.phone_index
            FROM decided d WHERE d.c_outcome IN ('opted_out', 'destination_limited', 'issued')
            ORDER BY d.n
        ), to_write AS (
            -- Issued codes and dropped ones: a dropped code is written as an issued one, but
            -- for its send.
            SELECT d.*, d.c_outcome = 'destination_limited' AS dropped
            FROM decided d WHERE d.c_outcome IN ('issued', 'destination_limited')
        ), written AS (
            INSERT INTO messages (id, user_id, template_name, variables, channel, status, attempts,
                idempotency_key, next_attempt_at, lease_until, created_at, updated_at, to_number,
                to_index, encoding, segments, attempt_started_at, attempt_body, lookup_needed,
                provider_sid)
            SELECT w.message_id, w.user_id, w.template, w.variables,
                CASE WHEN w.dropped THEN w.channel ELSE w.message_channel END,
                CASE WHEN w.dropped THEN 'sending' ELSE w.status END,
                CASE WHEN w.dropped OR w.attempt_started IS NULL THEN 0 ELSE 1 END, NULL,
                w.created_at, CASE WHEN w.dropped THEN w.claimed_until ELSE w.lease END,
                w.created_at, w.created_at,
                CASE WHEN NOT w.dropped THEN w.d_to_number END,
                CASE WHEN NOT w.dropped THEN w.d_to_index END,
                CASE WHEN NOT w.dropped THEN w.encoding END,
                CASE WHEN NOT w.dropped THEN w.segments END,
                CASE WHEN NOT w.dropped THEN w.attempt_started END,
                CASE WHEN NOT w.dropped THEN w.body END, FALSE,
                CASE WHEN NOT w.dropped THEN w.sid END
            FROM to_write w ORDER BY w.n
        ), evented AS (
            INSERT INTO message_events (message_id, status, error_code, detail, occurred_at)
            SELECT d.message_id, e.status, NULL, e.detail, d.created_at
            FROM decided d CROSS JOIN LATERAL (VALUES
                    (1, 'sending', NULL, TRUE),
                    (2, 'sent', NULL, d.sid IS NOT NULL),
                    (3, d.news, 'provider answer', d.sid IS NOT NULL AND d.news IS NOT NULL))
                AS e(ord, status, detail, wanted)
            WHERE d.c_outcome = 'issued' AND d.attempt_started IS NOT NULL AND e.wanted
            ORDER BY d.n, e.ord
        ), forgiven AS (
            DELETE FROM otp_failures f USING to_write w
            WHERE f.user_id = w.user_id AND f.purpose = w.purpose
        ), coded AS (
            INSERT INTO otp_codes (user_id, purpose, phone_number, channel, code_hash, attempts,
                expires_at, used_at, message_id, created_at)
            SELECT w.user_id, w.purpose, w.d_code_to, w.channel, w.code_hash, 0, w.expires_at,
                NULL, w.message_id, w.now
            FROM to_write w ORDER BY w.n
            ON CONFLICT (user_id, purpose) DO UPDATE SET phone_number = excluded.phone_number,
                channel = excluded.channel, code_hash = excluded.code_hash, attempts = 0,
                expires_at = excluded.expires_at, used_at = NULL,
                message_id = excluded.message_id, created_at = excluded.created_at
        )
        SELECT d.n AS job, d.c_outcome, d.c_last_send, d.c_number_full, d.c_user_full,
            d.c_address_full, d.c_named_opted_out, d.c_send_to_opted_out, d.attempt_started,
            d.slot_sender, d.slot_now_us, d.slot_interval_us,
            CASE WHEN d.c_outcome = 'issued' AND d.elsewhere THEN d.file_number END AS c_redirected_to
        FROM decided d ORDER BY d.n
    LOOP
        n := r.job;
        outcome := r.c_outcome;
        last_send := r.c_last_send;
        number_full := r.c_number_full;
        user_full := r.c_user_full;
        address_full := r.c_address_full;
        named_opted_out := r.c_named_opted_out;
        send_to_opted_out := r.c_send_to_opted_out;
        redirected_to := r.c_redirected_to;
        IF r.c_outcome = 'issued' AND r.attempt_started IS NOT NULL
           AND r.slot_sender IS NOT NULL THEN
            taken_senders := taken_senders || r.slot_sender;
            taken_now_us := taken_now_us || r.slot_now_us;
            taken_interval_us := taken_interval_us || r.slot_interval_us;
        END IF;
        v_together := v_together || r.job;
        RETURN NEXT;
    END LOOP;

    -- Jobs that share a number, user or address: one at a time in the order they came, each
    -- seeing what the ones before it wrote.
    IF cardinality(v_together) < jsonb_array_length(p_jobs) THEN
        FOR j IN SELECT * FROM otp_batch_jobs(p_jobs) b
                 WHERE NOT (b.n = ANY(v_together)) ORDER BY b.n LOOP
            n := j.n;
            redirected_to := NULL;
            file_number := NULL;
            file_index := NULL;
            IF j.unless_on_file THEN
                SELECT c.phone_number, c.phone_index INTO file_number, file_index
                FROM messaging_consent c WHERE c.user_id = j.user_id;
            END IF;
            elsewhere := file_number IS NOT NULL AND file_index IS DISTINCT FROM j.send_to_index;
            dest_index := CASE WHEN elsewhere THEN file_index ELSE j.send_to_index END;
            -- Migration 19's checks: the offsets are sub-selects so that PL/pgSQL keeps one
            -- cached plan instead of planning the statement again for every job.
            SELECT
                (SELECT l.created_at FROM otp_send_log l WHERE l.phone_index = j.phone_index
                 ORDER BY l.created_at DESC LIMIT 1),
                (SELECT l.created_at FROM otp_send_log l WHERE l.phone_index = j.phone_index
                 AND l.created_at > j.window_start ORDER BY l.created_at DESC
                 LIMIT 1 OFFSET (SELECT j.per_number)),
                (SELECT l.created_at FROM otp_send_log l WHERE l.user_id = j.user_id
                 AND l.created_at > j.window_start ORDER BY l.created_at DESC
                 LIMIT 1 OFFSET (SELECT j.per_number)),
                (SELECT l.created_at FROM otp_send_log l WHERE l.ip = j.ip
                 AND l.created_at > j.window_start ORDER BY l.created_at DESC
                 LIMIT 1 OFFSET (SELECT j.per_address)),
                EXISTS (SELECT 1 FROM opt_outs o WHERE o.phone_index = j.phone_index
                        AND o.channel = j.channel),
                EXISTS (SELECT 1 FROM opt_outs o WHERE o.phone_index = dest_index
                        AND o.channel = j.channel),
                CASE WHEN j.attempt_started IS NOT NULL
                     AND dest_index IS DISTINCT FROM j.phone_index THEN GREATEST(
                    (SELECT l.created_at FROM otp_send_log l WHERE l.send_to_index = dest_index
                     ORDER BY l.created_at DESC LIMIT 1),
                    (SELECT l.created_at FROM otp_send_log l WHERE l.phone_index = dest_index
                     AND l.went_to_named ORDER BY l.created_at DESC LIMIT 1)) END,
                CASE WHEN j.attempt_started IS NOT NULL
                     AND dest_index IS DISTINCT FROM j.phone_index THEN (
                    SELECT u.t FROM (
                        SELECT l.created_at AS t FROM otp_send_log l
                        WHERE l.send_to_index = dest_index AND l.created_at > j.window_start
                        UNION ALL
                        SELECT l.created_at FROM otp_send_log l WHERE l.phone_index = dest_index
                        AND l.went_to_named AND l.created_at > j.window_start
                    ) u ORDER BY u.t DESC LIMIT 1 OFFSET (SELECT j.per_number)) END
            INTO last_send, number_full, user_full, address_full, named_opted_out,
                send_to_opted_out, dest_last, dest_full;

            IF j.refuse_all OR last_send > j.cooldown_after OR number_full IS NOT NULL
               OR user_full IS NOT NULL OR (j.ip IS NOT NULL AND address_full IS NOT NULL) THEN
                outcome := 'rate_limited';
                RETURN NEXT;
                CONTINUE;
            END IF;

            IF elsewhere AND (file_index IS NULL
               OR NOT ('otp:phone:' || file_index) = ANY(v_locked)) THEN
                outcome := 'on_file_elsewhere';
                RETURN NEXT;
                CONTINUE;
            END IF;

            IF named_opted_out OR send_to_opted_out THEN
                outcome := 'opted_out';
            ELSIF j.attempt_started IS NOT NULL AND dest_index IS DISTINCT FROM j.phone_index
                  AND (dest_last > j.cooldown_after OR dest_full IS NOT NULL) THEN
                outcome := 'destination_limited';
            ELSE
                outcome := 'issued';
            END IF;

            INSERT INTO otp_send_log (phone_number, user_id, ip, created_at, phone_index,
                send_to_index, went_to_named)
            VALUES (j.sealed_phone, j.user_id, j.ip, j.now, j.phone_index,
                CASE WHEN outcome = 'issued' AND j.attempt_started IS NOT NULL
                     AND dest_index IS DISTINCT FROM j.phone_index THEN dest_index END,
                outcome = 'issued' AND j.attempt_started IS NOT NULL
                    AND dest_index IS NOT DISTINCT FROM j.phone_index);

            IF outcome = 'opted_out' THEN
                RETURN NEXT;
                CONTINUE;
            END IF;

            IF outcome = 'destination_limited' THEN
                -- Written as an issued code, but for its send (`OtpIssue::dropped_record`).
                INSERT INTO messages (id, user_id, template_name, variables, channel, status,
                    attempts, idempotency_key, next_attempt_at, lease_until, created_at,
                    updated_at, to_number, to_index, encoding, segments, attempt_started_at,
                    attempt_body, lookup_needed, provider_sid)
                VALUES (j.message_id, j.user_id, j.template, j.variables, j.channel, 'sending', 0,
                    NULL, j.created_at, j.claimed_until, j.created_at, j.created_at, NULL, NULL,
                    NULL, NULL, NULL, NULL, FALSE, NULL);
            ELSE
                -- `store::INSERT_OTP_MESSAGE`: `status`, `lease` and `sid` as
                -- `OtpIssue::written_status`, `written_lease` and `accepted` give them.
                INSERT INTO messages (id, user_id, template_name, variables, channel, status,
                    attempts, idempotency_key, next_attempt_at, lease_until, created_at,
                    updated_at, to_number, to_index, encoding, segments, attempt_started_at,
                    attempt_body, lookup_needed, provider_sid)
                VALUES (j.message_id, j.user_id, j.template, j.variables, j.message_channel,
                    j.status, CASE WHEN j.attempt_started IS NULL THEN 0 ELSE 1 END, NULL,
                    j.created_at, j.lease, j.created_at, j.created_at,
                    CASE WHEN elsewhere AND j.to_number IS NOT NULL THEN file_number
                         ELSE j.to_number END,
                    CASE WHEN elsewhere AND j.to_index IS NOT NULL THEN file_index
                         ELSE j.to_index END,
                    j.encoding, j.segments, j.attempt_started, j.body, FALSE, j.sid);
            END IF;

            IF outcome = 'issued' AND j.attempt_started IS NOT NULL THEN
                -- `sending`, and an accepted send's (`accepted_events`) `sent` and news (above).
                INSERT INTO message_events (message_id, status, error_code, detail, occurred_at)
                SELECT j.message_id, e.status, NULL, e.detail, j.created_at
                FROM (VALUES ('sending', NULL, TRUE),
                             ('sent', NULL, j.sid IS NOT NULL),
                             (j.news, 'provider answer', j.sid IS NOT NULL AND j.news IS NOT NULL))
                    AS e(status, detail, wanted)
                WHERE e.wanted;
                IF j.slot_sender IS NOT NULL THEN
                    taken_senders := taken_senders || j.slot_sender;
                    taken_now_us := taken_now_us || j.slot_now_us;
                    taken_interval_us := taken_interval_us || j.slot_interval_us;
                END IF;
            END IF;

            INSERT INTO otp_codes (user_id, purpose, phone_number, channel, code_hash, attempts,
                expires_at, used_at, message_id, created_at)
            VALUES (j.user_id, j.purpose, CASE WHEN elsewhere THEN file_number ELSE j.code_to END,
                j.channel, j.code_hash, 0, j.expires_at, NULL, j.message_id, j.now)
            ON CONFLICT (user_id, purpose) DO UPDATE SET phone_number = excluded.phone_number,
                channel = excluded.channel, code_hash = excluded.code_hash, attempts = 0,
                expires_at = excluded.expires_at, used_at = NULL, message_id = excluded.message_id,
                created_at = excluded.created_at;

            -- A new code starts a new count of wrong tries.
            DELETE FROM otp_failures f WHERE f.user_id = j.user_id AND f.purpose = j.purpose;

            redirected_to := CASE WHEN outcome = 'issued' AND elsewhere THEN file_number END;
            RETURN NEXT;
        END LOOP;
    END IF;
    PERFORM send_rate_take_batch(taken_senders, taken_now_us, taken_interval_us);
END
$$;
