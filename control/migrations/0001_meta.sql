-- Key/value facts about this keel instance (its identity, creation time).
CREATE TABLE keel_meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);
