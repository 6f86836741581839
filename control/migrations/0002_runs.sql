-- One row per start of the appliance; stopped_at stays NULL when a run did
-- not shut down cleanly, which the next start reports.
CREATE TABLE runs (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    version    TEXT    NOT NULL,
    started_at INTEGER NOT NULL, -- unix milliseconds
    stopped_at INTEGER           -- unix milliseconds; NULL while running or after a crash
);
