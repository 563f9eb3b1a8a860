"""The one prefetch mechanism (fastemp/patches/prefetch.py), on a backend that records what it is asked."""

from __future__ import annotations

import torch

from fastemp.patches import PatchBackend, PatchRequest


class Recording(PatchBackend):
    """Makes a request's seed as its 'patches'; notes every start, finish and drop."""

    def __init__(self):
        super().__init__()
        self.log = []

    def start(self, request):
        self.log.append(("start", request.seed))
        return request.seed

    def finish(self, handle):
        self.log.append(("finish", handle))
        return torch.tensor(handle)

    def drop(self, handle):
        self.log.append(("drop", handle))


def request(seed: int) -> PatchRequest:
    return PatchRequest(torch.arange(4), 2, seed)


def test_a_prefetched_key_is_started_once_and_taken_then():
    backend = Recording()
    backend.prefetch(1, request(10))
    backend.prefetch(1, request(10))  # announced again: already in flight
    assert int(backend.take(1, request(10))) == 10
    assert backend.log == [("start", 10), ("finish", 10)]
    assert int(backend.take(1, request(10))) == 10  # taken again: made now
    assert backend.log[2:] == [("start", 10), ("finish", 10)]


def test_keys_not_prefetched_are_made_now_and_leave_what_is_in_flight():
    backend = Recording()
    backend.prefetch(2, request(20))
    assert int(backend.take(5, request(50))) == 50 and int(backend(torch.arange(4), 2, 60)) == 60
    assert list(backend._ahead) == [2]
    assert int(backend.take(2, request(20))) == 20
    assert backend.log == [("start", 20), ("start", 50), ("finish", 50), ("start", 60), ("finish", 60), ("finish", 20)]


def test_depth_bound_drops_the_oldest_and_taking_a_key_drops_those_announced_before_it():
    backend = Recording()
    for key in (1, 2, 3):
        backend.prefetch(key, request(key))
    assert list(backend._ahead) == [2, 3] and ("drop", 1) in backend.log  # depth 2
    backend.prefetch(4, request(4))
    assert int(backend.take(4, request(4))) == 4  # 3, announced before 4, was never taken: dropped
    assert backend.log[-4:] == [("drop", 2), ("start", 4), ("drop", 3), ("finish", 4)] and not backend._ahead
    backend.prefetch(5, request(5))
    backend.close()
    assert backend.log[-1] == ("drop", 5) and not backend._ahead
