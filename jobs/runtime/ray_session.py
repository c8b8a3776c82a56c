"""Starting or joining Ray the same way from every job and test.

On a cluster (`resources.ray_address` or RAY_ADDRESS set) jobs join it; otherwise a local Ray is
started with the configured CPU count, no dashboard, and a short temp dir (Unix socket paths
must stay under ~100 bytes, which deep temp folders break).
"""
from __future__ import annotations

import logging
import os
import tempfile
import warnings

import ray

from fbmem.jobs.config import Config

log = logging.getLogger(__name__)


def ensure_ray(cfg: Config) -> None:
    """Initialise Ray once per process; a no-op when already initialised."""
    if ray.is_initialized():
        return
    # Ray forks its local processes after LanceDB may have started its runtime; the children
    # never touch LanceDB, so lancedb's fork warning is noise here.
    warnings.filterwarnings("ignore", message="lancedb fork support is experimental")
    address = cfg.resources.ray_address or os.environ.get("RAY_ADDRESS")
    # Workers inherit this: torch threads that busy-wait make co-located actors 10-30x slower.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env = {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, runtime_env=env, log_to_driver=True)
        return
    temp_dir = os.environ.get("FBMEM_RAY_TMP") or os.path.join(tempfile.gettempdir(), "fbray")
    os.makedirs(temp_dir, exist_ok=True)
    ray.init(
        num_cpus=cfg.resources.ray_num_cpus,
        include_dashboard=False,
        _temp_dir=temp_dir,
        runtime_env=env,
        log_to_driver=True,
        configure_logging=True,
        logging_level=logging.WARNING,
    )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
