"""The training and validation loaders: an epoch's batches for one rank, as float32 tensors.

``train_loader`` gives every rank exactly ``steps_per_epoch`` batches per epoch (an exact partition of
the split, see ``partition``), reproducibly and resumably (``skip_batches``); ``val_loader`` gives each
rank a disjoint share of the validation split, every sample once over all ranks. Both take their
decoding options from a :class:`~localsgd_ds.data.config.DataConfig` (``config=``) or, as before it
existed, from keywords, which override the config's fields when both are given.

Example::

    options = DataConfig(num_workers=8)
    for images, labels in train_loader(loc, batch_size=32, rank=r, world_size=8, epoch=e, config=options):
        ...
    for images, labels in val_loader(loc, batch_size=100, rank=r, world_size=8, config=options):
        ...
"""

from __future__ import annotations

import dataclasses
import os

import torch
from torch.utils.data import DataLoader, IterableDataset

from localsgd_ds import s3
from localsgd_ds.data.config import DataConfig
from localsgd_ds.data.manifest import Manifest, read_manifest
from localsgd_ds.data.prefetch import prefetch
from localsgd_ds.data.streams import TrainStream, ValStream
from localsgd_ds.data.transforms import normalize

KEYWORD_DEFAULTS = DataConfig(num_workers=2)

WORKER_TIMEOUT_VARIABLE = "LOCALSGD_LOADER_TIMEOUT"
DEFAULT_WORKER_TIMEOUT_S = 600.0
"""How long a loader waits for its worker processes' next batch before it fails (a worker that hangs
without dying, for example deadlocked after fork, would otherwise block its rank forever while the other
ranks wait in their next collective). Long enough for a first read from slow object storage."""


def worker_timeout_s() -> float:
    """``$LOCALSGD_LOADER_TIMEOUT`` seconds, else 600."""
    value = os.environ.get(WORKER_TIMEOUT_VARIABLE, "").strip()
    try:
        seconds = float(value) if value else DEFAULT_WORKER_TIMEOUT_S
    except ValueError:
        raise ValueError(f"{WORKER_TIMEOUT_VARIABLE}={value!r}: must be a number of seconds > 0") from None
    if not seconds > 0:
        raise ValueError(f"{WORKER_TIMEOUT_VARIABLE}={value!r}: must be a number of seconds > 0")
    return seconds


"""The options of a loader called without ``config``: the keyword defaults the loaders always had."""


def _identity(batch):
    return batch


def _init_worker(_worker_id: int) -> None:
    torch.set_num_threads(1)  # one decode process per core; intra-op threads would oversubscribe


class ShardLoader:
    """An iterable of ``(images, labels)`` (plus ``keys`` if asked) with a length.

    Each ``iter()`` starts the epoch over with fresh worker processes and yields the same batches.
    ``skipped_samples`` / ``skipped_keys`` count and name the corrupt samples met so far.
    """

    def __init__(self, dataset: IterableDataset, *, length: int, exact: bool, pin_memory: bool | None):
        self.dataset = dataset
        self.length = length
        self.num_workers = dataset.options.num_workers
        self.exact = exact
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
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
            # A worker that stops producing fails this loader in time instead of blocking the rank.
            timeout=worker_timeout_s() if self.num_workers else 0,
        )
        batches = iter(loader)
        # Workers send uint8 batches; a thread of this process converts them to normalized float32
        # (torch ops release the GIL): moving float batches through fresh shared memory cost workers
        # about 4x the conversion itself, and the conversion stays off the training thread.
        ready = prefetch(self._normalized(batches), depth=2, join_timeout=30.0)
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


def _options(config: DataConfig | None, **keywords) -> DataConfig:
    """``config`` (else :data:`KEYWORD_DEFAULTS`) with the keywords that were given (not None) in place."""
    given = {name: value for name, value in keywords.items() if value is not None}
    base = KEYWORD_DEFAULTS if config is None else config
    return dataclasses.replace(base, **given) if given else base


def _check_batch_and_rank(batch_size: int, rank: int, world_size: int) -> None:
    """The checks both loaders make of their arguments (before any read)."""
    for name, value in (("batch_size", batch_size), ("world_size", world_size)):
        if value < 1:
            raise ValueError(f"{name}={value}: must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}: must be in [0, world_size={world_size})")


def train_loader(
    location: str,
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    epoch: int,
    seed: int = 0,
    skip_batches: int = 0,
    config: DataConfig | None = None,
    image_size: int | None = None,
    num_workers: int | None = None,
    crop_scale: tuple[float, float] | None = None,
    hflip: bool | None = None,
    shuffle_block: int = 1024,
    split: str = "train",
    with_keys: bool = False,
    pin_memory: bool | None = None,
    jpeg_draft: bool = True,
) -> ShardLoader:
    """This rank's training batches of ``epoch``: exactly ``steps_per_epoch - skip_batches`` of them.

    Batches are ``(float32 [B, 3, image_size, image_size], int64 [B])`` (plus a tuple of sample keys
    with ``with_keys=True``), RandomResizedCrop (area fraction drawn from ``crop_scale``) + horizontal
    flip (``hflip``), normalized with ImageNet mean/std. ``image_size``, ``num_workers``, ``crop_scale``
    and ``hflip`` override ``config``'s fields (default: :data:`KEYWORD_DEFAULTS`). ``jpeg_draft=False``
    decodes every JPEG at full size (slower on large images; see ``transforms._crop_resize``).
    """
    options = _options(
        config, image_size=image_size, num_workers=num_workers, crop_scale=crop_scale, hflip=hflip
    )
    _check_batch_and_rank(batch_size, rank, world_size)
    if shuffle_block < 1:
        raise ValueError(f"shuffle_block={shuffle_block}: must be >= 1")
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
    dataset = TrainStream(
        manifest, batch_size=batch_size, rank=rank, world_size=world_size, options=options,
        with_keys=with_keys, epoch=epoch, seed=seed, skip_batches=skip_batches, shuffle_block=shuffle_block,
        jpeg_draft=jpeg_draft,
    )  # fmt: skip
    return ShardLoader(dataset, length=steps - skip_batches, exact=True, pin_memory=pin_memory)


def val_loader(
    location: str,
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    config: DataConfig | None = None,
    resize: int | None = None,
    crop: int | None = None,
    num_workers: int | None = None,
    split: str = "val",
    with_keys: bool = False,
    pin_memory: bool | None = None,
) -> ShardLoader:
    """This rank's disjoint share of the validation split: over all ranks every sample once.

    Resize the short side to ``resize``, center-crop ``crop`` (``config.val_resize`` and
    ``config.val_crop`` unless given). Ranks may get different batch counts (and the last batch of each
    worker may be short): run no collective inside the loop; sum (correct, total) afterwards.
    """
    options = _options(config, val_resize=resize, val_crop=crop, num_workers=num_workers)
    _check_batch_and_rank(batch_size, rank, world_size)
    dataset = ValStream(
        read_manifest(location, split),
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        options=options,
        with_keys=with_keys,
    )
    return ShardLoader(dataset, length=len(dataset), exact=False, pin_memory=pin_memory)
