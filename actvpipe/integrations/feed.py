"""An endless iterator over a loader's batches, the seam every trainer integration shares."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

import torch

from actvpipe.batches import Batch, acts_of
from actvpipe.hook_names import HookIndex
from actvpipe.loader import ActivationLoader

T = TypeVar("T")


class Feed(Generic[T]):
    """The loader's batches, pass after pass, each turned by ``convert`` into what a trainer takes.

    A batch is drawn only when the trainer asks for it (no read-ahead here), so ``state_dict()`` at
    any moment resumes exactly after the batches handed out so far.
    """

    def __init__(self, loader: ActivationLoader, convert: Callable[[Batch], T]):
        self.loader, self.convert = loader, convert
        self._batches: Iterator[Batch] | None = None

    def __iter__(self) -> Feed[T]:
        return self

    def __next__(self) -> T:
        for _ in range(2):  # the rest of this pass, else a new one
            if self._batches is None:
                self._batches = iter(self.loader)
            try:
                return self.convert(next(self._batches))
            except StopIteration:
                self._batches = None
        raise RuntimeError("the loader served no batch in a whole pass: is the dataset empty?")

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume after the batches ``state`` was saved at (call before the next batch)."""
        self._batches = None
        self.loader.load_state_dict(state)

    def close(self) -> None:
        self._batches = None
        self.loader.close()


def hook_feed(loader: ActivationLoader, hook: str, model: int | None = None) -> Feed[torch.Tensor]:
    """``[batch, d_model]`` tensors of one hook (a TransformerLens name or ours), endless."""
    index = HookIndex.of(hook, loader.spec, model)
    return Feed(loader, lambda batch: index.take(acts_of(batch)))
