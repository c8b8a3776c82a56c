"""Neuron hooks on the cross-attention value layers (SPEC.md section 6) on a tiny random UNet."""
from __future__ import annotations

import csv

import pytest
import torch
import torch.nn.functional as F
from model_shapes import sd14_unet_on_meta

from fbmem.jobs.core.nemo.hooks import (
    channel_scales,
    deactivate,
    find_value_layers,
    record_activations,
    total_neurons,
    value_activations,
)
from fbmem.pipelines.diffusion_models import TinySpec, build_tiny_components

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_components(seed=0, spec=TinySpec())


@pytest.fixture(scope="module")
def inputs(tiny):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 16, 16, generator=g)
    e = torch.randn(3, 77, TinySpec().cross_attention_dim, generator=g)
    return x, e


def run(unet, x, e, t=961):
    with torch.no_grad():
        return unet(x, torch.tensor(t), encoder_hidden_states=e).sample


def test_value_layers_are_down_then_mid_cross_attention_values(tiny):
    layers = find_value_layers(tiny["unet"])
    assert [l.idx for l in layers] == list(range(len(layers)))
    names = [l.name for l in layers]
    assert all(n.endswith("attn2.to_v") for n in names)
    assert not any(n.startswith("up_blocks") for n in names)
    # the tiny UNet has attention in two down blocks and the mid block
    assert names[-1].startswith("mid_block") and all(n.startswith("down_blocks") for n in names[:-1])
    assert [l.out_features for l in layers] == [32, 64, 64]
    assert all(l.module is tiny["unet"].get_submodule(l.name) for l in layers)


def test_sd14_structure_gives_the_reference_layers(reference_data):
    layers = find_value_layers(sd14_unet_on_meta())
    assert len(layers) == 7 and total_neurons(layers) == 5760
    with open(reference_data / "sd14_to_v_activation_stats.csv", newline="") as f:
        ref = sorted({(int(r["layer_idx"]), r["module"]) for r in csv.DictReader(f)})
    assert [(l.idx, l.name) for l in layers] == ref


def test_deactivate_zeroes_exactly_the_chosen_channels_and_restores(tiny, inputs):
    unet = tiny["unet"]
    x, e = inputs
    with record_activations(unet) as base_acts:
        base = run(unet, x, e)
    chosen = {0: [1, 5], 2: [0, 63]}
    with deactivate(unet, chosen), record_activations(unet) as acts:
        off = run(unet, x, e)
    assert not torch.allclose(off, base)
    for idx in base_acts:
        b, a = base_acts[idx][0], acts[idx][0]
        mask = torch.zeros(b.shape[-1], dtype=torch.bool)
        mask[chosen.get(idx, [])] = True
        assert torch.all(a[..., mask] == 0)
        if idx == 0:  # the first hooked layer's other channels are untouched (later ones see changed inputs)
            assert torch.equal(a[..., ~mask], b[..., ~mask])
    assert torch.equal(run(unet, x, e), base)  # hooks removed: the exact original output


def test_deactivate_alpha_dampens(tiny, inputs):
    unet = tiny["unet"]
    x, e = inputs
    with record_activations(unet) as base_acts:
        run(unet, x, e)
    with deactivate(unet, {0: [2, 3]}, alpha=0.25), record_activations(unet) as acts:
        run(unet, x, e)
    assert torch.allclose(acts[0][0][..., [2, 3]], 0.25 * base_acts[0][0][..., [2, 3]])


def test_deactivate_rejects_bad_neurons(tiny):
    with pytest.raises(ValueError, match="layer 0 .* has 32 neurons"):
        with deactivate(tiny["unet"], {0: [32]}):
            pass
    with pytest.raises(ValueError, match="out of range"):
        with deactivate(tiny["unet"], {3: [0]}):
            pass


def _mask(width: int, chans: list[int]) -> torch.Tensor:
    m = torch.ones(width)
    m[chans] = 0.0
    return m


def test_channel_scales_match_per_sample_deactivation(tiny, inputs):
    unet = tiny["unet"]
    x, e = inputs
    sets = [{0: [1, 2], 2: [7]}, {}, {1: list(range(10)), 2: [7, 8]}]
    widths = {l.idx: l.out_features for l in find_value_layers(unet)}
    scales = {i: torch.stack([_mask(w, s.get(i, [])) for s in sets]) for i, w in widths.items()}
    with channel_scales(unet, scales):
        batched = run(unet, x, e)
    for b, s in enumerate(sets):
        with deactivate(unet, s):
            single = run(unet, x[b:b + 1], e[b:b + 1])
        assert torch.allclose(batched[b:b + 1], single, atol=1e-5), b
    assert not torch.allclose(batched[0], run(unet, x[:1], e[:1])[0])


def test_channel_scales_cover_both_guidance_branches(tiny, inputs):
    """A CFG batch cat([uncond, cond]) of 2B rows takes B mask rows: sample b's row masks both."""
    unet = tiny["unet"]
    x, e = inputs
    uncond = torch.zeros_like(e)
    sets = [{0: [0, 4]}, {2: [1, 2, 3]}, {0: [9], 1: [5]}]
    widths = {l.idx: l.out_features for l in find_value_layers(unet)}
    scales = {i: torch.stack([_mask(w, s.get(i, [])) for s in sets]) for i, w in widths.items()}
    with channel_scales(unet, scales):
        both = run(unet, torch.cat([x, x]), torch.cat([uncond, e]))
    for b, s in enumerate(sets):
        with deactivate(unet, s):
            ref = run(unet, torch.stack([x[b], x[b]]), torch.stack([uncond[b], e[b]]))
        assert torch.allclose(both[[b, 3 + b]], ref, atol=1e-5), b
    with pytest.raises(ValueError, match="not a multiple"):
        with channel_scales(unet, {0: torch.ones(2, 32)}):
            run(unet, x, e)


def test_value_activations_need_no_unet_pass_and_match_to_v(tiny, inputs):
    unet = tiny["unet"]
    _, e = inputs
    calls = []
    handle = unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        acts = value_activations(unet, e)
    finally:
        handle.remove()
    assert calls == []
    for l in find_value_layers(unet):
        manual = F.linear(e, l.module.weight, l.module.bias).abs().mean(dim=1)
        assert acts[l.idx].shape == (3, l.out_features)
        assert torch.allclose(acts[l.idx], manual, atol=1e-6)
    # and it is what the value layers see in a real UNet pass with the same text embeddings
    x, _ = inputs
    with record_activations(unet) as seen:
        run(unet, x, e)
    for idx, outs in seen.items():
        assert torch.allclose(outs[0].abs().mean(dim=1), acts[idx], atol=1e-6)
