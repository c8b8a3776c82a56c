"""NeMo (SPEC.md section 6) as pure functions over tensors and callables.

Pieces, in the order a prompt goes through them:
- statistics (statistics.py) and detection (detection.py) come first;
- initial selection (`initial_selection`) and the one-pass greedy refinement, both one candidate
  at a time as the reference does (`refine_sequential`) and batched (`refine_batched`).

Candidate neuron sets are `dict[layer_idx, list[int]]` (list order matters for the refinement; a
neuron listed twice, as the reference's selection lists it, counts once at its last place);
the search code only sees them through `evaluate(set) -> s` / `evaluate_many(sets) -> [s]`
callables, so it is tested with constructed oracles and run by the evaluator (evaluator.py) on a real UNet.

Why the batched refinement returns exactly the sequential sets: the greedy pass is a chain of
decisions, each "re-enable candidate c: does s stay below the threshold?" taken on the state left
by the previous decisions. `refine_batched` evaluates, in one batched call, a tree of speculative
states: the node for the outcome prefix (o_1..o_{k-1}) tests candidate k on exactly the state the
sequential pass would hold if the earlier outcomes were o_1..o_{k-1}. After the call it walks the
tree along the outcomes that really happened; every node on that walk was evaluated on the true
sequential state, so its decision is the sequential decision. The walk stops at the first
outcome whose branch was not evaluated, and the next call starts there. Which nodes to evaluate
only changes speed, never results: the most probable prefixes under a predictor (a candidate's
measured effect on s, or the phase's drop rate), plus scouting slots that give upcoming
candidates a first measurement. The same holds for the initial search (all (theta, k) sets of a
window in one call, then the first that mitigates).

"Exactly" is exact for a deterministic `evaluate`. A real UNet's float results depend on the
batch size in the last bits (seen on the CPU: s differs by ~5e-7 between a 4-sample and a
64-sample call), so a decision within ~1e-6 of the threshold could in principle go the other way,
the same order as the reference's own run-to-run GPU nondeterminism.

"""
from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from fbmem.jobs.core.nemo.statistics import NeuronStats

NeuronSets = dict[int, list[int]]
Evaluate = Callable[[NeuronSets], float]
EvaluateMany = Callable[[list[NeuronSets]], list[float]]


# ============================================================================ initial selection


STOP_EQUAL = "equal"
STOP_AT_OR_BELOW = "at-or-below"
STOP_RULES = (STOP_EQUAL, STOP_AT_OR_BELOW)
K_MAX = 1280  # (ref) the search also gives up when k reaches this (SD 1.4's widest value layer)


def search_stops(theta: float, k: int, *, theta_min: float = 1.0, stop_rule: str = STOP_EQUAL,
                 k_max: int = K_MAX) -> bool:
    """The reference's give-up test, made after the decrement: `theta == 1 or k >= 1280`.

    `equal` (ref) tests theta == theta_min exactly (the reference's literal 1 is its default
    min_theta); `at-or-below` tests theta <= theta_min. With the default start 5 and step 0.25
    (exact in binary) both stop at the same place; with a step that never lands on theta_min
    exactly, `equal` runs on until k reaches k_max, as the reference would.
    """
    if stop_rule not in STOP_RULES:
        raise ValueError(f"nemo.theta_stop must be one of {STOP_RULES}, got {stop_rule!r}")
    hit = theta == theta_min if stop_rule == STOP_EQUAL else theta <= theta_min
    return hit or k >= k_max


def theta_k_schedule(
    theta_start: float = 5.0, theta_step: float = 0.25, theta_min: float = 1.0, k_start: int = 0,
    *, stop_rule: str = STOP_EQUAL, k_max: int = K_MAX,
) -> list[tuple[float, int]]:
    """The (theta, k) pairs the initial search evaluates, in order (SPEC 6).

    The search evaluates, and while s(B) > threshold decrements theta (only while theta >
    theta_min) and increments k; it gives up as soon as the new (theta, k) meets `search_stops`.
    Defaults: 16 pairs, (5, 0) to (1.25, 15). Decrements are repeated subtractions, as the
    reference's loop does.
    """
    if theta_step <= 0:
        raise ValueError("theta_step must be positive")
    if k_max < 1:
        raise ValueError("k_max must be at least 1")
    out = []
    theta, k = float(theta_start), int(k_start)
    while True:
        out.append((theta, k))
        if theta > theta_min:
            theta -= theta_step
        k += 1
        if search_stops(theta, k, theta_min=theta_min, stop_rule=stop_rule, k_max=k_max):
            return out


