"""Device prefetch: order, the consumed-batch state it reports, errors and shutdown."""

import threading

import pytest

from clsp_jax.train.prefetch import Prefetcher


class Counter:
    """A data iterator with Grain's get_state(): batches 0, 1, ... up to `stop`."""

    def __init__(self, stop=None):
        self.position, self.stop, self.thread = 0, stop, None

    def __next__(self):
        self.thread = threading.current_thread().name
        if self.stop is not None and self.position >= self.stop:
            raise StopIteration
        self.position += 1
        return {"x": self.position - 1}

    def get_state(self):
        return {"position": self.position}


def test_batches_in_order_with_the_state_of_the_last_consumed_one():
    data = Counter()
    batches = Prefetcher(data, lambda host: host["x"] * 10, size=3)
    assert batches.state == {"position": 0}
    for i in range(5):
        host, prepared = next(batches)
        assert (host["x"], prepared) == (i, i * 10)
        assert batches.state == {"position": i + 1}  # not the producer's position, which runs ahead
    batches.close()
    assert data.thread == "prefetch" and data.position >= 5


def test_end_of_data_and_errors_reach_the_consumer():
    batches = Prefetcher(Counter(stop=2), lambda host: host, size=1)
    assert [h["x"] for h, _ in batches] == [0, 1]
    with pytest.raises(StopIteration):
        next(batches)
    batches.close()

    def prepare(host):
        if host["x"] == 1:
            raise KeyError("caption missing")
        return host

    batches = Prefetcher(Counter(), prepare, size=2)
    next(batches)
    with pytest.raises(KeyError, match="caption missing"):
        next(batches)
    batches.close()


def test_close_stops_a_producer_blocked_on_a_full_queue():
    data = Counter()
    batches = Prefetcher(data, lambda host: host, size=1)
    next(batches)
    batches.close()
    assert not batches._thread.is_alive()
    assert data.position <= 3  # one consumed, one queued, at most one more in hand
    with pytest.raises(ValueError, match=">= 1"):
        Prefetcher(Counter(), lambda host: host, size=0)
