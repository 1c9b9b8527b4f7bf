"""Sources: the small picklable descriptions of what a generator process produces.

``StreamSpec`` runs a model over text; ``Hdf5Spec`` reads cached rows back. Both build their
node graph inside the generator process (``rows_graph``) and describe themselves for resume.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from actvpipe.documents import DatasetSource
from actvpipe.hdf5 import Hdf5File, Hdf5Rows
from actvpipe.models import ModelSource
from actvpipe.pipeline import build_rows_graph
from actvpipe.placement import DEFAULT_WATERMARKS


@dataclass(frozen=True)
class StreamSpec:
    """Everything the generator needs, resolved and validated in the training process."""

    model: ModelSource
    dataset: DatasetSource
    context_length: int
    layers: tuple[int, ...]
    capture: tuple[str, str]
    modules: tuple[str, str] | None
    d_model: int
    generation_batch_size: int
    dtype: torch.dtype
    device: str
    seed: int
    exclude_bos: bool
    deterministic: bool = False
    threads: int | None = None
    model_dtype: torch.dtype | None = None  # None: the buffer's dtype
    exclude_tokens: tuple[int, ...] = ()
    packing: str = "concat"
    rank: int = 0
    world_size: int = 1
    watermarks: tuple[float, float] = DEFAULT_WATERMARKS

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.model_dtype or self.dtype

    @property
    def first_pos(self) -> int:
        """First captured position of each context: 1 skips the BOS row."""
        return 1 if self.exclude_bos else 0

    @property
    def row_shape(self) -> tuple[int, int, int]:
        return (2, len(self.layers), self.d_model)

    def rows_graph(self, plan, fill=None, report=None):
        """Load model and tokenizer (in the generator process) and build text -> rows per ``plan``;
        ``fill`` and ``report`` connect the device policy to the buffer (see ``Placement``)."""
        return build_rows_graph(self, plan, fill, report)

    def fingerprint(self) -> dict[str, object]:
        """The arguments a saved state must match to be restored."""
        return {
            "model": self.model.name,
            "dataset": self.dataset.describe(),
            "text_column": self.dataset.text_column,
            "context_length": self.context_length,
            "layers": list(self.layers),
            "capture": list(self.capture),
            "modules": None if self.modules is None else list(self.modules),
            "generation_batch_size": self.generation_batch_size,
            "dtype": str(self.dtype),
            "model_dtype": str(self.compute_dtype),
            "seed": self.seed,
            "exclude_bos": self.exclude_bos,
            "exclude_tokens": list(self.exclude_tokens),
            "packing": self.packing,
            "rank": self.rank,
            "world_size": self.world_size,
            "deterministic": self.deterministic,
        }


@dataclass(frozen=True)
class Hdf5Spec:
    """Rows read back from validated cache files, in file order, as one pass."""

    files: tuple[Hdf5File, ...]
    seed: int = 0
    deterministic: bool = False

    @property
    def row_shape(self) -> tuple[int, int, int]:
        return self.files[0].row_shape

    @property
    def dtype(self) -> torch.dtype:
        return self.files[0].dtype

    @property
    def d_model(self) -> int:
        return self.row_shape[2]

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.files[0].attrs["layers"])

    def rows_graph(self, plan, fill=None, report=None):
        return Hdf5Rows(self.files, plan.buffered, plan.frontier)

    def fingerprint(self) -> dict[str, object]:
        return {
            "files": [[f.path, f.rows] for f in self.files],
            "dtype": str(self.dtype),
            "seed": self.seed,
            "deterministic": self.deterministic,
        }
