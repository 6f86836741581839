-- Host liveness: each host agent refreshes its row every few seconds; a
-- host whose row is older than the expiry is not responding. Tasks name the
-- host that must run them (NULL: any host) and the agent that claimed them,
-- so a RUNNING task is taken over only from an agent that stopped beating.
CREATE TABLE heartbeats (
    host_id TEXT    PRIMARY KEY NOT NULL,
    at      INTEGER NOT NULL -- unix milliseconds
);
ALTER TABLE tasks ADD COLUMN host_id TEXT;
ALTER TABLE tasks ADD COLUMN claimed_by TEXT;
