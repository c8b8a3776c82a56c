"""Fetching URIs bounded in time and bytes (pipelines/fetch.py), against misbehaving servers on 127.0.0.1.

Times are asserted as bounds only (a fetch ends within its deadline plus a generous margin for a
shared machine), never as speed targets.
"""
from __future__ import annotations

import os
import random
import sys
import threading
import time
from pathlib import Path

import pytest
from bad_inputs import BadServer, SilentServer, UnreachableServer

from fbmem.pipelines.fetch import (
    FetchError,
    FetchPool,
    FetchSettings,
    _fetch_http,
    ascii_url,
    fetch,
    fetch_many,
)

PAYLOAD = bytes(range(256)) * 8  # 2048 bytes
MARGIN_S = 2.0  # scheduling slack on a loaded 2-core machine; every bound below is deadline + this


def quick(**kw) -> FetchSettings:
    base = dict(threads=4, connect_timeout_s=2.0, read_timeout_s=10.0, deadline_s=1.5, max_bytes=1 << 20,
                retries=2, backoff_s=0.01)
    return FetchSettings(**{**base, **kw})


@pytest.fixture
def server():
    with BadServer({"a": PAYLOAD, "small": b"x" * 100}, drip_s=0.1) as s:
        yield s


def _timed(fn):
    t0 = time.monotonic()
    try:
        return fn(), time.monotonic() - t0
    except FetchError as exc:
        return exc, time.monotonic() - t0


def test_plain_fetch_and_redirect(server) -> None:
    assert fetch(server.url("/file/a"), quick()) == PAYLOAD
    assert fetch(server.url("/redirect/a"), quick()) == PAYLOAD


def test_slow_drip_body_is_cut_at_the_deadline(server) -> None:
    # 2048 bytes at one per 0.1 s would take 205 s; every read gets a byte well within the 10 s read
    # timeout, so only the deadline can end it.
    err, elapsed = _timed(lambda: fetch(server.url("/drip/a"), quick(deadline_s=1.5)))
    assert isinstance(err, FetchError)
    assert str(err).startswith(f"cannot read {server.url('/drip/a')}: deadline exceeded: ")
    assert "bytes read in 1.5 s" in str(err)
    assert 1.4 <= elapsed < 1.5 + MARGIN_S
    assert not err.transient


def test_slow_drip_status_line_is_cut_at_the_deadline(server) -> None:
    err, elapsed = _timed(lambda: fetch(server.url("/drip-head"), quick(deadline_s=1.0)))
    assert isinstance(err, FetchError) and "deadline exceeded" in str(err)
    assert elapsed < 1.0 + MARGIN_S


def test_silent_server_is_cut_at_the_deadline_or_read_timeout() -> None:
    with SilentServer() as silent:
        err, elapsed = _timed(lambda: fetch(silent.url("/x.jpg"), quick(deadline_s=1.0)))
        assert isinstance(err, FetchError) and "deadline exceeded: 0 bytes read in 1 s" in str(err)
        assert elapsed < 1.0 + MARGIN_S
        # a read timeout shorter than the deadline ends it first, and is not retried
        err, elapsed = _timed(lambda: fetch(silent.url("/y.jpg"), quick(read_timeout_s=0.3, deadline_s=20)))
        assert isinstance(err, FetchError) and str(err).endswith("timed out: no data for 0.3 s")
        assert elapsed < 0.3 + MARGIN_S


def test_many_silent_urls_are_waited_for_concurrently_not_one_after_another(server) -> None:
    with SilentServer() as silent:
        uris = [silent.url(f"/{i}.jpg") for i in range(8)] + [server.url("/file/a")]
        t0 = time.monotonic()
        results = fetch_many(uris, quick(threads=9, deadline_s=1.0))
        elapsed = time.monotonic() - t0
    assert results[-1] == PAYLOAD
    assert all(isinstance(r, FetchError) and "deadline exceeded" in str(r) for r in results[:-1])
    assert elapsed < 1.0 + MARGIN_S  # one after another: 8 s


def test_byte_cap_declared_streamed_and_local(server, tmp_path: Path) -> None:
    err, _ = _timed(lambda: fetch(server.url("/file/a"), quick(max_bytes=2047)))
    assert str(err).endswith("too large: 2048 bytes > max_bytes 2047")
    assert fetch(server.url("/file/a"), quick(max_bytes=2048)) == PAYLOAD  # exactly at the cap: fine
    err, _ = _timed(lambda: fetch(server.url("/chunked/5000000"), quick(max_bytes=1 << 20)))
    assert "too large: more than 1048576 bytes > max_bytes 1048576" in str(err)
    assert fetch(server.url("/chunked/300"), quick()) == b"\x00" * 300
    p = tmp_path / "big.bin"
    p.write_bytes(b"y" * 5000)
    err, _ = _timed(lambda: fetch(str(p), quick(max_bytes=4999)))
    assert str(err) == f"cannot read {p}: too large: 5000 bytes > max_bytes 4999"
    assert fetch(p.as_uri(), quick(max_bytes=5000)) == b"y" * 5000


