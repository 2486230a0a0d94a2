-- The write path (issue 14): a batch takes its send slots at its end, one statement per sender.
--
-- Every OTP (and every queued OTP the dispatcher marks) takes its sender's next send slot, so one
-- `send_rate` row per sender is updated by every batch, and a row lock is held until the commit.
-- Taken in the middle of a batch, that lock was held across the rest of the batch and its commit,
-- and batches of one instance or two queued behind each other on it (pg_stat_statements at 16
-- connections: the slot update was the slowest statement of an OTP, 0.4-0.5 ms of waiting, and
-- send-otp ran 13% faster with the limit off). Now the jobs' slots are gathered and taken after
-- the loop, k slots at once per sender (in sender order, so two batches never wait on each other
-- in a circle), and the lock is held for the commit only. The jobs themselves now run in the order
-- they arrived (`n`), as on SQLite's writer: ordering them by sender only served the slot locks.
--
-- k slots at once are what k takes in a row give: each take starts at the later of the sender's
-- next slot and now, and after the first take the next slot is already past now. With the jobs'
-- latest `now` the result is never earlier than the takes one by one would give, so the
-- configured rate still holds. SQLite's writer and the portable transaction (one writer, no row
-- lock to wait on) still take a slot per job; the slots they reach are the same.

-- The slots of a batch's jobs: per sender (sorted), as many slots as the sender's jobs.
CREATE FUNCTION send_rate_take_batch(p_senders TEXT[], p_now_us BIGINT[], p_interval_us BIGINT[])
RETURNS VOID LANGUAGE plpgsql AS $$
DECLARE
    s RECORD;
BEGIN
    FOR s IN SELECT t.sender, max(t.now_us) AS now_us, max(t.interval_us) AS interval_us,
            count(*) AS taken
        FROM unnest(p_senders, p_now_us, p_interval_us) AS t(sender, now_us, interval_us)
        GROUP BY t.sender ORDER BY t.sender LOOP
        INSERT INTO send_rate (sender, next_slot_us)
        VALUES (s.sender, s.now_us + s.taken * s.interval_us)
        ON CONFLICT (sender) DO UPDATE SET next_slot_us =
            GREATEST(send_rate.next_slot_us, s.now_us) + s.taken * s.interval_us;
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION otp_issue_batch(p_lock_keys TEXT[], p_jobs JSONB) RETURNS TABLE (
    n BIGINT,
    outcome TEXT,
    last_send TIMESTAMPTZ,
    number_full TIMESTAMPTZ,
    user_full TIMESTAMPTZ,
    address_full TIMESTAMPTZ,
    named_opted_out BOOLEAN,
    send_to_opted_out BOOLEAN
) LANGUAGE plpgsql AS $$
DECLARE
    j RECORD;
    taken_senders TEXT[] := '{}';
    taken_now_us BIGINT[] := '{}';
    taken_interval_us BIGINT[] := '{}';
