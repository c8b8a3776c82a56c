"""NeMo search (SPEC.md section 6): initial (theta, k) selection, the stop rule, duplicate neurons, and
the greedy refinement one candidate at a time and batched.

The search is tested on constructed oracles (s(B) as a function of the neuron set) where the
expected answer follows from SPEC by hand, and batched == sequential is checked on random oracles
with various drop rates (tests/jobs/test_nemo.py checks it on the real tiny UNet).
"""
from __future__ import annotations

import hashlib
import random

import pytest
import torch

from fbmem.jobs.core.nemo.search import (
    STOP_AT_OR_BELOW,
    initial_selection,
    last_place,
    n_neurons,
    refine_batched,
    refine_sequential,
    search_stops,
    select_neurons,
    set_key,
    theta_k_schedule,
)
from fbmem.jobs.core.nemo.statistics import NeuronStats

# ---------------------------------------------------------------------------- initial selection


def test_theta_k_schedule_gives_up_at_theta_one_after_16():
    sched = theta_k_schedule()
    assert len(sched) == 16
    assert sched[0] == (5.0, 0) and sched[-1] == (1.25, 15)
    assert [k for _, k in sched] == list(range(16))


def test_select_neurons_outliers_ascending_then_topk_once_at_last_place():
    st = NeuronStats({0: "l0"}, {0: torch.zeros(6)}, {0: torch.ones(6)})
    acts = {0: torch.tensor([0.5, 9.0, -6.0, 7.0, 0.1, 4.0])}
    assert select_neurons(acts, st, 5.0, 0) == {0: [1, 2, 3]}  # |z| > 5, ascending index
    # top-3 by activation: 1 (9.0), 3 (7.0), 5 (4.0); 1 and 3 already listed: kept once, at their LAST
    # place (the top-k part), where the reference's refinement in effect tests them (issue 15)
    assert select_neurons(acts, st, 5.0, 3) == {0: [2, 1, 3, 5]}
    assert select_neurons(acts, st, 8.0, 2) == {0: [1, 3]}


class SetOracle:
    """s(B) from a rule on the set; records every set it is asked about, and the calls."""

    def __init__(self, fn):
        self.fn, self.seen, self.calls = fn, [], 0

    def one(self, s):
        self.calls += 1
        self.seen.append(s)
        return self.fn(s)

    def many(self, sets):
        self.calls += 1
        self.seen.extend(sets)
        return [self.fn(s) for s in sets]


def _linear_stats(width: int = 40):
    """acts a_j = j / 4 vs mean 0, std 1: neuron j is above theta iff j / 4 > theta."""
    st = NeuronStats({0: "l0", 1: "l1"}, {0: torch.zeros(width), 1: torch.zeros(width)},
                     {0: torch.ones(width), 1: torch.ones(width)})
    acts = {0: torch.arange(width) / 4.0, 1: torch.zeros(width)}
    return acts, st


def test_initial_selection_stops_at_the_first_mitigating_set():
    acts, st = _linear_stats()
    oracle = SetOracle(lambda s: 0.9 if n_neurons(s) < 12 else 0.3)
    res = initial_selection(acts, st, lambda ss: [oracle.one(s) for s in ss], threshold=0.428, batch=1)
    # (theta, k) = (5 - i/4, i): layer 0 has j/4 > theta (j > 20 - i) plus top-i; layer 1 top-i
    counts = [n_neurons(select_neurons(acts, st, th, k)) for th, k in theta_k_schedule()]
    first = next(i for i, c in enumerate(counts) if c >= 12)
    assert res.mitigated and res.evaluations == first + 1 and oracle.calls == first + 1
    assert (res.theta, res.k) == theta_k_schedule()[first]
    assert res.score == 0.3 and res.refine_threshold == 0.428
    batched = initial_selection(acts, st, SetOracle(oracle.fn).many, threshold=0.428, batch=16)
    assert batched.sets == res.sets and batched.calls == 1 and (batched.theta, batched.k) == (res.theta, res.k)


def test_initial_selection_gives_up_and_refines_against_the_last_score():
    acts, st = _linear_stats()
    oracle = SetOracle(lambda s: 0.95 - 0.001 * n_neurons(s))
    res = initial_selection(acts, st, lambda ss: [oracle.one(s) for s in ss], threshold=0.428, batch=1)
    assert not res.mitigated and oracle.calls == 16 and res.evaluations == 16
    assert (res.theta, res.k) == (1.25, 15)
    assert res.sets == select_neurons(acts, st, 1.25, 15)
    assert res.refine_threshold == res.score == pytest.approx(0.95 - 0.001 * n_neurons(res.sets))
    assert all(len(set(v)) == len(v) for v in res.sets.values())  # each neuron once
    batched = initial_selection(acts, st, SetOracle(oracle.fn).many, threshold=0.428, batch=5)
    assert batched.sets == res.sets and batched.calls == 4 and batched.score == res.score


