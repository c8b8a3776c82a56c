"""NeMo statistics (SPEC.md section 6): per-neuron mean and std of |to_v| activations over
ordinary prompts, accumulated in one pass, read from the reference CSV, and checked against the
UNet's value layers before a search trusts them."""
from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fbmem.jobs.core.nemo.hooks import ValueLayer

STATS_COLUMNS = ("layer_idx", "module", "neuron", "mean_abs_act", "std_abs_act")


class ActivationAccumulator:
    """Running per-neuron mean/std of activations, so 50,000 prompts never sit in memory at once.

    Sums are kept in float64 (sum and sum of squares of values of order 1 over 1e5 prompts lose
    nothing there); std is the sample std (n - 1), torch.std's default.
    """

    def __init__(self) -> None:
        self.n = 0
        self._s: dict[int, torch.Tensor] = {}
        self._ss: dict[int, torch.Tensor] = {}

    def update(self, acts: Mapping[int, torch.Tensor]) -> None:
        ns = {int(t.shape[0]) for t in acts.values()}
        if len(ns) != 1:
            raise ValueError(f"every layer must hold the same prompts; got batch sizes {sorted(ns)}")
        for idx, a in acts.items():
            a = a.detach().to("cpu", torch.float64)
            if idx in self._s and self._s[idx].shape[0] != a.shape[1]:
                raise ValueError(f"layer {idx}: {a.shape[1]} neurons, earlier batches had {self._s[idx].shape[0]}")
            self._s[idx] = self._s.get(idx, 0) + a.sum(0)
            self._ss[idx] = self._ss.get(idx, 0) + (a * a).sum(0)
        self.n += ns.pop()

    def result(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        if self.n < 2:
            raise ValueError(f"activation statistics need at least 2 prompts, got {self.n}")
        out = {}
        for idx in sorted(self._s):
            mean = self._s[idx] / self.n
            var = (self._ss[idx] - self.n * mean * mean).clamp_min(0) / (self.n - 1)
            out[idx] = (mean.float(), var.sqrt().float())
        return out


def activation_stats(acts: Mapping[int, torch.Tensor]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (mean [C], std [C]) of activations acts[idx] = [N, C] over the N prompts."""
    acc = ActivationAccumulator()
    acc.update(acts)
    return acc.result()


@dataclass
class NeuronStats:
    """Per-layer activation statistics with the module names they were computed on."""

    modules: dict[int, str]
    mean: dict[int, torch.Tensor]
    std: dict[int, torch.Tensor]
    source: str = ""
    n_prompts: int | None = None

    def sizes(self) -> dict[int, int]:
        return {i: int(m.numel()) for i, m in self.mean.items()}


def load_stats_csv(path: str | Path) -> NeuronStats:
    """The SD 1.4 reference format: layer_idx,module,neuron,mean_abs_act,std_abs_act.

    Neurons of each layer must be exactly 0..C-1 (any order) and one module name per layer, so a
    truncated or mixed file is an error naming the row, never a silently shifted neuron.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"statistics file not found: {path}")
    rows: dict[int, dict[int, tuple[float, float]]] = {}
    modules: dict[int, str] = {}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in STATS_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}; expected {', '.join(STATS_COLUMNS)}")
        for line, r in enumerate(reader, start=2):
            try:
                li, n = int(r["layer_idx"]), int(r["neuron"])
                mu, sd = float(r["mean_abs_act"]), float(r["std_abs_act"])
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{line}: unreadable row {r}: {exc}") from exc
            if modules.setdefault(li, r["module"]) != r["module"]:
                raise ValueError(f"{path}:{line}: layer {li} named both {modules[li]!r} and {r['module']!r}")
            if n in rows.setdefault(li, {}):
                raise ValueError(f"{path}:{line}: layer {li} neuron {n} appears twice")
            rows[li][n] = (mu, sd)
    if not rows:
        raise ValueError(f"{path}: no statistics rows")
    mean, std = {}, {}
    for li in sorted(rows):
        c = len(rows[li])
        if sorted(rows[li]) != list(range(c)):
            raise ValueError(f"{path}: layer {li} neurons are not 0..{c - 1}")
        vals = torch.tensor([rows[li][j] for j in range(c)], dtype=torch.float32)
        mean[li], std[li] = vals[:, 0].contiguous(), vals[:, 1].contiguous()
    if sorted(rows) != list(range(len(rows))):
        raise ValueError(f"{path}: layer indices {sorted(rows)} are not 0..{len(rows) - 1}")
    return NeuronStats(modules, mean, std, source=f"file:{path.name}")


def check_stats_layers(stats: NeuronStats, layers: Sequence[ValueLayer]) -> None:
    """Statistics must describe exactly these layers (same count, names and widths)."""
    have = [(i, stats.modules.get(i), stats.sizes()[i]) for i in sorted(stats.mean)]
    want = [(l.idx, l.name, l.out_features) for l in layers]
    if have != want:
        diff = [f"layer {w[0]}: model {w[1]} ({w[2]}) vs stats {h[1]} ({h[2]})"
                for h, w in zip(have, want) if h != w]
        raise ValueError(
            f"the activation statistics ({stats.source or 'given'}: {len(have)} layers, "
            f"{sum(h[2] for h in have)} neurons) do not match this UNet's value layers "
            f"({len(want)} layers, {sum(w[2] for w in want)} neurons)"
            + (": " + "; ".join(diff[:4]) if diff else "")
            + ". Compute statistics for this model (`run_stats`) or import the file made for it."
        )