BEGIN
    PERFORM lock_keys_in_order(p_lock_keys);

    FOR j IN SELECT * FROM jsonb_to_recordset(p_jobs) AS x(
        n BIGINT,
        phone_index TEXT,
        sealed_phone TEXT,
        user_id TEXT,
        ip TEXT,
        now TIMESTAMPTZ,
        window_start TIMESTAMPTZ,
        per_number BIGINT,
        per_address BIGINT,
        cooldown_after TIMESTAMPTZ,
        refuse_all BOOLEAN,
        channel TEXT,
        send_to_index TEXT,
        message_id TEXT,
        template TEXT,
        variables TEXT,
        message_channel TEXT,
        created_at TIMESTAMPTZ,
        lease TIMESTAMPTZ,
        attempt_started TIMESTAMPTZ,
        to_number TEXT,
        to_index TEXT,
        encoding TEXT,
        segments BIGINT,
        body TEXT,
        slot_sender TEXT,
        slot_now_us BIGINT,
        slot_interval_us BIGINT,
        purpose TEXT,
        code_to TEXT,
        code_hash TEXT,
        expires_at TIMESTAMPTZ
    ) ORDER BY x.n LOOP
        n := j.n;
        SELECT
            (SELECT l.created_at FROM otp_send_log l WHERE l.phone_index = j.phone_index
             ORDER BY l.created_at DESC LIMIT 1),
            (SELECT l.created_at FROM otp_send_log l WHERE l.phone_index = j.phone_index
             AND l.created_at > j.window_start ORDER BY l.created_at DESC LIMIT 1 OFFSET j.per_number),
            (SELECT l.created_at FROM otp_send_log l WHERE l.user_id = j.user_id
             AND l.created_at > j.window_start ORDER BY l.created_at DESC LIMIT 1 OFFSET j.per_number),
            (SELECT l.created_at FROM otp_send_log l WHERE l.ip = j.ip
             AND l.created_at > j.window_start ORDER BY l.created_at DESC LIMIT 1 OFFSET j.per_address),
            EXISTS (SELECT 1 FROM opt_outs o WHERE o.phone_index = j.phone_index
                    AND o.channel = j.channel),
            EXISTS (SELECT 1 FROM opt_outs o WHERE o.phone_index = j.send_to_index
                    AND o.channel = j.channel)
        INTO last_send, number_full, user_full, address_full, named_opted_out, send_to_opted_out;

        IF j.refuse_all OR last_send > j.cooldown_after OR number_full IS NOT NULL
           OR user_full IS NOT NULL OR (j.ip IS NOT NULL AND address_full IS NOT NULL) THEN
            outcome := 'rate_limited';
            RETURN NEXT;
            CONTINUE;
        END IF;

        INSERT INTO otp_send_log (phone_number, user_id, ip, created_at, phone_index)
        VALUES (j.sealed_phone, j.user_id, j.ip, j.now, j.phone_index);

        IF named_opted_out OR send_to_opted_out THEN
            outcome := 'opted_out';
            RETURN NEXT;
            CONTINUE;
        END IF;

        -- `store::INSERT_OTP_MESSAGE`
        INSERT INTO messages (id, user_id, template_name, variables, channel, status, attempts,
            idempotency_key, next_attempt_at, lease_until, created_at, updated_at, to_number, to_index,
            encoding, segments, attempt_started_at, attempt_body, lookup_needed)
        VALUES (j.message_id, j.user_id, j.template, j.variables, j.message_channel, 'sending',
            CASE WHEN j.attempt_started IS NULL THEN 0 ELSE 1 END, NULL, j.created_at, j.lease,
            j.created_at, j.created_at, j.to_number, j.to_index, j.encoding, j.segments,
            j.attempt_started, j.body, FALSE);

        IF j.attempt_started IS NOT NULL THEN
            INSERT INTO message_events (message_id, status, error_code, detail, occurred_at)
            VALUES (j.message_id, 'sending', NULL, NULL, j.created_at) ON CONFLICT DO NOTHING;
            IF j.slot_sender IS NOT NULL THEN
                taken_senders := taken_senders || j.slot_sender;
                taken_now_us := taken_now_us || j.slot_now_us;
                taken_interval_us := taken_interval_us || j.slot_interval_us;
            END IF;
        END IF;

        INSERT INTO otp_codes (user_id, purpose, phone_number, channel, code_hash, attempts,
            expires_at, used_at, message_id, created_at)
        VALUES (j.user_id, j.purpose, j.code_to, j.channel, j.code_hash, 0, j.expires_at, NULL,
            j.message_id, j.now)
        ON CONFLICT (user_id, purpose) DO UPDATE SET phone_number = excluded.phone_number,
            channel = excluded.channel, code_hash = excluded.code_hash, attempts = 0,
            expires_at = excluded.expires_at, used_at = NULL, message_id = excluded.message_id,
            created_at = excluded.created_at;

        -- A new code starts a new count of wrong tries.
        DELETE FROM otp_failures f WHERE f.user_id = j.user_id AND f.purpose = j.purpose;

        outcome := 'issued';
        RETURN NEXT;
    END LOOP;
    PERFORM send_rate_take_batch(taken_senders, taken_now_us, taken_interval_us);
