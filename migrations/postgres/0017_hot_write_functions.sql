-- The write path (issue 14): the hot writes as functions, so each is one round trip and one
-- commit instead of a transaction of five to nine statements, each a round trip of its own. An
-- OTP send went from 17 round trips to 3; a dispatched message from about 12 to 4. Each takes a
-- batch of jobs (a JSON array; `n` numbers them), so the writes of many concurrent requests share
-- one call and one commit (`src/store/postgres/batch.rs`); the caller runs a batch that fails
-- again one job at a time, so one bad job fails alone.
--
-- Locks: every advisory lock a batch needs is taken first, in sorted order, and jobs that take a
-- sender's send slot run in the order of their senders, so two batches (of one instance or two)
-- never wait on each other's locks or `send_rate` rows in a circle.
--
-- Each does what its twin in `src/store/portable/` does (and the SQLite writer in
-- `src/store/sqlite/hot_writes.rs`): the same statements, in the same order, under the same
-- advisory locks. The store conformance tests and the integration suite run all three backends'
-- versions. A change to one is a change to all: a later migration replaces these functions.
--
-- A job's fields are read as `j.<field>` and parameters are prefixed `p_`, so neither shadows a
-- column. In READ COMMITTED each statement of a (volatile) function sees what committed before it
-- began (and what the batch wrote before it), as separate statements would.

-- The advisory locks of `keys` (sorted by the caller), taken after the sort, so two calls never
-- wait on each other in a circle; held until the transaction ends.
-- (PL/pgSQL: `PERFORM` runs the query to its last row; a SQL function would stop at the first.)
CREATE FUNCTION lock_keys_in_order(p_keys TEXT[]) RETURNS VOID LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended(k, 0))
    FROM unnest(p_keys) WITH ORDINALITY AS t(k, o) ORDER BY o;
END
$$;

-- `store::RESERVE_SEND_SLOT`: take the sender's next send slot (microseconds since the epoch).
CREATE FUNCTION send_rate_take(p_sender TEXT, p_now_us BIGINT, p_interval_us BIGINT)
RETURNS VOID LANGUAGE sql AS $$
    INSERT INTO send_rate (sender, next_slot_us) VALUES (p_sender, p_now_us + p_interval_us)
    ON CONFLICT (sender) DO UPDATE SET next_slot_us =
        (CASE WHEN send_rate.next_slot_us > p_now_us THEN send_rate.next_slot_us
         ELSE p_now_us END) + p_interval_us;
$$;

-- OTPs issued (`OtpStore::issue_otp`): the numbers', users' and addresses' locks; then per job
-- the checks of `store::OTP_CHECKS`; then, unless a limit refuses it (nothing written), the send
-- logged; then, unless either number opted out of the channel, the message (already `sending`
-- with an attempt, its event and the sender's slot), the code, and a fresh count of wrong tries.
-- `refuse_all`: a limit of zero applies. The caller decides the wait from the checks returned.
CREATE FUNCTION otp_issue_batch(p_lock_keys TEXT[], p_jobs JSONB) RETURNS TABLE (
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
    ) ORDER BY x.slot_sender NULLS FIRST, x.n LOOP
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
                PERFORM send_rate_take(j.slot_sender, j.slot_now_us, j.slot_interval_us);
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
END
$$;

-- Claimed messages marked `sending` for an attempt (`MessageStore::mark_sending`): the update of
-- `store::mark_sending_sql` (the guard's checks in the same statement), then its event and the
-- sender's slot. Per job: 'marked', 'policy_changed' (ours still, but a STOP or a consent change
-- stops it; nothing written) or 'claim_lost'. Marks need no advisory lock (each message is
-- claimed by one dispatcher); `p_lock_keys` keeps the batch functions' one signature.
CREATE FUNCTION message_mark_sending_batch(p_lock_keys TEXT[], p_jobs JSONB)
RETURNS TABLE (n BIGINT, outcome TEXT)
LANGUAGE plpgsql AS $$
DECLARE
    j RECORD;
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
    ) ORDER BY x.slot_sender NULLS FIRST, x.n LOOP
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
            PERFORM send_rate_take(j.slot_sender, j.slot_now_us, j.slot_interval_us);
        END IF;
        outcome := 'marked';
        RETURN NEXT;
    END LOOP;
END
$$;

-- Sends the provider accepted (`MessageStore::record_sent`), under their SIDs' locks (`p_lock_keys`,
-- 'sid:' and the SID, as `apply_status` takes them): the update of `store::RECORD_SENT` to where
-- the message ends (`news`, the provider's own news, already checked to follow `status`), and an
-- event per status. Per job: 'recorded', 'claim_lost', or 'parked': callbacks for this SID arrived
-- first and wait; nothing was written, and the caller runs the full transaction, which applies
-- them.
CREATE FUNCTION message_sent_batch(p_lock_keys TEXT[], p_jobs JSONB)
RETURNS TABLE (n BIGINT, outcome TEXT) LANGUAGE plpgsql AS $$
DECLARE
    j RECORD;
BEGIN
    PERFORM lock_keys_in_order(p_lock_keys);
    FOR j IN SELECT * FROM jsonb_to_recordset(p_jobs) AS x(
        n BIGINT,
        id TEXT,
        fence TIMESTAMPTZ,
        status TEXT,
        news TEXT,
        sid TEXT,
        now TIMESTAMPTZ
    ) LOOP
        n := j.n;
        IF EXISTS (SELECT 1 FROM unmatched_status_callbacks u WHERE u.provider_sid = j.sid) THEN
            outcome := 'parked';
            RETURN NEXT;
            CONTINUE;
        END IF;
        UPDATE messages m SET status = COALESCE(j.news, j.status), provider_sid = j.sid,
            reason = NULL, error_code = NULL, error_message = NULL, lease_until = NULL,
            updated_at = j.now
        WHERE m.id = j.id AND m.lease_until = j.fence;
        IF NOT FOUND THEN
            outcome := 'claim_lost';
            RETURN NEXT;
            CONTINUE;
        END IF;
        INSERT INTO message_events (message_id, status, error_code, detail, occurred_at)
        VALUES (j.id, j.status, NULL, NULL, j.now) ON CONFLICT DO NOTHING;
        IF j.news IS NOT NULL THEN
            INSERT INTO message_events (message_id, status, error_code, detail, occurred_at)
            VALUES (j.id, j.news, NULL, 'provider answer', j.now) ON CONFLICT DO NOTHING;
        END IF;
        outcome := 'recorded';
        RETURN NEXT;
    END LOOP;
END
$$;
