"""webdataset's ``gopen`` learns ``s3://`` (webdataset 1.0 has no S3 reader), without importing it.

The loaders of this package read shards themselves; this is for code that builds its own
``wds.WebDataset("s3://...")`` pipelines next to them. Importing ``localsgd_ds.data`` calls
:func:`register_when_imported`: if webdataset is loaded already, the reader is added to its ``gopen``
table now, else the moment ``webdataset.gopen`` is imported (a finder on ``sys.meta_path`` wraps that one
module's loader), so nobody pays for importing webdataset only to register a reader. Forked workers
inherit either. For spawned DataLoader workers pass :func:`register_s3_gopen` as ``worker_init_fn``.

Example::

    import localsgd_ds.data, webdataset as wds
    ds = wds.WebDataset("s3://datasets/imagenet/train/train-{000000..000099}.tar", shardshuffle=False)
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from typing import BinaryIO

from localsgd_ds import s3

_MODULE = "webdataset.gopen"


def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw) -> BinaryIO:
    """webdataset ``gopen`` handler for ``s3://`` URLs (read-only, retrying, ranged)."""
    if mode != "rb":
        raise ValueError(f"{s3.redact(url)}: the s3:// gopen handler only reads (mode 'rb'), got {mode!r}")
    return s3.open_stream(url)


def register_s3_gopen(*_worker_id) -> None:
    """Teach webdataset's ``gopen`` to read ``s3://`` URLs in this process (imports webdataset).

    Idempotent, and usable as a DataLoader ``worker_init_fn`` for plain ``wds.WebDataset`` pipelines.
    """
    # `webdataset.gopen` as an attribute is the function; the module is only reachable via import_module.
    importlib.import_module(_MODULE).gopen_schemes["s3"] = gopen_s3


class _RegisteringLoader(importlib.abc.Loader):
    """Runs the real loader of ``webdataset.gopen``, then adds the s3:// handler to its table."""

    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        module.gopen_schemes["s3"] = gopen_s3


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


def register_when_imported() -> None:
    """Register now if webdataset is loaded, else when it is (idempotent; imports nothing)."""
    if _MODULE in sys.modules:
        register_s3_gopen()
    elif not any(isinstance(finder, _RegisterOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())
