"""Stream ImageNet webdataset shards (written by ``python -m data_prep shard``) into every rank.

A shard location is ``s3://bucket/prefix``, a local path, ``file://...`` or ``http(s)://...``, holding
``classes.json`` and per split ``<split>/manifest.json`` plus ``<split>/<split>-NNNNNN.tar`` (DESIGN.md
section 4). The manifest gives every shard's sample count, bytes, sha256 and a seek index (the byte
offset of every ``index_every``-th sample), so a rank can start reading in the middle of a shard with a
ranged GET.

What an epoch is (the choice, and why). Every epoch is an *exact partition*, not resampling: the
shards are put in a seeded, epoch-dependent order and the concatenated sample stream is rotated by a
seeded offset; rank ``r`` takes the ``r``-th run of ``steps_per_epoch * batch_size`` consecutive samples,
and inside the rank each DataLoader worker takes a consecutive part, shuffled in blocks of
``shuffle_block`` samples. So every rank runs exactly ``steps_per_epoch = N // (world_size *
batch_size)`` batches whatever the shard count (one shard for 64 ranks works), no sample is seen twice
in an epoch, and the fewer than ``world_size * batch_size`` samples left over at the end of the stream
are skipped for that epoch only (they differ from epoch to epoch). Class mixing within a shard comes
from data_prep's global shuffle. webdataset's usual alternative (resampled shards plus ``with_epoch``)
draws shards with replacement: some samples are seen twice in an "epoch", others not at all.

Determinism. A train loader's batches are a pure function of (location's manifest, seed, epoch, rank,
world_size, num_workers, batch_size, image_size, shuffle_block, crop_scale, hflip, jpeg_draft): every random
choice (order, rotation, block permutation, crop, flip) comes from a seed derived from those and the
sample's position, never from process state or timing. ``skip_batches=n`` yields exactly the batches ``n, n+1, ...`` of the same
epoch, reading from the nearest seek point and decoding nothing it skips, so a run resumed mid-epoch
sees what an uninterrupted run would have seen next.

Corrupt data. A sample that does not decode, or a damaged stretch of tar, is logged (shard URL and key)
and counted in ``loader.skipped_samples``; in training its slot is filled with the next good sample of
the same worker (re-augmented), so the batch count never changes. In validation it is dropped.

Example::

    from localsgd_ds.data import steps_per_epoch, train_loader, val_loader, evaluate_counts
    loc = "s3://imagenet/shards"                         # AWS_ENDPOINT_URL etc. from the environment
    steps = steps_per_epoch(loc, batch_size=32, world_size=8)   # 1281167 // (32 x 8) = 5004
    for epoch in range(90):
        for images, labels in train_loader(loc, batch_size=32, rank=rank, world_size=8, epoch=epoch):
            ...
    correct = total = 0
    for images, labels in val_loader(loc, batch_size=100, rank=rank, world_size=8):
        correct += int((model(images).argmax(1) == labels).sum()); total += len(labels)
    correct, total = evaluate_counts(correct, total)     # summed over ranks
"""

from __future__ import annotations

import io
import json
import logging
import math
import queue
import tarfile
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from localsgd_ds import s3

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "localsgd-ds-shards/1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

s3.register_s3_gopen()  # webdataset pipelines in this process (and in forked or spawned workers) read s3://


# ============================================================================================ manifest
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


# ============================================================================================ partition
@dataclass(frozen=True)
class Piece:
    """``count`` consecutive samples of shard ``shard`` starting at sample ``first``."""

    shard: int
    first: int
    count: int


def epoch_order(counts: list[int], seed: int, epoch: int) -> tuple[list[int], int]:
    """The shard order and stream rotation of an epoch (a pure function of seed and epoch)."""
    rng = np.random.default_rng([seed, epoch, 0x0D0E])
    order = [int(i) for i in rng.permutation(len(counts))]
    return order, int(rng.integers(sum(counts))) if sum(counts) else 0


