-- Live sale changes (docs/api.md "Changing a running sale"): a sale can be paused (buys refused
-- with 409 `paused`), its end moved, an item restocked. `paused` is copied into every item row,
-- like the window, so transaction 1 checks it in the row it locks. Every change is recorded on the
-- group of the sale (or of the item, for a restock), with the admin request that made it.
ALTER TABLE sales ADD COLUMN paused boolean NOT NULL DEFAULT false;
ALTER TABLE sale_items ADD COLUMN paused boolean NOT NULL DEFAULT false;

CREATE TABLE sale_changes (
    -- A UUID: a move copies a change to another group once, whatever its catch-up passes.
    change_id  uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    sale_id    bigint      NOT NULL,
    item_id    bigint,
    -- 'ends_at', 'paused', 'resumed' or 'restock'.
    change     text        NOT NULL CHECK (change IN ('ends_at', 'paused', 'resumed', 'restock')),
    detail     jsonb       NOT NULL,
    request_id text,
    made_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX sale_changes_by_sale ON sale_changes (sale_id, made_at);
CREATE INDEX sale_changes_by_item ON sale_changes (item_id) WHERE item_id IS NOT NULL;
