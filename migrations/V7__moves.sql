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
