"""Scheduling parameters come from seed/scheduling.yaml (or the file V2V_SCHEDULING_PARAMETERS names),
read at start-up, not from code; product facts come from the shared catalogue."""

from __future__ import annotations

import importlib
from datetime import date
from pathlib import Path

import pytest
import yaml

from scheduling_service import config
from scheduling_service.config import SEED, SchedulingSettings, load_parameters
from scheduling_service.domain.selection import Parameters, Request
from scheduling_service.domain.slots import SlotRequest
from v2v_contracts import OrderSubmittedV1
from v2v_contracts.reference import product_catalogue


@pytest.fixture(autouse=True)
def no_parameters_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("V2V_SCHEDULING_PARAMETERS", raising=False)


def test_seed_file_is_the_packaged_one() -> None:
    assert Path(config.__file__).parent / "seed" / "scheduling.yaml" == SEED
    assert SEED.is_file()


def test_load_parameters_reads_the_seed() -> None:
    cfg = yaml.safe_load(SEED.read_text())
    params = load_parameters()
    assert params == Parameters(
        same_region_transit_days=cfg["inbound_transit_days"]["same_region"],
        cross_region_transit_days=cfg["inbound_transit_days"]["cross_region"],
        horizon_days=cfg["booking_horizon_days"],
        lanes={
            (lane["from"], lane["to"], material): days
            for lane in cfg["lanes"]
            for material, days in lane["days"].items()
        },
    )
    # what the service runs with when no other file is named
    assert params == SchedulingSettings().planning().params


def test_seed_values_are_sensible() -> None:
    params = load_parameters()
    assert params.same_region_transit_days >= 0
    assert params.cross_region_transit_days >= params.same_region_transit_days
    assert params.horizon_days > 0


def test_load_parameters_uses_the_given_file(tmp_path: Path) -> None:
    path = tmp_path / "scheduling.yaml"
    path.write_text("inbound_transit_days: {same_region: '3', cross_region: 5}\nbooking_horizon_days: 9\n")
    params = load_parameters(path)
    assert params == Parameters(same_region_transit_days=3, cross_region_transit_days=5, horizon_days=9)
    assert isinstance(params.same_region_transit_days, int)


def test_the_settings_name_another_parameters_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "scheduling.yaml"
    path.write_text("inbound_transit_days: {same_region: 2, cross_region: 4}\nbooking_horizon_days: 7\n")
    assert SchedulingSettings().parameters_file == SEED
    monkeypatch.setenv("V2V_SCHEDULING_PARAMETERS", str(path))
    settings = SchedulingSettings()
    assert settings.parameters_file == path
    assert settings.planning().params == Parameters(2, 4, horizon_days=7)
    monkeypatch.setenv("V2V_SCHEDULING_PARAMETERS", "")  # empty: the seed
    assert SchedulingSettings().parameters_file == SEED


def test_nothing_is_read_at_import(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Importing the service (its composition root) reads no parameters file: a missing one fails only
    when the handlers are built at start-up."""
    monkeypatch.setenv("V2V_SCHEDULING_PARAMETERS", str(tmp_path / "missing.yaml"))
    app = importlib.reload(importlib.import_module("scheduling_service.app"))
    with pytest.raises(FileNotFoundError):
        SchedulingSettings().planning()
    assert app.DEFINITION.settings_class is SchedulingSettings


def test_the_seed_holds_no_product_facts() -> None:
    """Durations and material are product facts: the one catalogue has them, the seed does not."""
    cfg = yaml.safe_load(SEED.read_text())
    assert "products" not in cfg
    assert set(cfg) == {"inbound_transit_days", "booking_horizon_days", "lanes"}


def test_product_facts_come_from_the_shared_catalogue() -> None:
    catalogue = product_catalogue()
    assert SchedulingSettings().planning().products == catalogue
    assert set(catalogue) >= {"TISA-CEL", "AXI-CEL", "CILTA-CEL"}
    for code, product in catalogue.items():
        req = SlotRequest.submitted(
            OrderSubmittedV1(
                order_id="00000000-0000-0000-0000-000000000001",  # type: ignore[arg-type]
                coi="V2V0026000001X",
                treatment_center_id="TC-DE-BE-001",
                product_code=code,
                order_type="commercial",
                regulator="EMA",
                country="DE",
                region="europe",
                requested_apheresis_date=date(2026, 6, 1),
            )
        )
        assert req.selection(catalogue) == Request(
            code,
            "commercial",
            "EMA",
            "europe",
            date(2026, 6, 1),
            material=product.apheresis_material,
            processing_days=product.manufacturing_days + product.qc_days,
        )
    # the values the seed used to carry, now the catalogue's
    facts = {c: (p.apheresis_material, p.manufacturing_days, p.qc_days) for c, p in catalogue.items()}
    assert facts["TISA-CEL"] == ("cryopreserved", 17, 14)
    assert facts["AXI-CEL"] == ("fresh", 14, 7)
    assert facts["CILTA-CEL"] == ("fresh", 19, 14)
    # a product the catalogue does not know: fresh, no processing days (as before)
    unknown = SlotRequest(
        req.order_id,
        req.coi,
        req.treatment_center_id,
        "NOT-A-PRODUCT",
        "commercial",
        "EMA",
        "europe",
        req.apheresis_date,
    )
    assert unknown.selection(catalogue).material == "fresh"
    assert unknown.selection(catalogue).processing_days == 0
