"""The node that normalises served batches in place with fixed statistics of the stream."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torchdata.nodes import BaseNode

from actvpipe.batches import Batch, acts_of
from actvpipe.stats import Normalization


class Normalizer(BaseNode[Batch]):
    """Applies ``(x - shift) * scale`` to each batch. The factors are part of the state, so a resumed
    run normalises exactly as the saved one did; a fresh start computes them once, with ``compute``
    (a statistics pass in this process), before the source starts its pass."""

    SOURCE_KEY, NORMALIZATION_KEY = "source", "normalization"

    def __init__(self, source: BaseNode[Batch], compute: Callable[[], Normalization]):
        super().__init__()
        self.source, self.compute = source, compute
        self.normalization: Normalization | None = None

    def prepare(self, initial_state: dict | None = None) -> None:
        """Have the factors for a start from ``initial_state``: the saved ones, or computed once."""
        if initial_state is not None:
            self.normalization = Normalization.from_state(initial_state[self.NORMALIZATION_KEY])
        elif self.normalization is None:
            self.normalization = self.compute()

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        self.prepare(initial_state)
        self.source.reset(None if initial_state is None else initial_state[self.SOURCE_KEY])

    def next(self) -> Batch:
        batch = next(self.source)
        self.normalization.apply_(acts_of(batch))
        return batch

    def get_state(self) -> dict[str, Any]:
        return {
            self.SOURCE_KEY: self.source.state_dict(),
            self.NORMALIZATION_KEY: self.normalization.to_state(),
        }
