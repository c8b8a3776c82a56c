"""FB-Mem label rule (SPEC section 2): pair labels, generation labels, the reference's rule."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fbmem.jobs.core.label_rule import (
    BM,
    FIRED_BG,
    FIRED_FG,
    FIRED_FG_BG,
    FIRED_FULL,
    FIRED_NONE,
    FM,
    NM,
    RULE_MOST_SEVERE,
    RULE_PAPER,
    SEVERITY,
    VM,
    generation_label,
    label_generation,
    pair_label,
    pair_labels,
    paper_rule,
    severity_of,
)

TAUS = {"tau_full": 0.8, "tau_fg": 0.8, "tau_bg": 0.8}
score = st.floats(0.0, 1.0, allow_nan=False)
tau = st.floats(0.05, 0.95, allow_nan=False)


@pytest.mark.parametrize(
    ("full", "fg", "bg", "label", "fired"),
    [
        (0.80, 0.10, 0.10, VM, FIRED_FULL),  # thresholds are inclusive
        (0.50, 0.80, 0.80, VM, FIRED_FG_BG),
        (0.50, 0.90, 0.79, FM, FIRED_FG),
        (0.50, 0.79, 0.95, BM, FIRED_BG),
        (0.79, 0.79, 0.79, NM, FIRED_NONE),
        (0.95, 0.95, 0.95, VM, FIRED_FULL),  # full fires first
    ],
)
def test_pair_rule_table(full, fg, bg, label, fired):
    assert pair_label(full, fg, bg, **TAUS) == label
    labels, why = pair_labels([full], [fg], [bg], **TAUS)
    assert labels.tolist() == [label] and why.tolist() == [fired]


def test_separate_thresholds_are_used():
    kw = {"tau_full": 0.95, "tau_fg": 0.6, "tau_bg": 0.9}
    assert pair_label(0.9, 0.65, 0.5, **kw) == FM  # full below its own tau, fg above 0.6
    assert pair_label(0.9, 0.5, 0.92, **kw) == BM
    assert pair_label(0.9, 0.5, 0.85, **kw) == NM
    assert pair_label(0.96, 0.0, 0.0, **kw) == VM


def test_bad_scores_and_thresholds_raise():
    with pytest.raises(ValueError, match="NaN"):
        pair_label(float("nan"), 0.5, 0.5, **TAUS)
    with pytest.raises(ValueError, match="tau_fg"):
        pair_label(0.5, 0.5, 0.5, tau_full=0.8, tau_fg=1.5, tau_bg=0.8)
    with pytest.raises(ValueError, match="differ in shape"):
        pair_labels([0.1, 0.2], [0.1], [0.1], **TAUS)
    with pytest.raises(ValueError, match="unknown labels"):
        severity_of(["VM", "XX"])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(score, score, score), min_size=1, max_size=8), tau, tau, tau)
def test_vectorised_matches_scalar(rows, tf, tg, tb):
    kw = {"tau_full": tf, "tau_fg": tg, "tau_bg": tb}
    full, fg, bg = (np.array(c) for c in zip(*rows))
    labels, _ = pair_labels(full, fg, bg, **kw)
    assert labels.tolist() == [pair_label(*r, **kw) for r in rows]


@settings(max_examples=80, deadline=None)
@given(score, score, score, st.integers(0, 2), st.floats(0.0, 1.0), tau, tau, tau)
def test_raising_a_score_never_lowers_severity(full, fg, bg, which, new, tf, tg, tb):
    kw = {"tau_full": tf, "tau_fg": tg, "tau_bg": tb}
    before = [full, fg, bg]
    after = list(before)
    after[which] = max(before[which], new)
    assert SEVERITY[pair_label(*after, **kw)] >= SEVERITY[pair_label(*before, **kw)]


@settings(max_examples=80, deadline=None)
@given(score, score, score, tau, tau, tau)
def test_labels_respect_thresholds(full, fg, bg, tf, tg, tb):
    label = pair_label(full, fg, bg, tau_full=tf, tau_fg=tg, tau_bg=tb)
    if label == VM:
        assert full >= tf or (fg >= tg and bg >= tb)
    else:
        assert full < tf and not (fg >= tg and bg >= tb)
    if label == FM:
        assert fg >= tg and bg < tb
    if label == BM:
        assert bg >= tb and fg < tg
    if label == NM:
        assert fg < tg and bg < tb and full < tf


pair_rows = st.lists(
    st.fixed_dictionaries({"full": score, "fg": score, "bg": score}), min_size=1, max_size=10
)


@settings(max_examples=80, deadline=None)
@given(pair_rows, tau, tau, tau)
def test_generation_label_is_the_most_severe_pair(rows, tf, tg, tb):
    kw = {"tau_full": tf, "tau_fg": tg, "tau_bg": tb}
    label, idx, reason = generation_label(rows, **kw)
    per_pair = [pair_label(r["full"], r["fg"], r["bg"], **kw) for r in rows]
    assert SEVERITY[label] == max(SEVERITY[p] for p in per_pair)
    assert per_pair[idx] == label
    best_mean = max(0.5 * (r["fg"] + r["bg"]) for r, p in zip(rows, per_pair) if p == label)
    assert 0.5 * (rows[idx]["fg"] + rows[idx]["bg"]) == best_mean
    assert reason.startswith(RULE_MOST_SEVERE)


@settings(max_examples=60, deadline=None)
@given(pair_rows, tau, tau, tau)
def test_paper_rule_labels_the_best_average_pair(rows, tf, tg, tb):
    kw = {"tau_full": tf, "tau_fg": tg, "tau_bg": tb}
    label, idx, reason = paper_rule(rows, **kw)
    means = [0.5 * r["fg"] + 0.5 * r["bg"] for r in rows]
    assert idx == int(np.argmax(means))
    assert label == pair_label(rows[idx]["full"], rows[idx]["fg"], rows[idx]["bg"], **kw)
    assert reason.startswith(RULE_PAPER)
    # the project rule is never less severe than the reference's
    assert SEVERITY[generation_label(rows, **kw)[0]] >= SEVERITY[label]


def test_rules_differ_when_a_verbatim_pair_has_a_lower_average():
    rows = [
        {"full": 0.85, "fg": 0.40, "bg": 0.45},  # VM by full score, mean 0.425
        {"full": 0.50, "fg": 0.70, "bg": 0.75},  # NM, mean 0.725: the reference picks this one
    ]
    assert generation_label(rows, **TAUS)[:2] == (VM, 0)
    assert paper_rule(rows, **TAUS)[:2] == (NM, 1)
    assert label_generation(rows, rule=RULE_PAPER, **TAUS)[:2] == (NM, 1)
    assert label_generation(rows, rule=RULE_MOST_SEVERE, **TAUS)[:2] == (VM, 0)


def test_ties_broken_by_mean_of_fg_and_bg():
    rows = [
        {"full": 0.1, "fg": 0.85, "bg": 0.1},  # FM, mean 0.475
        {"full": 0.1, "fg": 0.90, "bg": 0.3},  # FM, mean 0.600
        {"full": 0.1, "fg": 0.10, "bg": 0.9},  # BM
    ]
    label, idx, reason = generation_label(rows, **TAUS)
    assert (label, idx) == (FM, 1)
    assert "2 of 3 pairs" in reason


def test_generation_errors():
    with pytest.raises(ValueError, match="at least one"):
        generation_label([], **TAUS)
    with pytest.raises(ValueError, match="'bg'"):
        generation_label([{"full": 0.1, "fg": 0.2}], **TAUS)
    with pytest.raises(ValueError, match="unknown label rule"):
        label_generation([{"full": 0.1, "fg": 0.2, "bg": 0.3}], rule="max", **TAUS)
