"""The samples of a webdataset tar stream: consecutive members that share a key, grouped as webdataset
groups them (the key is the member name up to the first dot of its last path component).

One reader for both sides of the pipeline: the loaders read byte ranges of shards through it, and
``data_prep.verify`` checks whole shards with it. It is a generator that yields every sample before a
damaged stretch and then lets tarfile's error out, so a caller knows how far a shard was sound; each
sample carries the byte offset of its first member, which verify compares with the manifest's seek
index.

Example::

    with open("train-000000.tar", "rb") as f:
        for sample in tar_samples(f):
            print(sample.key, sample.offset, int(sample.parts["cls"]), len(sample.parts["jpg"]))
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO


@dataclass(frozen=True)
class TarSample:
    key: str
    parts: dict[str, bytes]  # extension in lower case ("jpg", "cls") -> the member's bytes
    offset: int  # byte offset in the stream of the header of the sample's first member


def key_and_extension(name: str) -> tuple[str, str]:
    """``"n01/img_1.jpg"`` -> ``("n01/img_1", "jpg")``; the extension in lower case."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name[:dot], name[dot + 1 :].lower()) if dot >= 0 else (name, "")


def tar_samples(stream: BinaryIO) -> Iterator[TarSample]:
    """Every sample of ``stream`` (read once, front to back); members that are not files are passed over.

    Raises ``tarfile.TarError`` at a damaged member header, after the samples before it. (tarfile ends
    quietly at some garbled headers: compare the count with what the manifest expects.)
    """
    key, parts, offset = None, {}, 0
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            if not member.isreg():
                continue
            member_key, extension = key_and_extension(member.name)
            data = tar.extractfile(member).read()
            if member_key != key:
                if key is not None:
                    yield TarSample(key, parts, offset)
                key, parts, offset = member_key, {}, member.offset
            parts[extension] = data
    if key is not None:
        yield TarSample(key, parts, offset)