def last_place(neurons: Sequence[int]) -> list[int]:
    """Each neuron once, at its LAST place in the list (SPEC 6).

    The reference lists a neuron that is both above theta and in the top-k twice; in its greedy
    refinement, re-enabling the first copy leaves the neuron blocked by the second, so the first
    copy goes and the neuron is in effect tested at its last place.
    """
    seen: set[int] = set()
    out: list[int] = []
    for j in reversed([int(x) for x in neurons]):
        if j not in seen:
            seen.add(j)
            out.append(j)
    return out[::-1]


def select_neurons(
    acts: Mapping[int, torch.Tensor], stats: NeuronStats, theta: float, k: int
) -> NeuronSets:
    """Per layer: {j : |a_j - mu_j| / sigma_j > theta} ascending, then top-k(a) descending.

    A neuron in both lists is kept once, at its last place (`last_place`): in the top-k part. Ties
    in top-k keep the lower index first (stable sort). sigma = 0 follows plain division (inf or
    nan), as the reference does.
    """
    out: NeuronSets = {}
    for idx in sorted(acts):
        a = acts[idx].float().flatten().cpu()
        z = (a - stats.mean[idx]).abs() / stats.std[idx]
        chosen = torch.nonzero(z > theta).flatten().tolist()
        if k > 0:
            chosen += torch.sort(a, descending=True, stable=True).indices[: min(k, a.numel())].tolist()
        out[idx] = last_place(chosen)
    return out


def set_key(sets: Mapping[int, Sequence[int]]) -> frozenset[tuple[int, int]]:
    """Neuron sets compared as sets (order and empty layers ignored)."""
    return frozenset((int(i), int(j)) for i, js in sets.items() for j in js)


def n_neurons(sets: Mapping[int, Sequence[int]]) -> int:
    return sum(len(v) for v in sets.values())


@dataclass
class InitialResult:
    sets: NeuronSets
    score: float  # s(B) of the kept set
    theta: float
    k: int
    mitigated: bool  # s(B) <= threshold was reached
    refine_threshold: float  # threshold, or the kept set's s(B) when the search gave up
    evaluations: int  # candidate sets the reference would evaluate
    evaluated: int  # candidate sets actually evaluated (batched: may include later ones)
    calls: int  # evaluate_many calls
    stop: str = ""  # the give-up test this search used (`stop_description`)


def stop_description(theta_min: float = 1.0, stop_rule: str = STOP_EQUAL, k_max: int = K_MAX) -> str:
    """The give-up test in words, for messages: 'theta == 1 or k >= 1280' (ref)."""
    return f"theta {'==' if stop_rule == STOP_EQUAL else '<='} {theta_min:g} or k >= {k_max}"


def initial_selection(
    acts: Mapping[int, torch.Tensor],
    stats: NeuronStats,
    evaluate_many: EvaluateMany,
    *,
    threshold: float,
    batch: int = 1,
    theta_start: float = 5.0,
    theta_step: float = 0.25,
    theta_min: float = 1.0,
    k_start: int = 0,
    stop_rule: str = STOP_EQUAL,
    k_max: int = K_MAX,
) -> InitialResult:
    """SPEC 6 initial search; `batch` > 1 evaluates that many (theta, k) sets per call.

    The result is the first set in schedule order with s(B) <= threshold, which is what the
    one-at-a-time loop stops at, so batching changes only the number of calls. Identical
    consecutive sets (nothing new at the lower theta) are evaluated once per call.
    The refinement threshold is `threshold`, or the kept set's s(B) when the search gave up; also
    (the reference's loop) when a mitigating set's own (theta, k) already meets the give-up test,
    which only a custom start can make happen.
    """
    schedule = theta_k_schedule(theta_start, theta_step, theta_min, k_start, stop_rule=stop_rule, k_max=k_max)
    cands = [select_neurons(acts, stats, th, k) for th, k in schedule]
    calls = evaluated = 0
    scores: list[float] = []
    for start in range(0, len(cands), max(1, batch)):
        window = cands[start:start + max(1, batch)]
        uniq: dict[frozenset, int] = {}
        todo = []
        for s in window:
            if set_key(s) not in uniq:
                uniq[set_key(s)] = len(todo)
                todo.append(s)
        vals = list(evaluate_many(todo))
        if len(vals) != len(todo):
            raise ValueError(f"evaluate_many returned {len(vals)} scores for {len(todo)} sets")
        calls += 1
        evaluated += len(todo)
        for s in window:
            scores.append(float(vals[uniq[set_key(s)]]))
            i = len(scores) - 1
            if scores[i] <= threshold:
                th, k = schedule[i]
                stops = search_stops(th, k, theta_min=theta_min, stop_rule=stop_rule, k_max=k_max)
                return InitialResult(cands[i], scores[i], th, k, True, scores[i] if stops else threshold,
                                     i + 1, evaluated, calls, stop_description(theta_min, stop_rule, k_max))
    th, k = schedule[-1]
    return InitialResult(cands[-1], scores[-1], th, k, False, scores[-1], len(cands), evaluated, calls,
                         stop_description(theta_min, stop_rule, k_max))


