"""Read the samples at given stream positions from the shards: one ranged GET per piece of a shard.

A piece (``partition.Piece``) is a run of consecutive samples of one shard. The manifest's seek index
gives the byte range that holds them, so a reader starts at the seek point at or before the first
sample and stops at the one after the last. Exactly ``piece.count`` samples come out of every piece:
a sample that lacks its ``jpg`` or an integer ``cls``, or that a damaged stretch of tar made
unreadable, comes out as a :class:`RawSample` with ``jpeg=None`` and the reason, for the loaders to
count and replace, so the positions of all later samples stay what the partition says.

Example::

    for sample in read_pieces(manifest, stream_pieces(counts, order, offset, start, stop)):
        sample.key, sample.label, sample.jpeg
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

from localsgd_ds import s3
from localsgd_ds.data.manifest import Manifest
from localsgd_ds.data.partition import Piece
from localsgd_ds.data.tar import tar_samples

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RawSample:
    url: str
    key: str
    jpeg: bytes | None  # None: the sample is damaged (reason in ``error``)
    label: int = -1
    error: str = ""


def _byte_range(manifest: Manifest, piece: Piece) -> tuple[int, int, int]:
    """(first byte, end byte, samples to pass over at the start) of the read that covers ``piece``."""
    shard, every = manifest.shards[piece.shard], manifest.index_every
    seek = piece.first // every
    stop = -(-(piece.first + piece.count) // every)
    end = shard.offsets[stop] if stop < len(shard.offsets) else shard.num_bytes
    return shard.offsets[seek], end, piece.first - seek * every


def _raw(url: str, key: str, parts: dict[str, bytes]) -> RawSample:
    try:
        return RawSample(url, key, parts["jpg"], int(parts["cls"]))
    except (KeyError, ValueError) as exc:
        return RawSample(url, key, None, error=f"bad sample: {type(exc).__name__} {exc}")


def read_piece(manifest: Manifest, piece: Piece) -> Iterator[RawSample]:
    """Exactly ``piece.count`` RawSamples (damaged ones included), reading one byte range of the shard."""
    url = manifest.shards[piece.shard].url
    start, end, passed_over = _byte_range(manifest, piece)
    emitted = 0
    try:
        with s3.open_stream(url, start, end) as stream:
            for sample in tar_samples(stream):
                if passed_over:
                    passed_over -= 1
                    continue
                yield _raw(url, sample.key, sample.parts)
                emitted += 1
                if emitted == piece.count:
                    return
    except tarfile.TarError as exc:
        log.warning("%s: damaged tar data after %d samples of this read: %s", s3.redact(url), emitted, exc)
    # tarfile ends quietly at a garbled header in mid-archive; either way these samples are lost.
    first_lost, last = piece.first + emitted, piece.first + piece.count - 1
    log.warning("%s: damaged tar data: samples %d-%d unreadable", s3.redact(url), first_lost, last)
    for position in range(first_lost, last + 1):
        yield RawSample(url, f"<sample {position}>", None, error="missing from shard")


def read_pieces(manifest: Manifest, pieces: list[Piece]) -> Iterator[RawSample]:
    for piece in pieces:
        yield from read_piece(manifest, piece)
