-- PostgreSQL twin of ../0001_meta.sql (same number, same tables): SQLite keeps its
-- own files so the checksums recorded in existing databases stay valid;
-- AUTOINCREMENT becomes an identity column and INTEGER becomes BIGINT
-- (unix-ms times do not fit PostgreSQL's 32-bit INTEGER).
-- Key/value facts about this keel instance (its identity, creation time).
CREATE TABLE keel_meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);
