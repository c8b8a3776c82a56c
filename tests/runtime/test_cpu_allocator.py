"""The scorer's CPU block follows the allocator setting; scores do not depend on it."""
from __future__ import annotations

import platform

import pytest
import torch

from fbmem.jobs.core.region_similarity import (
    CPU_BLOCK_BYTES,
    CPU_BLOCK_BYTES_RETAINED,
    score_pairs,
)
from fbmem.jobs.runtime import cpu_allocator
from fbmem.jobs.runtime.cpu_allocator import default_cpu_block_bytes


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_retaining_freed_memory_enlarges_the_cpu_block(monkeypatch):
    monkeypatch.setattr(cpu_allocator, "_retaining", False)
    assert default_cpu_block_bytes() == CPU_BLOCK_BYTES
    assert cpu_allocator.retain_freed_memory() is True
    assert cpu_allocator.retains_freed_memory()
    assert default_cpu_block_bytes() == CPU_BLOCK_BYTES_RETAINED > CPU_BLOCK_BYTES


def test_scores_do_not_depend_on_the_block_size():
    g = torch.Generator().manual_seed(3)
    gx, tx = torch.rand(4, 3, 161, 161, generator=g), torch.rand(4, 3, 161, 161, generator=g)
    gm = (torch.rand(4, 1, 161, 161, generator=g) > 0.5).float()
    tm = (torch.rand(4, 1, 161, 161, generator=g) > 0.5).float()
    gi, ti = torch.tensor([0, 0, 1, 2, 3, 3]), torch.tensor([0, 1, 1, 2, 3, 0])
    one = score_pairs(gx, gm, tx, tm, gen_idx=gi, train_idx=ti, cpu_block_bytes=1)
    whole = score_pairs(gx, gm, tx, tm, gen_idx=gi, train_idx=ti, cpu_block_bytes=CPU_BLOCK_BYTES_RETAINED)
    for k in ("full", "fg", "bg"):
        torch.testing.assert_close(one[k], whole[k], atol=1e-6, rtol=0)
