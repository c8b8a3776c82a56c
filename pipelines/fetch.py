"""Reading the bytes behind many URIs at once, bounded in time and size: the reader of validation.

As img2dataset does it: the URIs of one batch are fetched by a small pool of threads (`threads`
per validate task), so one slow server costs its own deadline, not the batch's. Every fetch is
bounded three ways:

- **connect**: `connect_timeout_s` for the TCP connect; a read that gets no byte for
  `read_timeout_s` fails.
- **deadline**: the whole fetch, retries included, ends within `deadline_s` of its start. A socket
  timeout alone does not bound a server that drips a byte every few seconds, so a watchdog thread
  shuts the connection down at the deadline (including a TLS handshake or header that drips). What
  a socket cannot bound (a hung DNS lookup, an object store, a hung network file system) is
  abandoned by the pool at the deadline: the row gets its error and the batch goes on.
- **bytes**: a declared `Content-Length` over `max_bytes` fails before the body is read; the body is
  streamed and fails as soon as it passes `max_bytes` (local files: their size is checked first).

Transient failures (connection reset or dropped mid-body, connect timeouts, a temporary DNS
failure, HTTP 5xx, 408, 425, 429) are retried up to `retries` times with exponential backoff and
jitter (`backoff_s`, 2x, 4x ... each times a random 0.5..1.5), honouring `Retry-After`, and only
while the deadline leaves time. Every failure is a `FetchError` whose message is
`cannot read URI: reason`, so the caller turns it into one error row.
"""
from __future__ import annotations

import collections
import functools
import heapq
import http.client
import itertools
import os
import random
import socket
import stat
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import pyarrow as pa

USER_AGENT = "fbmem/0.1 (+image audit)"
# HTTP statuses worth another try: the server (or a proxy) says "not now", not "no".
TRANSIENT_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})
_CHUNK = 1 << 16
# How long past its deadline a fetch the watchdog cannot stop (DNS, object store) is waited for.
ABANDON_GRACE_S = 1.0


class FetchError(ValueError):
    """A URI whose bytes could not be had; the message says why. `transient`: worth a retry."""

    def __init__(self, reason: str, *, transient: bool = False, retry_after_s: float = 0.0) -> None:
        super().__init__(reason)
        self.transient = transient
        self.retry_after_s = retry_after_s  # the server's Retry-After, when it sent one


@dataclass(frozen=True)
class FetchSettings:
    """The bounds of one fetch (see the module docstring); `IngestConfig` holds the configured ones."""

    threads: int = 16
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0
    deadline_s: float = 60.0
    max_bytes: int = 32 * 2**20
    retries: int = 2
    backoff_s: float = 0.5

    def __post_init__(self) -> None:
        if self.threads < 1 or self.max_bytes < 1 or self.retries < 0:
            raise ValueError(f"invalid fetch settings: {self}")
        if min(self.connect_timeout_s, self.read_timeout_s, self.deadline_s) <= 0 or self.backoff_s < 0:
            raise ValueError(f"invalid fetch settings: {self}")


# --------------------------------------------------------------------------------------- one fetch


def fetch(uri: str, settings: FetchSettings) -> bytes:
    """The bytes of a local path, file:// URL, http(s) URL, or (via pyarrow.fs) an object-store URI.

    Raises `FetchError("cannot read URI: reason")`. Bounded in bytes always, in time by the watchdog
    for http(s) (the caller's pool bounds the rest: see `fetch_many`).
    """
    if not uri:
        raise FetchError("cannot read '': empty uri")
    try:
        scheme = urllib.parse.urlsplit(uri).scheme.lower() if "://" in uri else ""
        if scheme in ("", "file"):
            path = urllib.request.url2pathname(urllib.parse.urlsplit(uri).path) if scheme == "file" else uri
            return _read_local(path, settings.max_bytes)
        if scheme in ("http", "https"):
            return _fetch_http(uri, settings)
        # s3://, gs://, hdfs:// ...: corpora at scale live in object stores; pyarrow.fs knows them.
        return _read_object(uri, settings.max_bytes)
    except FetchError as exc:
        raise FetchError(f"cannot read {uri}: {exc}", transient=exc.transient) from None
    except ValueError as exc:  # a malformed URI (bad IPv6 literal, NUL byte ...)
        raise FetchError(f"cannot read {uri}: invalid uri: {exc}") from None


def _too_large(size: int | str, max_bytes: int) -> FetchError:
    return FetchError(f"too large: {size} bytes > max_bytes {max_bytes}")