# ============================================================================ refinement


@dataclass(frozen=True)
class _Cand:
    """One refinement step: re-enable a whole layer (neuron None) or one neuron of it."""

    layer: int
    neuron: int | None = None


def _candidates(initial: Mapping[int, Sequence[int]]) -> list[_Cand]:
    layers = sorted(i for i, v in initial.items() if len(v))
    out = [_Cand(i) for i in reversed(layers)]
    for i in reversed(layers):
        out += [_Cand(i, int(j)) for j in initial[i]]
    return out


def _check_initial(initial: Mapping[int, Sequence[int]]) -> NeuronSets:
    """The refinement's starting lists, each neuron once at its last place (`last_place`), so a
    list in the reference's form (duplicates) is refined as the reference refines it."""
    return {int(i): last_place(v) for i, v in initial.items()}


@dataclass
class RefineResult:
    sets: NeuronSets
    score: float | None  # s(B) of the refined set (None: nothing dropped and no initial score given)
    decisions: int  # candidate decisions of the greedy pass (= the reference's evaluations)
    drops: int
    evaluated: int  # candidate sets evaluated (batched: includes speculative ones not used)
    calls: int  # evaluate / evaluate_many calls: sequential model calls
    per_call: list[int] = field(default_factory=list)  # decisions resolved by each call


def refine_sequential(
    initial_sets: Mapping[int, Sequence[int]],
    evaluate: Evaluate,
    threshold: float,
    *,
    initial_score: float | None = None,
) -> RefineResult:
    """The reference's greedy pass, one evaluation per candidate (SPEC 6).

    Layers in reverse order (mid block first): re-enable the whole layer; if s < threshold still
    holds, drop the layer. Then each remaining layer in reverse order, each neuron in list order:
    re-enable it alone; if s < threshold still holds, drop it. Empty layers have nothing to test.
    A neuron listed twice is tested once, at its last place.
    """
    state = _check_initial(initial_sets)
    score = initial_score
    calls = drops = 0
    for layer in sorted((i for i, v in state.items() if v), reverse=True):
        trial = {**state, layer: []}
        s = float(evaluate(trial))
        calls += 1
        if s < threshold:
            state, score, drops = trial, s, drops + 1
    for layer in sorted((i for i, v in state.items() if v), reverse=True):
        for j in list(state[layer]):
            trial = {**state, layer: [x for x in state[layer] if x != j]}
            s = float(evaluate(trial))
            calls += 1
            if s < threshold:
                state, score, drops = trial, s, drops + 1
    return RefineResult(state, score, calls, drops, calls, calls, [1] * calls)


class _Node:
    """A speculative state: outcome prefix, next candidate, removals so far, probability, base.

    `base` is the state's own s(B) when known (the score of the evaluation that made its last
    drop, or the refinement's starting score), or a prediction of it while building the tree.
    """

    __slots__ = ("prefix", "pos", "removed_layers", "removed", "prob", "base")

    def __init__(self, prefix, pos, removed_layers, removed, prob, base=None):
        self.prefix: tuple[bool, ...] = prefix
        self.pos: int = pos  # index of this node's candidate (after skips)
        self.removed_layers: frozenset[int] = removed_layers
        self.removed: frozenset[tuple[int, int]] = removed
        self.prob: float = prob
        self.base: float | None = base


def _apply(node: _Node, c: _Cand) -> tuple[frozenset[int], frozenset[tuple[int, int]]]:
    """The removal state after dropping candidate c."""
    if c.neuron is None:
        return node.removed_layers | {c.layer}, node.removed
    return node.removed_layers, node.removed | {(c.layer, c.neuron)}


def _next_pos(cands: list[_Cand], pos: int, removed_layers: frozenset[int]) -> int:
    """Skip neuron candidates of layers dropped in the layer phase (nothing left to re-enable)."""
    while pos < len(cands) and cands[pos].neuron is not None and cands[pos].layer in removed_layers:
        pos += 1
    return pos


def _state(initial: NeuronSets, removed_layers, removed) -> NeuronSets:
    return {i: ([] if i in removed_layers else [j for j in v if (i, j) not in removed]) for i, v in initial.items()}


