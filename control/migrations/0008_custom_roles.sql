-- Users holding a custom role (`role = 'custom'`) name it here (`/roles`).
ALTER TABLE users ADD COLUMN role_id TEXT;
