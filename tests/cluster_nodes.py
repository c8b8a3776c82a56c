"""A real two-node Ray cluster on this machine, for tests: a head node and a worker node, each a
`ray start --block` process of its own, and `ray job submit` to run jobs on it.

    with LocalCluster(worker_resources={"model_worker": 4}) as cluster:
        cluster.submit("fbmem", "label", "--db", db)      # the driver runs on the head
        cluster.worker_node_id                             # the node with the custom resource

What it takes care of (each learnt the hard way, Ray 2.60):
- Token auth is on by default for `ray start --head`, and the default token file is shared by
  every Ray of this account on the machine: the cluster gets a private token file
  (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH) for its nodes, its CLI calls and its HTTP calls.
- Fixed default ports (GCS 6379, dashboard 8265, dashboard agent 52365, Ray client 10001) may
  be taken by another Ray: every one of them is a free port found here. The nodes advertise
  127.0.0.1, not the machine's address.
- Each node has its own short temp dir (Unix socket paths must stay under ~100 bytes).
- A job's `fbmem`/`python` is looked up on the PATH of the `ray start` of the head: the
  interpreter's bin folder (the virtualenv) goes first.
- Stopping: never `ray stop`, which stops every Ray on the machine. Each `ray start --block` runs
  in its own session (process group); the cluster is stopped by signalling those two groups.
  Ray's workers (actors, the job supervisor, drivers) run in process groups of their own but
  exit when their raylet does; `stop` checks that every process it saw under the two nodes, and
  any process naming the cluster's folder, is gone. RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0
  makes SIGTERM stop a node in seconds instead of draining it for 30 s.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent  # the virtualenv's bin: ray, fbmem, python


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_table() -> dict[int, tuple[int, int, int]]:
    """pid -> (ppid, pgid, start time in clock ticks since boot) of every process, from /proc.
    (pid, start time) names a process for good: a pid alone may be reused by someone else's."""
    out: dict[int, tuple[int, int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        out[int(entry)] = (int(fields[1]), int(fields[2]), int(fields[19]))
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing


class LocalCluster:
    """A head node (no custom resources) and one worker node (`worker_resources`), started by
    `start()` / `__enter__` and stopped by `stop()` / `__exit__`."""

    def __init__(self, *, head_cpus: int = 1, worker_cpus: int = 1,
                 worker_resources: dict[str, float] | None = None,
                 object_store_bytes: int = 256 * 1024**2, env: dict[str, str] | None = None) -> None:
        self.head_cpus, self.worker_cpus = head_cpus, worker_cpus
        self.worker_resources = dict(worker_resources or {})
        self.object_store_bytes = object_store_bytes
        self.root = Path(tempfile.mkdtemp(prefix="fbmn", dir="/tmp"))  # short: socket paths
        self.token_path = self.root / "token"
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env.update(env or {})
        self.env.update(
            PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(self.token_path),
            RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
            RAY_USAGE_STATS_ENABLED="0",
            OMP_WAIT_POLICY="PASSIVE",
        )
        self.procs: list[subprocess.Popen] = []
        self.seen: set[tuple[int, int]] = set()  # (pid, start time) of every process under the two nodes
        self.started_after = 0  # clock ticks since boot when the first node was started
        self.nodes: list[dict[str, Any]] = []
        self.start_seconds = self.stop_seconds = 0.0

    # --- addresses ---------------------------------------------------------------------------
    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token_path.read_text().strip()}"}

    def _node_id(self, has_resource: bool) -> str:
        custom = set(self.worker_resources)
        ids = [n["NodeID"] for n in self.nodes if bool(custom & set(n["Resources"])) == has_resource]
        assert len(ids) == 1, self.nodes
        return ids[0]

    @property
    def head_node_id(self) -> str:
        return self._node_id(False)

    @property
    def worker_node_id(self) -> str:
        return self._node_id(True)

    # --- start -------------------------------------------------------------------------------
    def _ray_start(self, name: str, *args: str) -> subprocess.Popen:
        with open(self.root / f"{name}.log", "wb") as log:  # the child keeps its own copy of the file
            proc = subprocess.Popen(
                [str(BIN / "ray"), "start", *args, "--node-ip-address=127.0.0.1", "--block", "--disable-usage-stats",
                 f"--object-store-memory={self.object_store_bytes}", f"--dashboard-agent-listen-port={free_port()}"],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,  # own process group
            )
        self.procs.append(proc)
        return proc

    def _check_running(self) -> None:
        for proc in self.procs:
            if proc.poll() is not None:
                logs = "\n".join((self.root / f"{n}.log").read_text(errors="replace")[-3000:]
                                 for n in ("head", "worker") if (self.root / f"{n}.log").exists())
                raise RuntimeError(f"`ray start` exited with {proc.returncode}:\n{logs}")

    def _wait_for_gcs(self, timeout: float) -> None:
        """Until the head's GCS accepts connections: enough for the worker node to join."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_running()
            try:
                with socket.create_connection(("127.0.0.1", self.gcs_port), timeout=2):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the head's GCS did not answer in {timeout:.0f} s") from None
                time.sleep(0.3)

    def _wait_for_dashboard(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_running()
            try:
                req = urllib.request.Request(f"{self.dashboard_url}/api/version", headers=self.auth_headers)
                with urllib.request.urlopen(req, timeout=2):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the head's dashboard did not answer in {timeout:.0f} s") from None
                time.sleep(0.5)

    def _wait_for_nodes(self, n: int, timeout: float) -> list[dict[str, Any]]:
        """The alive nodes (`NodeID`, `Resources`), once there are `n`: one short driver that polls."""
        code = (
            "import json, sys, time, ray\n"
            f"ray.init(address={self.gcs_address!r}, logging_level='ERROR', log_to_driver=False)\n"
            f"deadline = time.monotonic() + {timeout}\n"
            "while True:\n"
            "    alive = [{'NodeID': x['NodeID'], 'Resources': x['Resources']} for x in ray.nodes() if x['Alive']]\n"
            f"    if len(alive) >= {n} or time.monotonic() > deadline: break\n"
            "    time.sleep(0.5)\n"
            "print('NODES=' + json.dumps(alive))\n"
        )
        out = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True,
                             timeout=timeout + 60, cwd=self.root, check=False)
        line = [x for x in out.stdout.splitlines() if x.startswith("NODES=")]
        if not line:
            raise RuntimeError(f"could not list the nodes:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
        nodes = json.loads(line[-1][len("NODES="):])
        if len(nodes) < n:
            self._check_running()
            raise TimeoutError(f"{len(nodes)} of {n} nodes alive after {timeout:.0f} s: {nodes}")
        return nodes

    def start(self, timeout: float = 120) -> LocalCluster:
        t0 = time.monotonic()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        self.started_after = int(uptime * os.sysconf("SC_CLK_TCK")) - 1  # now, in /proc's start-time unit
        self.token_path.write_text(secrets.token_hex(32))
        self.token_path.chmod(0o600)
        try:
            self._ray_start(
                "head", "--head", f"--port={self.gcs_port}", f"--temp-dir={self.root / 'h'}",
                f"--num-cpus={self.head_cpus}", "--num-gpus=0", "--resources={}",
                "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={free_port()}",
            )
            self._wait_for_gcs(timeout)
            self._ray_start(  # joins while the head's dashboard is still starting
                "worker", f"--address={self.gcs_address}", f"--temp-dir={self.root / 'w'}",
                f"--num-cpus={self.worker_cpus}", "--num-gpus=0", f"--resources={json.dumps(self.worker_resources)}",
            )
            self._wait_for_dashboard(timeout)  # the jobs API
            self.nodes = self._wait_for_nodes(2, timeout)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    # --- jobs --------------------------------------------------------------------------------
    def submit(self, *entrypoint: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """`ray job submit --address <dashboard> -- <entrypoint>`; waits for the job and fails
        (with its logs) unless it succeeded."""
        self._note_processes()
        cmd = [str(BIN / "ray"), "job", "submit", "--address", self.dashboard_url, "--", *entrypoint]
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout, cwd=self.root,
                             check=False)
        self._note_processes()
        if out.returncode != 0 or "succeeded" not in out.stdout:
            raise AssertionError(
                f"job failed (exit {out.returncode}): {' '.join(entrypoint)}\n"
                f"{out.stdout[-6000:]}\n{out.stderr[-3000:]}"
            )
        return out

    def jobs(self) -> list[dict[str, Any]]:
        """The cluster's jobs (`ray.job_submission` details: entrypoint, status, driver_node_id, ...)."""
        req = urllib.request.Request(f"{self.dashboard_url}/api/jobs/", headers=self.auth_headers)
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    # --- stop --------------------------------------------------------------------------------
    def _note_processes(self) -> set[int]:
        """Record every process under the two `ray start` processes (children of children...)."""
        table = _proc_table()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        todo = [p.pid for p in self.procs]
        while todo:
            pid = todo.pop()
            if pid in table:
                self.seen.add((pid, table[pid][2]))
            todo.extend(children.get(pid, []))
        return self.seen

    def leftovers(self) -> list[str]:
        """Processes of this cluster still alive: seen under its nodes, in its two process groups,
        or naming its folder on their command line."""
        groups = {p.pid for p in self.procs}
        root = str(self.root)
        left = [pid for pid, (_, pgid, start) in _proc_table().items()
                if _alive(pid) and ((pid, start) in self.seen or (pgid in groups and start >= self.started_after)
                                    or root in _cmdline(pid))]
        return [f"{pid}: {_cmdline(pid)[:160]}" for pid in sorted(set(left)) if pid != os.getpid()]

    def stop(self, timeout: float = 60) -> list[str]:
        """SIGTERM to the two process groups (worker first), SIGKILL to whatever is left after
        `timeout`; returns the processes still alive after that (none, normally)."""
        t0 = time.monotonic()
        self._note_processes()
        for proc in reversed(self.procs):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while self.leftovers() and time.monotonic() < deadline:
            time.sleep(0.5)
        if self.leftovers():
            for entry in self.leftovers():
                try:
                    os.kill(int(entry.split(":")[0]), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            for proc in self.procs:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(2)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.stop_seconds = time.monotonic() - t0
        return self.leftovers()

    def remove_files(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
