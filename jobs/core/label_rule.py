"""FB-Mem labels (SPEC.md section 2): a pair's label from its scores, a generation's from its pairs.

Why both generation rules: the project's rule (`most-severe`) labels a generation by its worst
pair, so one verbatim copy among 20 candidates is never hidden by a better-averaged candidate;
the reference code's rule (`paper-best-average`) labels only the candidate with the highest
0.5*fg + 0.5*bg. Every result names the rule it used, and pair scores are kept, so either rule
can be recomputed later.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

VM, FM, BM, NM = "VM", "FM", "BM", "NM"
LABELS: tuple[str, ...] = (VM, FM, BM, NM)  # most severe first
SEVERITY: dict[str, int] = {VM: 3, FM: 2, BM: 1, NM: 0}

# which condition produced a pair label
FIRED_FULL = "full"  # full >= tau_full -> VM
FIRED_FG_BG = "fg+bg"  # fg >= tau_fg and bg >= tau_bg -> VM
FIRED_FG = "fg"  # -> FM
FIRED_BG = "bg"  # -> BM
FIRED_NONE = "none"  # -> NM

RULE_MOST_SEVERE = "most-severe"
RULE_PAPER = "paper-best-average"
RULES: tuple[str, ...] = (RULE_MOST_SEVERE, RULE_PAPER)

_LABEL_OF_CODE = np.array([NM, BM, FM, VM])  # indexed by severity
_FIRED_NAMES = np.array([FIRED_NONE, FIRED_BG, FIRED_FG, FIRED_FG_BG, FIRED_FULL])


def _check_taus(tau_full: float, tau_fg: float, tau_bg: float) -> None:
    for name, t in (("tau_full", tau_full), ("tau_fg", tau_fg), ("tau_bg", tau_bg)):
        if not (0.0 <= float(t) <= 1.0):
            raise ValueError(f"{name} must be in [0, 1], got {t}")


def _as_scores(full, fg, bg) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    arrs = [np.asarray(a, dtype=np.float64) for a in (full, fg, bg)]
    shapes = {a.shape for a in arrs}
    if len(shapes) != 1:
        raise ValueError(f"full, fg and bg differ in shape: {[a.shape for a in arrs]}")
    for name, a in zip(("full", "fg", "bg"), arrs):
        if np.isnan(a).any():
            raise ValueError(f"{name} contains NaN: a score is missing, so no label can be given")
    return arrs[0], arrs[1], arrs[2]


def pair_labels(full, fg, bg, *, tau_full: float, tau_fg: float,
                tau_bg: float) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised pair rule: (labels, fired) string arrays of the scores' shape.

    fired names the condition that decided: full, fg+bg (both VM), fg (FM), bg (BM), none (NM).
    """
    _check_taus(tau_full, tau_fg, tau_bg)
    f, g, b = _as_scores(full, fg, bg)
    hit_full, hit_fg, hit_bg = f >= tau_full, g >= tau_fg, b >= tau_bg
    fired = np.select([hit_full, hit_fg & hit_bg, hit_fg, hit_bg], [4, 3, 2, 1], default=0)
    severity = np.select([fired >= 3, fired == 2, fired == 1], [3, 2, 1], default=0)
    return _LABEL_OF_CODE[severity], _FIRED_NAMES[fired]


def pair_label(full: float, fg: float, bg: float, *, tau_full: float, tau_fg: float,
               tau_bg: float) -> str:
    """SPEC 2 rule for one pair: VM, FM, BM or NM."""
    labels, _ = pair_labels(full, fg, bg, tau_full=tau_full, tau_fg=tau_fg, tau_bg=tau_bg)
    return str(labels)


def severity_of(labels) -> np.ndarray:
    """Severity codes (VM 3 > FM 2 > BM 1 > NM 0) of label strings."""
    arr = np.asarray(labels)
    out = np.full(arr.shape, -1, dtype=np.int64)
    for lab, sev in SEVERITY.items():
        out[arr == lab] = sev
    if (out < 0).any():
        raise ValueError(f"unknown labels: {sorted(set(arr[out < 0].tolist()))} (expected {LABELS})")
    return out


def _rows_to_scores(pairs: Sequence[Mapping[str, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if len(pairs) == 0:
        raise ValueError("a generation needs at least one scored pair to be labelled")
    try:
        return (np.array([p["full"] for p in pairs], dtype=np.float64),
                np.array([p["fg"] for p in pairs], dtype=np.float64),
                np.array([p["bg"] for p in pairs], dtype=np.float64))
    except KeyError as e:
        raise ValueError(f"pair rows need 'full', 'fg' and 'bg' scores; missing {e}") from None


def generation_label(pairs: Sequence[Mapping[str, float]], *, tau_full: float, tau_fg: float,
                     tau_bg: float) -> tuple[str, int, str]:
    """(label, index of the deciding pair, reason) under RULE_MOST_SEVERE.

    The most severe pair label wins; ties go to the higher mean of fg and bg, then to the first pair.
    """
    full, fg, bg = _rows_to_scores(pairs)
    labels, fired = pair_labels(full, fg, bg, tau_full=tau_full, tau_fg=tau_fg, tau_bg=tau_bg)
    sev = severity_of(labels)
    mean_fb = 0.5 * (fg + bg)
    # lexsort: last key is primary; negate for descending; index order breaks remaining ties
    idx = int(np.lexsort((np.arange(len(sev)), -mean_fb, -sev))[0])
    n_same = int((sev == sev[idx]).sum())
    reason = (f"{RULE_MOST_SEVERE}: pair {idx} is {labels[idx]} by '{fired[idx]}' "
              f"(full={full[idx]:.4f}, fg={fg[idx]:.4f}, bg={bg[idx]:.4f}); "
              f"{n_same} of {len(sev)} pairs share this label")
    return str(labels[idx]), idx, reason


def paper_rule(pairs: Sequence[Mapping[str, float]], *, tau_full: float, tau_fg: float,
               tau_bg: float) -> tuple[str, int, str]:
    """(label, index, reason) under RULE_PAPER: label the pair with the highest 0.5*fg + 0.5*bg."""
    full, fg, bg = _rows_to_scores(pairs)
    idx = int(np.argmax(0.5 * fg + 0.5 * bg))  # first index on ties, like the reference's argmax
    labels, fired = pair_labels(full[idx], fg[idx], bg[idx], tau_full=tau_full, tau_fg=tau_fg,
                                tau_bg=tau_bg)
    reason = (f"{RULE_PAPER}: pair {idx} has the highest 0.5*fg+0.5*bg "
              f"({0.5 * fg[idx] + 0.5 * bg[idx]:.4f}) and is {labels} by '{fired}'")
    return str(labels), idx, reason


def label_generation(pairs: Sequence[Mapping[str, float]], *, rule: str = RULE_MOST_SEVERE,
                     tau_full: float, tau_fg: float, tau_bg: float) -> tuple[str, int, str]:
    """Dispatch on a rule name (a config value) to generation_label or paper_rule."""
    if rule == RULE_MOST_SEVERE:
        return generation_label(pairs, tau_full=tau_full, tau_fg=tau_fg, tau_bg=tau_bg)
    if rule == RULE_PAPER:
        return paper_rule(pairs, tau_full=tau_full, tau_fg=tau_fg, tau_bg=tau_bg)
    raise ValueError(f"unknown label rule {rule!r}; expected one of {RULES}")
