"""Read bytes from shard locations: ``s3://bucket/prefix``, local paths, ``file://`` and ``http(s)://``.

The reading half of the data pipeline: ``localsgd_ds.data`` streams shards through it and ``data_prep``
checks and resumes with it (``data_prep.writer`` is the writing half). Reads are ranged and retried: a
transient object-store error (timeout, dropped connection, 5xx, throttling) reopens the object at the
byte where it stopped, so a stalled connection mid-shard costs a reconnect, not the job. A missing
object or rejected credential is not transient and raises at once, naming the URL and endpoint, never
a secret. :func:`with_retries` is the one retry loop, for every request here and in the writer.

S3 settings come from the standard AWS sources that boto3 reads: ``AWS_ENDPOINT_URL`` (or
``AWS_ENDPOINT_URL_S3``) for an S3-compatible store, ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_PROFILE`` / ``~/.aws/config`` for credentials. With a custom
endpoint, path-style addressing is used (every S3-compatible server supports it). Two knobs for the
retry loop, read from the environment so that DataLoader workers and spawned ranks inherit them:
``LOCALSGD_IO_RETRIES`` (default 5) and ``LOCALSGD_IO_TIMEOUT`` (seconds per socket read, default 60).

Example::

    from localsgd_ds import s3
    manifest = json.loads(s3.read_bytes("s3://imagenet/shards/train/manifest.json"))
    with s3.open_stream("s3://imagenet/shards/train/train-000000.tar", start=0, end=10240) as f:
        head = f.read()
"""

from __future__ import annotations

import contextlib
import http.client
import io
import logging
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

_BUFFER = 1 << 20  # read objects in 1 MiB chunks: one Python call per MiB, not per tar block


class StorageError(OSError):
    """An object could not be read or written; the message names the URL (secrets removed)."""


class ObjectNotFoundError(StorageError, FileNotFoundError):
    """The object (or its bucket) does not exist."""


class AccessDeniedError(StorageError, PermissionError):
    """The store rejected the request: missing, wrong or insufficient credentials."""


# ---------------------------------------------------------------------------------------- locations
@dataclass(frozen=True)
class Location:
    """A parsed location. ``kind`` is "local", "s3" or "http"; for s3, ``bucket`` and ``key``."""

    kind: str
    url: str  # canonical: an absolute path for local, else the URL
    bucket: str = ""
    key: str = ""


def parse(url: str | os.PathLike) -> Location:
    """Classify a location; local paths and ``file://`` URLs become absolute paths."""
    url = os.fspath(url)
    parsed = urllib.parse.urlparse(url)
    scheme = parsed.scheme.lower()
    if scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"{url!r}: an s3 location needs a bucket: s3://bucket/prefix")
        return Location("s3", url.rstrip("/"), parsed.netloc, parsed.path.strip("/"))
    if scheme in ("http", "https"):
        return Location("http", url.rstrip("/"))
    if scheme == "file":
        return Location("local", os.path.abspath(urllib.request.url2pathname(parsed.path)))
    if scheme and len(scheme) > 1:  # one letter: a Windows drive, not a scheme
        raise ValueError(
            f"{redact(url)}: unsupported scheme {scheme!r}; use s3://, http(s)://, file:// or a path"
        )
    return Location("local", os.path.abspath(url))


def join(url: str | os.PathLike, *parts: str) -> str:
    """``join("s3://b/p", "train", "x.tar") == "s3://b/p/train/x.tar"``; paths join as paths."""
    loc = parse(url)
    if loc.kind == "local":
        return os.path.join(loc.url, *parts)
    return "/".join([loc.url, *(p.strip("/") for p in parts)])


def redact(url: str) -> str:
    """The URL without user info or query string (pre-signed URLs carry signatures there)."""
    try:
        p = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if not p.scheme or len(p.scheme) == 1:
        return url
    host = p.hostname or ""
    if p.port:
        host = f"{host}:{p.port}"
    return urllib.parse.urlunsplit((p.scheme, host, p.path, "", ""))


