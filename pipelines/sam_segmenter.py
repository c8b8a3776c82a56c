"""Foreground masks: SAM (segment-anything) proposals, one foreground rule, and a Ray Data actor.

How the foreground is chosen (`choose_foreground`; a design decision, read it before trusting
FM/BM labels). SAM's automatic generator proposes many masks (objects, parts, and background
regions such as sky, walls or floor) and says nothing about which are "foreground". We decide:

  1. Drop specks and near-whole-frame masks: a mask is kept only if its area is within
     [min_area_frac, max_area_frac] of the frame.
  2. A kept mask is *background-like* when it covers more than `border_touch_frac` of the image's
     border pixels (the one-pixel frame around the image). Backgrounds extend past the frame and so
     run along its edge; a photographed object usually sits inside it.
  3. Foreground = the union of the kept masks that are not background-like (all salient objects,
     not just one: FB-Mem asks whether the *subject matter* was copied, and a subject may be
     several things).
  4. If nothing qualifies, the foreground is EMPTY (no pixel), not a best guess. With an empty
     mask FB-Mem's beta rule scores the pair on the full image, so it can still be labelled
     verbatim or not memorized, but never foreground- or background-only. We prefer that
     conservative outcome to promoting a border-touching region (a landscape's sky, a texture) to
     "foreground", which would produce confident, wrong partial-memorization labels.

Known consequences: an object cropped by the frame along more than `border_touch_frac` of the
border counts as background (close-up portraits lose their foreground, then get full-image
scores); a small object lying *on* a background (a window in a wall) counts as foreground.

Images are downscaled so their long side is at most `max_side` before segmenting (SAM resizes to
its encoder's 1024 anyway, and full-resolution proposal masks would cost memory for nothing); the
chosen mask is upsampled back to the image size (bilinear, so its edge pixels become soft).

Backends are pluggable (`make_backend`): "sam" (a checkpoint, or `tiny` random weights for tests),
"grabcut" (OpenCV, weight-free, initialised with a centred rectangle) and "colour" (weight-free:
k-means colour clusters with this module's border rule applied per cluster, then GrabCut;
pipelines/colour_segmenter.py, the better choice for the toy world's images and the toy model's
blurry samples). Each backend is just a callable `RGB uint8 HxWx3 -> float32 HxW mask in [0, 1]`
with a `model_id`.
"""
from __future__ import annotations

import os
from functools import partial
from typing import Protocol

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from fbmem.jobs.config import Config, SegmenterConfig
from fbmem.pipelines.clip_embedder import column_or_nulls, row_error, set_column
from fbmem.pipelines.colour_segmenter import ColourForeground
from fbmem.pipelines.devices import pick_device
from fbmem.pipelines.masks import (
    border_coverage,
    decode_mask_png,
    encode_mask_png,
    fg_fraction,
    mask_from_file_bytes,
)

GIVEN_MASK_MODEL = "given"  # mask_model of masks that came with the source

# Tiny random-weight SAM: the real architecture at toy size (an 8x8 token grid), so the whole
# automatic-mask-generator path runs in milliseconds on a CPU.
TINY_SAM = {"img_size": 128, "patch_size": 16, "embed_dim": 64, "depth": 2, "num_heads": 2,
            "prompt_embed_dim": 64, "decoder_mlp_dim": 128, "decoder_heads": 2}


# --------------------------------------------------------------------------- the foreground rule


def choose_foreground(
    masks: list[dict],
    shape: tuple[int, int],
    *,
    min_area_frac: float,
    max_area_frac: float,
    border_touch_frac: float,
) -> np.ndarray:
    """SAM mask records -> float32 HxW foreground in {0, 1}: the union of the kept masks that do
    not run along the image border; empty when none qualifies (see the module docstring).

    Only each record's 'segmentation' (bool HxW) is used: area and border coverage are measured
    on it, so the rule does not depend on scores a different backend would not produce.
    """
    h, w = int(shape[0]), int(shape[1])
    frame = float(h * w)
    fg = np.zeros((h, w), dtype=bool)
    for i, rec in enumerate(masks):
        seg = np.asarray(rec["segmentation"], dtype=bool)
        if seg.shape != (h, w):
            raise ValueError(f"mask {i} has shape {seg.shape}, expected {(h, w)}")
        area = float(seg.sum()) / frame
        if area < min_area_frac or area > max_area_frac:
            continue
        if border_coverage(seg) > border_touch_frac:
            continue
        fg |= seg
    return fg.astype(np.float32)


# --------------------------------------------------------------------------------- SAM models


