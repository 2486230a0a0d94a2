-- Deployment-wide send pacing: the next free send slot per sender, in microseconds since the
-- epoch. Every instance reserves slots here, so the rate holds across instances.
CREATE TABLE send_rate (
    sender       TEXT PRIMARY KEY NOT NULL,
    next_slot_us INTEGER NOT NULL
);