# ---------------------------------------------------------------------------------------- S3 client
def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def io_retries() -> int:
    return _env_int("LOCALSGD_IO_RETRIES", 5)


def io_timeout() -> int:
    return _env_int("LOCALSGD_IO_TIMEOUT", 60)


_sleep = time.sleep  # the backoff; a module attribute so that pure-logic tests need not wait

_clients: dict[tuple, object] = {}
_sessions: dict[int, object] = {}
_clients_lock = threading.Lock()
# A client is bound to the endpoint and credentials it was made with: when these variables change (a
# notebook, a test starting another server), the next call makes a new client.
_CLIENT_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "LOCALSGD_IO_TIMEOUT",
)


def s3_client():
    """The boto3 S3 client of this process and environment (boto3 clients must not cross a fork)."""
    env = hash(tuple(os.environ.get(name) for name in _CLIENT_ENV))
    key = (os.getpid(), env)
    client = _clients.get(key)
    if client is not None:
        return client
    with _clients_lock:
        if key not in _clients:
            import boto3
            from botocore.config import Config

            custom_endpoint = bool(
                os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
            )
            config = Config(
                connect_timeout=min(10, io_timeout()),
                read_timeout=io_timeout(),
                # botocore retries the request itself; a failure while streaming the body is ours (see _Reader).
                retries={"max_attempts": 3, "mode": "standard"},
                max_pool_connections=16,
                s3={"addressing_style": "path"} if custom_endpoint else None,
            )
            # A session holds no connection, only parsed service models and resolved settings, so a
            # forked DataLoader worker may reuse its parent's: a client from it costs 0.01 s of CPU,
            # one from a new session 0.2 s, paid by every worker of every epoch.
            session = _sessions.get(env)
            if session is None:
                _sessions.clear()
                session = _sessions[env] = boto3.session.Session()
            _clients.clear()  # other PIDs' clients came through fork, others are stale: never reuse them
            _clients[key] = session.client("s3", config=config)
        return _clients[key]


def reset_clients() -> None:
    """Forget this process's S3 client, e.g. after changing AWS_* variables in ``os.environ``."""
    with _clients_lock:
        _clients.clear()
        _sessions.clear()


def _endpoint() -> str:
    try:
        return redact(s3_client().meta.endpoint_url)
    except Exception:  # noqa: BLE001 - only used inside error messages
        return "<unknown endpoint>"


_TRANSIENT_CODES = {
    "500",
    "502",
    "503",
    "504",
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "Throttling",
    "ThrottlingException",
}
_MISSING_CODES = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}
_DENIED_CODES = {
    "401",
    "403",
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "AllAccessDisabled",
}


