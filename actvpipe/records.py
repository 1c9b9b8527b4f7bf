"""The records passed between stages: blocks of packed contexts, blocks of rows, and file ranges.

Kept apart from the stages so that the buffer and the file format need not import the model code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class ContextBlock:
    """Consecutive packed contexts: ``tokens[j]`` is global context number ``first_seq + j``.

    ``start`` is where the block's first context begins in the dataset, ``next_start`` where the
    following block begins and ``next_seq`` its first context number: packing restarted there
    reproduces the following contexts exactly.
    """

    tokens: np.ndarray
    first_seq: int
    start: tuple[int, int]
    next_start: tuple[int, int]
    next_seq: int
    lengths: np.ndarray | None = None  # per context, positions before padding (None: no padding)


@dataclass(frozen=True)
class FileRange:
    """Where rows go when copied file to file: an open descriptor and the byte offset in it."""

    fd: int
    offset: int


@dataclass
class RowBlock:
    """Rows ``[n, k, n_layers, d_model]`` with per-row ``meta``: ``row_id`` (position in the pass's
    generation order), ``seq``, ``pos``, ``token_ids``, and the start ``block_seq``/``block_record``/
    ``block_offset`` of the block that produced it. ``next_block`` says where the following block
    starts, when the producer can restart there. A block read from disk has no ``rows`` tensor but
    ``read_into(dest, lo, hi)``, which reads its rows ``lo:hi`` straight into ``dest``: a uint8 array
    over whole rows, or a ``FileRange`` of the shared buffer's file, so they land in the buffer
    without an intermediate copy."""

    rows: torch.Tensor | None
    meta: dict[str, np.ndarray]
    next_block: tuple[int, int, int] | None = None
    computed: int = 0  # rows the model produced for this block, before any resume filtering
    read_into: Callable[[np.ndarray | FileRange, int, int], None] | None = None

    def __len__(self) -> int:
        return len(self.meta["row_id"])

    def select(self, keep: np.ndarray) -> RowBlock:
        index = torch.from_numpy(np.flatnonzero(keep))
        meta = {k: v[keep] for k, v in self.meta.items()}
        return RowBlock(self.rows.index_select(0, index), meta, self.next_block, self.computed)
