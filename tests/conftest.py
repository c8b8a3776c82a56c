"""Shared fixtures: a local Ray per test module, the tiny preset, the reference data shipped in the package."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray (2 CPUs, no dashboard, short temp dir); shut down after the module."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    tmp = tempfile.mkdtemp(prefix="fbr", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tmp, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}})
    # Ray Data binds its log handlers to the sys.stderr of its first use: do that here, not under
    # a CliRunner whose captured stream is closed when the command returns.
    ray.data.range(1).take(1)
    yield ray
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_store(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 with one bucket, for the session: `.uri` (`s3://bucket`; put
    each database under its own prefix), `.storage_options` (endpoint, region, dummy keys,
    allow_http), `.client()` (boto3). The server is a subprocess in its own process group, stopped
    at the end. Dummy AWS variables are set meanwhile so nothing looks for real credentials or
    probes the network (also in the Ray workers of modules that start Ray after this fixture)."""
    from s3_server import DUMMY_AWS_ENV, S3Server

    log = tmp_path_factory.mktemp("s3") / "conditional_puts.log"
    with pytest.MonkeyPatch.context() as env:
        for key, value in DUMMY_AWS_ENV.items():
            env.setenv(key, value)
        with S3Server(conditional_log=log) as server:
            yield server


@pytest.fixture(scope="session")
def tiny_cfg():
    from fbmem.jobs.config import load_config

    return load_config(preset="tiny")


@pytest.fixture(scope="session")
def reference_data() -> Path:
    """The folder of the public reference files shipped inside the package (a fresh clone needs nothing beside it)."""
    from fbmem.pipelines.reference_data import prompt_set_path

    return prompt_set_path("memorized-laion").parent
