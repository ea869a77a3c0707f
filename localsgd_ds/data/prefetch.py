"""Run an iterator in a thread, a bounded number of items ahead of its consumer.

The loaders use it twice: in a DataLoader worker, object-store reads run ahead of JPEG decoding; in the
training process, the float conversion of the next batches runs beside the training step (numpy and
torch release the GIL). An exception in the thread is raised in the consumer; closing the consumer's
generator stops the thread.

Example::

    for sample in prefetch(read_samples(), depth=256):
        decode(sample)
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

_END = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


def prefetch(items: Iterator, depth: int, join_timeout: float = 0.0) -> Iterator:
    """Yield ``items``, produced by a thread up to ``depth`` ahead; on close, stop the thread and wait
    for it up to ``join_timeout`` seconds."""
    ahead: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ahead.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            put(_Failure(exc))

    thread = threading.Thread(target=produce, name="shard-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = ahead.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        stop.set()
        if join_timeout:
            thread.join(join_timeout)
