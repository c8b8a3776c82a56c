"""Foreground masks: the foreground rule on controlled SAM-style records, tiny SAM end to end,
safe checkpoint loading, GrabCut, and the segmenter actor's row handling."""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from fbmem.jobs.config import Config, SegmenterConfig
from fbmem.pipelines.masks import decode_mask_png, encode_mask_png
from fbmem.pipelines.sam_segmenter import (
    GIVEN_MASK_MODEL,
    SamSegmenter,
    border_coverage,
    build_tiny_sam,
    choose_foreground,
    grabcut_foreground,
    load_sam,
    load_state_dict_safely,
    make_backend,
    segment_image,
)

torch.set_num_threads(1)
CPU = torch.device("cpu")
RULE = dict(min_area_frac=0.005, max_area_frac=0.9, border_touch_frac=0.05)
TINY = dict(sam_model_type="tiny", points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)


def _record(seg: np.ndarray, iou: float = 0.9) -> dict:
    """A test double for one of SamAutomaticMaskGenerator's output records."""
    ys, xs = np.nonzero(seg)
    bbox = [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1] if len(xs) else [0] * 4
    return {"segmentation": seg, "area": int(seg.sum()), "bbox": bbox,
            "predicted_iou": iou, "stability_score": 0.97}


def _box(shape, y0, y1, x0, x1) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _scene(w=64, h=48, seed=0) -> Image.Image:
    """Noisy dark background with a bright square in the middle."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
    arr[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = rng.integers(200, 256, (h // 2, w // 2, 3))
    return Image.fromarray(arr)


# ----------------------------------------------------------------------------- foreground rule


def test_border_coverage():
    shape = (10, 20)
    assert border_coverage(_box(shape, 3, 7, 5, 15)) == 0.0
    assert border_coverage(np.ones(shape, bool)) == 1.0
    assert border_coverage(_box(shape, 0, 1, 0, 20)) == pytest.approx(20 / (2 * (10 + 20) - 4))


def test_central_object_is_foreground_and_background_is_not():
    shape = (40, 60)
    obj = _box(shape, 10, 30, 20, 40)
    background = ~obj  # touches the whole border
    fg = choose_foreground([_record(background), _record(obj)], shape, **RULE)
    assert fg.dtype == np.float32 and fg.shape == shape
    np.testing.assert_array_equal(fg, obj.astype(np.float32))


def test_specks_and_whole_frame_masks_are_ignored():
    shape = (40, 60)
    obj = _box(shape, 10, 30, 20, 40)
    speck = _box(shape, 2, 4, 2, 4)  # 4 px < 0.5 % of 2400, and off the border
    almost_all = _box(shape, 1, 39, 1, 59)  # 95 % of the frame, not touching the border
    fg = choose_foreground([_record(speck), _record(almost_all), _record(obj)], shape, **RULE)
    np.testing.assert_array_equal(fg, obj.astype(np.float32))


def test_foreground_is_the_union_of_all_qualifying_objects():
    shape = (40, 60)
    a, b = _box(shape, 5, 15, 5, 15), _box(shape, 20, 35, 30, 50)
    fg = choose_foreground([_record(a), _record(b)], shape, **RULE)
    np.testing.assert_array_equal(fg, (a | b).astype(np.float32))


def test_border_touch_threshold_decides_cropped_objects():
    shape = (40, 60)
    # touches the bottom edge along 6 px: 6 / 196 = 3 % of the border
    small_touch = _box(shape, 25, 40, 27, 33)
    # touches the bottom edge along 30 px: 15 %
    big_touch = _box(shape, 25, 40, 15, 45)
    assert choose_foreground([_record(small_touch)], shape, **RULE).sum() == small_touch.sum()
    assert choose_foreground([_record(big_touch)], shape, **RULE).sum() == 0
    lenient = dict(RULE, border_touch_frac=0.2)
    assert choose_foreground([_record(big_touch)], shape, **lenient).sum() == big_touch.sum()


def test_no_qualifying_mask_means_no_foreground():
    shape = (30, 30)
    assert choose_foreground([], shape, **RULE).sum() == 0
    assert choose_foreground([], shape, **RULE).shape == shape
    sky, ground = _box(shape, 0, 15, 0, 30), _box(shape, 15, 30, 0, 30)
    assert choose_foreground([_record(sky, 0.99), _record(ground, 0.99)], shape, **RULE).sum() == 0


def test_record_of_wrong_shape_is_rejected():
    with pytest.raises(ValueError, match="mask 0 has shape"):
        choose_foreground([_record(np.ones((5, 5), bool))], (6, 5), **RULE)


# ----------------------------------------------------------------------------------- tiny SAM


@pytest.fixture(scope="module")
def tiny_backend():
    return make_backend(SegmenterConfig(**TINY), CPU)


def test_tiny_sam_weights_depend_only_on_the_seed():
    s0, s0b, s1 = (build_tiny_sam(s).state_dict() for s in (0, 0, 1))
    assert all(torch.equal(s0[k], s0b[k]) for k in s0)
    assert not all(torch.equal(s0[k], s1[k]) for k in s0)


def test_tiny_sam_end_to_end_gives_a_mask_of_the_image_size(tiny_backend):
    img = _scene(64, 48)
    records = tiny_backend.generator.generate(np.asarray(img))
    assert records and records[0]["segmentation"].shape == (48, 64)  # SAM did propose masks
    mask = segment_image(tiny_backend, img, max_side=1024)
    assert mask.shape == (48, 64) and mask.dtype == np.float32
    assert 0.0 <= mask.min() <= mask.max() <= 1.0
    np.testing.assert_array_equal(mask, segment_image(tiny_backend, img, max_side=1024))


def test_large_images_are_segmented_small_and_the_mask_upsampled(tiny_backend):
    seen = []

    def spy(image: np.ndarray) -> np.ndarray:  # records what the backend is given
        seen.append(image.shape)
        return tiny_backend(image)

    mask = segment_image(spy, _scene(200, 150), max_side=64)
    assert seen == [(48, 64, 3)]
    assert mask.shape == (150, 200)


def test_sam_checkpoint_loads_safely(tmp_path):
    source = build_tiny_sam(seed=3)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    torch.save(state, tmp_path / "sam.pth")
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "sam.safetensors"))
    for name in ("sam.pth", "sam.safetensors"):
        target = build_tiny_sam(seed=4)
        target.load_state_dict(load_state_dict_safely(str(tmp_path / name)))
        assert all(torch.equal(v, target.state_dict()[k]) for k, v in state.items())

    class Payload:
        def __reduce__(self):
            return (print, ("pickle code ran",))

    torch.save({"model": state, "x": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(Exception, match="(?i)weights.only"):
        load_state_dict_safely(str(tmp_path / "evil.pth"))


def test_real_sam_needs_a_checkpoint_setting(tmp_path):
    with pytest.raises(ValueError, match="models.segmenter.sam_checkpoint is not set"):
        load_sam(SegmenterConfig(sam_model_type="vit_b"), CPU)
    with pytest.raises(FileNotFoundError, match="models.segmenter.sam_checkpoint"):
        load_sam(SegmenterConfig(sam_model_type="vit_b", sam_checkpoint=str(tmp_path / "x.pth")), CPU)


def test_grabcut_finds_a_central_object():
    img = np.asarray(_scene(64, 48, seed=1))
    truth = _box((48, 64), 12, 36, 16, 48)
    mask = grabcut_foreground(img) > 0.5
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.8


# -------------------------------------------------------------------------------------- actor


def _config_json(**seg) -> str:
    return Config.model_validate(
        {"models": {"segmenter": {**TINY, **seg}}, "resources": {"device": "cpu"}}
    ).to_json()


@pytest.fixture(scope="module")
def segmenter():
    return SamSegmenter(_config_json())


def test_actor_rows(segmenter):
    img = _scene(64, 48)
    given = np.zeros((48, 64), dtype=np.uint8)
    given[10:30, 10:40] = 200
    existing = encode_mask_png(np.full((48, 64), 0.25, np.float32))
    batch = pa.table(
        {
            "image_id": list("abcdef"),
            "image_bytes": pa.array([_png(img)] * 5 + [b"broken"], pa.binary()),
            "width": pa.array([64, 64, None, 64, 64, None], pa.int32()),
            "height": pa.array([48, 48, None, 48, 48, None], pa.int32()),
            "mask_bytes": pa.array(
                [_png(Image.fromarray(given)), _png(Image.new("L", (32, 32))), None, None, None, None],
                pa.binary(),
            ),
            "mask_png": pa.array([None, None, None, None, existing, None], pa.binary()),
            "error": pa.array([None, None, None, "image too small", None, None], pa.string()),
        }
    )
    out = segmenter(batch)
    assert out.num_rows == 6 and out.column("image_id").to_pylist() == list("abcdef")
    rows = out.to_pylist()
    # a: precomputed mask used as given (soft values kept)
    np.testing.assert_allclose(decode_mask_png(rows[0]["mask_png"]), given / 255.0, atol=1e-6)
    assert rows[0]["mask_model"] == GIVEN_MASK_MODEL and rows[0]["error"] is None
    assert rows[0]["fg_fraction"] == pytest.approx((given / 255.0).mean(), abs=1e-6)
    # b: wrong-size precomputed mask -> an error for this row only, naming both sizes
    assert rows[1]["mask_png"] is None and "32x32" in rows[1]["error"] and "64x48" in rows[1]["error"]
    # c: segmented by tiny SAM, no width/height columns needed
    assert rows[2]["error"] is None and rows[2]["mask_model"] == SegmenterConfig(**TINY).model_id
    assert decode_mask_png(rows[2]["mask_png"]).shape == (48, 64)
    assert 0.0 <= rows[2]["fg_fraction"] <= 1.0
    # d: an earlier error is passed through untouched
    assert rows[3]["error"] == "image too small" and rows[3]["mask_png"] is None
    # e: an existing mask is kept byte for byte
    assert rows[4]["mask_png"] == existing and rows[4]["fg_fraction"] == pytest.approx(0.25, abs=0.003)
    # f: undecodable image -> error row
    assert rows[5]["error"].startswith("mask: ") and rows[5]["mask_png"] is None
    assert out.schema.field("fg_fraction").type == pa.float32()


def test_actor_with_grabcut_backend():
    seg = SamSegmenter(_config_json(backend="grabcut"))
    out = seg(pa.table({"image_bytes": pa.array([_png(_scene(64, 48, seed=2))], pa.binary())}))
    row = out.to_pylist()[0]
    assert row["error"] is None and row["mask_model"] == "grabcut"
    assert 0.15 < row["fg_fraction"] < 0.4  # the square is a quarter of the frame
