-- The write path (issue 14): the dispatcher's mark batch finds its messages by primary key alone,
-- whatever the planner's statistics say.
--
-- Migration 24's UPDATE names the messages by `id = ANY (ids)` and also checks `status IN
-- ('queued', 'sending')`. Without statistics (a new database, autovacuum off) or with ones from
-- a quiet moment, the planner takes that status check to match a row or two, and so reached the
-- messages through `messages_due`: ANDing a bitmap of every queued and sending entry with the
-- primary key's (22 of 23 sampled batches in the dispatch benchmark), or, with bitmap scans off,
-- walking every queued and sending entry and filtering by id. With a backlog of 30,000 each batch
-- of marks read 30,000 index entries to find a few hundred rows. The check is now a CASE, which no
-- index serves, so the rows are found by key and the status is checked on each; same outcomes.
-- `store_conformance::on_postgres_marks_find_messages_by_key` checks that `messages_due` is not
-- scanned.

CREATE OR REPLACE FUNCTION message_mark_sending_batch(p_lock_keys TEXT[], p_jobs JSONB)
RETURNS TABLE (n BIGINT, outcome TEXT)
LANGUAGE plpgsql AS $$
DECLARE
    r RECORD;
    ids TEXT[];
    taken_senders TEXT[] := '{}';
    taken_now_us BIGINT[] := '{}';
    taken_interval_us BIGINT[] := '{}';
BEGIN
    PERFORM lock_keys_in_order(p_lock_keys);
    SELECT array_agg(x.id) INTO ids FROM jsonb_to_recordset(p_jobs) AS x(id TEXT);
    FOR r IN
        WITH jobs AS MATERIALIZED (
            SELECT x.*, row_number() OVER (PARTITION BY x.id ORDER BY x.n) = 1 AS first_for_id
            FROM jsonb_to_recordset(p_jobs) AS x(
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
                slot_interval_us BIGINT)
        ), marked AS (
            -- Right-hand sides read the row as it was, so `m.channel` in the CASE is the old one.
            UPDATE messages m SET status = 'sending', attempts = m.attempts + 1,
                to_number = j.to_number, to_index = j.to_index, encoding = j.encoding,
                segments = j.segments, updated_at = j.now, attempt_started_at = j.now,
                attempt_body = j.body, lookup_needed = FALSE,
                requested_channel = CASE WHEN m.channel <> j.channel
                    THEN COALESCE(m.requested_channel, m.channel) ELSE m.requested_channel END,
                channel = j.channel, lease_until = j.lease
            FROM jobs j
            WHERE m.id = ANY (ids) AND m.id = j.id AND j.first_for_id
              AND m.lease_until = j.fence
              -- A CASE, not `status IN (...)`: see above.
              AND CASE m.status WHEN 'queued' THEN TRUE WHEN 'sending' THEN TRUE ELSE FALSE END
              AND NOT EXISTS (SELECT 1 FROM opt_outs o WHERE o.phone_index = j.to_index
                              AND o.channel = j.channel)
              AND (NOT j.consent OR EXISTS (
                  SELECT 1 FROM messaging_consent c WHERE c.user_id = m.user_id
                  AND c.phone_index = j.to_index
                  AND CASE j.channel WHEN 'sms' THEN c.sms_consent
                                     WHEN 'whatsapp' THEN c.whatsapp_consent ELSE FALSE END
                  AND (NOT j.marketing OR c.marketing_consent)))
            RETURNING j.n AS job
        ), evented AS (
            INSERT INTO message_events (message_id, status, error_code, detail, occurred_at)
            SELECT j.id, 'sending', NULL, NULL, j.now
            FROM jobs j JOIN marked k ON k.job = j.n ORDER BY j.n
            ON CONFLICT DO NOTHING
        )
        SELECT j.n AS job, j.id, j.fence, j.first_for_id, k.job IS NOT NULL AS was_marked,
            j.slot_sender, j.slot_now_us, j.slot_interval_us
        FROM jobs j LEFT JOIN marked k ON k.job = j.n ORDER BY j.n
    LOOP
        n := r.job;
        IF r.was_marked THEN
            outcome := 'marked';
            IF r.slot_sender IS NOT NULL THEN
                taken_senders := taken_senders || r.slot_sender;
                taken_now_us := taken_now_us || r.slot_now_us;
                taken_interval_us := taken_interval_us || r.slot_interval_us;
            END IF;
        ELSIF r.first_for_id AND EXISTS (
                SELECT 1 FROM messages m WHERE m.id = r.id AND m.lease_until = r.fence
                AND m.status IN ('queued', 'sending')) THEN
            outcome := 'policy_changed';
        ELSE
            outcome := 'claim_lost';
        END IF;
        RETURN NEXT;
    END LOOP;
    PERFORM send_rate_take_batch(taken_senders, taken_now_us, taken_interval_us);
END
$$;
