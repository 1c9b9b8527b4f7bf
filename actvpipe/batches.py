"""What the loader hands out: how batches are cut (``.batch()``'s options) and a batch with provenance."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch


@dataclass
class TokenBatch:
    """A batch with provenance: ``acts[i]`` came from token ``token_ids[i]`` at position ``pos[i]`` of
    context ``seq[i]`` (the global index of the packed context), produced by ``source[i]`` (0: the
    stream itself, 1: the HDF5 files mixed in with ``.buffer(hdf5=...)``)."""

    acts: torch.Tensor
    token_ids: torch.Tensor
    seq: torch.Tensor
    pos: torch.Tensor
    source: torch.Tensor

    def __len__(self) -> int:
        return len(self.acts)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> TokenBatch:
        """The same batch with ``fn`` applied to every field."""
        return TokenBatch(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})


Batch = torch.Tensor | TokenBatch


def acts_of(batch: Batch) -> torch.Tensor:
    return batch.acts if isinstance(batch, TokenBatch) else batch


@dataclass(frozen=True)
class Batching:
    """How batches are cut and handed out: ``.batch()``'s arguments."""

    size: int
    drop_last: bool = False
    with_tokens: bool = False
    pin_memory: bool = False
    device: torch.device | None = None  # where batches are handed over (None: host memory)

    @property
    def pinned(self) -> bool:
        """Gather into pinned memory: asked for, or needed by a copy to an accelerator."""
        return self.pin_memory or (self.device is not None and self.device.type != "cpu")
