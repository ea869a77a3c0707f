"""The plan of a shard job: which source images go into which shard, as a pure function of the file
list, the seed and the size target, with a fingerprint of every shard's contents.

Shards are byte-for-byte reproducible from their plan (fixed tar metadata), which is what makes a job
resumable: a rerun keeps every shard whose record carries the fingerprint the plan gives it now.

Example::

    settings = ShardSettings(samples_per_shard=128, seed=0)
    tasks = plan_tasks(discover("data/digits").splits["train"], "s3://datasets/digits/train", settings)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

from data_prep.layout import SourceSample, SourceSplit
from localsgd_ds import s3
from localsgd_ds.data.manifest import MANIFEST_FORMAT

DEFAULT_SHARD_MB = 256.0
INDEX_EVERY = 32  # one seek point per 32 samples: ImageNet's manifest stays below 1 MB


@dataclass(frozen=True)
class ShardSettings:
    """What decides the shard contents. Only ``strict`` does not enter the fingerprint."""

    samples_per_shard: int | None = None  # target samples per shard; or:
    shard_mb: float | None = None  # target MB per shard (of source bytes); default 256 if neither is set
    seed: int = 0  # the global shuffle
    strict: bool = False  # the first unreadable image stops the job
    resize_short_side: int | None = None  # re-encode images whose short side is larger than this
    jpeg_quality: int = 90  # only used when re-encoding
    index_every: int = INDEX_EVERY

    def __post_init__(self):
        if self.samples_per_shard is not None and self.shard_mb is not None:
            raise ValueError("give samples_per_shard or shard_mb, not both")
        if self.samples_per_shard is not None and self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard={self.samples_per_shard}: must be >= 1")
        if self.shard_mb is not None and self.shard_mb <= 0:
            raise ValueError(f"shard_mb={self.shard_mb}: must be > 0")
        if self.resize_short_side is not None and self.resize_short_side < 8:
            raise ValueError(f"resize_short_side={self.resize_short_side}: must be >= 8")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality={self.jpeg_quality}: must be in [1, 100]")
        if self.index_every < 1:
            raise ValueError(f"index_every={self.index_every}: must be >= 1")

    def content(self) -> dict:
        return {
            "resize_short_side": self.resize_short_side,
            "jpeg_quality": self.jpeg_quality if self.resize_short_side else None,
            "index_every": self.index_every,
        }


@dataclass(frozen=True)
class ShardTask:
    split: str
    index: int
    url: str
    record_url: str
    samples: tuple[SourceSample, ...]
    keys: tuple[str, ...]
    fingerprint: str
    settings: ShardSettings
    staging: str | None  # the job's staging folder (S3 output)

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def _keys(samples: Iterable[SourceSample]) -> list[str]:
    """webdataset keys from relative paths: no extension and no dots (a dot starts the extension)."""
    keys, seen = [], set()
    for s in samples:
        key = re.sub(r"[.\s]", "_", os.path.splitext(s.relpath)[0])
        base, n = key, 1
        while key in seen:
            key, n = f"{base}_{n}", n + 1
        seen.add(key)
        keys.append(key)
    return keys


def plan_shards(split: SourceSplit, settings: ShardSettings) -> list[list[int]]:
    """Sample indices of each shard: a seeded global permutation cut by count or by source bytes."""
    import numpy as np

    order = np.random.default_rng([settings.seed, 0x5A4D]).permutation(len(split.samples)).tolist()
    shards: list[list[int]] = []
    if settings.samples_per_shard is not None:
        n = settings.samples_per_shard
        return [order[i : i + n] for i in range(0, len(order), n)]
    limit = (settings.shard_mb or DEFAULT_SHARD_MB) * 1e6
    current, size = [], 0
    for i in order:
        if current and size + split.samples[i].size > limit:
            shards.append(current)
            current, size = [], 0
        current.append(i)
        size += split.samples[i].size
    if current:
        shards.append(current)
    return shards


def fingerprint(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def plan_tasks(
    split: SourceSplit, split_url: str, settings: ShardSettings, staging: str | None = None
) -> list[ShardTask]:
    """One task per shard of the plan, each with the fingerprint of what it will contain."""
    keys = _keys(split.samples)
    tasks = []
    for i, members in enumerate(plan_shards(split, settings)):
        samples = tuple(split.samples[j] for j in members)
        contents = [(s.relpath, s.label, s.size, keys[j]) for s, j in zip(samples, members, strict=True)]
        name = shard_name(split.name, i)
        tasks.append(
            ShardTask(
                split=split.name,
                index=i,
                url=s3.join(split_url, name),
                record_url=s3.join(split_url, "_work", name + ".json"),
                samples=samples,
                keys=tuple(keys[j] for j in members),
                fingerprint=fingerprint(
                    {"format": MANIFEST_FORMAT, "settings": settings.content(), "samples": contents}
                ),
                settings=settings,
                staging=staging,
            )
        )
    return tasks
