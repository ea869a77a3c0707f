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
    print(report.splits["train"].manifest["num_samples"])
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
from dataclasses import dataclass
from pathlib import Path

from data_prep import writer
from data_prep.images import BadImageError, prepare_image
from data_prep.layout import SourceDataset, SourceSplit, discover
from data_prep.plan import DEFAULT_SHARD_MB, ShardSettings, ShardTask, fingerprint, plan_tasks
from data_prep.staging import Staging
from localsgd_ds import s3
from localsgd_ds.data.manifest import MANIFEST_FORMAT

TOOL = "data_prep 1"


class ShardingError(RuntimeError):
    """The job cannot go on; the message says what to change."""


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
    skipped, reencoded, offsets = [], [], []
    count = 0
    with writer.atomic_output(task.url, task.staging) as tmp:
        with open(tmp, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for sample, key in zip(task.samples, task.keys, strict=True):
                try:
                    with open(sample.path, "rb") as src:
                        payload, changed = prepare_image(
                            src.read(), task.settings.resize_short_side, task.settings.jpeg_quality
                        )
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
    writer.put_bytes(json.dumps(record).encode(), task.record_url)
    return record


# ============================================================================================ the job
def _reusable(record_url: str, shard_url: str, fingerprint: str) -> dict | None:
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


def _existing_manifest(manifest_url: str, plan_fp: str, split: str, overwrite: bool) -> dict | None:
    """The manifest already at ``manifest_url`` if it is this plan's (the split is done); None if there
    is none, or if ``overwrite`` and it is another plan's (then it is deleted first)."""
    try:
        existing = json.loads(s3.read_bytes(manifest_url))
    except s3.ObjectNotFoundError:
        return None
    if existing.get("fingerprint") == plan_fp:
        return existing
    if not overwrite:
        raise ShardingError(
            f"{s3.redact(manifest_url)} already describes a different {split} shard set (other inputs or "
            "settings); pass --overwrite to replace it, or choose another --out"
        )
    writer.delete(manifest_url)  # from here on the location is "being rewritten", never inconsistent
    return None


def _write_missing(
    split: SourceSplit, tasks: list[ShardTask], workers: int, progress: bool
) -> tuple[list[dict], int]:
    """Every task's record, in shard order: reused where an earlier run finished the shard, else
    written now; and how many were reused."""
    from tqdm import tqdm

    records = {}
    for task in tasks:
        record = _reusable(task.record_url, task.url, task.fingerprint)
        if record is not None:
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
        _run([t for t in tasks if t.index not in records], workers, done)
    finally:
        bar.close()
    return [records[i] for i in range(len(tasks))], reused


def _manifest(split: SourceSplit, num_classes: int, settings: ShardSettings, plan_fp: str, records) -> dict:
    """The manifest.json content, from the shards' records in shard order."""
    return {
        "format": MANIFEST_FORMAT,
        "split": split.name,
        "num_samples": sum(r["num_samples"] for r in records),
        "num_bytes": sum(r["num_bytes"] for r in records),
        "num_shards": len(records),
        "num_classes": num_classes,
        "index_every": settings.index_every,
        "source_layout": split.layout,
        "settings": {
            "seed": settings.seed,
            "samples_per_shard": settings.samples_per_shard,
            "shard_mb": None if settings.samples_per_shard else (settings.shard_mb or DEFAULT_SHARD_MB),
            **settings.content(),
        },
        "fingerprint": plan_fp,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tool": TOOL,
        "skipped": [list(s) for r in records for s in r["skipped"]],
        "reencoded": [p for r in records for p in r["reencoded"]],
        "shards": [
            {k: r[k] for k in ("name", "num_samples", "num_bytes", "sha256", "offsets")} for r in records
        ],
    }


def _tidy(split_url: str, split: str, listed: set[str]) -> None:
    """Remove the records (a half-written one a killed run left too) and shards of an earlier, larger
    plan that the manifest no longer lists."""
    work_url = s3.join(split_url, "_work")
    for name in s3.list_names(work_url):
        writer.delete(s3.join(work_url, name))
    if s3.parse(work_url).kind == "local":
        with contextlib.suppress(OSError):
            os.rmdir(s3.parse(work_url).url)
    pattern = re.compile(rf"^{re.escape(split)}-\d{{6}}\.tar$")
    for name in s3.list_names(split_url):
        if pattern.match(name) and name not in listed:
            writer.delete(s3.join(split_url, name))


def _shard_split(source: SourceDataset, split: SourceSplit, out: str, settings: ShardSettings, *, workers,
                 overwrite, progress, staging) -> SplitResult:  # fmt: skip
    split_url = s3.join(out, split.name)
    manifest_url = s3.join(split_url, "manifest.json")
    tasks = plan_tasks(split, split_url, settings, staging)
    plan_fp = fingerprint({"classes": source.classes, "shards": [t.fingerprint for t in tasks]})
    done = _existing_manifest(manifest_url, plan_fp, split.name, overwrite)
    if done is not None:
        return SplitResult(manifest_url, done, 0, len(tasks), tuple(map(tuple, done.get("skipped", []))))
    if s3.parse(out).kind == "local":
        _cleanup_local_partials(s3.parse(split_url).url)
    records, reused = _write_missing(split, tasks, workers, progress)
    manifest = _manifest(split, len(source.classes), settings, plan_fp, records)
    writer.put_bytes(json.dumps(manifest, indent=1).encode(), manifest_url)
    _tidy(split_url, split.name, {t.name for t in tasks})
    skipped = tuple(tuple(s) for s in manifest["skipped"])
    return SplitResult(manifest_url, manifest, len(tasks) - reused, reused, skipped)


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
    settings = ShardSettings(samples_per_shard, shard_mb, seed, strict, resize_short_side, jpeg_quality)
    if workers < 1:
        raise ValueError(f"workers={workers}: must be >= 1")
    out = os.fspath(out)
    if s3.parse(out).kind == "http":
        raise ShardingError(
            f"{s3.redact(out)}: http(s) locations are read-only; write to a path or s3://bucket/prefix"
        )
    source = discover(src, splits)
    if s3.parse(out).kind == "local":  # shards are written beside their targets and renamed
        return _shard_splits(source, out, settings, workers=workers, overwrite=overwrite, progress=progress)
    writer.ensure_bucket(out)
    aborted = writer.abort_incomplete_uploads(out)
    with Staging(out, tmp_dir) as staging:  # removes the staging that killed jobs left
        if aborted and progress:
            print(f"aborted {aborted} incomplete multipart upload(s) left under {s3.redact(out)}")
        if staging.removed and progress:
            print(f"removed {len(staging.removed)} staging folder(s) of killed jobs in {staging.root}")
        return _shard_splits(
            source,
            out,
            settings,
            workers=workers,
            overwrite=overwrite,
            progress=progress,
            staging=str(staging.path),
        )


def _shard_splits(
    source: SourceDataset, out: str, settings: ShardSettings, *, workers, overwrite, progress, staging=None
) -> ShardReport:
    classes_url = s3.join(out, "classes.json")
    try:
        old_classes = json.loads(s3.read_bytes(classes_url))
    except s3.ObjectNotFoundError:
        old_classes = None
    if old_classes is not None and list(old_classes) != list(source.classes) and not overwrite:
        raise ShardingError(
            f"{s3.redact(classes_url)} lists other classes than {source.root}; pass --overwrite or choose another --out"
        )
    writer.put_bytes(json.dumps(list(source.classes)).encode(), classes_url)
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
            staging=staging,
        )
    return ShardReport(out, source.classes, results)
