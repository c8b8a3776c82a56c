"""Release gates of a scan (`fbmem scan --fail-on "VM > 0.01"`), pure.

A gate is `LABEL OP VALUE`: LABEL one of VM, FM, BM, NM, or a sum such as `VM+FM`; OP one of
> >= < <= == !=; VALUE a share of the audited generations when written with a decimal point or a
`%` (`0.01`, `1%`), a count when an integer (`VM > 0` fails on any verbatim copy). A scan writes
everything first and then exits with its own code when any gate is crossed (jobs/errors.py), so a
release pipeline can stop on memorization while the evidence stays in the tables.
"""
from __future__ import annotations

import operator
import re
from collections.abc import Mapping
from dataclasses import dataclass

from fbmem.jobs.config import ConfigError
from fbmem.jobs.core.label_rule import LABELS

_OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le, "==": operator.eq,
        "!=": operator.ne}
_GATE = re.compile(r"^\s*([A-Za-z+ ]+?)\s*(>=|<=|==|!=|>|<)\s*([0-9]*\.?[0-9]+)\s*(%?)\s*$")


class GateError(ConfigError):
    """A gate that cannot be read (a usage error: exit 1)."""


@dataclass(frozen=True)
class Gate:
    text: str
    labels: tuple[str, ...]
    op: str
    value: float
    share: bool  # a share of the audited generations, else a count

    def measure(self, counts: Mapping[str, int]) -> float:
        n = sum(counts.get(lab, 0) for lab in self.labels)
        if not self.share:
            return float(n)
        total = sum(counts.get(lab, 0) for lab in LABELS)
        return n / total if total else 0.0

    def crossed(self, counts: Mapping[str, int]) -> bool:
        return bool(_OPS[self.op](self.measure(counts), self.value))


def parse_gate(text: str) -> Gate:
    m = _GATE.match(text)
    if not m:
        raise GateError(f"gate {text!r}: expected LABEL OP VALUE, e.g. \"VM > 0.01\" (a share) or \"VM > 0\" (a count)")
    names = tuple(part.strip().upper() for part in m.group(1).split("+"))
    unknown = [n for n in names if n not in LABELS]
    if unknown or not names:
        raise GateError(f"gate {text!r}: unknown label {', '.join(unknown) or '(none)'}; labels: {', '.join(LABELS)}")
    raw, pct = m.group(3), m.group(4) == "%"
    value = float(raw) / 100 if pct else float(raw)
    share = pct or "." in raw
    if share and not 0 <= value <= 1:
        raise GateError(f"gate {text!r}: a share must be between 0 and 1 (or 0% and 100%)")
    return Gate(text=text.strip(), labels=names, op=m.group(2), value=value, share=share)


def evaluate_gates(gates: list[Gate], counts: Mapping[str, int]) -> list[dict]:
    """One result per gate: its text, the measured value and whether it is crossed."""
    return [{"gate": g.text, "measured": g.measure(counts), "threshold": g.value, "share": g.share,
             "crossed": g.crossed(counts)} for g in gates]