def stream_pieces(counts: list[int], order: list[int], offset: int, start: int, stop: int) -> list[Piece]:
    """Pieces covering positions [start, stop) of the stream "shards in ``order``, rotated by ``offset``"."""
    total = sum(counts)
    if not 0 <= start <= stop <= total:
        raise ValueError(f"range [{start}, {stop}) outside a stream of {total} samples")
    a, b = (start + offset) % total if total else 0, (start + offset) % total + (stop - start) if total else 0
    spans = [(a, min(b, total))] + ([(0, b - total)] if b > total else [])
    pieces = []
    for lo, hi in spans:
        pos = 0
        for shard in order:
            n = counts[shard]
            first, last = max(lo, pos), min(hi, pos + n)
            if first < last:
                pieces.append(Piece(shard, first - pos, last - first))
            pos += n
            if pos >= hi:
                break
    return pieces


def worker_batches(steps: int, num_workers: int) -> list[int]:
    """Batches of each worker when batch ``i`` of the rank comes from worker ``i % num_workers``."""
    return [steps // num_workers + (w < steps % num_workers) for w in range(num_workers)]


# ============================================================================================ decoding
def random_resized_crop(
    width: int, height: int, rng: np.random.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
):
    """torchvision's RandomResizedCrop parameters as (left, top, crop_width, crop_height), from ``rng``."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def _crop_resize(
    im: Image.Image, box: tuple[float, float, float, float], size: int, draft: bool
) -> Image.Image:
    """Resize ``box`` of ``im`` to size x size (antialiased bilinear, as torchvision on a PIL image).

    ``draft``: when the crop is at least twice the output, let libjpeg scale by 1/2, 1/4 or 1/8 in the
    DCT while the crop still keeps >= ``size`` pixels. That is not torchvision's resize (a center crop of
    a 1000x750 photo came out up to 19/255 off), so validation never drafts. Training does, because it
    pays on large images: in ``benchmarks/bench_loader.py --draft-ab`` the loader needed 1.31x (1000x750)
    and 1.57x (2000x1500) the CPU per image without it (medians of 7 interleaved rounds; at 500x375,
    where no crop is large enough to draft, 0.92x: noise). See data_prep/README.md, "Loader benchmark".
    """
    width, height = im.size
    crop_w, crop_h = box[2] - box[0], box[3] - box[1]
    if draft and im.format == "JPEG" and min(crop_w, crop_h) >= 2 * size:
        drafted = im.draft(None, (math.ceil(width * size / crop_w), math.ceil(height * size / crop_h)))
        if drafted is not None:
            s = width / drafted[1][2]
            box = (box[0] / s, box[1] / s, box[2] / s, box[3] / s)
    if im.mode in ("RGB", "L", "CMYK"):
        out = im.resize((size, size), Image.BILINEAR, box=box)
        return out if out.mode == "RGB" else out.convert("RGB")  # grayscale/CMYK: convert the small image
    return im.convert("RGB").resize((size, size), Image.BILINEAR, box=box)


def decode_train(
    jpeg: bytes,
    rng: np.random.Generator,
    size: int,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    hflip: bool = True,
    draft: bool = True,
) -> np.ndarray:
    """RandomResizedCrop(size, scale=crop_scale) + horizontal flip (unless ``hflip`` is False) of one
    encoded image; returns HWC uint8 RGB. The flip coin is tossed either way, so the crops do not move.
    ``draft``: decode large JPEGs at a reduced DCT scale when the crop is at least twice ``size``."""
    im = Image.open(io.BytesIO(jpeg))
    left, top, w, h = random_resized_crop(im.width, im.height, rng, scale=crop_scale)
    flip = rng.random() < 0.5 and hflip
    out = _crop_resize(im, (left, top, left + w, top + h), size, draft)
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(out)


def decode_val(jpeg: bytes, resize: int, crop: int) -> np.ndarray:
    """Resize(short side to ``resize``) + CenterCrop(``crop``) done as one box resize; HWC uint8 RGB.

    Always decoded at full size: within 1/255 of torchvision's Resize + CenterCrop at any image size."""
    im = Image.open(io.BytesIO(jpeg))
    width, height = im.size
    if width <= height:
        new_w, new_h = resize, int(resize * height / width)
    else:
        new_w, new_h = int(resize * width / height), resize
    left, top = int(round((new_w - crop) / 2.0)), int(round((new_h - crop) / 2.0))
    sx, sy = width / new_w, height / new_h
    return np.asarray(
        _crop_resize(im, (left * sx, top * sy, (left + crop) * sx, (top + crop) * sy), crop, False)
    )


