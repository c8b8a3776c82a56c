"""`fbmem scan` (jobs/scan.py): the ledger, resuming and taking over, incremental scans, what
changed between two scans, and the gates.

The incremental test is the issue's: a first scan of the small toy world (tests/chaos.py), then
a training image that copies one stored generation is added to the corpus folder; the second
scan reads only the shard that changed, generates and labels nothing new, compares the stored
generations with the new image only, and flips that generation from NM to VM, while every pair
scored before keeps its score and its run. The same gate, `--fail-on "VM > 0"`, passes the first
scan and fails the second (exit 5, after everything is written).
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from chaos import cli, kill_tree, run_cli, small_toy_scan
from PIL import Image

from fbmem.jobs.errors import ExitCode, ScanBusy
from fbmem.jobs.runtime.heartbeat import this_host
from fbmem.jobs.scan import run_scan
from fbmem.jobs.scan_spec import load_scan_spec
from fbmem.storage.database import connect
from fbmem.storage.schema import SCANS, now_utc


def _exit_code(args: list[str], ray_tmp: str, log: Path) -> int:
    proc = cli(args, ray_tmp, log)
    try:
        return proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            kill_tree(proc)


def _stage_counts(db, scan_id: str, stage: str) -> dict:
    row = db.read("scan_stages", where=f"scan_id = '{scan_id}' AND stage = '{stage}'").to_pylist()[0]
    assert row["status"] == "done", row
    return json.loads(row["counts_json"])


@pytest.mark.slow
def test_incremental_scan_reads_only_new_shards_and_flips_the_copied_generation(tmp_path: Path) -> None:
    spec_path = small_toy_scan(tmp_path / "toy", localize="memorized")
    spec = yaml.safe_load(spec_path.read_text())
    spec["stages"] = ["ingest", "index", "prompts", "generate", "label", "report"]
    # small shards, so that one new file changes one shard of several; an index from 10 rows (IVF_FLAT:
    # PQ needs more rows to train), so the second scan updates it
    spec["settings"].update({"engine.folder_files_per_shard": 4, "index.exact_below_rows": 10,
                             "index.index_type": "IVF_FLAT", "index.num_partitions": 2})
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    db_uri, ray_tmp, log = str(tmp_path / "db"), tempfile.mkdtemp(prefix="fbs", dir="/tmp"), tmp_path / "scan.log"
    summary1, summary2 = tmp_path / "s1.json", tmp_path / "s2.json"

    gate = ["--fail-on", "VM > 0"]
    assert _exit_code(["scan", str(spec_path), "--db", db_uri, *gate, "--summary-json", str(summary1)],
                      ray_tmp, log) == 0, log.read_text()[-3000:]
    db = connect(db_uri)
    first = json.loads(summary1.read_text())
    s1 = first["scan_id"]
    assert first["labels"]["VM"] == 0 and first["gates"][0]["crossed"] is False
    ingest1 = _stage_counts(db, s1, "ingest")
    n_shards = ingest1["shards"]
    assert n_shards >= 3 and ingest1["shards_new"] == n_shards
    assert _stage_counts(db, s1, "index")["action"] == "built"
    pairs_before = {r["pair_id"]: r for r in db.read("pair_scores").to_pylist()}
    labels_before = {r["generation_id"]: r for r in db.read("labels", where="rule = 'most-severe'").to_pylist()}

    # plant a training image that copies one stored generation (its pixels), named to sort last
    gen = db.read("generations", ["generation_id", "image_bytes"], where="mitigation = 'none'").to_pylist()[0]
    assert labels_before[gen["generation_id"]]["label"] == "NM"
    Image.open(io.BytesIO(gen["image_bytes"])).convert("RGB").save(tmp_path / "toy" / "world" / "images" / "zzzz_planted.png")

    code = _exit_code(["scan", str(spec_path), "--db", db_uri, *gate, "--summary-json", str(summary2)], ray_tmp, log)
    assert code == ExitCode.GATE, log.read_text()[-3000:]
    second = json.loads(summary2.read_text())  # written before the gate's exit
    s2 = second["scan_id"]
    assert s2 != s1 and second["previous_scan"] == s1 and second["gates"][0]["crossed"] is True
    scans = {r["scan_id"]: r for r in db.read("scans").to_pylist()}
    assert scans[s2]["status"] == "done"  # everything written; the exit code carries the verdict

    ingest2 = _stage_counts(db, s2, "ingest")
    assert ingest2["shards_new"] == 1 and ingest2["shards_done_before"] == n_shards - 1
    assert ingest2["images_written"] == 1
    shard_rows = db.read("scan_shards", where=f"scan_id = '{s2}'").to_pylist()
    assert sorted(r["status"] for r in shard_rows) == ["done"] + ["done-before"] * (n_shards - 1)
    assert _stage_counts(db, s2, "prompts")["prompts_new"] == 0
    assert _stage_counts(db, s2, "generate")["generated"] == 0
    assert _stage_counts(db, s2, "index")["action"] == "updated"

    planted = db.read("training_images", ["image_id"], where="source_uri LIKE '%zzzz_planted.png'").column(0).to_pylist()
    assert len(planted) == 1
    labels_after = {r["generation_id"]: r for r in db.read("labels", where="rule = 'most-severe'").to_pylist()}
    assert labels_after[gen["generation_id"]]["label"] == "VM"
    assert labels_after[gen["generation_id"]]["best_image_id"] == planted[0]
    # no other pair re-scored: every pair of the first scan is as it was; new pairs all involve the new image
    pairs_after = {r["pair_id"]: r for r in db.read("pair_scores").to_pylist()}
    for pid, before in pairs_before.items():
        after = pairs_after[pid]
        assert (after["run_id"], after["full"], after["fg"], after["bg"]) == (
            before["run_id"], before["full"], before["fg"], before["bg"])
    new_pairs = [r for pid, r in pairs_after.items() if pid not in pairs_before]
    assert new_pairs and {r["image_id"] for r in new_pairs} == set(planted)
    assert _stage_counts(db, s2, "label").get("new_pairs_scored") == len(new_pairs)
    # labels of generations without a new pair were not rewritten
    touched = {r["generation_id"] for r in new_pairs}
    for g, before in labels_before.items():
        if g not in touched:
            assert labels_after[g]["run_id"] == before["run_id"]

    diff = json.loads(run_cli(["sql", "scan_diff", "--db", db_uri, "--param", f"a={s1}", "--param", f"b={s2}",
                               "--format", "json"], ray_tmp))
    changed = [d for d in diff if d["change"] == "label changed"]
    assert [(d["generation_id"], d["label_a"], d["label_b"]) for d in changed] == [(gen["generation_id"], "NM", "VM")]
    assert any(d["change"] == "new pair" and d["label_b"] == "VM" and d["image_id"] == planted[0] for d in diff)
    assert second["changes_since_previous"].get("label changed") == 1

    listing = run_cli(["scans", "--db", db_uri, "--format", "json"], ray_tmp)
    assert {r["scan_id"]: r["status"] for r in json.loads(listing)} == {s1: "done", s2: "done"}


def _scan_row(scan_id: str, pid: int, spec_hash: str) -> dict:
    return {"scan_id": scan_id, "name": "weekly", "status": "running", "spec_hash": spec_hash, "started_at": now_utc(),
            "heartbeat_at": now_utc(), "host": this_host(), "pid": pid, "attempts": 1, "seconds": 1.0}


def test_a_scan_whose_owner_is_alive_is_refused_and_a_dead_owners_is_taken_over(tmp_path: Path) -> None:
    import pyarrow as pa

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"name": "weekly", "preset": "tiny", "stages": ["report"],
                                    "outputs": {"report": "report"}}))
    spec = load_scan_spec(path)
    db_uri = str(tmp_path / "db")
    db = connect(db_uri)
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        db.upsert("scans", pa.Table.from_pylist([_scan_row("weekly-1", owner.pid, spec.spec_hash())], schema=SCANS))
        with pytest.raises(ScanBusy, match="is running in process"):
            run_scan(spec, db_uri)  # no --scan-id: the spec's unfinished scan, which is alive
    finally:
        owner.kill()
        owner.wait()
    result = run_scan(spec, db_uri)  # its process is gone: taken over at once, resumed under its id
    assert (result.scan_id, result.how) == ("weekly-1", "taken over")
    row = db.read("scans").to_pylist()[0]
    assert row["status"] == "done" and row["attempts"] == 2
    assert (tmp_path / "report" / "index.html").is_file()
    again = run_scan(spec, db_uri, scan_id="weekly-1")  # a rerun of a done scan skips every done stage
    assert again.how == "resumed"
    stages = db.read("scan_stages").to_pylist()
    assert {s["stage"]: s["status"] for s in stages}["report"] == "done"
    assert run_scan(spec, db_uri).scan_id != "weekly-1"  # the last one finished: a new scan


def test_a_scan_id_names_one_spec(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"name": "weekly", "preset": "tiny", "stages": ["report"]}))
    run_scan(load_scan_spec(path), str(tmp_path / "db"), scan_id="w-1")
    path.write_text(yaml.safe_dump({"name": "weekly", "preset": "tiny", "stages": ["report"], "samples": 3}))
    with pytest.raises(ScanBusy, match="another spec"):
        run_scan(load_scan_spec(path), str(tmp_path / "db"), scan_id="w-1")


def test_the_scan_ledger_works_on_object_storage(tmp_path: Path, s3_store) -> None:
    """The ledger's rows, a takeover and the listing on the S3 server (moto): heartbeats and stage
    rows are ordinary upserts, so a store with conditional PUT is all they need."""
    import pyarrow as pa

    from fbmem.jobs.scan import scan_rows

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"name": "weekly", "preset": "tiny", "stages": ["report"],
                                    "settings": {"storage_options": s3_store.storage_options,
                                                 "runtime.heartbeat_s": 0.2}}))
    spec = load_scan_spec(path)
    db_uri = f"{s3_store.uri}/{tmp_path.name}/db"
    db = connect(db_uri, spec.to_config().storage_options)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    db.upsert("scans", pa.Table.from_pylist([_scan_row("weekly-s3", dead.pid, spec.spec_hash())], schema=SCANS))
    result = run_scan(spec, db_uri)
    assert (result.scan_id, result.how) == ("weekly-s3", "taken over")
    rows = scan_rows(db, stale_after_s=300)
    assert [(r["scan_id"], r["status"], r["stages"], r["attempts"]) for r in rows] == [("weekly-s3", "done", "1/1", 2)]
    stages = {r["stage"]: r for r in db.read("scan_stages").to_pylist()}
    assert stages["report"]["status"] == "done" and stages["report"]["heartbeat_at"] is not None
    assert {s for s, r in stages.items() if r["status"] == "skipped"} == {s for s in stages if s != "report"}
