"""Batch tensors reused only when nothing else holds them: fast by default, safe by construction."""

from __future__ import annotations

import torch

# torch has no public query for how many tensors share a storage; its private one is read here only.
# A torch without it: the pool allocates every batch (safe, slower), and tests/test_structure.py
# fails loudly so that the loss is noticed.
_use_count = getattr(torch._C, "_storage_Use_Count", None)


def storage_users(tensor: torch.Tensor) -> int:
    """How many tensors share ``tensor``'s memory (views, batches a user kept, arrays over them)."""
    return _use_count(tensor.untyped_storage()._cdata)


class OutputPool:
    """The newest ``capacity`` batch tensors of ``shape``. ``take(n)`` hands out a view of one that
    no batch, view or array handed out earlier still references, or of a new one: a batch the user
    keeps is never overwritten, and one they dropped is reused, which skips allocating and faulting
    in fresh pages for every batch (368 MB per GPT-2-small batch of 5000 rows)."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, capacity: int = 4, device="cpu"):
        self.shape, self.dtype, self.capacity = shape, dtype, capacity
        self.device = torch.device(device)
        self._tensors: list[tuple[torch.Tensor, int]] = []  # (tensor, its users when only the pool holds it)

    def take(self, n: int) -> torch.Tensor:
        if _use_count is None:
            return torch.empty((n, *self.shape[1:]), dtype=self.dtype, device=self.device)
        for tensor, alone in self._tensors:
            if storage_users(tensor) == alone:
                return tensor[:n]
        tensor = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        # The newest ``capacity`` tensors stay pooled; an older one still held is left to its holder.
        self._tensors = [*self._tensors[1 - self.capacity :], (tensor, storage_users(tensor))]
        return tensor[:n]


class BatchMemory:
    """Where batches of ``batch_size`` rows ``row_shape`` are gathered: a pooled tensor nothing else
    holds, or with ``pinned`` fresh pinned memory (torch's pinned-memory cache reuses a block only
    once pending copies from it are done). The pool is made on the first batch."""

    def __init__(self, batch_size: int, row_shape: tuple[int, ...], dtype: torch.dtype, pinned: bool = False):
        self.shape, self.dtype, self.pinned = (batch_size, *row_shape), dtype, pinned
        self._pool: OutputPool | None = None

    def take(self, n: int) -> torch.Tensor:
        if self.pinned:
            return torch.empty((n, *self.shape[1:]), dtype=self.dtype, pin_memory=True)
        if self._pool is None:
            self._pool = OutputPool(self.shape, self.dtype)
        return self._pool.take(n)
