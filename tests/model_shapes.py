"""Model shapes shared by tests: real architectures with no memory (parameters on the meta device)."""
from __future__ import annotations

import torch


def sd14_unet_on_meta():
    """An SD 1.4-shaped UNet (v1-4 unet config) with no memory: parameters on the meta device."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
            cross_attention_dim=768, attention_head_dim=8,
        )