class _Predictor:
    """Predicts a candidate's s on a state, used only to choose which states to evaluate.

    Model: re-enabling candidate c moves s by an effect e_c = s(S minus c) - s(S) that changes
    little while S changes by a few neurons, so s(S' minus c) ~ s(S') + e_c. Effects are measured
    exactly after each call (every evaluated state's own score is known then); the spread of the
    prediction errors seen so far (tau) turns a prediction into P(drop) = logistic((thr - s)/tau).
    Candidates never evaluated get the Laplace-smoothed drop rate of their phase (layer/neuron).
    """

    def __init__(self, threshold: float, lo: float = 0.02, hi: float = 0.98) -> None:
        self.threshold, self.lo, self.hi = threshold, lo, hi
        self.counts = {True: [0, 0], False: [0, 0]}  # is_layer -> [drops, decisions]
        self.effect: dict[_Cand, float] = {}
        self.raw: dict[_Cand, float] = {}
        self._err: list[float] = []

    def _clamp(self, p: float) -> float:
        return min(self.hi, max(self.lo, p))

    def predict(self, c: _Cand, base: float | None) -> float | None:
        if base is not None and c in self.effect:
            return base + self.effect[c]
        return self.raw.get(c)

    def p(self, c: _Cand, base: float | None) -> float:
        s = self.predict(c, base)
        if s is not None and self._err:
            tau = max(sum(self._err[-64:]) / len(self._err[-64:]), 1e-12)
            z = max(-60.0, min(60.0, (self.threshold - s) / tau))
            return self._clamp(1.0 / (1.0 + math.exp(-z)))
        d, n = self.counts[c.neuron is None]
        return self._clamp((d + 1) / (n + 2))

    def observe(self, c: _Cand, s: float, base: float | None) -> None:
        guess = self.predict(c, base)
        if guess is not None:
            self._err.append(abs(guess - s))
        self.raw[c] = s
        if base is not None:
            self.effect[c] = s - base

    def decided(self, c: _Cand, dropped: bool) -> None:
        cnt = self.counts[c.neuron is None]
        cnt[0] += int(dropped)
        cnt[1] += 1


def _child(cands: list[_Cand], node: _Node, dropped: bool, q: float, s: float | None) -> _Node:
    """The next state after node's candidate is dropped (base becomes its score s) or kept."""
    c = cands[node.pos]
    rl, rm = _apply(node, c) if dropped else (node.removed_layers, node.removed)
    return _Node(node.prefix + (dropped,), _next_pos(cands, node.pos + 1, rl), rl, rm, node.prob * q,
                 s if dropped else node.base)