def build_tiny_sam(seed: int):
    """A small random-weight `Sam`, identical for equal seeds (every actor holds the same model)."""
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    t = TINY_SAM
    grid = t["img_size"] // t["patch_size"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = Sam(
            image_encoder=ImageEncoderViT(
                img_size=t["img_size"],
                patch_size=t["patch_size"],
                embed_dim=t["embed_dim"],
                depth=t["depth"],
                num_heads=t["num_heads"],
                mlp_ratio=4,
                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                qkv_bias=True,
                out_chans=t["prompt_embed_dim"],
            ),
            prompt_encoder=PromptEncoder(
                embed_dim=t["prompt_embed_dim"],
                image_embedding_size=(grid, grid),
                input_image_size=(t["img_size"], t["img_size"]),
                mask_in_chans=16,
            ),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=3,
                transformer=TwoWayTransformer(
                    depth=2,
                    embedding_dim=t["prompt_embed_dim"],
                    mlp_dim=t["decoder_mlp_dim"],
                    num_heads=t["decoder_heads"],
                ),
                transformer_dim=t["prompt_embed_dim"],
                iou_head_depth=3,
                iou_head_hidden_dim=t["prompt_embed_dim"],
            ),
        )
        # Random 2x2 transposed-conv kernels paint a checkerboard over every mask; trained SAM's
        # masks are smooth. Averaging each kernel over its 2x2 taps (upsampling + channel mixing)
        # gives blob-shaped masks that follow the image's patches, so the generator's run-length
        # encoding (its main CPU cost here) stays ~10x shorter.
        with torch.no_grad():
            for layer in sam.mask_decoder.output_upscaling:
                if isinstance(layer, torch.nn.ConvTranspose2d):
                    layer.weight.copy_(layer.weight.mean(dim=(2, 3), keepdim=True))
    return sam.eval()


def load_state_dict_safely(path: str) -> dict[str, torch.Tensor]:
    """safetensors, or torch.load(weights_only=True): a checkpoint must not be able to run code
    (segment_anything's own loader calls torch.load without weights_only)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # training checkpoints wrap the weights
    return state


def load_sam(cfg: SegmenterConfig, device: torch.device):
    """The `Sam` model named by the config, in eval mode on `device`."""
    if cfg.sam_model_type == "tiny":
        return build_tiny_sam(cfg.seed).to(device)
    from segment_anything import sam_model_registry

    if not cfg.sam_checkpoint:
        raise ValueError(
            f"models.segmenter.sam_checkpoint is not set: SAM {cfg.sam_model_type} needs a local "
            "checkpoint file (.pth or .safetensors); or use sam_model_type 'tiny' or backend 'grabcut'"
        )
    path = os.path.expanduser(cfg.sam_checkpoint)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"models.segmenter.sam_checkpoint: file not found: {path}")
    sam = sam_model_registry[cfg.sam_model_type](checkpoint=None)
    try:
        sam.load_state_dict(load_state_dict_safely(path))
    except RuntimeError as exc:  # wrong architecture for these weights
        raise ValueError(
            f"models.segmenter.sam_checkpoint {path} does not fit sam_model_type "
            f"{cfg.sam_model_type!r}: {exc}"
        ) from exc
    return sam.to(device).eval()


# ----------------------------------------------------------------------------------- backends


class ForegroundBackend(Protocol):
    """What the segmenter needs from a backend; add one by implementing this and `make_backend`."""

    model_id: str

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """RGB uint8 HxWx3 -> float32 HxW foreground in [0, 1]."""
        ...


class SamForeground:
    """SAM's automatic mask generator (point grid) followed by `choose_foreground`."""

    def __init__(self, sam, cfg: SegmenterConfig) -> None:
        from segment_anything import SamAutomaticMaskGenerator

        self.model_id = cfg.model_id
        self.generator = SamAutomaticMaskGenerator(
            sam,
            points_per_side=cfg.points_per_side,
            pred_iou_thresh=cfg.pred_iou_thresh,
            stability_score_thresh=cfg.stability_score_thresh,
        )
        self.rule = partial(
            choose_foreground,
            min_area_frac=cfg.min_area_frac,
            max_area_frac=cfg.max_area_frac,
            border_touch_frac=cfg.border_touch_frac,
        )

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return self.rule(self.generator.generate(image), image.shape[:2])


def grabcut_foreground(
    image: np.ndarray, *, margin_frac: float = 0.1, iterations: int = 5, seed: int = 0
) -> np.ndarray:
    """Weight-free foreground: OpenCV GrabCut started from a centred rectangle.

    Pixels within `margin_frac` of the frame are declared background, the rest "probably
    foreground"; GrabCut's colour models then refine that. The same bias as the SAM rule (the
    subject sits inside the frame) without any weights. Returns a {0, 1} float32 mask.
    """
    import cv2

    arr = np.ascontiguousarray(image, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"grabcut needs an RGB HxWx3 image, got shape {arr.shape}")
    h, w = arr.shape[:2]
    mx, my = int(round(w * margin_frac)), int(round(h * margin_frac))
    rect = (mx, my, w - 2 * mx, h - 2 * my)
    if min(mx, my) < 1 or rect[2] < 2 or rect[3] < 2:
        return np.zeros((h, w), dtype=np.float32)  # too small to hold a frame and an inside
    cv2.setRNGSeed(seed)  # GrabCut's GMM init uses k-means: fix it for reproducible masks
    gc = np.zeros((h, w), dtype=np.uint8)
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.grabCut(arr[..., ::-1].copy(), gc, rect, bgd, fgd, iterations, cv2.GC_INIT_WITH_RECT)
    return np.isin(gc, (cv2.GC_FGD, cv2.GC_PR_FGD)).astype(np.float32)


