-- Each attempt that makes a reservation live (creates, revives or resumes it) bumps `attempt`.
-- Compensation releases a reservation only while it still carries the releasing attempt's number,
-- so a failed attempt can never release stock that a later retry of the same request resumed.
ALTER TABLE reservations ADD COLUMN attempt integer NOT NULL DEFAULT 1;

-- The reconciler looks for live reservations by age; index exactly that.
DROP INDEX reservations_unconfirmed;
CREATE INDEX reservations_live ON reservations (updated_at) WHERE state IN ('reserved', 'ordered');
