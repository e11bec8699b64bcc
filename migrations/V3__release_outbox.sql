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
