-- Runs belong to a node (host name and state directory): with a database
-- that many hosts share, one node's start must not close another's run.
ALTER TABLE runs ADD COLUMN node TEXT NOT NULL DEFAULT '';
