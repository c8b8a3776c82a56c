"""Release gates (`fbmem scan --fail-on`): shares vs counts, sums of labels, bad gates."""
from __future__ import annotations

import pytest

from fbmem.jobs.core.gates import GateError, evaluate_gates, parse_gate

COUNTS = {"VM": 2, "FM": 1, "BM": 0, "NM": 97}  # 100 audited generations


def test_a_decimal_or_percent_is_a_share_an_integer_a_count() -> None:
    assert parse_gate("VM > 0.01").share and parse_gate("VM > 1%").share
    assert not parse_gate("VM > 1").share
    assert parse_gate("VM > 1%").value == pytest.approx(0.01)


@pytest.mark.parametrize(("gate", "crossed"), [
    ("VM > 0.01", True),     # 2% > 1%
    ("VM > 0.02", False),    # 2% is not > 2%
    ("VM >= 0.02", True),
    ("VM > 1", True),        # 2 generations > 1
    ("VM > 2", False),
    ("VM+FM > 0.025", True),  # 3%
    ("vm + fm >= 4", False),
    ("BM > 0", False),
    ("NM < 0.5", False),
    ("NM == 97", True),
])
def test_gates_are_crossed_exactly_when_the_measure_crosses_the_threshold(gate: str, crossed: bool) -> None:
    assert parse_gate(gate).crossed(COUNTS) is crossed


def test_no_generations_crosses_no_share_gate() -> None:
    assert not parse_gate("VM > 0.0").crossed({})


@pytest.mark.parametrize("bad", ["VM", "XM > 0.1", "VM > 1.5", "VM >> 1", "VM > -1", ""])
def test_a_gate_that_cannot_be_read_is_a_config_error(bad: str) -> None:
    with pytest.raises(GateError):
        parse_gate(bad)


def test_evaluate_reports_measure_and_verdict() -> None:
    out = evaluate_gates([parse_gate("VM > 0.01"), parse_gate("FM > 5")], COUNTS)
    assert out[0] == {"gate": "VM > 0.01", "measured": 0.02, "threshold": 0.01, "share": True, "crossed": True}
    assert out[1]["measured"] == 1.0 and out[1]["crossed"] is False
