"""A split's manifest: what ``python -m data_prep shard`` wrote and what training reads to know an epoch.

``<location>/<split>/manifest.json`` lists every shard of the split with its sample count, bytes,
sha256 and a seek index (the byte offset of every ``index_every``-th sample, so that a reader can start
inside a shard with a ranged GET), and the totals; ``<location>/classes.json`` lists the class names
(DESIGN.md section 4). ``MANIFEST_FORMAT`` is the one definition of the format string: data_prep writes
it and :func:`parse_manifest` checks it.

Example::

    from localsgd_ds.data import read_manifest, steps_per_epoch
    m = read_manifest("s3://datasets/imagenet", "train")    # m.num_samples, m.shards, m.classes
    steps = steps_per_epoch("s3://datasets/imagenet", batch_size=32, world_size=8)   # 1281167 // 256 = 5004
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from localsgd_ds import s3

MANIFEST_FORMAT = "localsgd-ds-shards/1"


@dataclass(frozen=True)
class ShardInfo:
    """One tar shard. ``offsets[i]`` is the byte offset of sample ``i * index_every`` in the tar."""

    name: str
    url: str
    num_samples: int
    num_bytes: int
    sha256: str
    offsets: tuple[int, ...]


@dataclass(frozen=True)
class Manifest:
    """A split's shard list and totals (``<location>/<split>/manifest.json``) plus ``classes.json``."""

    location: str
    split: str
    shards: tuple[ShardInfo, ...]
    num_samples: int
    num_bytes: int
    num_classes: int
    classes: tuple[str, ...] | None
    index_every: int
    skipped_inputs: int = 0  # source images data_prep could not read (listed in the manifest file)
    info: Mapping[str, Any] = field(default_factory=dict)  # settings and provenance, for humans

    @property
    def shard_counts(self) -> list[int]:
        return [s.num_samples for s in self.shards]


def manifest_url(location: str, split: str) -> str:
    return s3.join(location, split, "manifest.json")


def parse_manifest(
    data: Mapping[str, Any], location: str, split: str, classes: tuple[str, ...] | None
) -> Manifest:
    """Validate a manifest dict; errors name the manifest URL and the bad key."""
    where = s3.redact(manifest_url(location, split))
    if data.get("format") != MANIFEST_FORMAT:
        raise ValueError(
            f"{where}: format {data.get('format')!r}, expected {MANIFEST_FORMAT!r} (written by data_prep)"
        )
    try:
        every = int(data["index_every"])
        shards = tuple(
            ShardInfo(
                name=s["name"],
                url=s3.join(location, split, s["name"]),
                num_samples=int(s["num_samples"]),
                num_bytes=int(s["num_bytes"]),
                sha256=s["sha256"],
                offsets=tuple(int(o) for o in s["offsets"]),
            )
            for s in data["shards"]
        )
        manifest = Manifest(
            location=location,
            split=split,
            shards=shards,
            num_samples=int(data["num_samples"]),
            num_bytes=int(data["num_bytes"]),
            num_classes=int(data["num_classes"]),
            classes=classes,
            index_every=every,
            skipped_inputs=len(data.get("skipped", [])),
            info={
                k: data[k] for k in ("settings", "fingerprint", "created", "tool", "reencoded") if k in data
            },
        )
    except KeyError as exc:
        raise ValueError(f"{where}: missing key {exc.args[0]!r}") from None
    if sum(manifest.shard_counts) != manifest.num_samples:
        raise ValueError(
            f"{where}: num_samples={manifest.num_samples} but the shards hold {sum(manifest.shard_counts)}"
        )
    for s in shards:
        if len(s.offsets) != math.ceil(s.num_samples / every):
            raise ValueError(
                f"{where}: shard {s.name} has {len(s.offsets)} offsets for {s.num_samples} samples"
            )
    return manifest


def _read_classes(location: str) -> tuple[str, ...] | None:
    try:
        data = json.loads(s3.read_bytes(s3.join(location, "classes.json")))
    except s3.ObjectNotFoundError:
        return None
    if isinstance(data, dict):  # {"wnid": index} is accepted too
        data = [name for name, _ in sorted(data.items(), key=lambda kv: kv[1])]
    return tuple(str(c) for c in data)


def read_manifest(location: str, split: str) -> Manifest:
    """Read ``<location>/<split>/manifest.json`` (and ``classes.json`` if present)."""
    url = manifest_url(location, split)
    try:
        data = json.loads(s3.read_bytes(url))
    except s3.ObjectNotFoundError:
        raise s3.ObjectNotFoundError(
            f"{s3.redact(url)}: no manifest for split {split!r}; is {s3.redact(location)} a data_prep shard location?"
        ) from None
    return parse_manifest(data, location, split, _read_classes(location))


def steps_per_epoch(location: str, split: str = "train", *, batch_size: int, world_size: int) -> int:
    """Batches every rank runs per epoch: ``num_samples // (world_size * batch_size)``."""
    return read_manifest(location, split).num_samples // (world_size * batch_size)
