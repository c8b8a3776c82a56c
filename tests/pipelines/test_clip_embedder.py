"""CLIP embeddings with the tiny random-weight open_clip model (offline), and the actor classes."""
from __future__ import annotations

import io
import tempfile

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from fbmem.jobs.config import ClipConfig, Config
from fbmem.pipelines.clip_embedder import (
    TINY_CLIP_NAME,
    ClipImageEmbedder,
    ClipTextEmbedder,
    embed_images,
    embed_texts,
    load_clip,
)
from fbmem.pipelines.devices import pick_device

torch.set_num_threads(1)
CPU = torch.device("cpu")
DIM = 64  # embed_dim of the tiny config


def _config_json(**clip) -> str:
    cfg = Config.model_validate(
        {
            "models": {
                "clip": {"tiny": True, **clip},
                "segmenter": {
                    "sam_model_type": "tiny",
                    "points_per_side": 4,
                    "pred_iou_thresh": 0.0,
                    "stability_score_thresh": 0.0,
                    "max_side": 128,
                },
            },
            "resources": {"device": "cpu"},
        }
    )
    return cfg.to_json()


def _image(seed: int, size=(48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny():
    return load_clip(ClipConfig(tiny=True), CPU)


@pytest.fixture(scope="module")
def image_embedder():
    return ClipImageEmbedder(_config_json())


def _vectors(table: pa.Table) -> list:
    return table.column("embedding").to_pylist()


# ------------------------------------------------------------------------------------- devices


def test_pick_device():
    assert pick_device("cpu") == CPU
    if torch.cuda.is_available():
        assert pick_device("auto").type == "cuda"
        assert pick_device("cuda").type == "cuda"
    else:
        assert pick_device("auto") == CPU
        with pytest.raises(RuntimeError, match="resources.device is 'cuda'"):
            pick_device("cuda")
    with pytest.raises(ValueError, match="resources.device"):
        pick_device("tpu")


# ----------------------------------------------------------------------------------- functions


def test_image_vectors_are_unit_norm_float32_of_model_width(tiny):
    model, preprocess, _ = tiny
    vecs = embed_images(model, preprocess, [_image(0), _image(1, (70, 33))], CPU)
    assert vecs.shape == (2, DIM) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)


def test_identical_images_identical_vectors_different_images_differ(tiny):
    model, preprocess, _ = tiny
    a, a2, b = embed_images(model, preprocess, [_image(0), _image(0), _image(1)], CPU)
    np.testing.assert_array_equal(a, a2)
    assert float(a @ b) < 0.9999


def test_batch_order_does_not_change_a_rows_vector(tiny):
    model, preprocess, _ = tiny
    imgs = [_image(i) for i in range(4)]
    fwd = embed_images(model, preprocess, imgs, CPU)
    rev = embed_images(model, preprocess, imgs[::-1], CPU)[::-1]
    alone = embed_images(model, preprocess, imgs[2:3], CPU)
    np.testing.assert_allclose(fwd, rev, atol=1e-5)
    np.testing.assert_allclose(fwd[2:3], alone, atol=1e-5)


def test_text_embedding_works_offline_and_is_unit_norm(tiny):
    model, _, tokenizer = tiny
    vecs = embed_texts(model, tokenizer, ["a photo of a cat", "a photo of a cat", "a red car"], CPU)
    assert vecs.shape == (3, DIM) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(vecs[0], vecs[1])
    assert float(vecs[0] @ vecs[2]) < 0.9999


def test_tiny_weights_depend_only_on_the_seed():
    torch.manual_seed(1234)  # the caller's RNG state must not matter ...
    m1, _, _ = load_clip(ClipConfig(tiny=True, seed=0), CPU)
    after = torch.rand(1)
    torch.manual_seed(1234)
    m2, _, _ = load_clip(ClipConfig(tiny=True, seed=0), CPU)
    assert torch.equal(torch.rand(1), after)  # ... and building must not consume it
    m3, _, _ = load_clip(ClipConfig(tiny=True, seed=1), CPU)
    s1, s2, s3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not all(torch.equal(s1[k], s3[k]) for k in s1)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_checkpoint_file_loads_through_the_real_path(tiny, tmp_path, suffix):
    model, preprocess, _ = tiny
    path = tmp_path / f"clip{suffix}"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    # seed 7 would give other random weights: equal vectors prove the file's weights were loaded
    loaded, pre2, _ = load_clip(ClipConfig(model_name=TINY_CLIP_NAME, pretrained=str(path), seed=7), CPU)
    img = [_image(3)]
    np.testing.assert_allclose(
        embed_images(loaded, pre2, img, CPU), embed_images(model, preprocess, img, CPU), atol=1e-6
    )


class _Payload:
    """Unpickling this would run code: a checkpoint must not be able to."""

    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_pickled_code_in_a_checkpoint_is_refused(tiny, tmp_path):
    model, _, _ = tiny
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": model.state_dict(), "x": _Payload()}, path)
    with pytest.raises(Exception, match="(?i)weights.only"):
        load_clip(ClipConfig(model_name=TINY_CLIP_NAME, pretrained=str(path)), CPU)


def test_missing_checkpoint_file_names_the_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match="models.clip.pretrained"):
        load_clip(ClipConfig(pretrained=str(tmp_path / "nope.pt")), CPU)


