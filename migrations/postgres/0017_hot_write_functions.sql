-- The write path (issue 14): the hot writes as functions, so each is one round trip and one
-- commit instead of a transaction of five to nine statements, each a round trip of its own. An
-- OTP send went from 17 round trips to 3; a dispatched message from about 12 to 2.
--
-- Each does what its twin in `src/store/portable/` does (and the SQLite writer in
-- `src/store/sqlite/hot_writes.rs`): the same statements, in the same order, under the same
-- advisory locks. The store conformance tests and the integration suite run all three backends'
-- versions. A change to one is a change to all: a later migration replaces these functions.
--
-- Parameters are prefixed `p_` so they never shadow a column. In READ COMMITTED each statement of
-- a (volatile) function sees what committed before it began, as separate statements would.

-- An OTP issued (`OtpStore::issue_otp`): the number's, user's and address's locks; the checks of
-- `store::OTP_CHECKS`; then, unless a limit refuses it (nothing written), the send logged; then,
-- unless either number opted out of the channel, the message (already `sending` with an attempt,
-- its event and the sender's slot), the code, and a fresh count of wrong tries.
-- `p_refuse_all`: a limit of zero applies. The caller decides the wait from the checks returned.
CREATE FUNCTION otp_issue(
    p_lock_keys TEXT[],
    p_phone_index TEXT,
    p_sealed_phone TEXT,
    p_user_id TEXT,
    p_ip TEXT,
    p_now TIMESTAMPTZ,
    p_window_start TIMESTAMPTZ,
    p_per_number BIGINT,
    p_per_address BIGINT,
    p_cooldown_after TIMESTAMPTZ,
    p_refuse_all BOOLEAN,
    p_channel TEXT,
    p_send_to_index TEXT,
    p_message_id TEXT,
    p_template TEXT,
    p_variables TEXT,
    p_message_channel TEXT,
    p_created_at TIMESTAMPTZ,
    p_lease TIMESTAMPTZ,
    p_attempt_started TIMESTAMPTZ,
    p_to_number TEXT,
    p_to_index TEXT,
    p_encoding TEXT,
    p_segments BIGINT,
    p_body TEXT,
    p_slot_sender TEXT,
    p_slot_now_us BIGINT,
    p_slot_interval_us BIGINT,
    p_purpose TEXT,
    p_code_to TEXT,
    p_code_hash TEXT,
    p_expires_at TIMESTAMPTZ
) RETURNS TABLE (
    outcome TEXT,
    last_send TIMESTAMPTZ,
    number_full TIMESTAMPTZ,
    user_full TIMESTAMPTZ,
    address_full TIMESTAMPTZ,
    named_opted_out BOOLEAN,
    send_to_opted_out BOOLEAN
) LANGUAGE plpgsql AS $$
BEGIN
    -- Keys arrive sorted; locks are taken after the sort, so two calls never wait in a circle.
    PERFORM pg_advisory_xact_lock(hashtextextended(k, 0))
    FROM unnest(p_lock_keys) WITH ORDINALITY AS t(k, n) ORDER BY n;

    SELECT
        (SELECT l.created_at FROM otp_send_log l WHERE l.phone_index = p_phone_index
         ORDER BY l.created_at DESC LIMIT 1),
        (SELECT l.created_at FROM otp_send_log l WHERE l.phone_index = p_phone_index
         AND l.created_at > p_window_start ORDER BY l.created_at DESC LIMIT 1 OFFSET p_per_number),
        (SELECT l.created_at FROM otp_send_log l WHERE l.user_id = p_user_id
         AND l.created_at > p_window_start ORDER BY l.created_at DESC LIMIT 1 OFFSET p_per_number),
        (SELECT l.created_at FROM otp_send_log l WHERE l.ip = p_ip
         AND l.created_at > p_window_start ORDER BY l.created_at DESC LIMIT 1 OFFSET p_per_address),
        EXISTS (SELECT 1 FROM opt_outs o WHERE o.phone_index = p_phone_index
                AND o.channel = p_channel),
        EXISTS (SELECT 1 FROM opt_outs o WHERE o.phone_index = p_send_to_index
                AND o.channel = p_channel)
    INTO last_send, number_full, user_full, address_full, named_opted_out, send_to_opted_out;

    IF p_refuse_all OR last_send > p_cooldown_after OR number_full IS NOT NULL
       OR user_full IS NOT NULL OR (p_ip IS NOT NULL AND address_full IS NOT NULL) THEN
        outcome := 'rate_limited';
        RETURN NEXT;
        RETURN;
    END IF;

    INSERT INTO otp_send_log (phone_number, user_id, ip, created_at, phone_index)
    VALUES (p_sealed_phone, p_user_id, p_ip, p_now, p_phone_index);

    IF named_opted_out OR send_to_opted_out THEN
        outcome := 'opted_out';
        RETURN NEXT;
        RETURN;
    END IF;

    -- `store::INSERT_OTP_MESSAGE`
    INSERT INTO messages (id, user_id, template_name, variables, channel, status, attempts,
        idempotency_key, next_attempt_at, lease_until, created_at, updated_at, to_number, to_index,
        encoding, segments, attempt_started_at, attempt_body, lookup_needed)
    VALUES (p_message_id, p_user_id, p_template, p_variables, p_message_channel, 'sending',
        CASE WHEN p_attempt_started IS NULL THEN 0 ELSE 1 END, NULL, p_created_at, p_lease,
        p_created_at, p_created_at, p_to_number, p_to_index, p_encoding, p_segments,
        p_attempt_started, p_body, FALSE);

    IF p_attempt_started IS NOT NULL THEN
        INSERT INTO message_events (message_id, status, error_code, detail, occurred_at)
        VALUES (p_message_id, 'sending', NULL, NULL, p_created_at) ON CONFLICT DO NOTHING;
        IF p_slot_sender IS NOT NULL THEN
            -- `store::RESERVE_SEND_SLOT`
            INSERT INTO send_rate (sender, next_slot_us)
            VALUES (p_slot_sender, p_slot_now_us + p_slot_interval_us)
            ON CONFLICT (sender) DO UPDATE SET next_slot_us =
                (CASE WHEN send_rate.next_slot_us > p_slot_now_us THEN send_rate.next_slot_us
                 ELSE p_slot_now_us END) + p_slot_interval_us;
        END IF;
    END IF;

    INSERT INTO otp_codes (user_id, purpose, phone_number, channel, code_hash, attempts,
        expires_at, used_at, message_id, created_at)
    VALUES (p_user_id, p_purpose, p_code_to, p_channel, p_code_hash, 0, p_expires_at, NULL,
        p_message_id, p_now)
    ON CONFLICT (user_id, purpose) DO UPDATE SET phone_number = excluded.phone_number,
        channel = excluded.channel, code_hash = excluded.code_hash, attempts = 0,
        expires_at = excluded.expires_at, used_at = NULL, message_id = excluded.message_id,
        created_at = excluded.created_at;

    -- A new code starts a new count of wrong tries.
    DELETE FROM otp_failures f WHERE f.user_id = p_user_id AND f.purpose = p_purpose;

    outcome := 'issued';
    RETURN NEXT;
END
$$;

-- A claimed message marked `sending` for an attempt (`MessageStore::mark_sending`): the update of
-- `store::mark_sending_sql` (the guard's checks in the same statement), then its event and the
-- sender's slot. 'marked', 'policy_changed' (ours still, but a STOP or a consent change stops
-- it; nothing written) or 'claim_lost'.
CREATE FUNCTION message_mark_sending(
    p_id TEXT,
    p_to_number TEXT,
    p_encoding TEXT,
    p_segments BIGINT,
    p_now TIMESTAMPTZ,
    p_channel TEXT,
    p_fence TIMESTAMPTZ,
    p_lease TIMESTAMPTZ,
    p_body TEXT,
    p_to_index TEXT,
    p_consent BOOLEAN,
    p_marketing BOOLEAN,
    p_slot_sender TEXT,
    p_slot_now_us BIGINT,
    p_slot_interval_us BIGINT
) RETURNS TEXT LANGUAGE plpgsql AS $$
BEGIN
    -- Right-hand sides read the row as it was, so `channel` in the CASE is the old channel.
    UPDATE messages SET status = 'sending', attempts = attempts + 1, to_number = p_to_number,
        to_index = p_to_index, encoding = p_encoding, segments = p_segments, updated_at = p_now,
        attempt_started_at = p_now, attempt_body = p_body, lookup_needed = FALSE,
        requested_channel = CASE WHEN channel <> p_channel
            THEN COALESCE(requested_channel, channel) ELSE requested_channel END,
        channel = p_channel, lease_until = p_lease
    WHERE id = p_id AND lease_until = p_fence AND status IN ('queued', 'sending')
      AND NOT EXISTS (SELECT 1 FROM opt_outs o WHERE o.phone_index = p_to_index
                      AND o.channel = p_channel)
      AND (NOT p_consent OR EXISTS (
          SELECT 1 FROM messaging_consent c WHERE c.user_id = messages.user_id
          AND c.phone_index = p_to_index
          AND CASE p_channel WHEN 'sms' THEN c.sms_consent
                             WHEN 'whatsapp' THEN c.whatsapp_consent ELSE FALSE END
          AND (NOT p_marketing OR c.marketing_consent)));
    IF NOT FOUND THEN
        IF EXISTS (SELECT 1 FROM messages WHERE id = p_id AND lease_until = p_fence
                   AND status IN ('queued', 'sending')) THEN
            RETURN 'policy_changed';
        END IF;
        RETURN 'claim_lost';
    END IF;
    INSERT INTO message_events (message_id, status, error_code, detail, occurred_at)
    VALUES (p_id, 'sending', NULL, NULL, p_now) ON CONFLICT DO NOTHING;
    IF p_slot_sender IS NOT NULL THEN
        INSERT INTO send_rate (sender, next_slot_us)
        VALUES (p_slot_sender, p_slot_now_us + p_slot_interval_us)
        ON CONFLICT (sender) DO UPDATE SET next_slot_us =
            (CASE WHEN send_rate.next_slot_us > p_slot_now_us THEN send_rate.next_slot_us
             ELSE p_slot_now_us END) + p_slot_interval_us;
    END IF;
    RETURN 'marked';
END
$$;

-- A send the provider accepted (`MessageStore::record_sent`), under the SID's lock: the update of
-- `store::RECORD_SENT` to where the message ends (`p_news`, the provider's own news, already
-- checked to follow `p_status`), and an event per status. 'recorded', 'claim_lost', or 'parked':
-- callbacks for this SID arrived first and wait; nothing was written, and the caller runs the
-- full transaction, which applies them.
CREATE FUNCTION message_sent(
    p_id TEXT,
    p_fence TIMESTAMPTZ,
    p_status TEXT,
    p_news TEXT,
    p_sid TEXT,
    p_now TIMESTAMPTZ
) RETURNS TEXT LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('sid:' || p_sid, 0));
    IF EXISTS (SELECT 1 FROM unmatched_status_callbacks u WHERE u.provider_sid = p_sid) THEN
        RETURN 'parked';
    END IF;
    UPDATE messages SET status = COALESCE(p_news, p_status), provider_sid = p_sid, reason = NULL,
        error_code = NULL, error_message = NULL, lease_until = NULL, updated_at = p_now
    WHERE id = p_id AND lease_until = p_fence;
    IF NOT FOUND THEN
        RETURN 'claim_lost';
    END IF;
    INSERT INTO message_events (message_id, status, error_code, detail, occurred_at)
    VALUES (p_id, p_status, NULL, NULL, p_now) ON CONFLICT DO NOTHING;
    IF p_news IS NOT NULL THEN
        INSERT INTO message_events (message_id, status, error_code, detail, occurred_at)
        VALUES (p_id, p_news, NULL, 'provider answer', p_now) ON CONFLICT DO NOTHING;
    END IF;
    RETURN 'recorded';
END
$$;
