"""Exact resume: what a saved state holds, and how a new generator regenerates exactly what was lost.

Rows of a pass have ids in generation order (``RowBlock.meta["row_id"]``). Contexts are packed and
run through the model in aligned blocks of ``generation_batch_size``; a block can be re-packed from
its start point ``(record, offset)`` without touching earlier data. A state records the frontier
(rows with smaller ids were published before the save), the ids of the rows buffered and unserved,
in the buffer's order, and the start points of their blocks. On restore the generator re-runs only
those blocks, keeps exactly the buffered rows, then streams on from the frontier's block keeping
rows at or past the frontier. Nothing else is recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torchdata.nodes import BaseNode

from actvpipe.generator_node import PlannedNode
from actvpipe.records import ContextBlock, RowBlock
from actvpipe.text import PackedContexts


@dataclass(frozen=True)
class ResumePlan:
    """What the generator emits: rows ``>= frontier`` from ``blocks[-1]`` on, plus ``buffered`` rows
    regenerated from the earlier ``blocks`` (rows ``[m, 3]``: block seq, record, offset; ascending)."""

    frontier: int
    buffered: np.ndarray
    blocks: np.ndarray

    @classmethod
    def fresh(cls) -> ResumePlan:
        return cls(0, np.zeros(0, dtype=np.int64), np.zeros((1, 3), dtype=np.int64))

    @property
    def continue_seq(self) -> int:
        return int(self.blocks[-1, 0])


class PlannedContexts(PlannedNode[ContextBlock]):
    """Re-packs each planned block from its start point, then streams on from the last one."""

    def __init__(self, packer: PackedContexts, plan: ResumePlan):
        super().__init__()
        self.packer = packer
        self.plan = plan

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        self._next_block = 0

    def next(self) -> ContextBlock:
        if self._next_block < len(self.plan.blocks):
            seq, record, offset = (int(v) for v in self.plan.blocks[self._next_block])
            self.packer.reset({"record": record, "offset": offset, "next_seq": seq})
            self._next_block += 1
        return next(self.packer)


class RowFilter(PlannedNode[RowBlock]):
    """Keeps rows at or past the plan's frontier, and the buffered rows being regenerated."""

    def __init__(self, source: BaseNode[RowBlock], plan: ResumePlan):
        super().__init__()
        self.source = source
        self.plan = plan

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        self.source.reset(initial_state)

    def next(self) -> RowBlock:
        block = next(self.source)
        ids = block.meta["row_id"]
        if len(ids) == 0:
            return block
        if block.meta["block_seq"][0] < self.plan.continue_seq:
            block.next_block = None  # a regenerated earlier block: not where streaming continues
        if ids[0] >= self.plan.frontier:
            return block
        keep = ids >= self.plan.frontier
        buffered = self.plan.buffered
        if len(buffered):
            at = np.minimum(np.searchsorted(buffered, ids), len(buffered) - 1)
            keep |= buffered[at] == ids
        return block.select(keep)


def order_slots(slots: np.ndarray, slot_ids: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Arrange regenerated ``slots`` (holding rows ``slot_ids``) in the saved buffer ``order``."""
    if len(order) == 0 and len(slots) == 0:
        return slots
    by_id = np.argsort(slot_ids)
    sorted_ids = slot_ids[by_id]
    at = np.searchsorted(sorted_ids, order)
    if len(order) != len(slots) or not np.array_equal(sorted_ids[np.minimum(at, len(at) - 1)], order):
        raise RuntimeError(
            "load_state_dict: the regenerated rows differ from the saved ones; the dataset or model "
            "changed since the state was saved"
        )
    return slots[by_id[at]]
