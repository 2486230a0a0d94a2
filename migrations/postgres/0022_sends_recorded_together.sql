-- The write path (issue 14): `message_sent_batch` records a batch's sends with one statement
-- instead of four statements per send.
--
-- Migration 17's function ran a PL/pgSQL loop over the jobs: per send a look for parked
-- callbacks, the message's update and one or two events, each statement paying the executor's
-- start and end. Now one statement of data-modifying CTEs does it for the whole batch: the jobs
-- (each with whether callbacks for its SID wait), the messages' update for the jobs not parked
-- whose claim still holds (`lease_until` = the fence), and the events of the sends recorded, in
-- job order. A job's outcome is 'parked', 'recorded' or 'claim_lost' as before. The same message
-- twice in one batch (never expected: a send is recorded once) is recorded once, the other job
-- answered 'claim_lost', as the loop answered it.

CREATE OR REPLACE FUNCTION message_sent_batch(p_lock_keys TEXT[], p_jobs JSONB)
RETURNS TABLE (n BIGINT, outcome TEXT) LANGUAGE plpgsql AS $$
BEGIN
    PERFORM lock_keys_in_order(p_lock_keys);
    RETURN QUERY
    WITH jobs AS MATERIALIZED (
        SELECT x.*, EXISTS (SELECT 1 FROM unmatched_status_callbacks u
                            WHERE u.provider_sid = x.sid) AS parked
        FROM jsonb_to_recordset(p_jobs) AS x(
            n BIGINT,
            id TEXT,
            fence TIMESTAMPTZ,
            status TEXT,
            news TEXT,
            sid TEXT,
            now TIMESTAMPTZ
        )
    ), recorded AS (
        UPDATE messages m SET status = COALESCE(j.news, j.status), provider_sid = j.sid,
            reason = NULL, error_code = NULL, error_message = NULL, lease_until = NULL,
            updated_at = j.now
        FROM jobs j
        WHERE NOT j.parked AND m.id = j.id AND m.lease_until = j.fence
        RETURNING j.n AS job, j.id AS message_id, j.status AS sent_status, j.news AS news,
            j.now AS at
    ), evented AS (
        INSERT INTO message_events (message_id, status, error_code, detail, occurred_at)
        SELECT r.message_id, e.status, NULL, e.detail, r.at
        FROM recorded r CROSS JOIN LATERAL (VALUES
                (1, r.sent_status, NULL),
                (2, r.news, 'provider answer')) AS e(ord, status, detail)
        WHERE e.status IS NOT NULL
        ORDER BY r.job, e.ord
        ON CONFLICT DO NOTHING
    )
    SELECT j.n, CASE WHEN j.parked THEN 'parked'
                     WHEN r.job IS NOT NULL THEN 'recorded'
                     ELSE 'claim_lost' END
    FROM jobs j LEFT JOIN recorded r ON r.job = j.n
    ORDER BY j.n;
END
$$;
