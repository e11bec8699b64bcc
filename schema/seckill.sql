-- schema/seckill.sql: the seckill schema as plain SQL, for DBAs who bootstrap shard groups by hand.
--
-- It mirrors the refinery migrations embedded in the engine: everything below this header is
-- migrations/V1__init.sql, unchanged. When a migration is added or changed, update this file too.
--
-- Apply it to the MASTER of EVERY shard group, in the database the DSNs in shards.toml name
-- (normally `seckill`). Shadows receive it through streaming replication; never apply it to a
-- shadow. Every group gets the whole schema, shard_map included, so any group can be the config group.
--
--     psql "host=<master> port=5432 user=seckill dbname=seckill" -v ON_ERROR_STOP=1 -1 -f schema/seckill.sql
--
-- Choose ONE of two ways to create the schema, per cluster, and stay with it:
--
-- 1. Engine-managed (the normal path). Do not apply this file. `seckill migrate --config shards.toml`,
--    or `seckill serve` with `[server] migrate_on_start = true` (the default), applies the embedded
--    migrations to every group's master and records them in the table refinery_schema_history.
--    Later releases apply their new migrations the same way.
--
-- 2. By hand. Apply this file to every master and set `[server] migrate_on_start = false` in
--    shards.toml; do not run `seckill migrate` against these groups afterwards. Refinery finds no
--    record of version 1 in refinery_schema_history, runs it again, and stops at
--    `relation "sales" already exists`: nothing changes (each migration runs in a transaction),
--    but `seckill migrate` fails and `seckill serve` refuses to start. A hand-applied schema cannot
--    be recorded for refinery by hand: each history row carries a checksum of the migration that
--    only the engine computes. Later migrations (migrations/V2__*.sql, ...) must then be applied
--    by hand as well, in order, on every master.
--
-- Which way a master went: a refinery_schema_history table with a row for version 1 means
-- engine-managed; the tables below without refinery_schema_history mean applied by hand.

-- seckill schema: the same on every shard group (DESIGN.md "Data model").
-- Ids are positive bigints; the engine refuses anything else at the API.

CREATE TABLE sales (
    sale_id             bigint PRIMARY KEY CHECK (sale_id > 0),
    name                text        NOT NULL,
    starts_at           timestamptz NOT NULL,
    ends_at             timestamptz NOT NULL,
    item_ids            bigint[]    NOT NULL,
    payment_window_secs integer     NOT NULL CHECK (payment_window_secs > 0),
    created_at          timestamptz NOT NULL DEFAULT now(),
    CHECK (ends_at > starts_at)
);

-- One row per item of a sale, on the item's group. The window is copied from the sale so the
-- conditional decrement checks it in the same row; remaining >= 0 is the last line against oversell.
CREATE TABLE sale_items (
    sale_id             bigint      NOT NULL,
    item_id             bigint      NOT NULL CHECK (item_id > 0),
    stock               integer     NOT NULL CHECK (stock >= 0),
    remaining           integer     NOT NULL CHECK (remaining >= 0 AND remaining <= stock),
    price_cents         bigint      NOT NULL CHECK (price_cents >= 0),
    per_user_limit      integer     NOT NULL CHECK (per_user_limit > 0),
    starts_at           timestamptz NOT NULL,
    ends_at             timestamptz NOT NULL,
    payment_window_secs integer     NOT NULL CHECK (payment_window_secs > 0),
    version             bigint      NOT NULL DEFAULT 0,
    PRIMARY KEY (sale_id, item_id)
);

