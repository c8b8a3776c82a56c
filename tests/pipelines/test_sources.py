"""Sources on a local Ray: folder, CSV/Parquet manifests, webdataset shards, then validation."""
from __future__ import annotations

import csv
import io
import json
import shutil
import tarfile
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from bad_inputs import EXPECTED_ERRORS, MUST_DECODE, write_bad_inputs, write_good_images

from fbmem.pipelines.images import sha256_hex, validate_batch
from fbmem.pipelines.sources import (
    GENERATION_SCHEMA,
    SOURCE_SCHEMA,
    folder_source,
    manifest_source,
    open_source,
    webdataset_source,
)

LIMITS = dict(max_pixels=89_478_485, min_side=32, timeout_s=5.0)
BAD_FILES = [n for n in EXPECTED_ERRORS if n != "missing"]  # those that exist on disk


@pytest.fixture(scope="module")
def ray_session():
    tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tmp, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


def _validated(ds: ray.data.Dataset) -> pa.Table:
    out = ds.map_batches(validate_batch, batch_format="pyarrow", fn_kwargs=LIMITS, batch_size=8)
    return pa.concat_tables(ray.get(out.to_arrow_refs()))


def _by_uri(table: pa.Table) -> dict[str, dict]:
    rows = table.to_pylist()
    uris = [r["source_uri"] for r in rows]
    assert len(uris) == len(set(uris)), "a source row was duplicated"
    return {r["source_uri"]: r for r in rows}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """A folder: 6 good images (with some captions and masks) and the bad inputs in a subfolder."""
    root = tmp_path_factory.mktemp("corpus")
    good = write_good_images(root, 6, seed=0)
    bad = write_bad_inputs(root / "sub" / "bad")
    return {"root": root, "good": good, "bad": bad}


def _check_bad_and_good(rows: dict[str, dict], good: list[Path], bad: dict[str, Path], names) -> None:
    for name in names:
        row = rows[str(bad[name])]
        if name in EXPECTED_ERRORS:
            assert row["error"] and EXPECTED_ERRORS[name] in row["error"], (name, row["error"])
            assert row["image_bytes"] is None
        else:
            assert row["error"] is None, (name, row["error"])
            assert row["width"] > 0 and row["height"] > 0
    for p in good:
        row = rows[str(p)]
        assert row["error"] is None, row["error"]
        assert row["image_id"] == sha256_hex(p.read_bytes())
        assert row["image_bytes"] == p.read_bytes()
        assert (row["width"], row["height"]) == (64, 64)


def test_folder_source_one_error_row_per_bad_file_and_every_good_row(ray_session, corpus) -> None:
    ds = folder_source(corpus["root"], rows_per_block=4)
    table = _validated(ds)
    rows = _by_uri(table)
    names = BAD_FILES + list(MUST_DECODE)
    assert len(rows) == len(corpus["good"]) + len(names)  # no .txt / .mask.png rows
    assert not any(u.endswith((".txt", ".mask.png")) for u in rows)
    _check_bad_and_good(rows, corpus["good"], corpus["bad"], names)
    assert sum(r["error"] is not None for r in rows.values()) == len(BAD_FILES)
    for i, p in enumerate(corpus["good"]):
        row = rows[str(p)]
        stem = p.with_suffix("")
        assert row["source_id"] == p.name
        assert row["caption"] == (f"caption 0 {i}" if i % 2 == 0 else None)
        mask = Path(f"{stem}.mask.png")
        if i % 3 == 0:
            assert row["mask_uri"] == str(mask) and row["mask_bytes"] == mask.read_bytes()
        else:
            assert row["mask_uri"] is None and row["mask_bytes"] is None
    assert rows[str(corpus["bad"]["cmyk"])]["source_id"] == "sub/bad/cmyk.jpg"