def _speculation_tree(cands: list[_Cand], root: _Node, pred: _Predictor, batch: int) -> dict[tuple[bool, ...], _Node]:
    """The states to evaluate in one call: a prefix-closed tree of outcome prefixes.

    Up to a quarter of the slots scout: they extend the all-kept path over candidates never
    evaluated yet, which gives those candidates a measured effect to be predicted from next time
    (and resolves them at once when they are indeed all kept). The rest go best-first to the most
    probable prefixes.
    """
    ahead, pos = [], root.pos
    while pos < len(cands) and len(ahead) < batch:
        ahead.append(cands[pos])
        pos = _next_pos(cands, pos + 1, root.removed_layers)
    unseen = sum(1 for c in ahead if c not in pred.raw)
    scout = min(unseen, batch // 4) if batch >= 4 else 0
    chosen: dict[tuple[bool, ...], _Node] = {}
    heap = [(-root.prob, 0, root)]
    tie = 0
    while heap and len(chosen) < batch - scout:
        _, _, node = heapq.heappop(heap)
        chosen[node.prefix] = node
        c = cands[node.pos]
        p = pred.p(c, node.base)
        for dropped, q in ((True, p), (False, 1.0 - p)):
            child = _child(cands, node, dropped, q, pred.predict(c, node.base))
            if child.pos < len(cands):
                tie += 1
                heapq.heappush(heap, (-child.prob, tie, child))
    node = root
    while len(chosen) < batch and node.pos < len(cands):  # scouting along the all-kept path
        chosen.setdefault(node.prefix, node)
        node = _child(cands, node, False, 1.0, None)
    return chosen


def _true_bases(
    root: _Node, nodes: list[_Node], result: dict[tuple[bool, ...], float]
) -> dict[tuple[bool, ...], float | None]:
    """Each evaluated state's own score: that of its last drop in the prefix, else the root's."""
    out: dict[tuple[bool, ...], float | None] = {}
    for node in sorted(nodes, key=lambda n: len(n.prefix)):
        if not node.prefix:
            out[node.prefix] = root.base
            continue
        parent = node.prefix[:-1]
        out[node.prefix] = result[parent] if node.prefix[-1] else out[parent]
    return out


def refine_batched(
    initial_sets: Mapping[int, Sequence[int]],
    evaluate_many: EvaluateMany,
    threshold: float,
    batch: int,
    *,
    initial_score: float | None = None,
) -> RefineResult:
    """The same greedy pass as `refine_sequential`, `batch` speculative states per call.

    Each call evaluates a tree of outcome prefixes from the current decision (see
    `_speculation_tree`), then replays the true outcomes through it; see the module docstring for
    why the sets are exactly the sequential ones.
    """
    if batch < 1:
        raise ValueError("batch must be >= 1")
    initial = _check_initial(initial_sets)
    cands = _candidates(initial)
    pred = _Predictor(threshold)
    root = _Node((), _next_pos(cands, 0, frozenset()), frozenset(), frozenset(), 1.0, initial_score)
    score = initial_score
    decisions = drops = evaluated = calls = 0
    per_call: list[int] = []
    while root.pos < len(cands):
        chosen = _speculation_tree(cands, root, pred, batch)
        nodes = list(chosen.values())
        trials = [_state(initial, *_apply(node, cands[node.pos])) for node in nodes]
        vals = [float(v) for v in evaluate_many(trials)]
        if len(vals) != len(trials):
            raise ValueError(f"evaluate_many returned {len(vals)} scores for {len(trials)} sets")
        calls += 1
        evaluated += len(trials)
        result = {node.prefix: v for node, v in zip(nodes, vals)}
        bases = _true_bases(root, nodes, result)
        for node in sorted(nodes, key=lambda n: len(n.prefix)):
            pred.observe(cands[node.pos], result[node.prefix], bases[node.prefix])
        # replay the true outcomes down the tree: each visited node holds the sequential state
        node, resolved = root, 0
        while True:
            s = result[node.prefix]
            c = cands[node.pos]
            dropped = s < threshold
            pred.decided(c, dropped)
            resolved += 1
            if dropped:
                drops += 1
                score = s
            nxt = _child(cands, node, dropped, 1.0, s)
            if nxt.prefix in chosen:
                node = chosen[nxt.prefix]
                continue
            root = _Node((), nxt.pos, nxt.removed_layers, nxt.removed, 1.0, score)
            break
        decisions += resolved
        per_call.append(resolved)
    return RefineResult(_state(initial, root.removed_layers, root.removed), score, decisions, drops,
                        evaluated, calls, per_call)


def refine(
    initial_sets: Mapping[int, Sequence[int]],
    evaluate_many: EvaluateMany,
    threshold: float,
    *,
    batch: int = 1,
    initial_score: float | None = None,
) -> RefineResult:
    """batch 1: the reference (`refine_sequential`); otherwise `refine_batched`."""
    if batch <= 1:
        return refine_sequential(initial_sets, lambda s: evaluate_many([s])[0], threshold, initial_score=initial_score)
    return refine_batched(initial_sets, evaluate_many, threshold, batch, initial_score=initial_score)


# ============================================================================ whole search


@dataclass
class LocalizeResult:
    initial: InitialResult
    refined: RefineResult
    threshold: float

    @property
    def criterion_reached(self) -> bool:
        s = self.refined_score
        return s is not None and s <= self.threshold

    @property
    def refined_score(self) -> float | None:
        return self.refined.score

    @property
    def calls(self) -> int:
        return self.initial.calls + self.refined.calls


def localize(
    acts: Mapping[int, torch.Tensor],
    stats: NeuronStats,
    evaluate_many: EvaluateMany,
    *,
    threshold: float,
    batch: int = 1,
    theta_start: float = 5.0,
    theta_step: float = 0.25,
    theta_min: float = 1.0,
    k_start: int = 0,
    stop_rule: str = STOP_EQUAL,
    k_max: int = K_MAX,
) -> LocalizeResult:
    """Initial selection then refinement (SPEC 6); batch 1 is the reference's call pattern."""
    init = initial_selection(acts, stats, evaluate_many, threshold=threshold, batch=batch,
                             theta_start=theta_start, theta_step=theta_step, theta_min=theta_min, k_start=k_start,
                             stop_rule=stop_rule, k_max=k_max)
    ref = refine(init.sets, evaluate_many, init.refine_threshold, batch=batch, initial_score=init.score)
    return LocalizeResult(init, ref, threshold)