def _classify(exc: BaseException, url: str) -> BaseException | None:
    """Map a client exception to a permanent StorageError, or None when it is worth retrying."""
    where = redact(url)
    try:
        import botocore.exceptions as bx
    except ImportError:  # http and local reads do not need boto3
        bx = None
    if bx is not None:
        if isinstance(exc, bx.ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            if code in _TRANSIENT_CODES or status in _TRANSIENT_CODES:
                return None
            if code in _MISSING_CODES or status == "404":
                what = "bucket" if code == "NoSuchBucket" else "object"
                return ObjectNotFoundError(f"{where}: no such {what} ({code}) at endpoint {_endpoint()}")
            if code in _DENIED_CODES or status in ("401", "403"):
                return AccessDeniedError(
                    f"{where}: access denied ({code}) at endpoint {_endpoint()}; check AWS_ACCESS_KEY_ID, "
                    "AWS_SECRET_ACCESS_KEY or AWS_PROFILE (secrets are not shown)"
                )
            return StorageError(
                f"{where}: {code or status} at endpoint {_endpoint()}: {err.get('Message', '')}"
            )
        if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError):
            return AccessDeniedError(
                f"{where}: no usable AWS credentials ({type(exc).__name__}); set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
            )
        if isinstance(exc, bx.HTTPClientError | bx.ConnectionError | bx.IncompleteReadError):
            return None
        if isinstance(exc, bx.BotoCoreError):
            return StorageError(f"{where}: {type(exc).__name__}: {exc}")
    if isinstance(exc, urllib.error.HTTPError):
        if exc.code == 404:
            return ObjectNotFoundError(f"{where}: not found (HTTP 404)")
        if exc.code in (401, 403):
            return AccessDeniedError(f"{where}: access denied (HTTP {exc.code})")
        if exc.code == 429 or exc.code >= 500:
            return None
        return StorageError(f"{where}: HTTP {exc.code} {exc.reason}")
    if isinstance(exc, FileNotFoundError):
        return ObjectNotFoundError(f"{where}: no such file")
    if isinstance(exc, PermissionError):
        return AccessDeniedError(f"{where}: permission denied")
    if isinstance(exc, urllib.error.URLError | http.client.HTTPException | ConnectionError | TimeoutError):
        return None
    try:
        import urllib3.exceptions

        if isinstance(exc, urllib3.exceptions.HTTPError):
            return None
    except ImportError:
        pass
    return StorageError(f"{where}: {type(exc).__name__}: {exc}")


def _log_retry(url: str, exc: BaseException, attempt: int, attempts: int, delay: float) -> None:
    log.warning(
        "%s: transient error (%s), retry %d/%d in %.2fs", redact(url), exc, attempt + 1, attempts - 1, delay
    )


def with_retries(
    call: Callable[[], T],
    url: str,
    *,
    retryable: bool = True,
    on_retry: Callable[[BaseException, int, int, float], None] | None = None,
    failure: Callable[[], str] | None = None,
) -> T:
    """``call()`` until it succeeds, retrying transient errors with exponential backoff.

    At most ``LOCALSGD_IO_RETRIES`` retries (none unless ``retryable``); a permanent error (missing
    object, rejected credentials) raises at once as a StorageError naming ``url``. Before each retry,
    ``on_retry(exc, attempt, attempts, delay)`` (default: log a warning). After the last attempt the
    StorageError says ``failure()`` (default: how many attempts failed) and the last error.
    """
    attempts = io_retries() + 1 if retryable else 1
    for attempt in range(attempts):
        try:
            return call()
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified right here
            permanent = _classify(exc, url)
            if permanent is not None:
                raise permanent from exc
            if attempt + 1 == attempts:
                what = (
                    failure() if failure else f"still failing after {attempts} attempts: {type(exc).__name__}"
                )
                raise StorageError(f"{redact(url)}: {what}: {exc}") from exc
            delay = min(8.0, 0.25 * 2**attempt)
            if on_retry is None:
                _log_retry(url, exc, attempt, attempts, delay)
            else:
                on_retry(exc, attempt, attempts, delay)
            _sleep(delay)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------- reading
def _open_raw(loc: Location, start: int, end: int | None):
    """A fresh stream of bytes [start, end) of the object (end=None: to the end), without retries."""
    if loc.kind == "local":
        f = open(loc.url, "rb", buffering=0)  # noqa: SIM115 - owned by _Reader
        f.seek(start)
        return f
    if loc.kind == "s3":
        kw = {}
        if start or end is not None:
            kw["Range"] = f"bytes={start}-" + ("" if end is None else str(end - 1))
        return s3_client().get_object(Bucket=loc.bucket, Key=loc.key, **kw)["Body"]
    headers = {}
    if start or end is not None:
        headers["Range"] = f"bytes={start}-" + ("" if end is None else str(end - 1))
    resp = urllib.request.urlopen(urllib.request.Request(loc.url, headers=headers), timeout=io_timeout())
    if start and resp.status == 200:  # the server ignored Range: skip up to start ourselves
        remaining = start
        while remaining:
            chunk = resp.read(min(remaining, _BUFFER))
            if not chunk:
                break
            remaining -= len(chunk)
    return resp


