"""Write an ImageNet-style folder as globally shuffled webdataset shards, locally or on S3.

Each split becomes ``<out>/<split>/<split>-NNNNNN.tar`` (samples ``<key>.jpg`` with the original JPEG
bytes and ``<key>.cls`` with the label as text) plus ``<out>/<split>/manifest.json``; the class list
goes to ``<out>/classes.json`` (DESIGN.md section 4). The plan (which image goes into which shard) is
a pure function of the file list, the seed and the size target, and shards are byte-for-byte
reproducible (fixed tar metadata), which is what makes the job resumable:

- a shard is written under a temporary name and renamed (locally), or uploaded whole (S3: a multipart
  upload only becomes an object when completed), so a reader never sees a partial shard;
- after each shard a small record (counts, sha256, seek index, the shard's fingerprint) goes to
  ``<out>/<split>/_work/``; a rerun reuses every shard whose record matches the plan and whose object
  is present with the recorded size, and writes the rest;
- the manifest is written last, then the records are removed. A location whose manifest was made
  with other settings or other inputs is refused unless ``overwrite=True``;
- shards bound for S3 are staged locally under ``<tmp_dir>/localsgd-staging`` (data_prep.staging): a
  run removes what killed runs left there, and never what a running job holds.

Unreadable or corrupt images are reported by path and skipped (listed in the manifest under
``skipped``); ``strict=True`` makes the first one fatal. CMYK and grayscale JPEGs are stored as they
are (the loaders convert them); non-JPEG files (ImageNet has a PNG named .JPEG) are re-encoded as JPEG
and listed under ``reencoded``. ``resize_short_side`` re-encodes images whose short side is larger.

Example::

    from data_prep.shard import shard_dataset
    report = shard_dataset("data/digits", "s3://datasets/digits", samples_per_shard=128, workers=2)
    print(report.splits["train"].manifest.num_samples)
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import json
import multiprocessing
import os
import re
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from data_prep.layout import SourceDataset, SourceSample, SourceSplit, discover
from data_prep.staging import Staging

MANIFEST_FORMAT = "localsgd-ds-shards/1"  # the same string as localsgd_ds.data.MANIFEST_FORMAT (tested)
TOOL = "data_prep 1"
DEFAULT_SHARD_MB = 256.0
INDEX_EVERY = 32  # one seek point per 32 samples: ImageNet's manifest stays below 1 MB


class BadImageError(ValueError):
    """An input image that cannot be decoded."""


class ShardingError(RuntimeError):
    """The job cannot go on; the message says what to change."""


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
    tmp_dir: str | None

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index)


@dataclass(frozen=True)
class SplitResult:
    manifest_url: str
    manifest: dict  # the manifest.json content
    written: int  # shards written by this call
    reused: int  # shards kept from an earlier, interrupted call
    skipped: tuple[tuple[str, str], ...]  # (source path, reason) of unreadable images


@dataclass(frozen=True)
class ShardReport:
    location: str
    classes: tuple[str, ...]
    splits: dict[str, SplitResult]

    @property
    def written(self) -> int:
        return sum(r.written for r in self.splits.values())

    @property
    def reused(self) -> int:
        return sum(r.reused for r in self.splits.values())


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


# ============================================================================================ planning
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


def _fingerprint(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ============================================================================================ images
def prepare_image(data: bytes, settings: ShardSettings) -> tuple[bytes, bool]:
    """The bytes to store for one source image and whether they were re-encoded.

    JPEGs are decoded (at 1/8 scale: libjpeg still parses every coefficient, so truncation and bad
    Huffman data are found) and stored unchanged. Other formats, and with ``resize_short_side`` larger
    images, are re-encoded as JPEG.
    """
    try:
        im = Image.open(io.BytesIO(data))
        width, height = im.size
        target = settings.resize_short_side
        shrink = target is not None and min(width, height) > target
        if im.format == "JPEG" and not shrink:
            im.draft(None, (max(1, width // 8), max(1, height // 8)))
            im.load()
            return data, False
        if shrink:
            scale = target / min(width, height)
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            if im.format == "JPEG":
                im.draft(None, size)  # decode at a reduced DCT scale that still keeps >= size
            im = im.resize(size, Image.BICUBIC, reducing_gap=3.0)
        else:
            im.load()
    except UnidentifiedImageError:
        raise BadImageError("not an image PIL can read (unrecognized format)") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for broken files
        raise BadImageError(f"{type(exc).__name__}: {exc}") from exc
    if im.mode not in ("RGB", "L"):
        im = im.convert("RGB")  # CMYK, palette, alpha: JPEG output as plain RGB
    out = io.BytesIO()
    im.save(out, "JPEG", quality=settings.jpeg_quality)
    return out.getvalue(), True


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # fixed metadata: the same inputs give the same bytes, hence the same sha256
    info.mode = 0o444
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_shard(task: ShardTask) -> dict:
    """Write one shard and its record; returns the record (the manifest entry plus bookkeeping)."""
    from localsgd_ds import s3

    skipped, reencoded, offsets = [], [], []
    count = 0
    with s3.atomic_output(task.url, task.tmp_dir) as tmp:
        with open(tmp, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for sample, key in zip(task.samples, task.keys, strict=True):
                try:
                    with open(sample.path, "rb") as src:
                        payload, changed = prepare_image(src.read(), task.settings)
                except (OSError, BadImageError) as exc:
                    reason = str(exc) if isinstance(exc, BadImageError) else f"{type(exc).__name__}: {exc}"
                    if task.settings.strict:
                        raise BadImageError(f"{sample.path}: {reason} (--strict: stopping)") from None
                    skipped.append((sample.path, reason))
                    continue
                if changed:
                    reencoded.append(sample.path)
                if count % task.settings.index_every == 0:
                    offsets.append(tar.offset)
                _add_member(tar, f"{key}.jpg", payload)
                _add_member(tar, f"{key}.cls", str(sample.label).encode())
                count += 1
        num_bytes, sha = tmp.stat().st_size, _sha256(tmp)
    record = {
        "name": task.name,
        "num_samples": count,
        "num_bytes": num_bytes,
        "sha256": sha,
        "offsets": offsets,
        "fingerprint": task.fingerprint,
        "skipped": skipped,
        "reencoded": reencoded,
    }
    s3.put_bytes(json.dumps(record).encode(), task.record_url)
    return record


# ============================================================================================ the job
def _reusable(record_url: str, shard_url: str, fingerprint: str) -> dict | None:
    from localsgd_ds import s3

    try:
        record = json.loads(s3.read_bytes(record_url))
    except (s3.ObjectNotFoundError, ValueError):
        return None
    if record.get("fingerprint") != fingerprint:
        return None
    if s3.object_size(shard_url) != record.get("num_bytes"):
        return None  # the shard went missing or is not the one recorded: write it again
    return record


def _cleanup_local_partials(folder: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(folder):
            if entry.name.startswith(".") and ".partial-" in entry.name:
                os.unlink(entry.path)


def _write_indexed(task: ShardTask) -> tuple[int, dict]:
    return task.index, write_shard(task)


def _run(tasks: list[ShardTask], workers: int, on_done) -> None:
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            on_done(task, write_shard(task))
        return
    by_index = {t.index: t for t in tasks}
    # fork: the workers inherit the imported modules and start at once; boto3 clients are per PID.
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        for index, record in pool.imap_unordered(_write_indexed, tasks, chunksize=1):
            on_done(by_index[index], record)


def _shard_split(
    source: SourceDataset,
    split: SourceSplit,
    out: str,
    settings: ShardSettings,
    *,
    workers,
    overwrite,
    progress,
    tmp_dir,
) -> SplitResult:
    from tqdm import tqdm

    from localsgd_ds import s3

    split_url = s3.join(out, split.name)
    work_url = s3.join(split_url, "_work")
    manifest_url = s3.join(split_url, "manifest.json")
    plan = plan_shards(split, settings)
    keys = _keys(split.samples)
    content = settings.content()
    tasks = []
    for i, members in enumerate(plan):
        samples = tuple(split.samples[j] for j in members)
        fp = _fingerprint(
            {
                "format": MANIFEST_FORMAT,
                "settings": content,
                "samples": [
                    (s.relpath, s.label, s.size, keys[j]) for s, j in zip(samples, members, strict=True)
                ],
            }
        )
        tasks.append(
            ShardTask(
                split=split.name,
                index=i,
                url=s3.join(split_url, shard_name(split.name, i)),
                record_url=s3.join(work_url, shard_name(split.name, i) + ".json"),
                samples=samples,
                keys=tuple(keys[j] for j in members),
                fingerprint=fp,
                settings=settings,
                tmp_dir=tmp_dir,
            )
        )
    plan_fp = _fingerprint({"classes": source.classes, "shards": [t.fingerprint for t in tasks]})

    # An existing manifest: done already, or a different dataset that we must not silently replace.
    try:
        existing = json.loads(s3.read_bytes(manifest_url))
    except s3.ObjectNotFoundError:
        existing = None
    if existing is not None:
        if existing.get("fingerprint") == plan_fp:
            return SplitResult(
                manifest_url, existing, 0, len(tasks), tuple(map(tuple, existing.get("skipped", [])))
            )
        if not overwrite:
            raise ShardingError(
                f"{s3.redact(manifest_url)} already describes a different {split.name} shard set (other inputs or "
                "settings); pass --overwrite to replace it, or choose another --out"
            )
        s3.delete(manifest_url)  # from here on the location is "being rewritten", never inconsistent

    if s3.parse(out).kind == "local":
        _cleanup_local_partials(s3.parse(split_url).url)

    records: dict[int, dict] = {}
    todo = []
    for task in tasks:
        record = _reusable(task.record_url, task.url, task.fingerprint)
        if record is None:
            todo.append(task)
        else:
            records[task.index] = record
    reused = len(records)
    bar = tqdm(
        total=len(split.samples),
        unit="img",
        desc=f"{split.name}: {len(tasks)} shards",
        disable=not progress,
        dynamic_ncols=True,
        mininterval=1.0,  # fewer lines in job logs, where stderr is not a terminal
    )
    bar.update(sum(len(tasks[i].samples) for i in records))
    bar.set_postfix(reused=reused, written=0)

    def done(task: ShardTask, record: dict) -> None:
        records[task.index] = record
        bar.update(len(task.samples))
        bar.set_postfix(reused=reused, written=len(records) - reused)
        for path, reason in record["skipped"]:
            bar.write(f"skipped {path}: {reason}")

    try:
        _run(todo, workers, done)
    finally:
        bar.close()

    ordered = [records[i] for i in range(len(tasks))]
    skipped = [tuple(s) for r in ordered for s in r["skipped"]]
    manifest = {
        "format": MANIFEST_FORMAT,
        "split": split.name,
        "num_samples": sum(r["num_samples"] for r in ordered),
        "num_bytes": sum(r["num_bytes"] for r in ordered),
        "num_shards": len(ordered),
        "num_classes": len(source.classes),
        "index_every": settings.index_every,
        "source_layout": split.layout,
        "settings": {
            "seed": settings.seed,
            "samples_per_shard": settings.samples_per_shard,
            "shard_mb": None if settings.samples_per_shard else (settings.shard_mb or DEFAULT_SHARD_MB),
            **content,
        },
        "fingerprint": plan_fp,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tool": TOOL,
        "skipped": [list(s) for s in skipped],
        "reencoded": [p for r in ordered for p in r["reencoded"]],
        "shards": [
            {k: r[k] for k in ("name", "num_samples", "num_bytes", "sha256", "offsets")} for r in ordered
        ],
    }
    s3.put_bytes(json.dumps(manifest, indent=1).encode(), manifest_url)
    # Tidy up: the records, and shards of an earlier, larger plan that the manifest no longer lists.
    # (Everything under _work goes, including a record a killed run left half-written.)
    for name in s3.list_names(work_url):
        s3.delete(s3.join(work_url, name))
    if s3.parse(work_url).kind == "local":
        with contextlib.suppress(OSError):
            os.rmdir(s3.parse(work_url).url)
    listed = {t.name for t in tasks}
    pattern = re.compile(rf"^{re.escape(split.name)}-\d{{6}}\.tar$")
    for name in s3.list_names(split_url):
        if pattern.match(name) and name not in listed:
            s3.delete(s3.join(split_url, name))
    return SplitResult(manifest_url, manifest, len(tasks) - reused, reused, tuple(skipped))


def shard_dataset(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    samples_per_shard: int | None = None,
    shard_mb: float | None = None,
    workers: int = 1,
    seed: int = 0,
    strict: bool = False,
    resize_short_side: int | None = None,
    jpeg_quality: int = 90,
    splits: tuple[str, ...] = ("train", "val"),
    overwrite: bool = False,
    progress: bool = True,
    tmp_dir: str | None = None,
) -> ShardReport:
    """Shard every split of ``src`` found among ``splits`` into ``out`` (a path or ``s3://bucket/prefix``).

    Resumable: call it again with the same arguments after an interruption. ``workers`` processes
    write shards in parallel. Raises BadImageError (``strict``), LayoutError or ShardingError.
    """
    from localsgd_ds import s3

    settings = ShardSettings(
        samples_per_shard=samples_per_shard,
        shard_mb=shard_mb,
        seed=seed,
        strict=strict,
        resize_short_side=resize_short_side,
        jpeg_quality=jpeg_quality,
    )
    if workers < 1:
        raise ValueError(f"workers={workers}: must be >= 1")
    out = os.fspath(out)
    loc = s3.parse(out)
    if loc.kind == "http":
        raise ShardingError(
            f"{s3.redact(out)}: http(s) locations are read-only; write to a path or s3://bucket/prefix"
        )
    source = discover(src, splits)
    with contextlib.ExitStack() as stack:
        if loc.kind == "s3":
            s3.ensure_bucket(out)
            aborted = s3.abort_incomplete_uploads(out)
            staging = stack.enter_context(Staging(out, tmp_dir))  # removes killed jobs' staged shards
            if aborted and progress:
                print(f"aborted {aborted} incomplete multipart upload(s) left under {s3.redact(out)}")
            if staging.removed and progress:
                print(f"removed {len(staging.removed)} staging folder(s) of killed jobs in {staging.root}")
            tmp_dir = str(staging.path)
        return _shard_splits(source, out, settings, workers, overwrite, progress, tmp_dir)


def _shard_splits(source, out, settings, workers, overwrite, progress, tmp_dir) -> ShardReport:
    from localsgd_ds import s3

    classes_url = s3.join(out, "classes.json")
    try:
        old_classes = json.loads(s3.read_bytes(classes_url))
    except s3.ObjectNotFoundError:
        old_classes = None
    if old_classes is not None and list(old_classes) != list(source.classes) and not overwrite:
        raise ShardingError(
            f"{s3.redact(classes_url)} lists other classes than {source.root}; pass --overwrite or choose another --out"
        )
    s3.put_bytes(json.dumps(list(source.classes)).encode(), classes_url)
    results = {}
    for name, split in source.splits.items():
        results[name] = _shard_split(
            source,
            split,
            out,
            settings,
            workers=workers,
            overwrite=overwrite,
            progress=progress,
            tmp_dir=tmp_dir,
        )
    return ShardReport(out, source.classes, results)
