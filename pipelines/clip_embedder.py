"""CLIP embeddings (open_clip): pure helpers, and Ray Data actor classes that hold the model.

Models by reference: `ClipConfig.model_name` + `pretrained` (an open_clip hub tag, or a local
checkpoint file that open_clip loads with safetensors or `torch.load(weights_only=True)`), or
`tiny`: a random-weight model from a small open_clip config registered under TINY_CLIP_NAME and
built under a fixed seed, so every actor in a pool (and every test) holds the same weights.

Vectors are float32 and unit-norm, so cosine similarity is a dot product in the vector index.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from fbmem.jobs.config import ClipConfig, Config
from fbmem.pipelines.devices import pick_device

TINY_CLIP_NAME = "fbmem-tiny-clip"
# Small enough to build in well under a second on one CPU core; the text tower keeps CLIP's
# real BPE vocabulary and context length so the bundled tokenizer works unchanged (offline).
TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def register_tiny_clip() -> str:
    """Add the tiny config to open_clip's registry (its public `add_model_config`); idempotent."""
    import open_clip

    if TINY_CLIP_NAME not in open_clip.list_models():
        # add_model_config reads JSON files named after the model. The entry stays registered
        # after the file is gone (later rescans skip missing paths), so nothing is left on disk.
        with tempfile.TemporaryDirectory(prefix="fbmem-clipcfg-") as tmp:
            path = Path(tmp) / f"{TINY_CLIP_NAME}.json"
            path.write_text(json.dumps(TINY_CLIP_CONFIG))
            open_clip.add_model_config(path)
    return TINY_CLIP_NAME


def _check_pretrained(pretrained: str | None) -> None:
    """Fail early, naming the setting, when `pretrained` looks like a file that is not there."""
    if pretrained is None:
        return
    looks_like_path = os.sep in pretrained or pretrained.endswith(_CHECKPOINT_SUFFIXES)
    if looks_like_path and not os.path.isfile(pretrained):
        raise FileNotFoundError(f"models.clip.pretrained: checkpoint file not found: {pretrained}")


def load_clip(cfg: ClipConfig, device: torch.device) -> tuple[torch.nn.Module, Callable, Callable]:
    """(model in eval mode on `device`, inference preprocess, tokenizer)."""
    import open_clip

    if cfg.tiny:
        name = register_tiny_clip()
        # fork_rng: seeding must not disturb the caller's global RNG stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    else:
        _check_pretrained(cfg.pretrained)
        name = cfg.model_name
        if name == TINY_CLIP_NAME:  # the tiny architecture with trained/saved weights from a file
            register_tiny_clip()
        # open_clip >= 2.24 loads local files with safetensors or torch.load(weights_only=True);
        # say so explicitly so a change of its default cannot make loading unsafe.
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=cfg.pretrained, weights_only=True
        )
    model = model.to(device).eval()
    tokenizer = open_clip.get_tokenizer(name)
    return model, preprocess, tokenizer


def embedding_dim(model: torch.nn.Module, tokenizer: Callable) -> int:
    """Output width, found by running the model (works for every open_clip architecture)."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        return int(model.encode_text(tokenizer([""]).to(device)).shape[-1])


def embed_images(
    model: torch.nn.Module, preprocess: Callable, images: list[Image.Image], device: torch.device
) -> np.ndarray:
    """PIL images -> float32 [N, D], unit norm."""
    if not images:
        raise ValueError("embed_images needs at least one image")
    pixels = torch.stack([preprocess(img) for img in images]).to(device)
    with torch.inference_mode():
        feats = model.encode_image(pixels, normalize=True)
    return feats.float().cpu().numpy()


def embed_texts(
    model: torch.nn.Module, tokenizer: Callable, texts: list[str], device: torch.device
) -> np.ndarray:
    """Texts -> float32 [N, D], unit norm. Long texts are cut at the model's context length."""
    if not texts:
        raise ValueError("embed_texts needs at least one text")
    tokens = tokenizer(list(texts)).to(device)
    with torch.inference_mode():
        feats = model.encode_text(tokens, normalize=True)
    return feats.float().cpu().numpy()


# --- arrow plumbing (shared by the actors below) ------------------------------------------


