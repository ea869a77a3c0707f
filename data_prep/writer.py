"""Write to a shard location (a folder, ``file://`` or ``s3://bucket/prefix``): the writing half of
``localsgd_ds.s3``, used only by data_prep, through the same client and the same retry loop.

Nothing partial is ever visible: locally a file is written under a hidden temporary name beside its
target and renamed; to S3 it is staged in a local folder (``data_prep.staging``) and uploaded whole
(a multipart upload becomes an object only when completed). http(s) locations are read-only.

Example::

    from data_prep import writer
    with writer.atomic_output("s3://datasets/digits/train/train-000000.tar", staging.path) as tmp:
        tmp.write_bytes(shard_bytes)          # uploaded when the block ends without an error
    writer.put_bytes(b"[...]", "s3://datasets/digits/classes.json")
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from localsgd_ds.s3 import StorageError, parse, redact, s3_client, with_retries


def _writable(url: str):
    loc = parse(url)
    if loc.kind == "http":
        raise StorageError(f"{redact(url)}: http(s) locations are read-only; write to a path or s3://")
    return loc


@contextlib.contextmanager
def atomic_output(url: str, staging: str | os.PathLike | None = None) -> Iterator[Path]:
    """Yield a local path to write; publish it at ``url`` only if the block succeeds.

    Local: the temporary file sits beside the target (a hidden ``.partial`` name) and is renamed, so a
    reader never sees a partial file. S3: the file is written in ``staging`` (required: a folder that a
    later run cleans up if this process is killed) and uploaded after it is complete.
    """
    loc = _writable(url)
    if loc.kind == "local":
        folder, name = os.path.split(loc.url)
        os.makedirs(folder, exist_ok=True)
        tmp = Path(folder) / f".{name}.partial-{os.getpid()}"
    elif staging is None:
        raise ValueError(f"{redact(url)}: writing to S3 needs a staging folder (data_prep.staging.Staging)")
    else:
        tmp = Path(staging) / os.path.basename(loc.key)
    try:
        yield tmp
        if loc.kind == "local":
            os.replace(tmp, loc.url)
        else:
            put_file(tmp, url)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def put_file(path: str | os.PathLike, url: str) -> None:
    """Copy a local file to ``url`` (S3: multipart above 64 MiB, visible only once complete)."""
    loc = _writable(url)
    if loc.kind == "local":
        with atomic_output(url) as tmp:
            shutil.copyfile(path, tmp)
        return
    from boto3.s3.transfer import TransferConfig

    transfer = TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=64 << 20, max_concurrency=4)
    with_retries(lambda: s3_client().upload_file(os.fspath(path), loc.bucket, loc.key, Config=transfer), url)


def put_bytes(data: bytes, url: str) -> None:
    loc = _writable(url)
    if loc.kind == "s3":
        with_retries(lambda: s3_client().put_object(Bucket=loc.bucket, Key=loc.key, Body=data), url)
        return
    with atomic_output(url) as tmp:
        tmp.write_bytes(data)


def delete(url: str) -> None:
    """Remove the object if it exists."""
    loc = _writable(url)
    if loc.kind == "local":
        with contextlib.suppress(FileNotFoundError):
            os.unlink(loc.url)
    else:
        with_retries(lambda: s3_client().delete_object(Bucket=loc.bucket, Key=loc.key), url)


def abort_incomplete_uploads(url: str) -> int:
    """Abort multipart uploads left under ``url`` by a killed writer (invisible, but they cost storage)."""
    loc = parse(url)
    if loc.kind != "s3":
        return 0
    prefix = loc.key + "/" if loc.key else ""
    resp = with_retries(lambda: s3_client().list_multipart_uploads(Bucket=loc.bucket, Prefix=prefix), url)
    uploads = resp.get("Uploads", [])
    for up in uploads:
        with_retries(
            lambda u=up: s3_client().abort_multipart_upload(
                Bucket=loc.bucket, Key=u["Key"], UploadId=u["UploadId"]
            ),
            url,
        )
    return len(uploads)


def ensure_bucket(url: str) -> None:
    """Check that the bucket of an s3:// location exists and is reachable; a clear error if not."""
    loc = parse(url)
    if loc.kind == "s3":
        with_retries(lambda: s3_client().head_bucket(Bucket=loc.bucket), f"s3://{loc.bucket}")
