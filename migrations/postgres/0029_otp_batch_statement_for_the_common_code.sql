-- The common code decided and written by a leaner batch statement (issue 14's write path, after
-- migration 28). `send-otp` on PostgreSQL, 16 connections, 8-second runs alternating on one
-- machine, each on a new database: 4,008 / 4,370 / 4,674 / 5,384 / 5,220 codes/s with migration
-- 28's function against 4,850 / 5,240 / 5,370 / 5,592 / 5,609 with this one (the last three pairs:
-- means 5,093 and 5,524, +8%); the call's own time (`pg_stat_user_functions`) 0.98-1.13 ms
-- against 0.91-0.98 ms, for about nine codes a call.
--
-- The batch call is the serial stage of `send-otp` on PostgreSQL (one call of a kind at a time
-- per instance), and most of a call was fixed cost, not per code: the batch's JSON parsed three
-- times through `otp_batch_jobs` (whose windows, which find the jobs in common, ran each time),
-- and a batch statement that carried, for every job, the plan nodes for the rare routes: a code
-- going to a number on file in place of the number named (`on_file_elsewhere`), and one going
-- to a number other than the number named, with that number's own limits (two sub-plans over
-- the send log's two indexes, a union and a sort, `destination_limited`).
--
-- Now:
-- - the locks' read of the numbers on file parses only the two fields it needs;
-- - the batch statement parses the jobs once itself, and takes only the jobs that go to the
--   number they were planned for and, if they are sent now, to the number named (nearly every
--   code). The rare routes go to the one-at-a-time loop after it, whose per-job statements
--   (migration 28's, unchanged) already decide them in full. A job sent there sees the batch's
--   writes, as a job sharing a number, user or address with another did already.
-- What a code is decided to be and what is written for it are unchanged.

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
            FROM jsonb_to_recordset(p_jobs) AS b(user_id TEXT, unless_on_file BOOLEAN)
            JOIN messaging_consent c ON c.user_id = b.user_id
            WHERE b.unless_on_file AND c.phone_index IS NOT NULL
        ) k ORDER BY k.key COLLATE "C");
    PERFORM lock_keys_in_order(v_locked);

    -- Jobs that share no number named, number sent to, user or address with another job of the
    -- batch, and go to the number planned and, if sent now, to the number named (no number on
    -- file elsewhere, no destination's own limits to read): decided and written together, one
    -- statement for all of them. None can see
    -- another's writes here (one snapshot), and none needs to: their limits and opt-outs are
    -- about different rows. Their events are inserted in job order and, within a message, in
    -- the VALUES' order (their ids); the loop's jobs' rows come after (higher ids), which
    -- nothing reads as an order across messages.
    FOR r IN
        WITH jobs AS MATERIALIZED (
            -- Each job with its number on file, if it is planned `unless_on_file`.
            SELECT x.*, f.file_index,
                f.file_number IS NOT NULL AND f.file_index IS DISTINCT FROM x.send_to_index
                    AS elsewhere
            FROM jsonb_to_recordset(p_jobs) AS x(
                n BIGINT, phone_index TEXT, sealed_phone TEXT, user_id TEXT, ip TEXT,
                now TIMESTAMPTZ, window_start TIMESTAMPTZ, per_number BIGINT,
                per_address BIGINT, cooldown_after TIMESTAMPTZ, refuse_all BOOLEAN,
                channel TEXT, send_to_index TEXT, message_id TEXT, template TEXT,
                variables TEXT, message_channel TEXT, created_at TIMESTAMPTZ,
                lease TIMESTAMPTZ, attempt_started TIMESTAMPTZ, to_number TEXT,
                to_index TEXT, encoding TEXT, segments BIGINT, body TEXT, slot_sender TEXT,
                slot_now_us BIGINT, slot_interval_us BIGINT, purpose TEXT, code_to TEXT,
                code_hash TEXT, expires_at TIMESTAMPTZ, status TEXT, sid TEXT, news TEXT,
                unless_on_file BOOLEAN, claimed_until TIMESTAMPTZ
            ) LEFT JOIN LATERAL (
                SELECT c.phone_number AS file_number, c.phone_index AS file_index
                FROM messaging_consent c WHERE x.unless_on_file AND c.user_id = x.user_id
            ) f ON TRUE
        ), alone AS MATERIALIZED (
            SELECT w.* FROM (
                SELECT t.*,
                    count(*) OVER (PARTITION BY t.phone_index) > 1
                    OR count(*) OVER (PARTITION BY t.user_id) > 1
                    OR (t.ip IS NOT NULL AND count(*) OVER (PARTITION BY t.ip) > 1)
                    OR count(*) OVER (PARTITION BY CASE WHEN t.elsewhere THEN t.file_index
                                                        ELSE t.send_to_index END) > 1
                    OR t.elsewhere
                    OR (t.attempt_started IS NOT NULL
                        AND t.send_to_index IS DISTINCT FROM t.phone_index) AS in_common
                FROM jobs t
            ) w WHERE NOT w.in_common
        ), decided AS MATERIALIZED (
            SELECT c.*, CASE
                WHEN c.refuse_all OR c.c_last_send > c.cooldown_after
                     OR c.c_number_full IS NOT NULL OR c.c_user_full IS NOT NULL
                     OR (c.ip IS NOT NULL AND c.c_address_full IS NOT NULL) THEN 'rate_limited'
                WHEN c.c_named_opted_out OR c.c_send_to_opted_out THEN 'opted_out'
                ELSE 'issued' END AS c_outcome
            FROM (SELECT k.*,
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
                EXISTS (SELECT 1 FROM opt_outs o WHERE o.phone_index = k.send_to_index
                        AND o.channel = k.channel) AS c_send_to_opted_out
                FROM alone k) c
        ), logged AS (
            INSERT INTO otp_send_log (phone_number, user_id, ip, created_at, phone_index,
                went_to_named)
            SELECT d.sealed_phone, d.user_id, d.ip, d.now, d.phone_index,
                d.c_outcome = 'issued' AND d.attempt_started IS NOT NULL
            FROM decided d WHERE d.c_outcome IN ('opted_out', 'issued')
            ORDER BY d.n
        ), written AS (
            INSERT INTO messages (id, user_id, template_name, variables, channel, status, attempts,
                idempotency_key, next_attempt_at, lease_until, created_at, updated_at, to_number,
                to_index, encoding, segments, attempt_started_at, attempt_body, lookup_needed,
                provider_sid)
            SELECT w.message_id, w.user_id, w.template, w.variables, w.message_channel, w.status,
                CASE WHEN w.attempt_started IS NULL THEN 0 ELSE 1 END, NULL, w.created_at,
                w.lease, w.created_at, w.created_at, w.to_number, w.to_index, w.encoding,
                w.segments, w.attempt_started, w.body, FALSE, w.sid
            FROM decided w WHERE w.c_outcome = 'issued' ORDER BY w.n
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
            DELETE FROM otp_failures f USING decided w
            WHERE w.c_outcome = 'issued' AND f.user_id = w.user_id AND f.purpose = w.purpose
        ), coded AS (
            INSERT INTO otp_codes (user_id, purpose, phone_number, channel, code_hash, attempts,
                expires_at, used_at, message_id, created_at)
            SELECT w.user_id, w.purpose, w.code_to, w.channel, w.code_hash, 0, w.expires_at,
                NULL, w.message_id, w.now
            FROM decided w WHERE w.c_outcome = 'issued' ORDER BY w.n
            ON CONFLICT (user_id, purpose) DO UPDATE SET phone_number = excluded.phone_number,
                channel = excluded.channel, code_hash = excluded.code_hash, attempts = 0,
                expires_at = excluded.expires_at, used_at = NULL,
                message_id = excluded.message_id, created_at = excluded.created_at
        )
        SELECT d.n AS job, d.c_outcome, d.c_last_send, d.c_number_full, d.c_user_full,
            d.c_address_full, d.c_named_opted_out, d.c_send_to_opted_out, d.attempt_started,
            d.slot_sender, d.slot_now_us, d.slot_interval_us, NULL::TEXT AS c_redirected_to
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

    -- Jobs that share a number, user or address, and those going to a number on file or to a
    -- number other than the number named: one at a time in the order they came, each seeing
    -- what the ones before it wrote (and what the statement above wrote).
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