# ---------------------------------------------------------------------------- refinement


def _additive(weights):
    return lambda s: 1.0 - sum(weights[(i, j)] for i, js in s.items() for j in js)


def test_refinement_follows_spec_on_a_hand_worked_case():
    """s = 1 - sum of blocked weights; layers reverse (1 then 0), then neurons of what remains."""
    w = {(0, 1): 0.5, (0, 2): 0.1, (0, 3): 0.3, (1, 4): 0.05, (1, 5): 0.05}
    init = {0: [1, 2, 3], 1: [4, 5]}
    seq = refine_sequential(init, _additive(w), 0.428)
    # layer 1 off -> s = 0.1 < thr: dropped; layer 0 off -> s = 1: kept.
    # neuron 1 -> 0.6 kept; neuron 2 -> 0.2 dropped; neuron 3 -> 0.5 kept.
    assert seq.sets == {0: [1, 3], 1: []}
    assert seq.decisions == 5 and seq.drops == 2 and seq.score == pytest.approx(0.2)
    for batch, calls in ((4, None), (64, 1)):  # 64 slots hold every outcome path of these 5 decisions
        bat = refine_batched(init, lambda ss: [_additive(w)(s) for s in ss], 0.428, batch)
        assert bat.sets == seq.sets and bat.score == seq.score and bat.decisions == 5
        assert bat.calls == calls if calls else bat.calls < seq.calls


def test_refinement_threshold_is_strict():
    w = {(0, 1): 0.5, (0, 2): 0.25}
    # re-enabling neuron 1 gives exactly 0.75: not below the threshold, so 1 stays; then 2 goes (0.5)
    assert refine_sequential({0: [1, 2]}, _additive(w), 0.75).sets == {0: [1]}
    # a hair above: neuron 1 goes (0.75 < thr); then re-enabling 2 would unblock everything (1.0): 2 stays
    assert refine_sequential({0: [1, 2]}, _additive(w), 0.7500001).sets == {0: [2]}


def _hash_oracle(seed: int):
    def f(s):
        h = hashlib.sha256(f"{seed}|{sorted(set_key(s))}".encode()).digest()
        return int.from_bytes(h[:8], "big") / 2**64
    return f


@pytest.mark.parametrize("kind,thr", [("hash", 0.1), ("hash", 0.5), ("hash", 0.9), ("additive", 0.05),
                                      ("additive", 0.3), ("additive", 0.7)])
def test_batched_refinement_equals_sequential_on_random_oracles(kind, thr):
    rng = random.Random(f"{kind}{thr}")
    for trial in range(4):
        init = {i: rng.sample(range(300), rng.randint(0, 40)) for i in range(rng.randint(1, 7))}
        total = max(1, n_neurons(init))
        if kind == "hash":
            fn = _hash_oracle(trial)
        else:
            w = {(i, j): rng.expovariate(1.0) / total for i in init for j in init[i]}
            fn = lambda s, w=w: _additive(w)(s) + 0.002 * (_hash_oracle(trial)(s) - 0.5)  # noqa: E731
        seq_oracle = SetOracle(fn)
        seq = refine_sequential(init, seq_oracle.one, thr, initial_score=fn(init))
        for batch in (2, 7, 64):
            oracle = SetOracle(fn)
            bat = refine_batched(init, oracle.many, thr, batch, initial_score=fn(init))
            assert bat.sets == seq.sets, (kind, thr, trial, batch)
            assert (bat.score, bat.decisions, bat.drops) == (seq.score, seq.decisions, seq.drops)
            assert oracle.calls == bat.calls and sum(bat.per_call) == seq.decisions
            assert len(oracle.seen) == bat.evaluated
            if seq.decisions >= 20 and batch == 64:
                assert bat.calls * 3 <= seq.calls, (kind, thr, trial, seq.calls, bat.calls)
        assert seq_oracle.calls == seq.decisions


def test_batched_refinement_resolves_long_runs_in_few_calls():
    """Mostly-dropped and mostly-kept candidates: speculation resolves many decisions per call."""
    rng = random.Random(5)
    init = {i: rng.sample(range(500), 60) for i in range(5)}
    w = {(i, j): rng.expovariate(1.0) / 300 for i in init for j in init[i]}
    for thr in (0.05, 0.6):
        seq = refine_sequential(init, _additive(w), thr)
        bat = refine_batched(init, lambda ss: [_additive(w)(s) for s in ss], thr, 64)
        assert bat.sets == seq.sets
        assert seq.calls >= 10 * bat.calls, (thr, seq.calls, bat.calls)


