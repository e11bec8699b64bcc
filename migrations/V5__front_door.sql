-- The front door (README "Protected sales"): a sale's protection, challenge replay records, and
-- the shared blocklist.

-- A sale's protection (`{"order_token", "challenge", ...}`), NULL when unprotected. Copied onto
-- each item row like the sale window, so the buy path learns it from the item's own group.
ALTER TABLE sales ADD COLUMN protection jsonb;
ALTER TABLE sale_items ADD COLUMN protection jsonb;

-- Challenge solutions already exchanged for an order token, on the group of the user they were
-- issued to: a solution works once. Rows past `expires_at` are useless (the challenge itself has
-- expired) and are swept.
CREATE TABLE challenge_uses (
    key        bytea       PRIMARY KEY,
    expires_at timestamptz NOT NULL
);
CREATE INDEX challenge_uses_expiry ON challenge_uses (expires_at);

-- Users and IPs refused at the front door. Only the copy on the config group is read (like
-- shard_map); every engine node polls blocklist_version and reloads on change. `value` is a user
-- id in decimal, or an IP address or CIDR in canonical form. Ids are chosen by the engine.
CREATE TABLE blocklist (
    id         bigint      PRIMARY KEY CHECK (id > 0),
    kind       text        NOT NULL CHECK (kind IN ('user', 'ip')),
    value      text        NOT NULL CHECK (length(value) BETWEEN 1 AND 64),
    reason     text        NOT NULL DEFAULT '' CHECK (length(reason) <= 500),
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz
);
CREATE TABLE blocklist_version (
    id      integer PRIMARY KEY CHECK (id = 1),
    version bigint  NOT NULL
);
INSERT INTO blocklist_version VALUES (1, 0);

CREATE FUNCTION blocklist_bump() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE blocklist_version SET version = version + 1 WHERE id = 1;
    RETURN NULL;
END $$;
CREATE TRIGGER blocklist_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON blocklist
    FOR EACH STATEMENT EXECUTE FUNCTION blocklist_bump();
