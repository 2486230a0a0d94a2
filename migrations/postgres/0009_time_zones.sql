-- Reminders in the patient's own time (issue 11).

-- The patient's IANA time zone, when they gave one (preferences; audited like the rest).
ALTER TABLE messaging_consent ADD COLUMN time_zone TEXT;

-- An appointment or follow-up keeps a zone only when the host app gave one (NULL otherwise; rows
-- written before keep the zone they hold), and how far ahead its current time, patient and status
-- were booked (`notice_seconds`, for late bookings; rows written before: since they were created).
ALTER TABLE appointments ALTER COLUMN time_zone DROP NOT NULL;
ALTER TABLE appointments ADD COLUMN notice_seconds BIGINT;
UPDATE appointments SET notice_seconds = FLOOR(EXTRACT(EPOCH FROM (starts_at - created_at)))::BIGINT;
ALTER TABLE appointments ALTER COLUMN notice_seconds SET NOT NULL;

ALTER TABLE follow_ups ALTER COLUMN time_zone DROP NOT NULL;
ALTER TABLE follow_ups ADD COLUMN notice_seconds BIGINT;
UPDATE follow_ups SET notice_seconds = FLOOR(EXTRACT(EPOCH FROM (due_at - created_at)))::BIGINT;
ALTER TABLE follow_ups ALTER COLUMN notice_seconds SET NOT NULL;

-- Reminder templates now carry the item's instant, rendered ("today at 10:30") when sent. Reminders
-- not yet sent get their item's time from the reminder log.
UPDATE messages m SET variables = jsonb_build_object(
        CASE WHEN m.template_name = 'follow_up_reminder' THEN 'due_at' ELSE 'starts_at' END,
        to_char(r.starts_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
        'link', m.variables::jsonb ->> 'link')::text
FROM reminder_log r
WHERE r.message_id = m.id
    AND m.status IN ('queued', 'sending')
    AND m.template_name IN ('appointment_reminder_24h', 'appointment_reminder_2h',
        'follow_up_reminder');