END
$$;

CREATE OR REPLACE FUNCTION message_mark_sending_batch(p_lock_keys TEXT[], p_jobs JSONB)
RETURNS TABLE (n BIGINT, outcome TEXT)
LANGUAGE plpgsql AS $$
DECLARE
    j RECORD;
    taken_senders TEXT[] := '{}';
    taken_now_us BIGINT[] := '{}';
    taken_interval_us BIGINT[] := '{}';
BEGIN
    PERFORM lock_keys_in_order(p_lock_keys);
    FOR j IN SELECT * FROM jsonb_to_recordset(p_jobs) AS x(
        n BIGINT,
        id TEXT,
        to_number TEXT,
        encoding TEXT,
        segments BIGINT,
        now TIMESTAMPTZ,
        channel TEXT,
        fence TIMESTAMPTZ,
        lease TIMESTAMPTZ,
        body TEXT,
        to_index TEXT,
        consent BOOLEAN,
        marketing BOOLEAN,
        slot_sender TEXT,
        slot_now_us BIGINT,
        slot_interval_us BIGINT
    ) ORDER BY x.n LOOP
        n := j.n;
        -- Right-hand sides read the row as it was, so `m.channel` in the CASE is the old one.
        UPDATE messages m SET status = 'sending', attempts = m.attempts + 1,
            to_number = j.to_number, to_index = j.to_index, encoding = j.encoding,
            segments = j.segments, updated_at = j.now, attempt_started_at = j.now,
            attempt_body = j.body, lookup_needed = FALSE,
            requested_channel = CASE WHEN m.channel <> j.channel
                THEN COALESCE(m.requested_channel, m.channel) ELSE m.requested_channel END,
            channel = j.channel, lease_until = j.lease
        WHERE m.id = j.id AND m.lease_until = j.fence AND m.status IN ('queued', 'sending')
          AND NOT EXISTS (SELECT 1 FROM opt_outs o WHERE o.phone_index = j.to_index
                          AND o.channel = j.channel)
          AND (NOT j.consent OR EXISTS (
              SELECT 1 FROM messaging_consent c WHERE c.user_id = m.user_id
              AND c.phone_index = j.to_index
              AND CASE j.channel WHEN 'sms' THEN c.sms_consent
                                 WHEN 'whatsapp' THEN c.whatsapp_consent ELSE FALSE END
              AND (NOT j.marketing OR c.marketing_consent)));
        IF NOT FOUND THEN
            IF EXISTS (SELECT 1 FROM messages m WHERE m.id = j.id AND m.lease_until = j.fence
                       AND m.status IN ('queued', 'sending')) THEN
                outcome := 'policy_changed';
            ELSE
                outcome := 'claim_lost';
            END IF;
            RETURN NEXT;
            CONTINUE;
        END IF;
        INSERT INTO message_events (message_id, status, error_code, detail, occurred_at)
        VALUES (j.id, 'sending', NULL, NULL, j.now) ON CONFLICT DO NOTHING;
        IF j.slot_sender IS NOT NULL THEN
            taken_senders := taken_senders || j.slot_sender;
            taken_now_us := taken_now_us || j.slot_now_us;
            taken_interval_us := taken_interval_us || j.slot_interval_us;
        END IF;
        outcome := 'marked';
        RETURN NEXT;
    END LOOP;
    PERFORM send_rate_take_batch(taken_senders, taken_now_us, taken_interval_us);
END
$$;

-- Nothing takes a slot one job at a time any more.
DROP FUNCTION send_rate_take(TEXT, BIGINT, BIGINT);
