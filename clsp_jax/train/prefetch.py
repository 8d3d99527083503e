"""Device prefetch: the next batches are loaded, assembled and put on the devices while the step runs.

A background thread pulls host batches from the data iterator, turns each into global device arrays with
`prepare` and queues up to `size` of them. Each queued batch carries the iterator state just after it, so
`Prefetcher.state` is the position of the last batch the loop *consumed*: a checkpoint saved from it
resumes with the next unconsumed batch, not past the prefetched ones.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator


class _End:
    """Queued when the iterator is exhausted or raises (the error is re-raised in the consumer)."""

    def __init__(self, error: BaseException | None):
        self.error = error


class Prefetcher:
    """Iterates `(host_batch, prepare(host_batch))`, computed `size` batches ahead in a thread.

    Args:
      iterator: a data iterator with `get_state()` (a Grain DatasetIterator), already positioned (resumed).
      prepare: host batch -> device batch (runs in the thread; jax transfers are thread-safe).
      size: batches kept ready (>= 1).
    """

    def __init__(self, iterator: Iterator, prepare: Callable, size: int = 2):
        if size < 1:
            raise ValueError(f"prefetch size must be >= 1, got {size}")
        self._iterator, self._prepare = iterator, prepare
        self.state = iterator.get_state()
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                host = next(self._iterator)
                item = (host, self._prepare(host), self._iterator.get_state())
                if not self._put(item):
                    return
        except StopIteration:
            self._put(_End(None))
        except BaseException as e:  # surfaced in __next__, in the training loop's thread
            self._put(_End(e))

    def __iter__(self):
        return self

    def __next__(self):
        item = self._queue.get()
        if isinstance(item, _End):
            self._queue.put(item)  # later calls end the same way
            if item.error is None:
                raise StopIteration
            raise item.error
        host, batch, self.state = item
        return host, batch

    def close(self) -> None:
        """Stops the thread (batches still queued are dropped; `state` stays at the last consumed one)."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                pass
        self._thread.join()