def _reference_refinement_literal(blocking: list[int], s, threshold: float) -> list[int]:
    """The reference's neuron_refinement for one layer, word for word: Python lists with duplicates,
    `list.remove` (first occurrence), iterating over a copy of the initial list."""
    blocking = list(blocking)
    if s({0: []}) < threshold:  # 1.) the whole layer
        return []
    for neuron in list(blocking):  # 2.) each neuron in list order
        curr = list(blocking)
        curr.remove(neuron)
        if s({0: curr}) < threshold:
            blocking.remove(neuron)
    return blocking


def test_duplicated_neurons_are_tested_once_at_their_last_place():
    """The reference lists neuron 1 twice (above theta, and in the top-k). Which place it is tested
    at changes the greedy result; the reference in effect tests it at its last place."""
    w = {(0, 1): 0.3, (0, 2): 0.2, (0, 3): 0.2}
    s = _additive(w)  # s = 1 - sum of blocked weights (a neuron blocked twice counts once)
    s_set = lambda sets: s({i: sorted(set(v)) for i, v in sets.items()})  # noqa: E731
    ref_list, thr = [1, 2, 3, 1], 0.75  # initial s = 0.3: mitigates
    first, last = [1, 2, 3], [2, 3, 1]
    assert last_place(ref_list) == last
    # first place: re-enabling 1 gives 0.6 (dropped), then 2 and 3 give 0.8 each (kept) -> {2, 3}
    assert refine_sequential({0: first}, s, thr).sets == {0: [2, 3]}
    # last place: 2 -> 0.5 dropped, 3 -> 0.7 dropped, 1 -> 1.0 kept -> {1}
    assert refine_sequential({0: last}, s, thr).sets == {0: [1]}
    # the reference itself, duplicates and all, gives the last-place answer
    assert _reference_refinement_literal(ref_list, s_set, thr) == [1]
    # and the code, given the reference's list, takes the last place, sequential and batched alike
    assert refine_sequential({0: ref_list}, s, thr).sets == {0: [1]}
    for batch in (2, 4, 64):
        bat = refine_batched({0: ref_list}, lambda ss: [s(x) for x in ss], thr, batch)
        assert bat.sets == {0: [1]} and bat.decisions == 4  # one layer decision + three neurons, not four


# ---------------------------------------------------------------------------- stop rule


def test_stop_rule_equal_is_the_references_and_at_or_below_is_a_setting():
    # default start and step: both rules give up after 16 sets, at theta 1.25, k 15
    assert theta_k_schedule(stop_rule=STOP_AT_OR_BELOW) == theta_k_schedule()
    # a step that never lands on 1: the reference's `theta == 1` never fires; theta stops
    # decreasing at 0.8 (it only decreases while > 1) and the search runs on until k reaches k_max
    eq = theta_k_schedule(5.0, 0.3, 1.0, 0, k_max=40)
    assert len(eq) == 40 and eq[-1][1] == 39 and eq[-1][0] == pytest.approx(0.8)
    assert eq[13][0] == pytest.approx(1.1) and eq[14][0] == pytest.approx(0.8) == eq[20][0]
    below = theta_k_schedule(5.0, 0.3, 1.0, 0, stop_rule=STOP_AT_OR_BELOW, k_max=40)
    assert len(below) == 14 and below[-1][0] == pytest.approx(1.1)  # gives up when theta reaches 0.8
    assert len(theta_k_schedule(5.0, 0.3, 1.0, 0)) == 1280  # the reference's k >= 1280
    assert search_stops(1.0, 3) and not search_stops(0.999, 3) and search_stops(0.999, 3, stop_rule=STOP_AT_OR_BELOW)
    with pytest.raises(ValueError, match="theta_stop"):
        search_stops(1.0, 0, stop_rule="below")


def test_a_set_that_mitigates_where_the_search_would_stop_refines_against_its_own_score():
    """The reference tests `theta == 1 or k >= 1280` after every evaluation, mitigating or not: a
    custom start at theta = 1 that mitigates at once refines against that set's s(B)."""
    acts, st = _linear_stats()
    res = initial_selection(acts, st, lambda ss: [0.3 for _ in ss], threshold=0.428, theta_start=1.0)
    assert res.mitigated and (res.theta, res.k) == (1.0, 0) and res.refine_threshold == 0.3
    res = initial_selection(acts, st, lambda ss: [0.3 for _ in ss], threshold=0.428)
    assert res.mitigated and res.refine_threshold == 0.428
    assert res.stop == "theta == 1 or k >= 1280"
