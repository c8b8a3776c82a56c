"""An S3-compatible server on 127.0.0.1 for the object-storage tests: moto's standalone server.

`S3Server.start()` runs this file as a subprocess in its own process group (moto's
`ThreadedMotoServer` bound to a free port that the OS picks, so two test runs never collide),
creates a bucket and hands out the `storage_options` Lance and LanceDB take; `stop()` ends that
process group and nothing else. Credentials are dummies and nothing leaves 127.0.0.1:
`DUMMY_AWS_ENV` keeps boto3 and Lance's object store from looking for real credentials or probing
the EC2 instance metadata service, and from sending 127.0.0.1 through a proxy.

Run directly (`python tests/s3_server.py [--log-conditional FILE]`) it serves until SIGTERM and
prints `PORT <n>` once it accepts connections. Conditional PUTs are made atomic (see
`_atomic_conditional_puts`). With `--log-conditional`, every PUT that carries `If-None-Match` is
logged to FILE as `<bucket>/<key> If-None-Match=<value>`: how the tests see that Lance commits
with conditional PUTs.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REGION = "us-east-1"
ACCESS_KEY = "testing"
SECRET_KEY = "testing"

DUMMY_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": ACCESS_KEY,
    "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
    "AWS_REGION": REGION,
    "AWS_DEFAULT_REGION": REGION,
    "AWS_EC2_METADATA_DISABLED": "true",  # boto3/botocore: no instance-metadata probe
    "AWS_CONFIG_FILE": os.devnull,  # no ~/.aws profile with real settings
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}


def storage_options(endpoint: str) -> dict[str, str]:
    """The `storage_options` for Lance / LanceDB on this server (all values strings)."""
    return {
        "aws_endpoint": endpoint,
        "aws_region": REGION,
        "aws_access_key_id": ACCESS_KEY,
        "aws_secret_access_key": SECRET_KEY,
        "allow_http": "true",
    }


@dataclass
class S3Server:
    """A moto S3 server subprocess and one bucket on it."""

    bucket: str = "fbmem-test"
    conditional_log: Path | None = None  # where the server logs PUTs with If-None-Match
    port: int | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)
    _stderr: object = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def uri(self) -> str:
        """The bucket's URI; tests put their databases under their own prefix: `f"{uri}/name"`."""
        return f"s3://{self.bucket}"

    @property
    def storage_options(self) -> dict[str, str]:
        return storage_options(self.endpoint)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)

    def start(self, timeout: float = 60.0) -> S3Server:
        cmd = [sys.executable, str(Path(__file__).resolve())]
        if self.conditional_log is not None:
            cmd += ["--log-conditional", str(self.conditional_log)]
        env = {**os.environ, **DUMMY_AWS_ENV}
        # stderr to a file, not a pipe: a pipe nobody reads fills up and blocks the server
        self._stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=env,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            line = self.proc.stdout.readline()  # "PORT <n>" once listening, or EOF if it died
            if not line.startswith("PORT "):
                raise RuntimeError(f"moto server did not start: {line!r} {self.stderr_tail()}")
            self.port = int(line.split()[1])
            while True:  # the socket is bound before PORT is printed; this only double-checks
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            self.client().create_bucket(Bucket=self.bucket)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """End the server's process group (only the one this object started)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        proc.stdout.close()
        self._stderr.close()

    def stderr_tail(self, chars: int = 4000) -> str:
        """The end of the server's stderr (errors and tracebacks; request logging is off)."""
        if self._stderr is None or self._stderr.closed:
            return ""
        self._stderr.flush()
        self._stderr.seek(0)
        return self._stderr.read()[-chars:]

    def __enter__(self) -> S3Server:  # noqa: PYI034
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _serve(argv: list[str]) -> None:
    import logging
    import threading

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    log = Path(argv[argv.index("--log-conditional") + 1]) if "--log-conditional" in argv else None
    _atomic_conditional_puts(log)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    print(f"PORT {server.get_host_and_port()[1]}", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    server.stop()


def _atomic_conditional_puts(log_path: Path | None) -> None:
    """Make moto's conditional PUT atomic, as S3's is, and optionally log it.

    moto 5.2 checks `If-None-Match: *` by looking the key up and then storing the object, in a
    threaded server: two racing PUTs of one key could both pass the check (the colleague's race
    test never saw it, but a test of commit safety must not depend on luck). One lock around
    conditional PUTs makes check-and-store one step; unconditional PUTs are left concurrent.
    """
    import threading

    from moto.s3.responses import S3Response

    lock = threading.Lock()
    log = open(log_path, "a", buffering=1) if log_path else None  # noqa: SIM115 - server lifetime
    put_object = S3Response.put_object

    def conditional_put(self):
        value = self.headers.get("If-None-Match")
        if value is None and self.headers.get("If-Match") is None:
            return put_object(self)
        if log is not None and value is not None:
            log.write(f"{self.bucket_name}/{self.parse_key_name()} If-None-Match={value}\n")
        with lock:
            return put_object(self)

    S3Response.put_object = conditional_put


if __name__ == "__main__":
    _serve(sys.argv[1:])
