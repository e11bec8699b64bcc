-- Two guards of a move on each group (src/moves/mod.rs "Guards"):
-- item_fences: a key move of an item fences the key itself, not only its existing rows, so a sale
-- created for it while it moves (its first rows) is refused on the source too; a completed move's
-- entry stays a minute as a tombstone, like a slot fence.
-- ended_moves: a move rolled back here; a runner that lost its claim may still try to fence for it,
-- and is refused (both take the move's advisory lock, so one sees the other's work).
CREATE TABLE item_fences (
    item_id bigint      PRIMARY KEY,
    move_id bigint      NOT NULL,
    until   timestamptz
);
CREATE INDEX item_fences_by_move ON item_fences (move_id);

CREATE TABLE ended_moves (
    move_id  bigint      PRIMARY KEY,
    ended_at timestamptz NOT NULL DEFAULT now()
);
