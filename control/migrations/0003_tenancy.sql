-- Tenancy, identity and the generic resource table, plus the change feed
-- (events), the audit log and idempotency records. Portable SQL only
-- (SQLite and PostgreSQL): TEXT ids (UUIDs), INTEGER unix-ms times, JSON in TEXT.

-- Every API-managed resource that is not a principal: VDCs, VPCs, subnets...
-- `vdc_id` is the owning VDC (a VDC owns itself); `parent_id` the containing
-- resource (parent VDC, VPC of a subnet). `spec` is the validated body.
CREATE TABLE resources (
    id         TEXT    PRIMARY KEY NOT NULL,
    kind       TEXT    NOT NULL,
    vdc_id     TEXT,
    parent_id  TEXT,
    name       TEXT    NOT NULL,
    spec       TEXT    NOT NULL,
    status     TEXT    NOT NULL,
    revision   INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX resources_kind_vdc ON resources (kind, vdc_id);
CREATE INDEX resources_parent ON resources (parent_id);

CREATE TABLE users (
    id            TEXT    PRIMARY KEY NOT NULL,
    name          TEXT    NOT NULL UNIQUE,
    password_hash TEXT    NOT NULL,
    role          TEXT    NOT NULL,
    vdc_id        TEXT REFERENCES resources (id),
    failed_logins INTEGER NOT NULL DEFAULT 0,
    locked_until  INTEGER NOT NULL DEFAULT 0,
    revision      INTEGER NOT NULL,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
);

-- Bearer secrets are stored only as SHA-256 hashes.
CREATE TABLE tokens (
    id         TEXT    PRIMARY KEY NOT NULL,
    user_id    TEXT    NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    kind       TEXT    NOT NULL, -- access | refresh | api
    name       TEXT    NOT NULL,
    hash       TEXT    NOT NULL UNIQUE,
    expires_at INTEGER,          -- NULL: until deleted
    created_at INTEGER NOT NULL
);

-- The change feed: appended in the same transaction as every change.
CREATE TABLE events (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    at            INTEGER NOT NULL,
    resource_type TEXT    NOT NULL,
    resource_id   TEXT    NOT NULL,
    action        TEXT    NOT NULL, -- created | updated | deleted
    vdc_id        TEXT,
    revision      INTEGER NOT NULL
);

CREATE TABLE audit_log (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    at        INTEGER NOT NULL,
    principal TEXT    NOT NULL,
    method    TEXT    NOT NULL,
    path      TEXT    NOT NULL,
    remote    TEXT    NOT NULL,
    status    INTEGER NOT NULL
);

CREATE TABLE idempotency (
    principal  TEXT    NOT NULL,
    key        TEXT    NOT NULL,
    request    TEXT    NOT NULL, -- method, path and SHA-256 of the body
    status     INTEGER NOT NULL,
    headers    TEXT    NOT NULL,
    body       TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (principal, key)
);
