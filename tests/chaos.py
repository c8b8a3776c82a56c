"""Kill -9 a running `fbmem` command and compare what it leaves with an uninterrupted run: the
harness of tests/jobs/test_scan_chaos.py and bench/chaos.py (both import it), and the process-tree
helpers of the ingest engine's kill test.

A run is the CLI in a child process with its own Ray temp folder; killing it kills the CLI and
every process it started (its local Ray), by their ids, as a lost node or an OOM kill would.
`compare_databases` compares every result table of two databases: the same keys, no duplicate
key, equal values, floats within a tolerance; bookkeeping (run ids, times, the ledgers) differs
by design and is left out.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]

# Result tables and their keys; every other table is bookkeeping (runs, errors' run ids, ledgers).
RESULT_TABLES = {
    "training_images": "image_id", "training_masks": "image_id", "training_sources": "source_row_id",
    "prompts": "prompt_id", "generations": "generation_id", "pair_scores": "pair_id", "labels": "label_id",
    "neurons": "neuron_set_id", "neuron_stats": "stat_id", "nemo_prompts": "nemo_id",
    "detections": "detection_id", "mitigation_quality": "quality_id", "errors": "error_id",
}
# Columns that say when or by which run a row was written, or how long it took: not results.
VOLATILE = {"run_id", "cluster_run_id", "ingested_at", "created_at", "labelled_at", "changed_at", "computed_at",
            "finished_at", "updated_at", "seconds", "heartbeat_at"}


# ------------------------------------------------------------------------------ processes


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc)."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the CLI and then every process it had started (its local Ray), by their ids."""
    tree = descendants(proc.pid)
    proc.kill()
    proc.wait()
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.time() + 30
    while time.time() < deadline and any(alive(p) for p in tree):
        time.sleep(0.2)


