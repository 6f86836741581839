-- Optional TOTP second factor (RFC 6238, SHA-1, 6 digits, 30 s): the
-- base32 secret once confirmed, a pending one while being set up, and the
-- last time step a code was accepted for (a code is good once).
ALTER TABLE users ADD COLUMN totp_secret TEXT;
ALTER TABLE users ADD COLUMN totp_pending TEXT;
ALTER TABLE users ADD COLUMN totp_last_step BIGINT NOT NULL DEFAULT 0;