# (x - mean) / std == x * _SCALE + _SHIFT, per channel, for x in 0..255
_SCALE = (1.0 / (np.array(IMAGENET_STD, dtype=np.float64) * 255)).astype(np.float32).reshape(1, 3, 1, 1)
_SHIFT = (
    (-np.array(IMAGENET_MEAN, dtype=np.float64) / np.array(IMAGENET_STD))
    .astype(np.float32)
    .reshape(1, 3, 1, 1)
)


class _Batch:
    """Decoded images written straight into a uint8 [B, 3, S, S] array: what workers send (a quarter
    of the float bytes; the float conversion happens in the loader's own thread, see ShardLoader)."""

    def __init__(self, capacity: int, size: int):
        shape = (capacity, 3, size, size)
        if get_worker_info() is None:
            self.tensor = torch.empty(shape, dtype=torch.uint8)
        else:
            # In a worker, allocate in shared memory right away (as DataLoader's own collate does):
            # sending it then moves no bytes, where a private buffer would be copied into a new one.
            proto = torch.empty(0, dtype=torch.uint8)
            self.tensor = proto.new(proto._typed_storage()._new_shared(math.prod(shape))).view(shape)
        self.pixels = self.tensor.numpy()
        self.labels: list[int] = []
        self.keys: list[str] = []
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.labels)

    def add(self, image: np.ndarray, label: int, key: str) -> None:
        self.pixels[len(self.labels)] = image.transpose(2, 0, 1)
        self.labels.append(label)
        self.keys.append(key)

    def message(self, index: int, with_keys: bool) -> tuple:
        """(batch index, uint8 images, int64 labels, keys or None, keys of corrupt samples skipped)."""
        n = len(self.labels)
        return (
            index,
            self.tensor[:n],
            torch.tensor(self.labels, dtype=torch.int64),
            tuple(self.keys) if with_keys else None,
            self.skipped,
        )


def normalize(batch: torch.Tensor, pin_memory: bool = False) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 [B, 3, H, W], normalized with ImageNet mean/std.

    numpy, not torch: single-threaded and free of the GIL. torch would use the process's intra-op
    threads, whose OpenMP spinning cost 8x the arithmetic here while DataLoader workers held the cores.
    The output comes from numpy's allocator too (reused memory), unless pinned (CUDA's caching host
    allocator): torch's CPU allocator handed out fresh pages for every batch, 4x the cost in page faults.
    """
    if pin_memory:
        out = torch.empty(batch.shape, dtype=torch.float32, pin_memory=True)
        pixels = out.numpy()
    else:
        pixels = np.empty(batch.shape, dtype=np.float32)
        out = torch.from_numpy(pixels)
    np.multiply(batch.numpy(), _SCALE, out=pixels)
    np.add(pixels, _SHIFT, out=pixels)
    return out


# ============================================================================================ reading
@dataclass(frozen=True)
class RawSample:
    url: str
    key: str
    jpeg: bytes | None  # None: the sample is damaged (reason in ``error``)
    label: int = -1
    error: str = ""


def _tar_samples(stream) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for consecutive members sharing a key, as webdataset groups them."""
    key, parts = None, {}
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            if not member.isreg():
                continue
            name = member.name
            dot = name.find(".", name.rfind("/") + 1)
            k, ext = (name[:dot], name[dot + 1 :].lower()) if dot >= 0 else (name, "")
            data = tar.extractfile(member).read()
            if k != key:
                if key is not None:
                    yield key, parts
                key, parts = k, {}
            parts[ext] = data
    if key is not None:
        yield key, parts