def vectors_to_arrow(vectors: np.ndarray, valid: np.ndarray) -> pa.FixedSizeListArray:
    """[N, D] float32 + validity -> fixed_size_list<float32>[D], null where not valid."""
    n, dim = vectors.shape
    values = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(n * dim))
    return pa.FixedSizeListArray.from_arrays(values, dim, mask=pa.array(~valid))


def set_column(table: pa.Table, name: str, array: pa.Array) -> pa.Table:
    """Replace column `name` if present (a rerun overwrites), else append it."""
    idx = table.schema.get_field_index(name)
    if idx >= 0:
        return table.set_column(idx, name, array)
    return table.append_column(name, array)


def row_error(stage: str, exc: BaseException) -> str:
    """A row's error message: our own ValueErrors already name the problem; others get their type."""
    detail = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
    return f"{stage}: {detail}"


def column_or_nulls(table: pa.Table, name: str) -> list[Any]:
    """A column as Python values, or all None when the batch does not have it."""
    if name in table.column_names:
        return table.column(name).to_pylist()
    return [None] * table.num_rows


class _ClipActor:
    """Shared constructor: the device and the model are chosen here, inside the actor."""

    def __init__(self, config_json: str) -> None:
        cfg = Config.model_validate_json(config_json)
        self.device = pick_device(cfg.resources.device)
        self.model, self.preprocess, self.tokenizer = load_clip(cfg.models.clip, self.device)
        self.model_id = cfg.models.clip.model_id
        self.dim = embedding_dim(self.model, self.tokenizer)
        self.max_pixels = cfg.ingest.max_pixels
        self.min_side = cfg.ingest.min_side
        from fbmem.pipelines.actors import record_model_node  # imports Ray: only in actors
        record_model_node("embed")

    def _finish(self, batch: pa.Table, vectors: np.ndarray, valid: np.ndarray) -> pa.Table:
        # embedding_model is null where there is no vector: it says which model made *this* value.
        models = pa.array([self.model_id if ok else None for ok in valid], type=pa.string())
        batch = set_column(batch, "embedding", vectors_to_arrow(vectors, valid))
        return set_column(batch, "embedding_model", models)


class ClipImageEmbedder(_ClipActor):
    """Ray Data actor: `image_bytes` -> `embedding`, `embedding_model` (batch_format="pyarrow").

    Rows whose `error` is already set are passed through with a null embedding (the pipeline may
    also filter them out first). A row whose image cannot be decoded gets its `error` filled and a
    null embedding; the batch never fails for one row.
    """

    def __call__(self, batch: pa.Table) -> pa.Table:
        from fbmem.pipelines.images import (
            decode_image,  # sibling module, imported where used
        )

        n = batch.num_rows
        errors = column_or_nulls(batch, "error")
        data = column_or_nulls(batch, "image_bytes")
        images: list[Image.Image] = []
        rows: list[int] = []
        for i in range(n):
            if errors[i] is not None:
                continue
            if data[i] is None:
                errors[i] = "clip: no image_bytes"
                continue
            try:
                images.append(
                    decode_image(data[i], max_pixels=self.max_pixels, min_side=self.min_side)
                )
                rows.append(i)
            except Exception as exc:  # one bad image is a row error, never a failed batch
                errors[i] = row_error("clip", exc)
        vectors = np.zeros((n, self.dim), dtype=np.float32)
        valid = np.zeros(n, dtype=bool)
        if images:
            vectors[rows] = embed_images(self.model, self.preprocess, images, self.device)
            valid[rows] = True
        batch = set_column(batch, "error", pa.array(errors, type=pa.string()))
        return self._finish(batch, vectors, valid)


class ClipTextEmbedder(_ClipActor):
    """Ray Data actor: `text` -> `embedding`, `embedding_model`; null text -> null embedding."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        if "text" not in batch.column_names:
            raise KeyError(f"ClipTextEmbedder needs a 'text' column, got {batch.column_names}")
        texts = batch.column("text").to_pylist()
        rows = [i for i, t in enumerate(texts) if t is not None]
        vectors = np.zeros((batch.num_rows, self.dim), dtype=np.float32)
        valid = np.zeros(batch.num_rows, dtype=bool)
        if rows:
            vectors[rows] = embed_texts(
                self.model, self.tokenizer, [texts[i] for i in rows], self.device
            )
            valid[rows] = True
        return self._finish(batch, vectors, valid)
