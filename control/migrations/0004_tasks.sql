-- Asynchronous work: one row per long or hypervisor-bound operation (VM
-- lifecycle actions, volume provisioning). The API enqueues, the host agent
-- runs them in `seq` order per resource and records the outcome; clients
-- poll `/tasks/{id}` (the `Location` of every 202 answer) or watch events.
CREATE TABLE tasks (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    id            TEXT    NOT NULL UNIQUE,
    vdc_id        TEXT,
    resource_type TEXT    NOT NULL,
    resource_id   TEXT    NOT NULL,
    action        TEXT    NOT NULL,
    params        TEXT    NOT NULL, -- JSON
    state         TEXT    NOT NULL, -- QUEUED | RUNNING | SUCCEEDED | FAILED
    progress      INTEGER NOT NULL, -- percent
    message       TEXT    NOT NULL,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
);
CREATE INDEX tasks_state ON tasks (state, seq);
CREATE INDEX tasks_resource ON tasks (resource_id, seq);
