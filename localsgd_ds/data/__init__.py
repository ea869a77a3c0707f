"""Stream ImageNet webdataset shards (written by ``python -m data_prep shard``) into every rank.

A shard location is ``s3://bucket/prefix``, a local path, ``file://...`` or ``http(s)://...``, holding
``classes.json`` and per split ``<split>/manifest.json`` plus ``<split>/<split>-NNNNNN.tar`` (DESIGN.md
section 4). Every epoch is an *exact partition*, not resampling: every rank runs exactly
``steps_per_epoch = N // (world_size * batch_size)`` batches whatever the shard count, no sample is
seen twice in an epoch, and fewer than ``world_size * batch_size`` samples are left out, different ones
every epoch (``partition``). A train loader's batches are a pure function of (manifest, seed, epoch,
rank, world_size, batch_size, shuffle_block, the DataConfig, jpeg_draft): ``skip_batches=n`` resumes
exactly at batch ``n``. A corrupt sample is logged and counted in ``loader.skipped_samples``; in
training its slot takes the next good sample, so the batch count never changes.

The modules, one concept each: ``config`` (DataConfig, the loaders' options), ``manifest``,
``partition`` (which samples a rank and worker read), ``transforms`` (decode, crop, normalize),
``tar`` (samples of a tar stream, shared with ``data_prep.verify``), ``reading`` (ranged reads of
shard pieces), ``prefetch``, ``streams`` (the per-worker datasets), ``loaders`` and ``webdataset_s3``
(webdataset's ``s3://`` reader). Bytes come through ``localsgd_ds.s3``; ``evaluate_counts`` lives in
``localsgd_ds.evaluation`` and is re-exported here.

Example::

    from localsgd_ds.data import DataConfig, steps_per_epoch, train_loader, val_loader
    from localsgd_ds.evaluation import evaluate_counts
    loc, options = "s3://imagenet/shards", DataConfig()      # AWS_ENDPOINT_URL etc. from the environment
    steps = steps_per_epoch(loc, batch_size=32, world_size=8)   # 1281167 // (32 x 8) = 5004
    for epoch in range(90):
        for images, labels in train_loader(loc, batch_size=32, rank=rank, world_size=8, epoch=epoch,
                                           config=options):
            ...
    correct = total = 0
    for images, labels in val_loader(loc, batch_size=100, rank=rank, world_size=8, config=options):
        correct += int((model(images).argmax(1) == labels).sum()); total += len(labels)
    correct, total = evaluate_counts(correct, total)     # summed over ranks
"""

from localsgd_ds.data.config import DataConfig
from localsgd_ds.data.loaders import KEYWORD_DEFAULTS, ShardLoader, train_loader, val_loader
from localsgd_ds.data.manifest import (
    MANIFEST_FORMAT,
    Manifest,
    ShardInfo,
    manifest_url,
    parse_manifest,
    read_manifest,
    steps_per_epoch,
)
from localsgd_ds.data.partition import Piece, epoch_order, stream_pieces, worker_batches
from localsgd_ds.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    decode_train,
    decode_val,
    normalize,
    random_resized_crop,
)
from localsgd_ds.data.webdataset_s3 import register_s3_gopen, register_when_imported
from localsgd_ds.evaluation import evaluate_counts

register_when_imported()  # wds.WebDataset("s3://...") works here and in forked workers, webdataset or not yet

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "KEYWORD_DEFAULTS",
    "MANIFEST_FORMAT",
    "DataConfig",
    "Manifest",
    "Piece",
    "ShardInfo",
    "ShardLoader",
    "decode_train",
    "decode_val",
    "epoch_order",
    "evaluate_counts",
    "manifest_url",
    "normalize",
    "parse_manifest",
    "random_resized_crop",
    "read_manifest",
    "register_s3_gopen",
    "steps_per_epoch",
    "stream_pieces",
    "train_loader",
    "val_loader",
    "worker_batches",
]