def _read_capped(read: Callable[[int], bytes], max_bytes: int) -> bytes:
    """Read a stream to its end, failing as soon as it passes `max_bytes`."""
    parts, total = [], 0
    while True:
        chunk = read(min(1 << 20, max_bytes + 1 - total))
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)
        total += len(chunk)
        if total > max_bytes:
            raise _too_large(f"more than {max_bytes}", max_bytes)


def _read_local(path: str, max_bytes: int) -> bytes:
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if stat.S_ISREG(st.st_mode):
                if st.st_size > max_bytes:
                    raise _too_large(st.st_size, max_bytes)
                data = f.read(max_bytes + 1)
                if len(data) > max_bytes:  # the file grew since the stat
                    raise _too_large(f"more than {max_bytes}", max_bytes)
                return data
            return _read_capped(f.read, max_bytes)  # a pipe or device: no size to check first
    except FetchError:
        raise
    except FileNotFoundError:
        raise FetchError("file not found") from None
    except IsADirectoryError:
        raise FetchError("is a directory") from None
    except OSError as exc:
        raise FetchError(f"{exc.strerror or exc}") from None
    except ValueError as exc:  # e.g. a NUL byte in the path
        raise FetchError(f"invalid path: {exc}") from None


def _read_object(uri: str, max_bytes: int) -> bytes:
    import pyarrow.fs as pafs

    try:
        fs, path = pafs.FileSystem.from_uri(uri)
        with fs.open_input_stream(path) as f:
            return _read_capped(f.read, max_bytes)
    except FetchError:
        raise
    except FileNotFoundError:
        raise FetchError("file not found") from None
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise FetchError(f"{exc}") from None


# ------------------------------------------------------------------------------------------- http


class _Guard:
    """One watched connection: a duplicate of its socket, shut down if the deadline passes.

    `shutdown` acts on the connection, not the descriptor, so shutting the duplicate down wakes a
    `recv` blocked on the original (plain or TLS) at once; holding our own descriptor means it can
    never hit a recycled file number.
    """

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.deadline = deadline
        self._dup = sock.dup()
        self._lock = threading.Lock()
        self.fired = False
        self.released = False

    def fire(self) -> None:
        with self._lock:
            if self.released:
                return
            self.fired = True
            try:
                self._dup.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the peer

    def release(self) -> None:
        with self._lock:
            if not self.released:
                self.released = True
                self._dup.close()


class _Watchdog:
    """One daemon thread per process that fires each guard whose deadline has passed."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, _Guard]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, sock: socket.socket, deadline: float) -> _Guard:
        guard = _Guard(sock, deadline)
        with self._cond:
            heapq.heappush(self._heap, (deadline, next(self._seq), guard))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="fbmem-fetch-watchdog", daemon=True)
                self._thread.start()
            self._cond.notify()
        return guard

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    while self._heap and self._heap[0][2].released:
                        heapq.heappop(self._heap)
                    if not self._heap:
                        self._cond.wait()
                        continue
                    wait = self._heap[0][0] - time.monotonic()
                    if wait <= 0:
                        guard = heapq.heappop(self._heap)[2]
                        break
                    self._cond.wait(wait)
            guard.fire()


_WATCHDOG = _Watchdog()


class _ConnectTimeout(TimeoutError):
    """The TCP connect did not complete in time (transient: retried)."""


class _Attempt:
    """One HTTP attempt: its connections (redirects open more) are watched until `close`."""

    def __init__(self, settings: FetchSettings, deadline: float) -> None:
        self.settings = settings
        self.deadline = deadline
        self.guards: list[_Guard] = []
        self.received = 0

    @property
    def fired(self) -> bool:
        return any(g.fired for g in self.guards)

    def connect(self, address: tuple[str, int], timeout: object = None, source_address=None) -> socket.socket:
        """`socket.create_connection`, with each address's connect bounded by what is left of the
        deadline too (a host with many black-holed addresses must not cost many timeouts)."""
        host, port = address
        error: OSError | None = None
        for family, kind, proto, _, target in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise _ConnectTimeout("no time left before the deadline to connect")
            limit = min(self.settings.connect_timeout_s, remaining)
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(limit)
                if source_address:
                    sock.bind(source_address)
                sock.connect(target)
            except TimeoutError:
                sock.close()
                error = _ConnectTimeout(f"connect timed out after {limit:g} s")
                continue
            except OSError as exc:
                sock.close()
                error = exc
                continue
            sock.settimeout(self.settings.read_timeout_s)
            self.guards.append(_WATCHDOG.watch(sock, self.deadline))
            return sock
        raise error or OSError(f"no address for {host}")

    def close(self) -> None:
        for g in self.guards:
            g.release()


class _HTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args, attempt: _Attempt, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = attempt.connect


class _HTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args, attempt: _Attempt, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = attempt.connect  # watched before the TLS handshake starts


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, attempt: _Attempt) -> None:
        super().__init__()
        self._attempt = attempt

    def http_open(self, req):
        return self.do_open(functools.partial(_HTTPConnection, attempt=self._attempt), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, attempt: _Attempt) -> None:
        super().__init__()
        self._attempt = attempt

    def https_open(self, req):
        return self.do_open(functools.partial(_HTTPSConnection, attempt=self._attempt), req, context=self._context)


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """Redirects as urllib follows them, without reading the redirect's own body (it could be endless)."""

    def http_error_302(self, req, fp, code, msg, headers):
        fp.close()
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def _retry_after(exc: urllib.error.HTTPError) -> float:
    try:
        return max(0.0, float(exc.headers.get("Retry-After", "")))
    except (TypeError, ValueError, AttributeError):
        return 0.0  # absent, or an HTTP date: the backoff decides


