"""NeMo statistics (SPEC.md section 6): per-neuron activation mean/std, the SD 1.4 file, layer checks."""
from __future__ import annotations

import pytest
import torch
from model_shapes import sd14_unet_on_meta

from fbmem.jobs.core.nemo.hooks import find_value_layers
from fbmem.jobs.core.nemo.statistics import (
    activation_stats,
    check_stats_layers,
    load_stats_csv,
)
from fbmem.pipelines.diffusion_models import TinySpec, build_tiny_components

torch.set_num_threads(1)


def test_activation_stats_match_torch():
    g = torch.Generator().manual_seed(0)
    acts = {0: torch.rand(50, 8, generator=g), 1: torch.rand(50, 3, generator=g) * 5}
    st = activation_stats(acts)
    for i, a in acts.items():
        assert torch.allclose(st[i][0], a.mean(0), atol=1e-6)
        assert torch.allclose(st[i][1], a.std(0), atol=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        activation_stats({0: torch.rand(1, 4)})


def test_sd14_stats_csv_loads(reference_data):
    st = load_stats_csv(reference_data / "sd14_to_v_activation_stats.csv")
    assert sorted(st.mean) == list(range(7))
    assert sum(st.sizes().values()) == 5760
    assert st.sizes() == {0: 320, 1: 320, 2: 640, 3: 640, 4: 1280, 5: 1280, 6: 1280}
    assert all(bool((s > 0).all()) for s in st.std.values())
    check_stats_layers(st, find_value_layers(sd14_unet_on_meta()))  # fits an SD 1.4-shaped UNet


def test_stats_that_do_not_fit_the_unet_are_refused(reference_data):
    st = load_stats_csv(reference_data / "sd14_to_v_activation_stats.csv")
    unet = build_tiny_components(seed=0, spec=TinySpec())["unet"]
    with pytest.raises(ValueError, match="do not match this UNet's value layers"):
        check_stats_layers(st, find_value_layers(unet))


def test_bad_stats_csv_names_the_problem(tmp_path):
    p = tmp_path / "s.csv"
    p.write_text("layer_idx,module,neuron,mean_abs_act,std_abs_act\n0,a,0,1,1\n0,a,2,1,1\n")
    with pytest.raises(ValueError, match="neurons are not 0..1"):
        load_stats_csv(p)
    p.write_text("layer_idx,module,neuron\n0,a,0\n")
    with pytest.raises(ValueError, match="missing columns"):
        load_stats_csv(p)