-- The item-side ledger: one row per purchase, keyed by the transaction id that is also the order id.
CREATE TABLE reservations (
    txn_id     uuid        PRIMARY KEY,
    sale_id    bigint      NOT NULL,
    item_id    bigint      NOT NULL,
    user_id    bigint      NOT NULL,
    quantity   integer     NOT NULL CHECK (quantity > 0),
    state      text        NOT NULL CHECK (state IN ('reserved', 'ordered', 'paid', 'released')),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX reservations_by_buyer ON reservations (sale_id, item_id, user_id);
CREATE INDEX reservations_unconfirmed ON reservations (created_at) WHERE state = 'reserved';

-- The user-side record, on the user's group.
CREATE TABLE orders (
    order_id     uuid        PRIMARY KEY,
    user_id      bigint      NOT NULL,
    sale_id      bigint      NOT NULL,
    item_id      bigint      NOT NULL,
    quantity     integer     NOT NULL CHECK (quantity > 0),
    amount_cents bigint      NOT NULL CHECK (amount_cents >= 0),
    status       text        NOT NULL CHECK (status IN ('pending_payment', 'paid', 'cancelled', 'expired')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    paid_at      timestamptz,
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX orders_by_user ON orders (user_id, created_at);
CREATE INDEX orders_pending_expiry ON orders (expires_at) WHERE status = 'pending_payment';

-- The router-config table. Only the copy on the config group is read; every group has the table
-- so any group can be made the config group.
CREATE TABLE shard_map (
    kind       text   NOT NULL CHECK (kind IN ('items', 'users')),
    key        bigint NOT NULL CHECK (key > 0),
    group_name text   NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, key)
);
CREATE TABLE shard_map_version (
    id      integer PRIMARY KEY CHECK (id = 1),
    version bigint  NOT NULL
);
INSERT INTO shard_map_version VALUES (1, 0);

CREATE FUNCTION shard_map_bump() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE shard_map_version SET version = version + 1 WHERE id = 1;
    RETURN NULL;
END $$;
CREATE TRIGGER shard_map_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON shard_map
    FOR EACH STATEMENT EXECUTE FUNCTION shard_map_bump();

-- migrations/V2__attempts.sql
-- Each attempt that makes a reservation live (creates, revives or resumes it) bumps `attempt`.
-- Compensation releases a reservation only while it still carries the releasing attempt's number,
-- so a failed attempt can never release stock that a later retry of the same request resumed.
ALTER TABLE reservations ADD COLUMN attempt integer NOT NULL DEFAULT 1;

-- The reconciler looks for live reservations by age; index exactly that.
DROP INDEX reservations_unconfirmed;
CREATE INDEX reservations_live ON reservations (updated_at) WHERE state IN ('reserved', 'ordered');

-- migrations/V3__release_outbox.sql
-- Stock that a cancel or an expiry must return to the item's group. The row is written in the same
-- transaction as the order's status change, so the release cannot be forgotten when the item's
-- group is unreachable at that moment (failing over, say): every engine node drains the table,
-- and a release is idempotent, so draining one twice is harmless.
-- An entry whose item group cannot be reached is tried again later (`next_attempt_at`), so it
-- never holds back the entries behind it.
CREATE TABLE release_outbox (
    order_id        uuid        PRIMARY KEY,
    item_id         bigint      NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    next_attempt_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX release_outbox_due ON release_outbox (next_attempt_at);

-- migrations/V4__payments.sql
-- Every payment callback the engine accepted or refused, on the group of the order's user, so a
-- refused one (late, duplicate, wrong amount) can be refunded and the provider's settlement file
-- can be reconciled against what the engine recorded. `state`: `applied` (it paid the order) or
-- `refund_due` (refused; `reason` says why: amount_mismatch, order_paid, order_cancelled,
-- order_expired, order_not_found).
CREATE TABLE payments (
    payment_ref  text        PRIMARY KEY CHECK (length(payment_ref) BETWEEN 1 AND 128),
    order_id     uuid        NOT NULL,
    user_id      bigint      NOT NULL,
    sale_id      bigint,
    amount_cents bigint      NOT NULL,
    state        text        NOT NULL CHECK (state IN ('applied', 'refund_due')),
    reason       text,
    received_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX payments_by_order ON payments (order_id);
CREATE INDEX payments_by_sale ON payments (sale_id, state);

-- migrations/V5__front_door.sql
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

-- The routing layout a cluster runs with (strategies, slot maps, ranges, by group name), kept on
-- the config group: an engine whose configuration would route existing keys to other groups
-- refuses to start instead (README "Changing the layout").
CREATE TABLE cluster_layout (
    id         integer     PRIMARY KEY CHECK (id = 1),
    layout     jsonb       NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Live moves of keys between shard groups (README "Moving keys").
--
-- The fence lives in the item's own row: while `fenced_by` names a move, transaction 1 and every
-- release (which lock this row first) refuse to write the item here, and the reconciler and the
-- audit leave the copy alone. A fenced row is either a copy being filled on the destination, the
-- source during the brief switch, or the inactive copy a switched move leaves behind.
ALTER TABLE sale_items ADD COLUMN fenced_by bigint;

-- The moves themselves, on the config group (like the router-config table): a persisted state
-- machine that any engine node (or the CLI) resumes when the one running it dies.
CREATE TABLE moves (
    move_id        bigint      PRIMARY KEY CHECK (move_id > 0),
    kind           text        NOT NULL CHECK (kind IN ('items', 'users')),
    -- The unit moved: one key, or every key of one hash slot.
    key            bigint      CHECK (key > 0),
    slot           integer     CHECK (slot >= 0),
    from_group     text        NOT NULL,
    to_group       text        NOT NULL CHECK (to_group <> from_group),
    phase          text        NOT NULL CHECK (phase IN ('copying', 'catching_up', 'fenced',
                                   'switched', 'completed', 'failed', 'cancelled')),
    rows_copied    bigint      NOT NULL DEFAULT 0,
    write_pause_ms bigint,
    error          text,
    -- Rows changed after this instant (by a writer holding the item's row lock) are not copied yet.
    watermark      timestamptz,
    -- Asked for by the API/CLI; carried out by whoever runs the move.
    cancel_requested   boolean NOT NULL DEFAULT false,
    complete_requested boolean NOT NULL DEFAULT false,
    -- The destination's copy is live (unfenced) once the route points at it.
    dest_live      boolean     NOT NULL DEFAULT false,
    -- Failed or cancelled, but the source's fence or the destination's copy is not cleaned up yet.
    cleanup_pending boolean    NOT NULL DEFAULT false,
    reverse_of     bigint,
    reversed_by    bigint,
    -- Who runs it, and until when that claim holds without being renewed.
    owner          text,
    lease_until    timestamptz,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    fenced_at      timestamptz,
    switched_at    timestamptz,
    finished_at    timestamptz,
    CHECK ((key IS NULL) <> (slot IS NULL))
);
-- One move in flight per key and per slot (the engine also refuses a move while another is open on
-- the key, its slot or a key of the slot, under an advisory lock; a switched move's reverse is the
-- one exception).
CREATE UNIQUE INDEX moves_one_open_per_key ON moves (kind, key)
    WHERE key IS NOT NULL AND phase IN ('copying', 'catching_up', 'fenced');
CREATE UNIQUE INDEX moves_one_open_per_slot ON moves (kind, slot)
    WHERE slot IS NOT NULL AND phase IN ('copying', 'catching_up', 'fenced');

-- Hash slots moved off the group the configuration gives them (a slot move's switch writes
-- here). Read with `shard_map` by every node; a key's own entry wins over its slot's.
CREATE TABLE slot_map (
    kind       text    NOT NULL CHECK (kind IN ('items', 'users')),
    slot       integer NOT NULL CHECK (slot >= 0),
    group_name text    NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, slot)
);
CREATE TRIGGER slot_map_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON slot_map
    FOR EACH STATEMENT EXECUTE FUNCTION shard_map_bump();

-- The fence of users being moved: while a user is named here, orders, payments and cancels of
-- that user are refused on this group (every such statement checks), and the mover waits for
-- the transactions that started before the fence before it copies the last changes.
CREATE TABLE user_fences (
    user_id bigint PRIMARY KEY,
    move_id bigint NOT NULL
);

-- A reservation's order exists: marked by `ordered_at` instead of `state = 'ordered'` and a new
-- `updated_at`. Neither `ordered_at` nor anything the mark changes is indexed, so the mark is a HOT
-- update (no new index entries in the three indexes of `reservations`) when the page has room,
-- which the fill factor keeps for it. Readers take `state = 'reserved' AND ordered_at IS NOT NULL`
-- as ordered; `state = 'ordered'` stays valid (rows marked before this migration).
ALTER TABLE reservations ADD COLUMN ordered_at timestamptz;
ALTER TABLE reservations SET (fillfactor = 85);

-- Sales carry a move's fence too (a slot move carries the sales whose ids are in the slot): a
-- fenced sale row is a copy being filled or one left behind, not the live one.
ALTER TABLE sales ADD COLUMN fenced_by bigint;

-- A hash slot being moved, fenced as a whole: keys of the slot that have no rows yet (a user's
-- first order, a new sale) are refused here too, so a node still routing the slot here cannot
-- start a second copy of them. A completed move leaves the fence for a while (`until`: longer
-- than any node takes to re-read the routes), then it no longer counts.
CREATE TABLE slot_fences (
    kind    text        NOT NULL CHECK (kind IN ('items', 'users')),
    slot    integer     NOT NULL CHECK (slot >= 0),
    move_id bigint      NOT NULL,
    until   timestamptz,
    PRIMARY KEY (kind, slot)
);
