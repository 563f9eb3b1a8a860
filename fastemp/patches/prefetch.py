"""What every patch backend shares: the request a step makes, and the one prefetch mechanism
(docs/data-backends.md#prefetch-one-mechanism-for-every-backend)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class PatchRequest(NamedTuple):
    """What a step asks a patch backend for: n patches of each image index[shard], drawn from `seed`.

    `index` is the global batch (every rank passes the same one); the randomness of image
    index[j] is row j of the global batch's draw, so K ranks make the patches one process would."""

    index: torch.Tensor  # (B,) int64
    n: int
    seed: int
    shard: slice = slice(None)


def patch_major(per_image: torch.Tensor) -> torch.Tensor:
    """(b, n, ...) patches per image as (n*b, ...), row i*b + j = patch i of image j: every backend's order."""
    return per_image.transpose(0, 1).reshape(per_image.shape[1] * per_image.shape[0], *per_image.shape[2:])


class PatchBackend:
    """The prefetch mechanism every backend inherits: requests in flight by key, bounded, in order."""

    name = "?"
    depth = 2  # requests in flight at most; announcing one more drops the oldest

    def __init__(self) -> None:
        self._ahead: dict = {}  # key -> handle, in the order announced

    def start(self, request: PatchRequest):
        """Begin making `request`; return a handle for `finish`."""
        raise NotImplementedError

    def finish(self, handle) -> torch.Tensor:
        """The patches of a started request, ready for use on the caller's thread (and CUDA stream)."""
        raise NotImplementedError

    def drop(self, handle) -> None:
        """Discard a started request nobody takes (the default: nothing to undo)."""

    def prefetch(self, key, request: PatchRequest) -> None:
        """Start the request the caller will take as `key` (the Trainer announces step t+1 before step t)."""
        if key in self._ahead:
            return
        while len(self._ahead) >= self.depth:
            self._drop_oldest()
        self._ahead[key] = self.start(request)

    def take(self, key, request: PatchRequest) -> torch.Tensor:
        """The patches of `request`: those announced as `key` (requests announced before it, never taken,
        are dropped), else made now."""
        if key in self._ahead:
            while next(iter(self._ahead)) != key:
                self._drop_oldest()
            return self.finish(self._ahead.pop(key))
        return self.finish(self.start(request))

    def __call__(self, index: torch.Tensor, n: int, seed: int, shard: slice = slice(None)) -> torch.Tensor:
        """The patches of (index, n, seed, shard), made now; what is in flight stays."""
        return self.finish(self.start(PatchRequest(index, n, seed, shard)))

    def close(self) -> None:
        """Drop what is in flight (backends with worker processes or threads also stop them)."""
        while self._ahead:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        self.drop(self._ahead.pop(next(iter(self._ahead))))
