-- depends: 0006.site-manufacturer
-- Issue 10: a remanufacture has a booking of its own (scheduling's new slot at the site that holds the
-- retained material). `run` is the run it serves; NULL for a collection's booking. Its material is at
-- the site from the start: an outage or a capacity cut never asks it to move.
ALTER TABLE bookings ADD COLUMN run integer CHECK (run IS NULL OR run >= 2);
