-- A fair start (DESIGN.md "Fair start"): the first `fair_window_ms` of a sale are a seeded draw.
-- The sale shows the seed's commitment from its creation; every item row carries the seed (the
-- draw runs on the item's group) and its draw's state; every buy request received in the window
-- is an entry, one per user and item.
ALTER TABLE sales ADD COLUMN fair_window_ms integer NOT NULL DEFAULT 0
    CHECK (fair_window_ms BETWEEN 0 AND 10000);
ALTER TABLE sales ADD COLUMN fair_commitment bytea;

ALTER TABLE sale_items ADD COLUMN fair_window_ms integer NOT NULL DEFAULT 0
    CHECK (fair_window_ms BETWEEN 0 AND 10000);
-- Secret until the draw is done; never shown by the API before.
ALTER TABLE sale_items ADD COLUMN fair_seed bytea;
-- The engine node running this item's draw, and until when its claim holds.
ALTER TABLE sale_items ADD COLUMN draw_claim uuid;
ALTER TABLE sale_items ADD COLUMN draw_claimed_until timestamptz;
-- The stock the draw started from, and when it was done (the seed is revealed once every item
-- of the sale is drawn).
ALTER TABLE sale_items ADD COLUMN draw_stock integer;
ALTER TABLE sale_items ADD COLUMN drawn_at timestamptz;
CREATE INDEX sale_items_undrawn ON sale_items (sale_id, item_id)
    WHERE fair_window_ms > 0 AND drawn_at IS NULL;

CREATE TABLE draw_entries (
    sale_id    bigint      NOT NULL,
    item_id    bigint      NOT NULL,
    user_id    bigint      NOT NULL,
    quantity   integer     NOT NULL CHECK (quantity > 0),
    -- The purchase's transaction id: its reservation's and its order's id if it wins.
    txn_id     uuid        NOT NULL,
    entered_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- Set by the draw: the rank key (HMAC-SHA256), the outcome, when; and when a winner's order
    -- was made on the user's group.
    rank_key   bytea,
    outcome    text        CHECK (outcome IN ('won', 'sold_out', 'limit_exceeded')),
    decided_at timestamptz,
    ordered_at timestamptz,
    PRIMARY KEY (sale_id, item_id, user_id)
);
CREATE INDEX draw_entries_undecided ON draw_entries (sale_id, item_id) WHERE outcome IS NULL;
