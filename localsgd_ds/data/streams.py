"""The datasets behind the loaders: each DataLoader worker reads, decodes and batches its own share.

``TrainStream`` is one rank's training epoch (see ``partition`` for which samples that is). A worker's
share is a run of consecutive stream positions; slot ``i`` of the share is position ``start + i`` and
the worker's batch ``k`` holds slots ``k * B`` to ``k * B + B - 1`` and is the rank's batch ``k *
num_workers + worker``. Samples are shuffled within blocks of ``shuffle_block`` slots, and every random
choice (block permutation, crop, flip) is seeded by the slot, so resuming at any batch reproduces what
an uninterrupted epoch would have produced. ``ValStream`` is a rank's contiguous share of the
validation split, unshuffled. Both send uint8 batches (``_Batch``) for the loader to normalize.

Example (what ``train_loader`` does)::

    stream = TrainStream(manifest, batch_size=32, rank=0, world_size=8, epoch=3, seed=0,
                         options=DataConfig(), skip_batches=0, shuffle_block=1024, with_keys=False)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from localsgd_ds import s3
from localsgd_ds.data.config import DataConfig
from localsgd_ds.data.manifest import Manifest
from localsgd_ds.data.partition import epoch_order, stream_pieces, worker_batches
from localsgd_ds.data.prefetch import prefetch
from localsgd_ds.data.reading import RawSample, read_pieces
from localsgd_ds.data.transforms import decode_train, decode_val

log = logging.getLogger(__name__)


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


def this_worker() -> tuple[int, int]:
    """(worker id, number of workers) of the DataLoader worker running this; (0, 1) outside one."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _decode_or_skip(
    sample: RawSample, decode: Callable[[bytes], np.ndarray], skipped: list[str]
) -> np.ndarray | None:
    """``decode(sample.jpeg)``; for a corrupt sample None, after logging it and adding it to ``skipped``."""
    if sample.jpeg is None:
        reason = sample.error
    else:
        try:
            return decode(sample.jpeg)
        except Exception as exc:  # noqa: BLE001 - any decoder failure means a corrupt sample
            reason = f"{type(exc).__name__}: {exc}"
    log.warning("skipped corrupt sample %s in %s: %s", sample.key, s3.redact(sample.url), reason)
    skipped.append(f"{s3.redact(sample.url)}#{sample.key}")
    return None


@dataclass(frozen=True)
class _WorkerShare:
    """A worker's share of the rank's epoch: ``length`` stream positions from ``start``, in
    ``num_batches`` batches, of which it produces those from ``first_batch`` on (a resumed epoch)."""

    start: int
    length: int
    num_batches: int
    first_batch: int


class _RankStream(IterableDataset):
    """What both streams hold: a rank's part of a split, produced in batches by ``options.num_workers``
    workers (at least one: with 0, the training process is the one worker)."""

    def __init__(
        self,
        manifest: Manifest,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        options: DataConfig,
        with_keys: bool,
    ):
        self.manifest = manifest
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.options = options
        self.num_workers = max(1, options.num_workers)
        self.with_keys = with_keys