class GrabCutForeground:
    def __init__(self, cfg: SegmenterConfig) -> None:
        self.model_id = cfg.model_id
        self.seed = cfg.seed

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return grabcut_foreground(image, seed=self.seed)


def make_backend(cfg: SegmenterConfig, device: torch.device) -> ForegroundBackend:
    if cfg.backend == "sam":
        return SamForeground(load_sam(cfg, device), cfg)
    if cfg.backend == "grabcut":
        return GrabCutForeground(cfg)
    if cfg.backend == "colour":

        return ColourForeground(cfg)
    raise ValueError(f"models.segmenter.backend: unknown backend {cfg.backend!r}")


def segment_image(backend: ForegroundBackend, image: Image.Image, *, max_side: int) -> np.ndarray:
    """Foreground mask of `image` at the image's own size: segment at most `max_side` wide/high,
    then upsample the mask back (bilinear, so its edges become soft)."""
    w, h = image.size
    scale = max_side / max(w, h)
    small = image
    if scale < 1.0:
        small = image.resize(
            (max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR
        )
    mask = backend(np.asarray(small.convert("RGB"), dtype=np.uint8))
    if small.size != image.size:
        up = Image.fromarray(np.asarray(mask, dtype=np.float32)).resize(
            (w, h), Image.Resampling.BILINEAR
        )
        mask = np.clip(np.asarray(up, dtype=np.float32), 0.0, 1.0)
    return np.asarray(mask, dtype=np.float32)


# ------------------------------------------------------------------------------------ actor


class SamSegmenter:
    """Ray Data actor (batch_format="pyarrow"): fills `mask_png`, `fg_fraction`, `mask_model`.

    Per row, in order: a row with `error` set is passed through; an existing `mask_png` is kept
    (its `fg_fraction` computed if missing); a source's `mask_bytes` is used as given
    (mask_model "given"; a wrong size or unreadable file is an error for that row); otherwise the
    image is segmented with the configured backend. A row that fails gets `error` filled and is
    kept; the batch never fails for one row.
    """

    def __init__(self, config_json: str) -> None:
        cfg = Config.model_validate_json(config_json)
        seg = cfg.models.segmenter
        self.device = pick_device(cfg.resources.device)
        self.backend = make_backend(seg, self.device)
        self.max_side = seg.max_side
        self.max_pixels = cfg.ingest.max_pixels
        self.min_side = cfg.ingest.min_side
        from fbmem.pipelines.actors import record_model_node  # imports Ray: only in actors
        record_model_node("segment")

    def _decode(self, data: bytes | None) -> Image.Image:
        from fbmem.pipelines.images import (
            decode_image,  # sibling module, imported where used
        )

        if data is None:
            raise ValueError("no image_bytes to segment")
        return decode_image(data, max_pixels=self.max_pixels, min_side=self.min_side)

    def _image_size(self, data: bytes | None, width, height) -> tuple[int, int]:
        if width is not None and height is not None:
            return int(width), int(height)  # validation stored the decoded (EXIF-applied) size
        return self._decode(data).size

    def __call__(self, batch: pa.Table) -> pa.Table:
        errors = column_or_nulls(batch, "error")
        images = column_or_nulls(batch, "image_bytes")
        given = column_or_nulls(batch, "mask_bytes")
        widths = column_or_nulls(batch, "width")
        heights = column_or_nulls(batch, "height")
        pngs = column_or_nulls(batch, "mask_png")
        fracs = column_or_nulls(batch, "fg_fraction")
        models = column_or_nulls(batch, "mask_model")
        for i in range(batch.num_rows):
            if errors[i] is not None:
                continue
            try:
                if pngs[i] is not None:
                    if fracs[i] is None:
                        fracs[i] = fg_fraction(decode_mask_png(pngs[i]))
                    continue
                if given[i] is not None:
                    size = self._image_size(images[i], widths[i], heights[i])
                    mask, model = mask_from_file_bytes(given[i], size), GIVEN_MASK_MODEL
                else:
                    image = self._decode(images[i])
                    mask = segment_image(self.backend, image, max_side=self.max_side)
                    model = self.backend.model_id
                pngs[i], fracs[i], models[i] = encode_mask_png(mask), fg_fraction(mask), model
            except Exception as exc:  # one bad row is an error row, never a failed batch
                errors[i] = row_error("mask", exc)
        batch = set_column(batch, "mask_png", pa.array(pngs, type=pa.binary()))
        batch = set_column(batch, "fg_fraction", pa.array(fracs, type=pa.float32()))
        batch = set_column(batch, "mask_model", pa.array(models, type=pa.string()))
        return set_column(batch, "error", pa.array(errors, type=pa.string()))