def _read_piece(manifest: Manifest, piece: Piece) -> Iterator[RawSample]:
    """Exactly ``piece.count`` RawSamples (damaged ones included), reading one byte range of the shard."""
    shard = manifest.shards[piece.shard]
    every = manifest.index_every
    seek = piece.first // every
    skip = piece.first - seek * every
    stop = -(-(piece.first + piece.count) // every)
    end = shard.offsets[stop] if stop < len(shard.offsets) else shard.num_bytes
    emitted = 0
    try:
        with s3.open_stream(shard.url, shard.offsets[seek], end) as stream:
            for key, parts in _tar_samples(stream):
                if skip:
                    skip -= 1
                    continue
                try:
                    label = int(parts["cls"])
                    yield RawSample(shard.url, key, parts["jpg"], label)
                except (KeyError, ValueError) as exc:
                    yield RawSample(shard.url, key, None, error=f"bad sample: {type(exc).__name__} {exc}")
                emitted += 1
                if emitted == piece.count:
                    return
    except tarfile.TarError as exc:
        log.warning(
            "%s: damaged tar data after %d samples of this read: %s", s3.redact(shard.url), emitted, exc
        )
    if emitted < piece.count:
        # tarfile ends quietly at a garbled header in mid-archive; either way these samples are lost.
        log.warning(
            "%s: damaged tar data: samples %d-%d unreadable",
            s3.redact(shard.url),
            piece.first + emitted,
            piece.first + piece.count - 1,
        )
    for i in range(piece.count - emitted):  # what the damaged or short shard failed to deliver
        yield RawSample(shard.url, f"<sample {piece.first + emitted + i}>", None, error="missing from shard")


_END = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


def _prefetch(items: Iterator, depth: int, join_timeout: float = 0.0) -> Iterator:
    """Run ``items`` in a thread, ``depth`` ahead (object-store reads overlap decoding; float
    conversion overlaps training). Closing the generator stops the thread, waiting up to ``join_timeout``."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def run() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            put(_Failure(exc))

    thread = threading.Thread(target=run, name="shard-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        stop.set()
        if join_timeout:
            thread.join(join_timeout)


def _read_pieces(manifest: Manifest, pieces: list[Piece]) -> Iterator[RawSample]:
    for piece in pieces:
        yield from _read_piece(manifest, piece)


# ============================================================================================ datasets
def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _init_worker(_worker_id: int) -> None:
    torch.set_num_threads(1)  # one decode process per core; intra-op threads would oversubscribe
    s3.register_s3_gopen()


def _log_skip(sample: RawSample, reason: str) -> str:
    log.warning("skipped corrupt sample %s in %s: %s", sample.key, s3.redact(sample.url), reason)
    return f"{s3.redact(sample.url)}#{sample.key}"


class _TrainStream(IterableDataset):
    """One rank's training batches for one epoch; each DataLoader worker produces its own share."""

    def __init__(
        self,
        manifest: Manifest,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        epoch: int,
        seed: int,
        image_size: int,
        num_workers: int,
        skip_batches: int,
        shuffle_block: int,
        with_keys: bool,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        hflip: bool = True,
        jpeg_draft: bool = True,
    ):
        self.manifest = manifest
        self.crop_scale = crop_scale
        self.hflip = hflip
        self.jpeg_draft = jpeg_draft
        self.batch_size = batch_size
        self.rank = rank
        self.epoch = epoch
        self.seed = seed
        self.image_size = image_size
        self.num_workers = max(1, num_workers)
        self.skip_batches = skip_batches
        self.shuffle_block = shuffle_block
        self.with_keys = with_keys
        counts = manifest.shard_counts
        self.steps = manifest.num_samples // (world_size * batch_size)
        self.order, self.offset = epoch_order(counts, seed, epoch)
        self.rank_start = rank * self.steps * batch_size

    def _worker_range(self, worker: int) -> tuple[int, int, int]:
        """(first stream position, number of positions, number of batches) of a worker."""
        batches = worker_batches(self.steps, self.num_workers)
        start = self.rank_start + sum(batches[:worker]) * self.batch_size
        return start, batches[worker] * self.batch_size, batches[worker]

    def _rng(self, worker: int, position: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, self.rank, worker, position])

    def __iter__(self):
        worker, num_workers = _worker()
        if num_workers != self.num_workers:
            raise RuntimeError(f"built for {self.num_workers} workers, iterated by {num_workers}")
        start, length, nbatches = self._worker_range(worker)
        bs, block = self.batch_size, self.shuffle_block
        # Worker batch k is the rank's batch k * W + worker: skip those before skip_batches undecoded.
        first_batch = max(0, -(-(self.skip_batches - worker) // self.num_workers))
        if first_batch >= nbatches:
            return
        first_pos = first_batch * bs
        first_block = first_pos // block
        pieces = stream_pieces(
            self.manifest.shard_counts, self.order, self.offset, start + first_block * block, start + length
        )
        raw = _prefetch(_read_pieces(self.manifest, pieces), depth=block)

        def shuffled() -> Iterator[tuple[int, RawSample]]:
            for b in range(first_block, -(-length // block)):
                items = [next(raw) for _ in range(min(block, length - b * block))]
                perm = np.random.default_rng(
                    [self.seed, self.epoch, self.rank, worker, b, 0xB10C]
                ).permutation(len(items))
                for i, j in enumerate(perm):
                    if b * block + i >= first_pos:
                        yield b * block + i, items[j]

        skipped: list[str] = []

        def decoded() -> Iterator[tuple[RawSample, np.ndarray]]:
            # A damaged sample's slot takes the next good sample (re-augmented for that slot): the
            # stream after any resume point is the same, so the substitute is too.
            owed: list[int] = []
            last = None
            for pos, sample in shuffled():
                if sample.jpeg is None:
                    skipped.append(_log_skip(sample, sample.error))
                    owed.append(pos)
                    continue
                try:
                    image = decode_train(
                        sample.jpeg,
                        self._rng(worker, pos),
                        self.image_size,
                        self.crop_scale,
                        self.hflip,
                        self.jpeg_draft,
                    )
                except Exception as exc:  # noqa: BLE001 - any decoder failure means a corrupt sample
                    skipped.append(_log_skip(sample, f"{type(exc).__name__}: {exc}"))
                    owed.append(pos)
                    continue
                for q in owed:
                    yield (
                        sample,
                        decode_train(
                            sample.jpeg,
                            self._rng(worker, q),
                            self.image_size,
                            self.crop_scale,
                            self.hflip,
                            self.jpeg_draft,
                        ),
                    )
                owed.clear()
                last = sample
                yield sample, image
            if owed:
                if last is None:
                    raise RuntimeError(
                        f"worker {worker} of rank {self.rank}: no decodable sample in its part of epoch {self.epoch}"
                    )
                for q in owed:
                    yield (
                        last,
                        decode_train(
                            last.jpeg,
                            self._rng(worker, q),
                            self.image_size,
                            self.crop_scale,
                            self.hflip,
                            self.jpeg_draft,
                        ),
                    )

        batch = _Batch(bs, self.image_size)
        k = first_batch
        for sample, image in decoded():
            batch.add(image, sample.label, sample.key)
            if len(batch) == bs:
                batch.skipped = skipped[:]
                skipped.clear()
                yield batch.message(k * self.num_workers + worker, self.with_keys)
                batch = _Batch(bs, self.image_size)
                k += 1
        if k != nbatches:
            raise RuntimeError(f"worker {worker} of rank {self.rank} produced {k} of {nbatches} batches")


class _ValStream(IterableDataset):
    """A rank's contiguous share of the validation stream; workers split it further. No shuffling."""

    def __init__(
        self,
        manifest: Manifest,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        resize: int,
        crop: int,
        num_workers: int,
        with_keys: bool,
    ):
        self.manifest = manifest
        self.batch_size = batch_size
        self.resize = resize
        self.crop = crop
        self.num_workers = max(1, num_workers)
        self.with_keys = with_keys
        n = manifest.num_samples
        self.rank_range = (rank * n // world_size, (rank + 1) * n // world_size)

    def worker_range(self, worker: int) -> tuple[int, int]:
        lo, hi = self.rank_range
        m = hi - lo
        return lo + worker * m // self.num_workers, lo + (worker + 1) * m // self.num_workers

    def __len__(self) -> int:
        return sum(-(-(b - a) // self.batch_size) for a, b in map(self.worker_range, range(self.num_workers)))

    def __iter__(self):
        worker, _ = _worker()
        lo, hi = self.worker_range(worker)
        counts = self.manifest.shard_counts
        pieces = stream_pieces(counts, list(range(len(counts))), 0, lo, hi)
        batch = _Batch(self.batch_size, self.crop)
        k = 0
        for sample in _prefetch(_read_pieces(self.manifest, pieces), depth=4 * self.batch_size):
            try:
                if sample.jpeg is None:
                    raise ValueError(sample.error)
                image = decode_val(sample.jpeg, self.resize, self.crop)
            except Exception as exc:  # noqa: BLE001 - any decoder failure means a corrupt sample
                batch.skipped.append(_log_skip(sample, f"{type(exc).__name__}: {exc}"))
                continue
            batch.add(image, sample.label, sample.key)
            if len(batch) == self.batch_size:
                yield batch.message(k, self.with_keys)
                batch = _Batch(self.batch_size, self.crop)
                k += 1
        if len(batch) or batch.skipped:
            yield batch.message(k, self.with_keys)


# ============================================================================================ loaders
def _identity(batch):
    return batch


class ShardLoader:
    """An iterable of ``(images, labels)`` (plus ``keys`` if asked) with a length.

    Each ``iter()`` starts the epoch over with fresh worker processes and yields the same batches.
    ``skipped_samples`` / ``skipped_keys`` count and name the corrupt samples met so far.
    """

    def __init__(
        self, dataset: IterableDataset, *, length: int, num_workers: int, exact: bool, pin_memory: bool
    ):
        self.dataset = dataset
        self.length = length
        self.num_workers = num_workers
        self.exact = exact
        self.pin_memory = pin_memory
        self.skipped_keys: list[str] = []

    @property
    def skipped_samples(self) -> int:
        return len(self.skipped_keys)

    @property
    def manifest(self) -> Manifest:
        return self.dataset.manifest

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_identity,
            worker_init_fn=_init_worker,
            prefetch_factor=2 if self.num_workers else None,
        )
        batches = iter(loader)
        # Workers send uint8 batches; a thread of this process converts them to normalized float32
        # (torch ops release the GIL): moving float batches through fresh shared memory cost workers
        # about 4x the conversion itself, and the conversion stays off the training thread.
        ready = _prefetch(self._normalized(batches), depth=2, join_timeout=30.0)
        try:
            yield from ready
        finally:
            ready.close()
            # Stop the workers now, not when the garbage collector gets to the iterator: after a worker
            # raised, that takes DataLoader 5 s per worker (join timeouts). A deliberate private call.
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def _normalized(self, batches):
        with_keys = self.dataset.with_keys
        for images, labels, keys in self._ordered(batches):
            images = normalize(images, self.pin_memory)
            yield (images, labels, keys) if with_keys else (images, labels)

    def _ordered(self, batches):
        if not self.exact:
            for _, images, labels, keys, skipped in batches:
                self.skipped_keys += skipped
                if len(labels):
                    yield images, labels, keys
            return
        # Training: yield batches in rank order. DataLoader already returns workers' batches round-robin;
        # the index check makes the order (and the count) a guarantee rather than an assumption.
        first = self.dataset.skip_batches
        expected, pending = first, {}
        for index, images, labels, keys, skipped in batches:
            self.skipped_keys += skipped
            pending[index] = (images, labels, keys)
            while expected in pending:
                yield pending.pop(expected)
                expected += 1
        if expected - first != self.length or pending:
            raise RuntimeError(f"train loader produced {expected - first} batches, expected {self.length}")


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name}={value}: must be >= 1")


def train_loader(
    location: str,
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    epoch: int,
    seed: int = 0,
    image_size: int = 224,
    num_workers: int = 2,
    skip_batches: int = 0,
    shuffle_block: int = 1024,
    split: str = "train",
    with_keys: bool = False,
    pin_memory: bool | None = None,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    hflip: bool = True,
    jpeg_draft: bool = True,
) -> ShardLoader:
    """This rank's training batches of ``epoch``: exactly ``steps_per_epoch - skip_batches`` of them.

    Batches are ``(float32 [B, 3, image_size, image_size], int64 [B])`` (plus a tuple of sample keys
    with ``with_keys=True``), RandomResizedCrop (area fraction drawn from ``crop_scale``; ImageNet's
    (0.08, 1) by default) + horizontal flip (``hflip``), normalized with ImageNet mean/std.
    ``jpeg_draft=False`` decodes every JPEG at full size (slower on large images; see ``_crop_resize``).
    """
    if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
        raise ValueError(f"crop_scale={crop_scale}: must satisfy 0 < low <= high <= 1")
    _check_positive(
        batch_size=batch_size, world_size=world_size, image_size=image_size, shuffle_block=shuffle_block
    )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}: must be in [0, world_size={world_size})")
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed={seed}, epoch={epoch}: must be >= 0")
    manifest = read_manifest(location, split)
    steps = manifest.num_samples // (world_size * batch_size)
    if steps == 0:
        raise ValueError(
            f"{s3.redact(location)}: split {split!r} has {manifest.num_samples} samples, fewer than world_size x "
            f"batch_size = {world_size} x {batch_size}: not one full batch per rank"
        )
    if not 0 <= skip_batches <= steps:
        raise ValueError(f"skip_batches={skip_batches}: must be in [0, steps_per_epoch={steps}]")
    dataset = _TrainStream(
        manifest,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        epoch=epoch,
        seed=seed,
        image_size=image_size,
        num_workers=num_workers,
        skip_batches=skip_batches,
        shuffle_block=shuffle_block,
        with_keys=with_keys,
        crop_scale=tuple(crop_scale),
        hflip=hflip,
        jpeg_draft=jpeg_draft,
    )
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    return ShardLoader(
        dataset, length=steps - skip_batches, num_workers=num_workers, exact=True, pin_memory=pin
    )


def val_loader(
    location: str,
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    resize: int = 256,
    crop: int = 224,
    num_workers: int = 2,
    split: str = "val",
    with_keys: bool = False,
    pin_memory: bool | None = None,
) -> ShardLoader:
    """This rank's disjoint share of the validation split: over all ranks every sample once.

    Ranks may get different batch counts (and the last batch of each worker may be short): run no
    collective inside the loop; sum (correct, total) afterwards with :func:`evaluate_counts`.
    """
    _check_positive(batch_size=batch_size, world_size=world_size, resize=resize, crop=crop)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}: must be in [0, world_size={world_size})")
    if crop > resize:
        raise ValueError(
            f"crop={crop} is larger than resize={resize}: the center crop must fit the resized image"
        )
    manifest = read_manifest(location, split)
    dataset = _ValStream(
        manifest,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        resize=resize,
        crop=crop,
        num_workers=num_workers,
        with_keys=with_keys,
    )
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    return ShardLoader(dataset, length=len(dataset), num_workers=num_workers, exact=False, pin_memory=pin)


def evaluate_counts(correct: int, total: int, device: torch.device | str | None = None) -> tuple[int, int]:
    """Sum (correct, total) over all ranks when torch.distributed is initialized; else return them.

    Accuracy is then ``correct / total``: a mean of counts, not of per-rank means (ranks see different
    numbers of validation samples). NCCL needs a CUDA tensor: ``device`` defaults to the current GPU
    for it and to the CPU otherwise.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return int(correct), int(total)
    if device is None:
        nccl = torch.distributed.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    counts = torch.tensor([int(correct), int(total)], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(counts)
    return int(counts[0]), int(counts[1])
