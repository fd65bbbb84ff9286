-- How far the outcome events are known to be on their way (streamsvc.actors.announcements):
-- every operation that finished before `before` had its outcome relayed, and Redis was
-- seen holding the same data at `seen`. One row, moved forward by the sweepers; when Redis
-- loses its data, the outcomes of what finished after `before` are put on the outcome
-- streams again.
CREATE TABLE IF NOT EXISTS streamsvc_announced (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    before   timestamptz NOT NULL,
    seen     timestamptz NOT NULL
);
