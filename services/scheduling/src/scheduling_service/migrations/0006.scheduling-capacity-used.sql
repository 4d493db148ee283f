-- depends: 0005.scheduling-slot-collected
-- The capacity each day has used, counted as it changes instead of counted again at every booking.
--
-- The plan of a booking needs, for its product, how many runs each site has on each day (slots held,
-- confirmed or consumed, and offers' active holds) and, under a centre's quota, how many of them are the
-- centre's. Counting them from `slots` and `holds` at every booking read every live slot of the product
-- from the start of its window on: the read grew with the book (0.30 ms with 50 slots of a product,
-- 0.96 ms with 1,200), and the scheduling hop, which books one order after another, fell behind as the
-- book grew (docs/BENCHMARKS.md, optimisation round 13). These two tables hold the counts; triggers keep
-- them in the transaction of every write of a slot or a hold (whatever writes it), so that a count read
-- under the product's lock is exactly what counting the rows would give. A day whose runs were released
-- keeps its row with 0.
CREATE TABLE capacity_used (
    product_code text NOT NULL,
    day          date NOT NULL,
    site_id      text NOT NULL,
    n            integer NOT NULL CHECK (n >= 0),
    PRIMARY KEY (product_code, day, site_id)
);

CREATE TABLE centre_capacity_used (
    treatment_center_id text NOT NULL,
    product_code        text NOT NULL,
    day                 date NOT NULL,
    n                   integer NOT NULL CHECK (n >= 0),
    PRIMARY KEY (treatment_center_id, product_code, day)
);

-- one run more (delta 1) or less (-1) on a day of a site, and of a centre (none for a slot booked before
-- slots named their centre). A run less where none is counted is an error: the counts would be wrong.
-- (An INSERT ... ON CONFLICT of -1 would fail the CHECK before finding the row: a decrement updates.)
CREATE FUNCTION capacity_used_add(product text, site text, on_day date, centre text, delta integer)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF delta > 0 THEN
        INSERT INTO capacity_used AS u (product_code, day, site_id, n) VALUES (product, on_day, site, delta)
        ON CONFLICT (product_code, day, site_id) DO UPDATE SET n = u.n + EXCLUDED.n;
        IF centre IS NOT NULL THEN
            INSERT INTO centre_capacity_used AS u (treatment_center_id, product_code, day, n)
            VALUES (centre, product, on_day, delta)
            ON CONFLICT (treatment_center_id, product_code, day) DO UPDATE SET n = u.n + EXCLUDED.n;
        END IF;
        RETURN;
    END IF;
    UPDATE capacity_used SET n = n + delta WHERE product_code = product AND day = on_day AND site_id = site;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'capacity_used: no run of % counted at % on %', product, site, on_day;
    END IF;
    IF centre IS NOT NULL THEN
        UPDATE centre_capacity_used SET n = n + delta
        WHERE treatment_center_id = centre AND product_code = product AND day = on_day;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'centre_capacity_used: no run of % counted for % on %', product, centre, on_day;
        END IF;
    END IF;
END $$;

-- a row of `slots` or `holds` uses its day while its status is one of the trigger's arguments (a slot
-- held, confirmed or consumed; a hold active)
CREATE FUNCTION row_capacity_used() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'INSERT' AND OLD.status = ANY (TG_ARGV) THEN
        PERFORM capacity_used_add(OLD.product_code, OLD.site_id, OLD.manufacturing_start_date,
                                  OLD.treatment_center_id, -1);
    END IF;
    IF TG_OP <> 'DELETE' AND NEW.status = ANY (TG_ARGV) THEN
        PERFORM capacity_used_add(NEW.product_code, NEW.site_id, NEW.manufacturing_start_date,
                                  NEW.treatment_center_id, 1);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER slots_capacity_count AFTER INSERT OR DELETE ON slots
    FOR EACH ROW EXECUTE FUNCTION row_capacity_used('held', 'confirmed', 'consumed');
-- an update only when it changes whether the slot counts, or where it counts (held -> confirmed: no)
CREATE TRIGGER slots_capacity_count_update AFTER UPDATE ON slots FOR EACH ROW
    WHEN ((OLD.status IN ('held', 'confirmed', 'consumed')) IS DISTINCT FROM
          (NEW.status IN ('held', 'confirmed', 'consumed'))
          OR (OLD.product_code, OLD.site_id, OLD.manufacturing_start_date, OLD.treatment_center_id)
             IS DISTINCT FROM
             (NEW.product_code, NEW.site_id, NEW.manufacturing_start_date, NEW.treatment_center_id))
    EXECUTE FUNCTION row_capacity_used('held', 'confirmed', 'consumed');

CREATE TRIGGER holds_capacity_count AFTER INSERT OR DELETE ON holds
    FOR EACH ROW EXECUTE FUNCTION row_capacity_used('active');
CREATE TRIGGER holds_capacity_count_update AFTER UPDATE ON holds FOR EACH ROW
    WHEN ((OLD.status = 'active') IS DISTINCT FROM (NEW.status = 'active')
          OR (OLD.product_code, OLD.site_id, OLD.manufacturing_start_date, OLD.treatment_center_id)
             IS DISTINCT FROM
             (NEW.product_code, NEW.site_id, NEW.manufacturing_start_date, NEW.treatment_center_id))
    EXECUTE FUNCTION row_capacity_used('active');

-- what the book holds already
INSERT INTO capacity_used (product_code, day, site_id, n)
SELECT product_code, day, site_id, count(*) FROM (
    SELECT product_code, manufacturing_start_date AS day, site_id FROM slots
    WHERE status IN ('held', 'confirmed', 'consumed')
    UNION ALL
    SELECT product_code, manufacturing_start_date, site_id FROM holds WHERE status = 'active'
) AS used GROUP BY product_code, day, site_id;

INSERT INTO centre_capacity_used (treatment_center_id, product_code, day, n)
SELECT treatment_center_id, product_code, day, count(*) FROM (
    SELECT treatment_center_id, product_code, manufacturing_start_date AS day FROM slots
    WHERE status IN ('held', 'confirmed', 'consumed') AND treatment_center_id IS NOT NULL
    UNION ALL
    SELECT treatment_center_id, product_code, manufacturing_start_date FROM holds WHERE status = 'active'
) AS used GROUP BY treatment_center_id, product_code, day;