def test_byte_cap_on_a_stream_without_size(tmp_path: Path) -> None:
    # /dev/zero has no size to check first: the streamed read must stop at the cap
    err, _ = _timed(lambda: fetch("/dev/zero", quick(max_bytes=3 << 20)))
    assert "too large: more than 3145728 bytes" in str(err)


def test_transient_http_errors_are_retried_then_succeed(server) -> None:
    url = server.url("/status/503/k1/2/a")
    assert fetch(url, quick(retries=2)) == PAYLOAD
    assert server.hits["/status/503/k1/2/a"] == 3
    url = server.url("/status/429/k2/1/a")
    assert fetch(url, quick(retries=1)) == PAYLOAD
    assert server.hits["/status/429/k2/1/a"] == 2


def test_retries_run_out_with_the_reason_and_the_count(server) -> None:
    url = server.url("/status/503/k3/5/a")
    err, _ = _timed(lambda: fetch(url, quick(retries=1)))
    assert str(err) == f"cannot read {url}: HTTP 503 Service Unavailable (after 2 attempts)"
    assert server.hits["/status/503/k3/5/a"] == 2


def test_permanent_http_errors_are_not_retried(server) -> None:
    url = server.url("/status/404/k4/5/a")
    err, _ = _timed(lambda: fetch(url, quick(retries=3)))
    assert str(err) == f"cannot read {url}: HTTP 404 Not Found"
    assert server.hits["/status/404/k4/5/a"] == 1
    err, _ = _timed(lambda: fetch(server.url("/nothing"), quick()))
    assert "HTTP 404" in str(err) and server.hits["/nothing"] == 1


def test_connection_reset_and_short_body_are_retried(server) -> None:
    assert fetch(server.url("/reset/k5/2/a"), quick(retries=2)) == PAYLOAD
    assert server.hits["/reset/k5/2/a"] == 3
    url = server.url("/short/small")
    err, _ = _timed(lambda: fetch(url, quick(retries=2)))
    assert str(err) == f"cannot read {url}: connection closed after 100 of 1100 bytes (after 3 attempts)"
    assert server.hits["/short/small"] == 3


def test_connect_timeout_is_transient_and_bounded() -> None:
    with UnreachableServer() as dead:
        url = dead.url("/x.jpg")
        err, elapsed = _timed(lambda: fetch(url, quick(connect_timeout_s=0.3, retries=1, deadline_s=10)))
    assert str(err) == f"cannot read {url}: connect timed out after 0.3 s (after 2 attempts)"
    assert 0.6 <= elapsed < 0.6 + MARGIN_S


def test_backoff_doubles_with_jitter_and_stops_at_the_deadline(server) -> None:
    url = server.url("/status/500/k6/100/a")
    slept: list[float] = []
    with pytest.raises(FetchError, match=r"HTTP 500 .*\(after 4 attempts\)"):
        _fetch_http(url, quick(retries=3, backoff_s=0.1, deadline_s=30), sleep=slept.append, rng=random.Random(7))
    assert len(slept) == 3
    for i, d in enumerate(slept):
        assert 0.05 * 2**i <= d <= 0.15 * 2**i
    assert len(set(slept)) == 3  # jittered, not a fixed schedule
    slept.clear()
    with pytest.raises(FetchError, match=r"no time left for a retry within 1 s"):
        _fetch_http(url, quick(retries=3, backoff_s=10, deadline_s=1), sleep=slept.append)
    assert slept == []


def test_pool_abandons_a_fetch_the_watchdog_cannot_stop() -> None:
    # A fetch stuck where no socket can be cut (a hung DNS lookup, a hung mount): the pool gives
    # the row its error at the deadline and a fresh thread takes the next URI.
    release = threading.Event()

    def fake(uri: str, settings: FetchSettings) -> bytes:
        if uri == "hang":
            release.wait(30)
            return b"too late"
        return uri.encode()

    t0 = time.monotonic()
    with FetchPool(["hang", "a", "b", "c"], quick(threads=1, deadline_s=0.5), fetch_one=fake) as pool:
        got = dict(pool)
        abandoned = pool.abandoned
    elapsed = time.monotonic() - t0
    release.set()
    assert [got[i] for i in (1, 2, 3)] == [b"a", b"b", b"c"]
    assert isinstance(got[0], FetchError) and str(got[0]) == "cannot read hang: deadline exceeded: no answer in 0.5 s"
    assert abandoned == 1
    assert elapsed < 0.5 + 1.0 + MARGIN_S