# -------------------------------------------------------------------------------------- actors


def test_image_actor_adds_vectors_and_keeps_bad_rows(image_embedder):
    batch = pa.table(
        {
            "image_id": ["a", "b", "c", "d"],
            "image_bytes": pa.array([_png(_image(0)), b"garbage", _png(_image(1)), None], pa.binary()),
            "error": pa.array([None, None, None, "image too small: 1x1"], pa.string()),
        }
    )
    out = image_embedder(batch)
    assert out.num_rows == 4 and out.column("image_id").to_pylist() == ["a", "b", "c", "d"]
    assert out.schema.field("embedding").type == pa.list_(pa.float32(), DIM)
    vecs = _vectors(out)
    assert vecs[1] is None and vecs[3] is None
    np.testing.assert_allclose(np.linalg.norm(np.array([vecs[0], vecs[2]]), axis=1), 1.0, atol=1e-5)
    errors = out.column("error").to_pylist()
    assert errors[0] is None and errors[2] is None
    assert errors[1].startswith("clip: ")  # the decode failure, named
    assert errors[3] == "image too small: 1x1"  # an earlier error is left as it was
    model_id = ClipConfig(tiny=True).model_id
    assert out.column("embedding_model").to_pylist() == [model_id, None, model_id, None]


def test_image_actor_without_error_column_and_rerun_replaces_columns(image_embedder):
    batch = pa.table({"image_bytes": pa.array([_png(_image(5))], pa.binary())})
    once = image_embedder(batch)
    twice = image_embedder(once)
    assert twice.column_names == once.column_names  # replaced, not duplicated
    assert _vectors(once) == _vectors(twice)


def test_two_actor_instances_give_the_same_vectors(image_embedder):
    batch = pa.table({"image_bytes": pa.array([_png(_image(i)) for i in range(3)], pa.binary())})
    other = ClipImageEmbedder(_config_json())
    np.testing.assert_array_equal(
        np.array(_vectors(image_embedder(batch))), np.array(_vectors(other(batch)))
    )


def test_actor_vector_matches_the_pure_function(tiny, image_embedder):
    model, preprocess, _ = tiny
    img = _image(9, (64, 64))
    out = image_embedder(pa.table({"image_bytes": pa.array([_png(img)], pa.binary())}))
    np.testing.assert_allclose(
        np.array(_vectors(out)), embed_images(model, preprocess, [img], CPU), atol=1e-6
    )


def test_text_actor():
    embedder = ClipTextEmbedder(_config_json())
    out = embedder(pa.table({"text": pa.array(["a cat", None, "a cat"], pa.string())}))
    vecs = _vectors(out)
    assert vecs[1] is None and vecs[0] == vecs[2] and len(vecs[0]) == DIM
    assert out.column("embedding_model").null_count == 1
    with pytest.raises(KeyError, match="'text' column"):
        embedder(pa.table({"caption": ["x"]}))


# ----------------------------------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def ray_session():
    import ray

    tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tmp, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_actors_run_under_ray_data(ray_session, image_embedder):
    import ray

    from fbmem.pipelines.sam_segmenter import SamSegmenter

    cfg_json = _config_json()
    table = pa.table(
        {
            "image_id": [f"i{i}" for i in range(5)],
            "image_bytes": pa.array([_png(_image(i)) for i in range(5)], pa.binary()),
        }
    )
    actor = dict(
        fn_constructor_args=(cfg_json,),
        batch_format="pyarrow",
        batch_size=2,
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=0.5,
    )
    ds = ray.data.from_arrow(table).map_batches(ClipImageEmbedder, **actor)
    ds = ds.map_batches(SamSegmenter, **actor)
    out = pa.concat_tables(ray.get(ds.to_arrow_refs())).sort_by("image_id")
    assert out.num_rows == 5
    expected = np.array(_vectors(image_embedder(table)))
    np.testing.assert_allclose(np.array(_vectors(out)), expected, atol=1e-5)
    assert out.column("error").null_count == 5
    assert out.column("mask_png").null_count == 0
