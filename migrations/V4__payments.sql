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