def test_csv_manifest_relative_uris_ids_and_missing_file(ray_session, tmp_path: Path) -> None:
    good = write_good_images(tmp_path / "imgs", 3, seed=1)
    bad = write_bad_inputs(tmp_path / "imgs" / "bad")
    manifest = tmp_path / "manifest.csv"
    entries = [(p, f"00{i}", f"cap, with comma\nand newline {i}") for i, p in enumerate(good)]
    entries += [(p, f"b{name}", None) for name, p in bad.items()]
    with manifest.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["uri", "caption", "id", "mask_uri"])
        for p, ident, cap in entries:
            rel = p.relative_to(tmp_path).as_posix()
            mask = Path(f"{p.with_suffix('')}.mask.png")
            w.writerow([rel, cap or "", ident, mask.relative_to(tmp_path).as_posix() if mask.exists() else ""])
    table = _validated(manifest_source(manifest))
    rows = _by_uri(table)
    assert len(rows) == len(entries)
    _check_bad_and_good(rows, good, bad, list(bad))
    assert str(bad["missing"]) in rows[str(bad["missing"])]["error"]
    assert rows[str(good[0])]["source_id"] == "000"  # ids stay strings
    assert rows[str(good[1])]["caption"] == "cap, with comma\nand newline 1"
    assert rows[str(good[0])]["mask_bytes"] == Path(f"{good[0].with_suffix('')}.mask.png").read_bytes()
    assert rows[str(bad["empty"])]["caption"] is None
    assert sum(r["error"] is not None for r in rows.values()) == len(EXPECTED_ERRORS)


def test_parquet_generation_manifest(ray_session, tmp_path: Path) -> None:
    good = write_good_images(tmp_path, 2, seed=2)
    bad = write_bad_inputs(tmp_path / "bad")
    uris = [str(p) for p in good] + [str(bad["truncated"]), str(bad["missing"])]
    pq.write_table(
        pa.table(
            {
                "uri": uris,
                "prompt": ["a cat", "a dog", "a cat", "a bird"],
                "seed": pa.array([7, 7, 8, None], pa.int64()),
                "sample": [0, 1, 0, 0],
            }
        ),
        tmp_path / "gens.parquet",
    )
    ds = manifest_source(tmp_path / "gens.parquet", generations=True)
    table = _validated(ds)
    for f in GENERATION_SCHEMA:
        assert table.schema.field(f.name).type == f.type, f.name
    rows = _by_uri(table)
    assert [rows[u]["prompt"] for u in uris] == ["a cat", "a dog", "a cat", "a bird"]
    assert [rows[u]["seed"] for u in uris] == [7, 7, 8, None]
    assert [rows[u]["sample"] for u in uris] == [0, 1, 0, 0]
    assert rows[uris[0]]["error"] is None and rows[uris[1]]["error"] is None
    assert "truncated or corrupt image" in rows[uris[2]]["error"]
    assert "file not found" in rows[uris[3]]["error"]


def test_manifest_missing_required_column_fails_before_work(tmp_path: Path) -> None:
    bad_csv = tmp_path / "no_uri.csv"
    bad_csv.write_text("path,caption\na.jpg,x\n")
    with pytest.raises(ValueError, match="no required column 'uri'") as info:
        manifest_source(bad_csv)
    assert str(bad_csv) in str(info.value)
    pq.write_table(pa.table({"uri": ["a.png"]}), tmp_path / "no_prompt.parquet")
    with pytest.raises(ValueError, match="no required column 'prompt'"):
        manifest_source(tmp_path / "no_prompt.parquet", generations=True)
    with pytest.raises(ValueError, match="manifest not found"):
        manifest_source(tmp_path / "absent.csv")


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write_shard(path: Path, good: list[Path], bad: dict[str, Path]) -> list[str]:
    """Shard with good samples (txt/json/mask), bad image members, and a sample with no image."""
    keys = []
    with tarfile.open(path, "w") as tar:
        for i, p in enumerate(good):
            key = f"{i:09d}"
            keys.append(key)
            ext = p.suffix[1:]
            _add(tar, f"{key}.{ext}", p.read_bytes())
            _add(tar, f"{key}.txt", f"shard caption {i}".encode())
            _add(tar, f"{key}.json", json.dumps({"url": f"http://x/{i}.{ext}", "key": key}).encode())
            mask = Path(f"{p.with_suffix('')}.mask.png")
            if mask.exists():
                _add(tar, f"{key}.mask.png", mask.read_bytes())
        for name in ("truncated", "text", "tiny", "cmyk"):
            _add(tar, f"{name}.{bad[name].suffix[1:]}", bad[name].read_bytes())
            keys.append(name)
        _add(tar, "noimage.txt", b"caption without image")
        _add(tar, "noimage.json", b'{"url": "http://x/gone.jpg"}')
        keys.append("noimage")
    return keys