def test_pool_keeps_order_free_results_and_errors_per_uri(server, tmp_path: Path) -> None:
    p = tmp_path / "f.bin"
    p.write_bytes(b"local")
    uris = [server.url("/file/small"), "", str(p), str(tmp_path / "missing"), server.url("/nope"), str(tmp_path)]
    out = fetch_many(uris, quick(threads=3))
    assert out[0] == b"x" * 100 and out[2] == b"local"
    assert str(out[1]) == "cannot read '': empty uri"
    assert str(out[3]).endswith("missing: file not found")
    assert "HTTP 404" in str(out[4])
    assert str(out[5]).endswith(": is a directory")


def test_watched_connections_leave_no_descriptors_behind(server) -> None:
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    fetch(server.url("/file/a"), quick())  # warm up (watchdog thread, imports)
    before = open_fds()
    for i in range(20):
        fetch(server.url("/file/small"), quick())
        with pytest.raises(FetchError):
            fetch(server.url(f"/status/404/fd{i}/1/a"), quick())
    assert open_fds() <= before + 2


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        FetchSettings(threads=0)
    with pytest.raises(ValueError):
        FetchSettings(deadline_s=0)


def test_non_ascii_urls_are_sent_percent_encoded(server) -> None:
    assert ascii_url("http://bücher.de/ö b.jpg?q=ü") == "http://xn--bcher-kva.de/%C3%B6%20b.jpg?q=%C3%BC"
    assert ascii_url("http://x.org/already%20quoted.jpg") == "http://x.org/already%20quoted.jpg"
    url = server.url("/file/ö b.png")
    err, _ = _timed(lambda: fetch(url, quick()))
    # the request went out (a 404 for the encoded name, not a UnicodeEncodeError before sending)
    assert str(err) == f"cannot read {url}: HTTP 404 Not Found"
    assert server.hits["/file/%C3%B6%20b.png"] == 1


def test_malformed_uris_are_fetch_errors() -> None:
    for uri, reason in (("http://[::1/x.jpg", "invalid uri"), ("/tmp/a\x00b.jpg", "invalid path")):
        with pytest.raises(FetchError, match=reason):
            fetch(uri, quick())


def test_https_handshake_with_a_silent_server_is_cut_at_the_deadline() -> None:
    # The TLS handshake waits for a ServerHello that never comes: the watchdog guards the TCP
    # connection before the handshake starts, so https is bounded the same way (no cert needed).
    with SilentServer() as silent:
        url = silent.url("/x.jpg").replace("http://", "https://")
        err, elapsed = _timed(lambda: fetch(url, quick(deadline_s=1.0, read_timeout_s=30)))
    assert isinstance(err, FetchError) and "deadline exceeded: 0 bytes read in 1 s" in str(err), err
    assert elapsed < 1.0 + MARGIN_S


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_fbmem_ingest_of_slow_and_silent_urls_writes_the_good_rows(ray_local, tmp_path: Path) -> None:
    """The issue's case end to end: `fbmem ingest` of a manifest whose URLs include a slow-drip and a
    silent server ends (a 2 KB drip at 5 bytes/s alone would take 7 minutes) and writes the good rows."""
    from bad_inputs import write_good_images
    from typer.testing import CliRunner

    from fbmem.jobs.cli import app
    from fbmem.storage.database import connect
    from fbmem.storage.sql import run_query

    good = write_good_images(tmp_path / "imgs", 3, seed=21)
    files = {p.name: p.read_bytes() for p in good}
    with BadServer(files, drip_s=0.2) as server, SilentServer() as silent:
        uris = [server.url(f"/file/{p.name}") for p in good] + [server.url(f"/drip/{good[0].name}"), silent.url("/s.png")]
        manifest = tmp_path / "manifest.csv"
        manifest.write_text("uri\n" + "\n".join(uris) + "\n")
        db_uri = str(tmp_path / "db")
        t0 = time.monotonic()
        result = CliRunner().invoke(app, ["ingest", "training", str(manifest), "--db", db_uri, "--preset", "tiny",
                                          "--set", "ingest.fetch_deadline_s=2"], catch_exceptions=False)
        elapsed = time.monotonic() - t0
    assert result.exit_code == 0, result.output
    db = connect(db_uri)
    written = sorted(db.read("training_images", ["source_uri"]).column(0).to_pylist())
    assert written == sorted(uris[:3])
    reasons = {r["source_uri"]: r["reason"] for r in run_query(db, "SELECT source_uri, reason FROM errors").to_pylist()}
    assert set(reasons) == set(uris[3:])
    assert all("deadline exceeded" in r for r in reasons.values()), reasons
    print(f"\nfbmem ingest with a slow-drip and a silent URL: {elapsed:.1f} s", file=sys.stderr)
