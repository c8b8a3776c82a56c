"""Nothing a source says is lost (issue 14, item 6): `training_images` keeps one row per image
content, `training_sources` one row per (image, source row), so copies of an image with other
captions all survive whatever the batching; bad manifest rows name the manifest and their row."""
from __future__ import annotations

import csv
import shutil

from bad_inputs import write_good_images
from typer.testing import CliRunner

from fbmem.jobs.cli import app
from fbmem.storage.database import connect

runner = CliRunner()


def fbmem(*args: str) -> str:
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_duplicate_content_with_different_captions_all_kept(ray_local, tmp_path) -> None:
    imgs = sorted(write_good_images(tmp_path / "imgs", 4, seed=11))
    copy = tmp_path / "imgs" / f"zz_copy{imgs[0].suffix}"
    shutil.copyfile(imgs[0], copy)  # same content, another name
    a, b, c, d = (p.relative_to(tmp_path).as_posix() for p in imgs)
    rows = [  # (uri, caption, id): image `a` under three rows, in three shards; two rows without uri
        (a, "a red cup", "r0"),
        ("", "no image here", ""),
        (b, "b", "r2"),
        (c, "c", "r3"),
        (copy.relative_to(tmp_path).as_posix(), "a cup, red", "r4"),
        (d, "d", "r5"),
        ("", "", ""),
        (a, "", "r7"),
    ]
    manifest = tmp_path / "m.csv"
    with manifest.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["uri", "caption", "id"])
        w.writerows(rows)
    db_uri = str(tmp_path / "db")
    args = ["ingest", "training", str(manifest), "--db", db_uri, "--preset", "tiny",
            "--set", "engine.manifest_rows_per_shard=3", "--set", "engine.rows_per_fragment=1",
            "--set", "engine.commit_every_fragments=1000"]
    out = fbmem(*args)
    assert "errors=2" in out
    db = connect(db_uri)

    images = db.read("training_images", ["image_id", "caption"]).to_pylist()
    assert len(images) == 4
    sources = db.read("training_sources").to_pylist()
    assert len(sources) == 6 == len({s["source_row_id"] for s in sources})
    a_id = next(s["image_id"] for s in sources if s["line"] == 0)
    of_a = sorted((s for s in sources if s["image_id"] == a_id), key=lambda s: s["line"])
    assert [s["line"] for s in of_a] == [0, 4, 7]
    assert [s["caption"] for s in of_a] == ["a red cup", "a cup, red", None]
    assert [s["source_id"] for s in of_a] == ["r0", "r4", "r7"]
    assert {s["source"] for s in sources} == {str(manifest)}
    assert of_a[1]["source_uri"] == str(copy)
    assert next(i["caption"] for i in images if i["image_id"] == a_id) in {"a red cup", "a cup, red", None}

    errors = db.read("errors", ["error_id", "source_uri", "reason"]).to_pylist()
    assert sorted(e["source_uri"] for e in errors) == [f"{manifest}#row=1", f"{manifest}#row=6"]
    assert len({e["error_id"] for e in errors}) == 2
    assert all("missing uri" in e["reason"] for e in errors)

    # A rerun adds nothing: skipped by the ledger, and also with the ledger gone (every row read
    # again: images skipped by the key check, their source rows appended again and checked back).
    fbmem(*args)
    db.delete("ingest_shards", "shard_id IS NOT NULL")
    fbmem(*args)
    assert db.count("training_images") == 4 and db.count("training_sources") == 6 and db.count("errors") == 2