def test_webdataset_shards_good_bad_and_truncated(ray_session, tmp_path: Path) -> None:
    good = write_good_images(tmp_path / "src", 4, seed=3)
    bad = write_bad_inputs(tmp_path / "bad")
    shards = tmp_path / "shards"
    shards.mkdir()
    shard = shards / "00000.tar"
    keys = _write_shard(shard, good, bad)
    # a second shard, cut in the middle of its third sample's image
    full = io.BytesIO()
    with tarfile.open(fileobj=full, mode="w") as tar:
        for i, p in enumerate(good[:3]):
            _add(tar, f"t{i}.{p.suffix[1:]}", p.read_bytes())
    data = full.getvalue()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        cut = tar.getmember(f"t2.{good[2].suffix[1:]}").offset_data + 100
    (shards / "00001.tar").write_bytes(data[:cut])

    table = _validated(webdataset_source(shards))
    rows = _by_uri(table)
    for i, p in enumerate(good):
        row = rows[f"{shard}#{i:09d}"]
        assert row["error"] is None
        assert row["image_bytes"] == p.read_bytes()
        assert row["caption"] == f"shard caption {i}"
        assert row["source_id"] == f"{i:09d}"
        has_mask = Path(f"{p.with_suffix('')}.mask.png").exists()
        assert (row["mask_bytes"] is not None) == has_mask
    for name in ("truncated", "text", "tiny"):
        assert EXPECTED_ERRORS[name] in rows[f"{shard}#{name}"]["error"]
    assert rows[f"{shard}#cmyk"]["error"] is None
    assert "no image member" in rows[f"{shard}#noimage"]["error"]
    assert rows[f"{shard}#noimage"]["source_id"] == "http://x/gone.jpg"  # json url when no key
    # the truncated shard: the two complete samples survive, the broken one is an error row
    t1 = str(shards / "00001.tar")
    assert rows[f"{t1}#t0"]["error"] is None and rows[f"{t1}#t1"]["error"] is None
    assert "corrupt or truncated webdataset shard" in rows[f"{t1}#t2"]["error"]
    assert len(rows) == len(keys) + 3


def test_webdataset_unreadable_shard_is_an_error_row(ray_session, tmp_path: Path) -> None:
    (tmp_path / "garbage.tar").write_bytes(b"not a tar at all" * 10)
    rows = webdataset_source(tmp_path / "garbage.tar").take_all()
    assert len(rows) == 1
    assert "corrupt or truncated webdataset shard" in rows[0]["error"]
    assert rows[0]["source_uri"] == str(tmp_path / "garbage.tar")


def test_open_source_dispatch(ray_session, tmp_path: Path) -> None:
    good = write_good_images(tmp_path / "imgs", 2, seed=4)
    assert open_source(tmp_path / "imgs").count() == 2
    assert open_source(tmp_path / "imgs").schema().names == SOURCE_SCHEMA.names
    manifest = tmp_path / "m.csv"
    manifest.write_text("uri\n" + "\n".join(p.relative_to(tmp_path).as_posix() for p in good) + "\n")
    assert sorted(r["source_uri"] for r in open_source(manifest).take_all()) == sorted(map(str, good))
    wds = tmp_path / "wds"
    wds.mkdir()
    with tarfile.open(wds / "a.tar", "w") as tar:
        _add(tar, "k.png", good[0].read_bytes())
    assert open_source(wds).take_all()[0]["source_uri"] == f"{wds / 'a.tar'}#k"
    assert open_source(wds / "a.tar").count() == 1
    shutil.copy(wds / "a.tar", tmp_path / "imgs" / "a.tar")
    with pytest.raises(ValueError, match="both images"):
        open_source(tmp_path / "imgs")
    assert open_source(tmp_path / "imgs", kind="folder").count() == 2
    with pytest.raises(ValueError, match="unknown source kind"):
        open_source(tmp_path / "imgs", kind="zip")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="source not found"):
        open_source(tmp_path / "nothing")
