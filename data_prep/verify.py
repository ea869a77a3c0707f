"""Check a shard location against its manifests: every shard present, sizes, sha256, sample counts,
well-formed samples (``jpg`` and an integer ``cls`` below ``num_classes``) and the seek index.

Example::

    from data_prep.verify import verify_shards
    report = verify_shards("s3://datasets/digits")
    print(report.summary()); assert report.ok, report.problems
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import re
import tarfile
from dataclasses import dataclass, field

from localsgd_ds import s3
from localsgd_ds.data.manifest import read_manifest
from localsgd_ds.data.tar import TarSample, tar_samples


@dataclass(frozen=True)
class SplitSummary:
    shards: int
    samples: int
    bytes: int


@dataclass(frozen=True)
class VerifyReport:
    location: str
    splits: dict[str, SplitSummary]
    problems: tuple[str, ...]  # each names the split and shard
    notes: tuple[str, ...] = field(default=())  # not wrong, but worth knowing (e.g. unlisted shard files)

    @property
    def ok(self) -> bool:
        return bool(self.splits) and not self.problems

    def summary(self) -> str:
        lines = [
            f"{name}: {s.shards} shards, {s.samples} samples, {s.bytes / 1e6:.1f} MB"
            for name, s in self.splits.items()
        ]
        lines += [f"NOTE {n}" for n in self.notes]
        lines += [f"FAIL {p}" for p in self.problems]
        lines.append(
            "OK" if self.ok else f"{len(self.problems)} problem(s)" if self.splits else "no manifest found"
        )
        return "\n".join(lines)


class _Hashing(io.RawIOBase):
    """Pass bytes through while hashing and counting them."""

    def __init__(self, stream):
        super().__init__()
        self.stream = stream
        self.sha = hashlib.sha256()
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.stream.readinto(buffer)
        self.sha.update(memoryview(buffer)[:n])
        self.count += n
        return n


def _sample_problems(where: str, sample: TarSample, num_classes: int) -> list[str]:
    problems = []
    if "jpg" not in sample.parts:
        problems.append(f"{where}: sample {sample.key!r} has no .jpg")
    try:
        label = int(sample.parts.get("cls", b""))
    except ValueError:
        return [*problems, f"{where}: sample {sample.key!r} has no integer .cls"]
    if not 0 <= label < num_classes:
        problems.append(f"{where}: sample {sample.key!r} has label {label}, outside [0, {num_classes})")
    return problems


def check_shard(args: tuple) -> list[str]:
    """Problems of one shard (empty if it is sound). ``args`` = (split, ShardInfo, index_every, num_classes)."""
    split, shard, every, num_classes = args
    where = f"{split}/{shard.name}"
    size = s3.object_size(shard.url)
    if size is None:
        return [f"{where}: missing ({s3.redact(shard.url)})"]
    problems = []
    if size != shard.num_bytes:
        problems.append(f"{where}: {size} bytes, manifest says {shard.num_bytes}")
    count, offsets = 0, []
    try:
        with s3.open_stream(shard.url) as raw:
            hashing = _Hashing(raw)
            stream = io.BufferedReader(hashing, buffer_size=1 << 20)
            for sample in tar_samples(stream):
                if count % every == 0:
                    offsets.append(sample.offset)
                count += 1
                problems += _sample_problems(where, sample, num_classes)
            while stream.read(1 << 20):  # the end-of-archive blocks belong to the hash too
                pass
    except s3.StorageError as exc:
        return [*problems, f"{where}: unreadable: {exc}"]
    except (tarfile.TarError, EOFError) as exc:
        return [*problems, f"{where}: damaged tar after {count} samples: {exc}"]
    if count != shard.num_samples:
        problems.append(f"{where}: {count} samples, manifest says {shard.num_samples}")
    if hashing.sha.hexdigest() != shard.sha256:
        problems.append(
            f"{where}: sha256 {hashing.sha.hexdigest()[:16]}..., manifest says {shard.sha256[:16]}..."
        )
    if tuple(offsets) != shard.offsets and count == shard.num_samples:
        problems.append(f"{where}: seek index does not match the sample positions")
    return problems


def verify_shards(
    location: str, splits: tuple[str, ...] = ("train", "val"), workers: int = 1
) -> VerifyReport:
    """Read every shard listed by the manifests of ``splits`` found at ``location`` and check it."""

    summaries, problems, notes, jobs = {}, [], [], []
    for split in splits:
        try:
            manifest = read_manifest(location, split)
        except s3.ObjectNotFoundError:
            notes.append(f"{split}: no manifest at {s3.redact(s3.join(location, split, 'manifest.json'))}")
            continue
        except ValueError as exc:
            problems.append(f"{split}: {exc}")
            continue
        summaries[split] = SplitSummary(len(manifest.shards), manifest.num_samples, manifest.num_bytes)
        if manifest.classes is not None and len(manifest.classes) != manifest.num_classes:
            problems.append(
                f"{split}: classes.json lists {len(manifest.classes)} classes, manifest says {manifest.num_classes}"
            )
        if manifest.classes is None:
            problems.append(f"{split}: {s3.redact(s3.join(location, 'classes.json'))} is missing")
        jobs += [(split, shard, manifest.index_every, manifest.num_classes) for shard in manifest.shards]
        if s3.parse(location).kind != "http":
            pattern = re.compile(rf"^{re.escape(split)}-\d{{6}}\.tar$")
            listed = {s.name for s in manifest.shards}
            extra = [
                n for n in s3.list_names(s3.join(location, split)) if pattern.match(n) and n not in listed
            ]
            if extra:
                notes.append(f"{split}: {len(extra)} shard file(s) not in the manifest, e.g. {extra[0]}")
    if workers > 1 and len(jobs) > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            results = pool.map(check_shard, jobs, chunksize=1)
    else:
        results = [check_shard(job) for job in jobs]
    problems += [p for r in results for p in r]
    return VerifyReport(location, summaries, tuple(problems), tuple(notes))
