"""Local staging for shards on their way to S3, removed by the next run even after a SIGKILL.

A shard bound for S3 is written to a local file and uploaded whole, so a killed job leaves staged
shards behind (256 MB each, one per writer process). Every job therefore stages under one known root,
``<tmp>/localsgd-staging/`` (``<tmp>`` is ``--tmp-dir`` or the system temp folder), in a folder of
its own named after its PID and output location, and holds an exclusive ``flock`` on the sibling
``<folder>.lock`` while it runs. The kernel drops that lock when the job and the writer processes it
forked have all exited, however they died; so at start a job removes every staged folder whose lock it
can take (the leftovers of dead jobs) and leaves those of jobs still running.

Example::

    from data_prep.staging import Staging
    with Staging("s3://datasets/imagenet") as staging:      # removes dead jobs' leftovers first
        shard_path = staging.path / "train-000000.tar"       # write here, then upload
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import secrets
import shutil
import tempfile
from pathlib import Path

ROOT_NAME = "localsgd-staging"


def staging_root(tmp_dir: str | os.PathLike | None = None) -> Path:
    """``<tmp_dir or the system temp folder>/localsgd-staging``."""
    return Path(tmp_dir or tempfile.gettempdir()) / ROOT_NAME


def _lock(path: Path, blocking: bool) -> int | None:
    """An fd holding an exclusive flock on the file now at ``path``, or None (locked elsewhere, or gone).

    After the flock, the path must still name the locked file: a cleaner may have removed it meanwhile.
    """
    try:
        fd = os.open(path, os.O_RDWR | (os.O_CREAT if blocking else 0), 0o600)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        if os.fstat(fd).st_ino == os.stat(path).st_ino:
            return fd
    except (BlockingIOError, FileNotFoundError):
        pass
    os.close(fd)
    return None


def remove_stale(root: Path) -> list[Path]:
    """Remove the staged folders under ``root`` that no live job holds; returns them."""
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted(root.iterdir()):
            if entry.suffix != ".lock":
                continue
            fd = _lock(entry, blocking=False)
            if fd is None:
                continue  # a live job's, or already removed by another cleaner
            try:
                folder = entry.with_suffix("")
                shutil.rmtree(folder, ignore_errors=True)
                entry.unlink()  # after the folder: a folder never outlives its lock
                removed.append(folder)
            finally:
                os.close(fd)
    return removed


class Staging:
    """This job's staging folder (``path``) under :func:`staging_root`, locked while the job lives.

    Entering removes dead jobs' staging (``removed`` lists it) and creates this one; leaving removes it.
    Writer processes forked while it is open share the lock.
    """

    def __init__(self, location: str, tmp_dir: str | os.PathLike | None = None):
        self.root = staging_root(tmp_dir)
        digest = hashlib.sha256(location.encode()).hexdigest()[:8]
        self.path = self.root / f"{os.getpid()}-{digest}-{secrets.token_hex(3)}"
        self.removed: list[Path] = []
        self._fd: int | None = None

    def __enter__(self) -> Staging:
        self.root.mkdir(parents=True, exist_ok=True)
        self.removed = remove_stale(self.root)
        lock = self.path.with_suffix(".lock")
        while self._fd is None:  # None only if a cleaner removed the new lock file before our flock
            self._fd = _lock(lock, blocking=True)
        self.path.mkdir()
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.with_suffix(".lock").unlink()
        os.close(self._fd)
        self._fd = None