class TrainStream(_RankStream):
    """One rank's training batches for one epoch; each DataLoader worker produces its own share.

    ``rank_stream`` are :class:`_RankStream`'s arguments."""

    def __init__(
        self,
        manifest: Manifest,
        *,
        epoch: int,
        seed: int,
        skip_batches: int,
        shuffle_block: int,
        jpeg_draft: bool = True,
        **rank_stream,
    ):
        super().__init__(manifest, **rank_stream)
        self.epoch = epoch
        self.seed = seed
        self.skip_batches = skip_batches
        self.shuffle_block = shuffle_block
        self.jpeg_draft = jpeg_draft
        self.steps = manifest.num_samples // (self.world_size * self.batch_size)
        self.order, self.offset = epoch_order(manifest.shard_counts, seed, epoch)
        self.rank_start = self.rank * self.steps * self.batch_size

    def __iter__(self):
        worker, num_workers = this_worker()
        if num_workers != self.num_workers:
            raise RuntimeError(f"built for {self.num_workers} workers, iterated by {num_workers}")
        share = self._share(worker)
        if share.first_batch >= share.num_batches:
            return
        skipped: list[str] = []  # keys of corrupt samples not yet reported with a batch
        slots = self._shuffled_slots(worker, share)
        yield from self._batches(worker, share, self._augmented(worker, slots, skipped), skipped)

    def _share(self, worker: int) -> _WorkerShare:
        batches = worker_batches(self.steps, self.num_workers)
        start = self.rank_start + sum(batches[:worker]) * self.batch_size
        # Worker batch k is the rank's batch k * W + worker: those before skip_batches are not produced.
        first_batch = max(0, -(-(self.skip_batches - worker) // self.num_workers))
        return _WorkerShare(start, batches[worker] * self.batch_size, batches[worker], first_batch)

    def _shuffled_slots(self, worker: int, share: _WorkerShare) -> Iterator[tuple[int, RawSample]]:
        """(slot, sample) from the first slot of ``share.first_batch`` on, each block of slots permuted;
        reading starts at the block that holds that first slot, and nothing before it is decoded."""
        block = self.shuffle_block
        first_slot = share.first_batch * self.batch_size
        first_block = first_slot // block
        pieces = stream_pieces(
            self.manifest.shard_counts,
            self.order,
            self.offset,
            share.start + first_block * block,
            share.start + share.length,
        )
        samples = prefetch(read_pieces(self.manifest, pieces), depth=block)
        for b in range(first_block, -(-share.length // block)):
            block_start = b * block
            in_block = [next(samples) for _ in range(min(block, share.length - block_start))]
            permutation = np.random.default_rng([self.seed, self.epoch, self.rank, worker, b, 0xB10C])
            for i, j in enumerate(permutation.permutation(len(in_block))):
                if block_start + i >= first_slot:
                    yield block_start + i, in_block[j]

    def _augment(self, jpeg: bytes, worker: int, slot: int) -> np.ndarray:
        """The slot's crop and flip of an image: a pure function of the bytes and the slot."""
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker, slot])
        o = self.options
        return decode_train(jpeg, rng, o.image_size, o.crop_scale, o.hflip, self.jpeg_draft)

    def _augmented(
        self, worker: int, slots: Iterator[tuple[int, RawSample]], skipped: list[str]
    ) -> Iterator[tuple[RawSample, np.ndarray]]:
        """(sample, image) for every slot, in slot order. A corrupt sample is logged and its slot takes
        the next good sample, augmented for that slot (the last good one at the end of the share)."""
        unfilled: list[int] = []  # slots of corrupt samples, waiting for the next good sample
        last_good = None
        for slot, sample in slots:
            image = _decode_or_skip(sample, lambda jpeg, s=slot: self._augment(jpeg, worker, s), skipped)
            if image is None:
                unfilled.append(slot)
                continue
            for empty in unfilled:
                yield sample, self._augment(sample.jpeg, worker, empty)
            unfilled.clear()
            last_good = sample
            yield sample, image
        if unfilled and last_good is None:
            raise RuntimeError(
                f"worker {worker} of rank {self.rank}: no decodable sample in its part of epoch {self.epoch}"
            )
        for empty in unfilled:
            yield last_good, self._augment(last_good.jpeg, worker, empty)

    def _batches(
        self,
        worker: int,
        share: _WorkerShare,
        images: Iterator[tuple[RawSample, np.ndarray]],
        skipped: list[str],
    ) -> Iterator[tuple]:
        batch_index = share.first_batch
        batch = _Batch(self.batch_size, self.options.image_size)
        for sample, image in images:
            batch.add(image, sample.label, sample.key)
            if len(batch) == self.batch_size:
                batch.skipped = skipped[:]
                skipped.clear()
                yield batch.message(batch_index * self.num_workers + worker, self.with_keys)
                batch = _Batch(self.batch_size, self.options.image_size)
                batch_index += 1
        if batch_index != share.num_batches:
            raise RuntimeError(
                f"worker {worker} of rank {self.rank} produced {batch_index} of {share.num_batches} batches"
            )


class ValStream(_RankStream):
    """A rank's contiguous share of the validation stream; workers split it further. No shuffling."""

    def __init__(self, manifest: Manifest, **rank_stream):
        super().__init__(manifest, **rank_stream)
        n = manifest.num_samples
        self.rank_range = (self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size)

    def worker_range(self, worker: int) -> tuple[int, int]:
        lo, hi = self.rank_range
        m = hi - lo
        return lo + worker * m // self.num_workers, lo + (worker + 1) * m // self.num_workers

    def __len__(self) -> int:
        return sum(-(-(b - a) // self.batch_size) for a, b in map(self.worker_range, range(self.num_workers)))

    def __iter__(self):
        worker, _ = this_worker()
        lo, hi = self.worker_range(worker)
        counts = self.manifest.shard_counts
        pieces = stream_pieces(counts, list(range(len(counts))), 0, lo, hi)
        resize, crop = self.options.val_resize, self.options.val_crop
        batch = _Batch(self.batch_size, crop)
        batch_index = 0
        for sample in prefetch(read_pieces(self.manifest, pieces), depth=4 * self.batch_size):
            image = _decode_or_skip(sample, lambda jpeg: decode_val(jpeg, resize, crop), batch.skipped)
            if image is None:
                continue
            batch.add(image, sample.label, sample.key)
            if len(batch) == self.batch_size:
                yield batch.message(batch_index, self.with_keys)
                batch = _Batch(self.batch_size, crop)
                batch_index += 1
        if len(batch) or batch.skipped:
            yield batch.message(batch_index, self.with_keys)