def _reason(exc: BaseException, attempt: _Attempt) -> FetchError:
    """An exception of one attempt -> the FetchError naming it (transient or not)."""
    s = attempt.settings
    if attempt.fired:
        return FetchError(f"deadline exceeded: {attempt.received} bytes read in {s.deadline_s:g} s")
    if isinstance(exc, FetchError):
        return exc
    if isinstance(exc, urllib.error.HTTPError):
        exc.close()
        transient = exc.code in TRANSIENT_HTTP or exc.code >= 500
        return FetchError(f"HTTP {exc.code} {exc.reason}", transient=transient, retry_after_s=_retry_after(exc))
    if isinstance(exc, urllib.error.URLError):
        inner = exc.reason if isinstance(exc.reason, BaseException) else None
        if inner is None:
            return FetchError(f"{exc.reason}")
        exc = inner
    if isinstance(exc, _ConnectTimeout):
        return FetchError(str(exc), transient=True)
    if isinstance(exc, socket.gaierror):
        return FetchError(f"name lookup failed: {exc.strerror or exc}", transient=exc.errno == socket.EAI_AGAIN)
    if isinstance(exc, http.client.IncompleteRead):
        got = len(exc.partial)
        total = f" of {got + exc.expected}" if isinstance(exc.expected, int) else ""
        return FetchError(f"connection closed after {got}{total} bytes", transient=True)
    if isinstance(exc, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)):
        return FetchError(f"connection reset: {exc}", transient=True)
    if isinstance(exc, TimeoutError):
        return FetchError(f"timed out: no data for {s.read_timeout_s:g} s")
    if isinstance(exc, ConnectionRefusedError):
        return FetchError("connection refused")
    if isinstance(exc, http.client.HTTPException):
        return FetchError(f"bad HTTP response: {type(exc).__name__}: {exc}")
    if isinstance(exc, OSError):
        return FetchError(f"{exc.strerror or exc}")
    return FetchError(f"{type(exc).__name__}: {exc}")


_URL_SAFE = "/:?#[]@!$&'()*+,;=%~"


def ascii_url(url: str) -> str:
    """An IRI as the URI a server expects: a non-ASCII host in IDNA, other non-ASCII characters (and
    spaces) percent-encoded as UTF-8; escapes already there are kept. Web corpora hold both forms."""
    if url.isascii() and " " not in url:
        return url
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    host = parts.hostname or ""
    if host and not host.isascii():
        try:
            ascii_host = host.encode("idna").decode("ascii")
        except UnicodeError:
            ascii_host = urllib.parse.quote(host, safe="")
        netloc = netloc.rsplit("@", 1)
        netloc[-1] = ascii_host + (f":{parts.port}" if parts.port is not None else "")
        netloc = "@".join(netloc)
    quote = functools.partial(urllib.parse.quote, safe=_URL_SAFE)
    return urllib.parse.urlunsplit((parts.scheme, quote(netloc), quote(parts.path), quote(parts.query), quote(parts.fragment)))


def _http_attempt(url: str, settings: FetchSettings, deadline: float) -> bytes:
    attempt = _Attempt(settings, deadline)
    opener = urllib.request.build_opener(_HTTPHandler(attempt), _HTTPSHandler(attempt), _RedirectHandler)
    request = urllib.request.Request(ascii_url(url), headers={"User-Agent": USER_AGENT})
    try:
        with opener.open(request, timeout=settings.read_timeout_s) as response:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.strip().isdigit() and int(declared) > settings.max_bytes:
                raise _too_large(int(declared), settings.max_bytes)
            body = bytearray()
            while True:
                chunk = response.read1(_CHUNK)
                if not chunk:
                    break
                body += chunk
                attempt.received = len(body)
                if len(body) > settings.max_bytes:
                    raise _too_large(f"more than {settings.max_bytes}", settings.max_bytes)
            if attempt.fired:
                raise FetchError("deadline")  # the watchdog cut the body: replaced by _reason
            if response.length:  # Content-Length not reached: the server closed early
                raise http.client.IncompleteRead(bytes(body), response.length)
            return bytes(body)
    except Exception as exc:  # noqa: BLE001 - every failure is named by _reason
        raise _reason(exc, attempt) from None
    finally:
        attempt.close()


