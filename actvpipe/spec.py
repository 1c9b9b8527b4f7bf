"""StreamSpec: the small picklable description of what the generator process computes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from actvpipe.documents import DatasetSource
from actvpipe.models import ModelSource


@dataclass(frozen=True)
class StreamSpec:
    """Everything the generator needs, resolved and validated in the training process."""

    model: ModelSource
    dataset: DatasetSource
    context_length: int
    layers: tuple[int, ...]
    d_model: int
    generation_batch_size: int
    dtype: torch.dtype
    device: str
    seed: int
    exclude_bos: bool
    deterministic: bool = False
    threads: int | None = None

    @property
    def first_pos(self) -> int:
        """First captured position of each context: 1 skips the BOS row."""
        return 1 if self.exclude_bos else 0

    @property
    def row_shape(self) -> tuple[int, int, int]:
        return (2, len(self.layers), self.d_model)

    @property
    def rows_per_context(self) -> int:
        return self.context_length - self.first_pos

    def fingerprint(self) -> dict[str, object]:
        """The arguments a saved state must match to be restored."""
        return {
            "model": self.model.name,
            "dataset": self.dataset.describe(),
            "text_column": self.dataset.text_column,
            "context_length": self.context_length,
            "layers": list(self.layers),
            "generation_batch_size": self.generation_batch_size,
            "dtype": str(self.dtype),
            "seed": self.seed,
            "exclude_bos": self.exclude_bos,
            "deterministic": self.deterministic,
        }
