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