def _fetch_http(
    url: str,
    settings: FetchSettings,
    *,
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
) -> bytes:
    rng = rng or random.Random()
    start = time.monotonic()
    deadline = start + settings.deadline_s
    tries = 0
    while True:
        tries += 1
        try:
            return _http_attempt(url, settings, deadline)
        except FetchError as exc:
            err = exc
        after = f" (after {tries} attempts)" if tries > 1 else ""
        if not err.transient or tries > settings.retries:
            raise FetchError(f"{err}{after}", transient=err.transient)
        delay = settings.backoff_s * 2 ** (tries - 1) * rng.uniform(0.5, 1.5)
        delay = max(delay, err.retry_after_s)
        if time.monotonic() + delay >= deadline:
            raise FetchError(f"{err}{after}; no time left for a retry within {settings.deadline_s:g} s", transient=True)
        sleep(delay)


# ------------------------------------------------------------------------------------- many fetches


class FetchPool:
    """Fetch many URIs with `settings.threads` threads; iterate `(index, bytes | FetchError)` as done.

    Threads start at construction, so the caller can work (decode rows it already has) while they
    fetch. Each result comes within `deadline_s` (+ `ABANDON_GRACE_S`) of its fetch's start: a fetch
    the watchdog cannot stop is abandoned (its daemon thread finishes on its own, its result is
    dropped) and a fresh thread takes its place, so a hung lookup never holds up the rest.
    """

    def __init__(
        self,
        uris: Sequence[str],
        settings: FetchSettings,
        fetch_one: Callable[[str, FetchSettings], bytes] = fetch,
    ) -> None:
        self._uris = list(uris)
        self._settings = settings
        self._fetch_one = fetch_one
        self._cond = threading.Condition()
        self._todo = collections.deque(range(len(self._uris)))
        self._running: dict[int, float] = {}  # index -> monotonic start
        self._ready: collections.deque[tuple[int, bytes | FetchError]] = collections.deque()
        self._closed = False
        self.abandoned = 0
        for _ in range(min(settings.threads, len(self._uris))):
            self._spawn()

    def _spawn(self) -> None:
        threading.Thread(target=self._work, name="fbmem-fetch", daemon=True).start()

    def _work(self) -> None:
        while True:
            with self._cond:
                if self._closed or not self._todo:
                    return
                i = self._todo.popleft()
                self._running[i] = time.monotonic()
            try:
                result: bytes | FetchError = self._fetch_one(self._uris[i], self._settings)
            except FetchError as exc:
                result = exc
            except BaseException as exc:  # noqa: BLE001 - one URI's bug is that row's error
                result = FetchError(f"cannot read {self._uris[i]}: {type(exc).__name__}: {exc}")
            with self._cond:
                if i not in self._running:
                    return  # abandoned: its replacement thread carries on
                del self._running[i]
                self._ready.append((i, result))
                self._cond.notify_all()

    def __iter__(self) -> Iterator[tuple[int, bytes | FetchError]]:
        limit = self._settings.deadline_s + ABANDON_GRACE_S
        for _ in range(len(self._uris)):
            with self._cond:
                while not self._ready:
                    now = time.monotonic()
                    for i, t0 in list(self._running.items()):
                        if now - t0 > limit:
                            del self._running[i]
                            self.abandoned += 1
                            reason = f"deadline exceeded: no answer in {self._settings.deadline_s:g} s"
                            self._ready.append((i, FetchError(f"cannot read {self._uris[i]}: {reason}")))
                            self._spawn()
                    if self._ready:
                        break
                    due = min((t0 + limit for t0 in self._running.values()), default=now + limit)
                    self._cond.wait(max(0.01, due - now))
                item = self._ready.popleft()
            yield item

    def close(self) -> None:
        """Stop handing out work (fetches in flight finish on their own, bounded as above)."""
        with self._cond:
            self._closed = True
            self._todo.clear()

    def __enter__(self) -> FetchPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fetch_many(uris: Sequence[str], settings: FetchSettings) -> list[bytes | FetchError]:
    """Every URI's bytes or its FetchError, in input order (see `FetchPool` for the bounds)."""
    out: list[bytes | FetchError] = [FetchError("not fetched")] * len(uris)
    with FetchPool(uris, settings) as pool:
        for i, result in pool:
            out[i] = result
    return out
