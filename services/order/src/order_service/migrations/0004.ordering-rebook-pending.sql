-- depends: 0003.ordering-parked-facts
-- While a rebook is pending, only a slot reserved for that rebook moves the order (a slot reserved for
-- the superseded request, e.g. served from the waitlist meanwhile, is recorded and ignored).
ALTER TABLE orders ADD COLUMN rebook_pending boolean NOT NULL DEFAULT false;
