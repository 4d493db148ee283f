"""Scheduling parameters come from seed/scheduling.yaml, not from code."""

from __future__ import annotations

from pathlib import Path

import yaml

from scheduling_service import services
from scheduling_service.domain.selection import Parameters
from scheduling_service.services import PARAMS, SEED, load_parameters


def test_seed_file_is_the_packaged_one() -> None:
    assert Path(services.__file__).parent / "seed" / "scheduling.yaml" == SEED
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
    assert params == PARAMS


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
