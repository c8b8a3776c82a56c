"""NeMo's neurons (SPEC.md section 6): the cross-attention value projections, and hooks on them.

A *neuron* is one output channel of an `attn2.to_v` Linear in a down block or the mid block.
Layers are found by walking `unet.named_modules()` (never by SD 1.4 shapes), in a fixed order:
down blocks in order, then the mid block; `ValueLayer.idx` is the position in that order and is
the layer id used everywhere (statistics CSV `layer_idx`, the `neurons` table, hook mappings).

Hooks:
- `deactivate(unet, {idx: [neurons]}, alpha)`: multiply the chosen channels by alpha on every call
  (every denoising step; both classifier-free-guidance branches, since they share the batch).
- `channel_scales(unet, {idx: Tensor[B, C]})`: a per-sample multiplier per channel, so B different
  neuron sets can be evaluated in ONE batched UNet call (NeMo's batched refinement).
- `record_activations(unet)`: what the value layers output during a UNet pass (tests, diagnostics).
`value_activations(unet, E)` gives NeMo's activation statistic without any UNet pass: it applies
each to_v directly to the text-encoder output, which is all a cross-attention value layer sees.

Removing a hook (leaving the context) restores the exact original outputs: nothing in the UNet is
modified, the hooks only rescale what the Linear returns.
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from fbmem.jobs.core.nemo.numerics import NATIVE, autocast_for, compute_dtype

_VALUE_NAME = re.compile(r"^(down_blocks\.\d+|mid_block)\..*attn2\.to_v$")


@dataclass(frozen=True)
class ValueLayer:
    """One cross-attention value projection: `idx` is its NeMo layer id (0..L-1)."""

    idx: int
    name: str
    module: torch.nn.Linear
    out_features: int


def find_value_layers(unet: torch.nn.Module) -> list[ValueLayer]:
    """The `attn2.to_v` Linears of the down blocks (in order) then the mid block.

    Up blocks are excluded (SPEC 6). named_modules() lists `mid_block` after `up_blocks` in
    diffusers' UNet2DConditionModel, so the order is imposed explicitly, not inherited.
    """
    found: list[tuple[int, int, str, torch.nn.Module]] = []
    for pos, (name, module) in enumerate(unet.named_modules()):
        m = _VALUE_NAME.match(name)
        if not m:
            continue
        if not isinstance(module, torch.nn.Linear):
            raise TypeError(
                f"{name} is a {type(module).__name__}, not a torch.nn.Linear: NeMo's hooks need plain "
                "value projections (unfuse QKV / merge LoRA adapters before localizing)"
            )
        found.append((0 if m.group(1).startswith("down") else 1, pos, name, module))
    if not found:
        raise ValueError(
            "no cross-attention value layers (down_blocks.*/mid_block.* ...attn2.to_v) in this UNet: "
            "NeMo needs a text-conditioned UNet with cross-attention in its down or mid blocks"
        )
    found.sort(key=lambda t: (t[0], t[1]))
    return [ValueLayer(i, name, mod, mod.out_features) for i, (_, _, name, mod) in enumerate(found)]


def total_neurons(layers: Sequence[ValueLayer]) -> int:
    return sum(l.out_features for l in layers)


def _layers_by_idx(unet: torch.nn.Module, keys: Sequence[int]) -> dict[int, ValueLayer]:
    layers = find_value_layers(unet)
    for k in keys:
        if not 0 <= int(k) < len(layers):
            raise ValueError(f"value layer index {k} out of range: this UNet has {len(layers)} value layers")
    return {l.idx: l for l in layers}


@contextlib.contextmanager
def _hooked(hooks: Sequence[tuple[torch.nn.Module, object]]) -> Iterator[None]:
    handles = [mod.register_forward_hook(fn) for mod, fn in hooks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _channel_mask(n: int, idx: Sequence[int], alpha: float) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.float32)
    if len(idx):
        mask[torch.as_tensor(list(idx), dtype=torch.long)] = alpha
    return mask


class _ScaleHook:
    """Forward hook: output [N, T, C] * scale, with scale [C] or [B, C] tiled to N rows."""

    def __init__(self, scale: torch.Tensor, name: str) -> None:
        self.scale = scale
        self.name = name
        self._cast: dict[tuple, torch.Tensor] = {}

    def _scale_for(self, out: torch.Tensor) -> torch.Tensor:
        key = (out.dtype, out.device)
        s = self._cast.get(key)
        if s is None:
            s = self.scale.to(device=out.device, dtype=out.dtype)
            self._cast[key] = s
        return s

    def __call__(self, module, inputs, out: torch.Tensor) -> torch.Tensor:
        s = self._scale_for(out)
        if s.dim() == 1:
            return out * s
        n, b = out.shape[0], s.shape[0]
        if n % b:
            raise ValueError(
                f"{self.name}: batch of {n} is not a multiple of the {b} rows of the channel scales"
            )
        if n != b:
            s = s.repeat(n // b, 1)
        return out * s.view(n, *([1] * (out.dim() - 2)), s.shape[-1])


@contextlib.contextmanager
def deactivate(
    unet: torch.nn.Module, neurons: Mapping[int, Sequence[int]], alpha: float = 0.0
) -> Iterator[None]:
    """Multiply the given channels of the given value layers by `alpha` on every UNet call.

    alpha 0 switches neurons off (SPEC 6); 0 < alpha < 1 dampens them. Applies to every step and
    both guidance branches because the hook sees the whole batch. Empty lists hook nothing.
    """
    layers = _layers_by_idx(unet, list(neurons))
    hooks = []
    for idx, chans in neurons.items():
        chans = [int(c) for c in chans]
        if not chans:
            continue
        layer = layers[int(idx)]
        bad = [c for c in chans if not 0 <= c < layer.out_features]
        if bad:
            raise ValueError(f"layer {idx} ({layer.name}) has {layer.out_features} neurons; got {bad[:5]}")
        hooks.append((layer.module, _ScaleHook(_channel_mask(layer.out_features, chans, alpha), layer.name)))
    with _hooked(hooks):
        yield


@contextlib.contextmanager
def channel_scales(unet: torch.nn.Module, scales: Mapping[int, torch.Tensor]) -> Iterator[None]:
    """Per-sample channel multipliers: layer output [N, T, C] * scales[idx][row, None, :].

    `scales[idx]` is [B, C] (or [C] for all samples). When the UNet batch N is a multiple k*B, the
    rows are tiled (`repeat(k, 1)`): sample n gets row n % B. That matches diffusers'
    classifier-free guidance, which runs `cat([uncond, cond])`, each half holding the same B
    samples in the same order, so one mask row covers both branches of its sample.
    """
    layers = _layers_by_idx(unet, list(scales))
    hooks = []
    for idx, s in scales.items():
        layer = layers[int(idx)]
        s = torch.as_tensor(s)
        if s.dim() not in (1, 2) or s.shape[-1] != layer.out_features:
            raise ValueError(
                f"scales for layer {idx} ({layer.name}) must be [B, {layer.out_features}] or "
                f"[{layer.out_features}], got {tuple(s.shape)}"
            )
        hooks.append((layer.module, _ScaleHook(s, layer.name)))
    with _hooked(hooks):
        yield


@contextlib.contextmanager
def record_activations(unet: torch.nn.Module) -> Iterator[dict[int, list[torch.Tensor]]]:
    """Record each value layer's output during UNet passes: {idx: [Tensor[N, T, C] per call]}.

    Outputs are recorded after any hook registered earlier (e.g. `deactivate` entered first), so a
    test can see which channels really reached the attention.
    """
    layers = find_value_layers(unet)
    seen: dict[int, list[torch.Tensor]] = {l.idx: [] for l in layers}

    def make(idx: int):
        def hook(module, inputs, out):
            seen[idx].append(out.detach().clone())
        return hook

    with _hooked([(l.module, make(l.idx)) for l in layers]):
        yield seen


@torch.no_grad()
def value_activations(
    unet: torch.nn.Module, text_embeddings: torch.Tensor, layers: Sequence[ValueLayer] | None = None,
    numerics: str = NATIVE,
) -> dict[int, torch.Tensor]:
    """NeMo activation a_j(p) = mean over tokens of |to_v(E_p)|_j, as float32 [N, C] per layer.

    Cross-attention keys/values depend only on the text, so no UNet pass is needed: each to_v is
    applied directly to the text-encoder output E [N, T, D] (on the layer's device and dtype).
    `numerics` (numerics.py): under the reference's GPU autocast, to_v runs in fp16 and the token
    mean is taken in fp16 as the reference's hook output is; otherwise the mean is taken in fp32.
    """
    if text_embeddings.dim() != 3:
        raise ValueError(f"text embeddings must be [N, tokens, width], got {tuple(text_embeddings.shape)}")
    layers = list(layers) if layers is not None else find_value_layers(unet)
    out: dict[int, torch.Tensor] = {}
    for l in layers:
        if text_embeddings.shape[-1] != l.module.in_features:
            raise ValueError(
                f"{l.name} expects {l.module.in_features}-wide text embeddings, got {text_embeddings.shape[-1]}"
            )
        w = l.module.weight
        e = text_embeddings.to(device=w.device, dtype=compute_dtype(l.module, numerics))
        with autocast_for(l.module, numerics) as fp16:
            v = l.module(e).abs()
        out[l.idx] = v.mean(dim=1).float() if fp16 else v.float().mean(dim=1)
    return out