def cli(args: Sequence[str], ray_tmp: str, log: Path | None = None) -> subprocess.Popen:
    """`fbmem ARGS` in a child process with its own Ray temp folder (output to `log`, else a pipe)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(FBMEM_RAY_TMP=ray_tmp, OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(REPO / "tests"))
    out = open(log, "a") if log is not None else subprocess.PIPE  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, "-c", "from fbmem.jobs.cli import main; main()", *args],
                            env=env, stdout=out, stderr=subprocess.STDOUT, text=True)


def run_cli(args: Sequence[str], ray_tmp: str, timeout: float = 900, log: Path | None = None) -> str:
    """Run to the end; the output (or the log's tail) is the assertion message on failure."""
    proc = cli(args, ray_tmp, log)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    text = out if out is not None else (log.read_text()[-4000:] if log else "")
    assert proc.returncode == 0, text[-4000:]
    return text


# ------------------------------------------------------------------------------ kill and resume


@dataclass
class Trial:
    kills_at: list[float]  # seconds after each attempt's start
    killed: list[bool] = field(default_factory=list)  # whether that attempt was still running
    attempts: int = 0
    seconds: float = 0.0


def kill_and_resume(args: Sequence[str], kills_at: Sequence[float], ray_tmp: str, log: Path,
                    timeout: float = 1800) -> Trial:
    """Start `fbmem ARGS`, kill it `kills_at[0]` s later, start it again, kill it `kills_at[1]` s
    later, ..., then run it to completion."""
    trial = Trial(list(kills_at))
    t0 = time.monotonic()
    for at in kills_at:
        proc = cli(args, ray_tmp, log)
        trial.attempts += 1
        try:
            proc.wait(timeout=at)
            trial.killed.append(False)  # it finished first: the next attempt resumes nothing
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            trial.killed.append(True)
            with open(log, "a") as f:
                f.write(f"\n#### chaos: killed with SIGKILL after {at:.1f} s\n")
    run_cli(args, ray_tmp, timeout=timeout, log=log)
    trial.attempts += 1
    trial.seconds = time.monotonic() - t0
    return trial


def seeded_moments(seed: int, n: int, low: float, high: float) -> list[float]:
    rng = random.Random(seed)
    return [round(rng.uniform(low, high), 1) for _ in range(n)]


# ------------------------------------------------------------------------------ comparison


def _table(db: str, name: str) -> pa.Table | None:
    path = Path(db) / f"{name}.lance"
    if not path.exists():
        return None
    return lance.dataset(str(path)).to_table()


def _same(a: object, b: object, tol: float) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        if a is None or b is None:
            return a is b
        return bool(np.isclose(a, b, rtol=0.0, atol=tol, equal_nan=True))
    if isinstance(a, list) and isinstance(b, list) and a and isinstance(a[0], float):
        return len(a) == len(b) and bool(np.allclose(a, b, rtol=0.0, atol=tol, equal_nan=True))
    return a == b


def compare_databases(a: str, b: str, tol: float = 1e-6) -> list[str]:
    """Differences between the result tables of databases `a` and `b` (empty: they match)."""
    problems: list[str] = []
    for name, key in RESULT_TABLES.items():
        ta, tb = _table(a, name), _table(b, name)
        if ta is None or tb is None:
            if (ta is None) != (tb is None) and (ta if ta is not None else tb).num_rows:
                problems.append(f"{name}: only in {'a' if tb is None else 'b'}")
            continue
        for label, t in (("a", ta), ("b", tb)):
            keys = t.column(key).to_pylist()
            if len(keys) != len(set(keys)):
                problems.append(f"{name}: duplicate keys in {label} ({len(keys) - len(set(keys))})")
        ra = {r[key]: r for r in ta.to_pylist()}
        rb = {r[key]: r for r in tb.to_pylist()}
        if set(ra) != set(rb):
            problems.append(f"{name}: keys differ: {len(set(ra) - set(rb))} only in a, {len(set(rb) - set(ra))} only in b")
        cols = [c for c in ta.column_names if c not in VOLATILE and c in tb.column_names]
        bad: dict[str, int] = {}
        for k in set(ra) & set(rb):
            for c in cols:
                if not _same(ra[k][c], rb[k][c], tol):
                    bad[c] = bad.get(c, 0) + 1
        for c, n in sorted(bad.items()):
            problems.append(f"{name}.{c}: {n} rows differ")
    # what changed, without run ids: the same (generation, rule, previous, label) transitions
    ca, cb = _table(a, "label_changes"), _table(b, "label_changes")
    if ca is not None or cb is not None:
        def changes(t: pa.Table | None) -> set[tuple]:
            if t is None:
                return set()
            return set(zip(*(t.column(c).to_pylist() for c in ("generation_id", "rule", "previous_label", "label"))))
        if changes(ca) != changes(cb):
            problems.append(f"label_changes: transitions differ ({len(changes(ca) ^ changes(cb))})")
    return problems


# ------------------------------------------------------------------------------ the toy scan

# A small toy world and a briefly trained model: a scan of every stage in about a minute here.
SMALL_SETTINGS = {"generation.steps": 4, "nemo.n_latents": 3, "cluster.k": 2, "candidates.k": 4,
                  "runtime.heartbeat_s": 1.0, "detect.wen_seeds": 2}


def small_toy_scan(out: Path, *, samples: int = 2, localize: str = "all") -> Path:
    """The shipped toy scan spec (jobs/toy/toy_scan.yaml) over a small toy world and a model
    trained briefly in `out` (both cached there); returns the spec's path. `localize: all` makes
    NeMo localize every prompt, so that mitigation has neurons to switch off even though a model
    trained for 12 steps memorizes nothing."""
    import yaml

    from fbmem.jobs.toy.corpus import ToyCorpusSpec
    from fbmem.jobs.toy.demo import build_world
    from fbmem.jobs.toy.train import ToyTrainSpec, ensure_toy_model

    corpus_spec = ToyCorpusSpec(vm_prompts=2, vm_copies=3, fm_prompts=2, fm_copies=3, bm_prompts=2, bm_copies=3,
                                nm_prompts=4, seed=3)
    train = ToyTrainSpec(vae_steps=8, vae_batch=4, unet_steps=12, unet_batch=8, warmup_steps=2)
    out.mkdir(parents=True, exist_ok=True)
    _, corpus = build_world(out, corpus_spec)
    ensure_toy_model(out / "model", corpus, train)
    spec = yaml.safe_load((REPO / "jobs" / "toy" / "toy_scan.yaml").read_text())
    spec.update(samples=samples, settings=dict(SMALL_SETTINGS), outputs={"report": "report", "summary_json": None})
    spec["nemo"]["localize"] = localize
    path = out / "scan.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path