class _Reader(io.RawIOBase):
    """Bytes [start, end) of one object; a transient failure reopens the object at the current byte."""

    def __init__(self, url: str, start: int = 0, end: int | None = None):
        super().__init__()
        self._loc = parse(url)
        self._url = url
        self._pos = start
        self._end = end
        self._retryable = self._loc.kind != "local"
        # Open now: a missing object or bad credentials fail here, at open time.
        self._stream = with_retries(self._open_raw, url, retryable=self._retryable)

    def _open_raw(self):
        return _open_raw(self._loc, self._pos, self._end)

    def readable(self) -> bool:
        return True

    def _read(self, size: int) -> bytes:
        if self._stream is None:
            self._stream = self._open_raw()
        data = self._stream.read(size)
        if not data and self._end is not None and self._pos < self._end:
            raise http.client.IncompleteRead(b"", self._end - self._pos)
        return data

    def _reopen_later(self, exc: BaseException, attempt: int, attempts: int, delay: float) -> None:
        log.warning("%s: stream broke at byte %d (%s); reopening", redact(self._url), self._pos, exc)
        self._drop()

    def readinto(self, buffer) -> int:
        want = len(buffer)
        if self._end is not None:
            want = min(want, self._end - self._pos)
        if want <= 0:
            return 0
        data = with_retries(
            lambda: self._read(want),
            self._url,
            retryable=self._retryable,
            on_retry=self._reopen_later,
            failure=lambda: f"read failed at byte {self._pos}",
        )
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def _drop(self) -> None:
        if self._stream is not None:
            with contextlib.suppress(Exception):
                self._stream.close()
            self._stream = None

    def close(self) -> None:
        self._drop()
        super().close()


def open_stream(url: str, start: int = 0, end: int | None = None) -> BinaryIO:
    """A buffered, retrying reader over bytes [start, end) of ``url`` (end=None: to the end)."""
    return io.BufferedReader(_Reader(url, start, end), buffer_size=_BUFFER)


def read_bytes(url: str) -> bytes:
    """The whole object."""
    with open_stream(url) as f:
        return f.read()


def object_size(url: str) -> int | None:
    """The size in bytes, or None if the object does not exist."""
    loc = parse(url)
    if loc.kind == "local":
        try:
            return os.path.getsize(loc.url)
        except FileNotFoundError:
            return None
    try:
        if loc.kind == "s3":
            head = with_retries(lambda: s3_client().head_object(Bucket=loc.bucket, Key=loc.key), url)
            return int(head["ContentLength"])
        req = urllib.request.Request(loc.url, method="HEAD")
        resp = with_retries(lambda: urllib.request.urlopen(req, timeout=io_timeout()), url)
        return int(resp.headers.get("Content-Length", -1))
    except ObjectNotFoundError:
        return None


def list_names(url: str) -> list[str]:
    """Names of the objects (files) directly under ``url`` treated as a folder; [] if there is none."""
    loc = parse(url)
    if loc.kind == "local":
        try:
            return sorted(e.name for e in os.scandir(loc.url) if e.is_file())
        except FileNotFoundError:
            return []
    if loc.kind == "http":
        raise StorageError(f"{redact(url)}: http(s) locations cannot be listed; read the manifest instead")
    prefix = loc.key + "/" if loc.key else ""
    names: list[str] = []

    def page(token: str | None) -> dict:
        kw = {"Bucket": loc.bucket, "Prefix": prefix, "Delimiter": "/"}
        if token:
            kw["ContinuationToken"] = token
        return s3_client().list_objects_v2(**kw)

    token = None
    while True:
        resp = with_retries(lambda t=token: page(t), url)
        names += [o["Key"][len(prefix) :] for o in resp.get("Contents", [])]
        token = resp.get("NextContinuationToken")
        if not token:
            return sorted(names)
