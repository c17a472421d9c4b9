"""Overlap loading with compute in one process: the next batches are made by a background thread.

With ``data.num_workers: 0`` the clips are decoded in the training process; done inline, every step waits
for its batch to be decoded, cropped and collated before the model runs. A thread that runs ahead by a
few batches hides that wait: decoding (libsndfile through cffi), resampling and the model's kernels
release Python's lock, so the two proceed on different cores. The order of the batches is unchanged (one
producer, one queue), and so is everything an exact resume depends on. The thread works on the caller's
CUDA device (pinned batches), so that the ranks of a job do not all open a context on GPU 0.
"""

from __future__ import annotations

import queue
import threading
import weakref
from typing import Iterator, TypeVar

import torch

__all__ = ["background"]

T = TypeVar("T")

_END = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def background(items: Iterator[T], depth: int = 2) -> Iterator[T]:
    """Yield ``items`` in order, produced up to ``depth`` ahead by a daemon thread, which starts here (not at the
    first item: a caller that times its steps starts its clock after this call).

    An exception in the producer is raised here, at the item where it happened. Closing the returned
    generator stops the producer (after the item it is making) and waits for it; close it rather than drop it: a
    generator dropped mid-way is closed by the garbage collector, where an exception (a Ctrl-C during the wait) is
    printed and ignored. One dropped, or never started, stops its producer all the same.
    """
    if depth < 1:
        raise ValueError(f"prefetch depth must be >= 1, got {depth}")
    box: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    # pinning batches talks to CUDA: on the caller's device, not device 0 (each rank of a job has its own)
    device = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def put(item) -> bool:
        while not stop.is_set():
            try:
                box.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        if device is not None:
            torch.cuda.set_device(device)
        try:
            for item in items:
                if not put(item) or stop.is_set():  # stopped: not a batch more is decoded
                    return
            put(_END)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            put(_Failure(err))

    thread = threading.Thread(target=produce, name="batch-prefetch", daemon=True)
    thread.start()
    out = _consume(box, stop, thread)
    weakref.finalize(out, stop.set)  # dropped before its first item: its finally never runs
    return out


def _consume(box: queue.Queue, stop: threading.Event, thread: threading.Thread) -> Iterator:
    try:
        while True:
            item = box.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        try:  # room in the queue: a producer waiting to put its batch there ends at once, not at its next poll
            box.get_nowait()
        except queue.Empty:
            pass
        thread.join(timeout=5)  # one decoding a batch finishes it first
