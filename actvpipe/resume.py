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
from typing import Any

import numpy as np
import torch
from torchdata.nodes import BaseNode

from actvpipe.records import ContextBlock, RowBlock
from actvpipe.text import PackedContexts

STATE_VERSION = 4


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


class PlannedContexts(BaseNode[ContextBlock]):
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

    def get_state(self) -> dict[str, Any]:
        # Before the first planned block the packer has no position yet: asking it for one would
        # make it open the data at the start, and reach the first block by reading up to it.
        packer = self.packer.state_dict() if self._next_block else None
        return {"next_block": self._next_block, "packer": packer}


class RowFilter(BaseNode[RowBlock]):
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

    def get_state(self) -> dict[str, Any]:
        return self.source.state_dict()


def make_state(
    fingerprint: dict[str, Any],
    frontiers: list[int],
    buffered_meta: dict[str, np.ndarray],
    continuations: list[tuple[int, int, int]],
    sampler: dict[str, Any],
) -> dict[str, Any]:
    """The saved state: a few integers per source plus 5 to 9 bytes per buffered row (never the rows)."""
    ids, sources = buffered_meta["row_id"], buffered_meta["source"]
    all_blocks = np.stack([buffered_meta[k] for k in ("block_seq", "block_record", "block_offset")], axis=1)
    blocks = []
    for k, continuation in enumerate(continuations):
        mine = np.concatenate([all_blocks[sources == k], np.array([continuation], dtype=np.int64)])
        blocks.append(torch.from_numpy(np.unique(mine, axis=0)))
    base = int(ids.min()) if len(ids) else 0
    small = len(ids) == 0 or int(ids.max()) - base < 2**31
    return {
        "fingerprint": {**fingerprint, "state_version": STATE_VERSION},
        "frontiers": [int(f) for f in frontiers],
        "buffered_base": base,
        "buffered": torch.from_numpy((ids - base).astype(np.int32 if small else np.int64)),
        "buffered_source": torch.from_numpy(sources.astype(np.uint8)),
        "blocks": blocks,
        **sampler,
    }


def plans_from_state(state: dict[str, Any]) -> tuple[list[ResumePlan], np.ndarray]:
    """Each source's plan, and the buffered rows' keys (``row_id * n_sources + source``) in buffer order."""
    ids = state["buffered"].numpy().astype(np.int64) + state["buffered_base"]
    sources = state["buffered_source"].numpy().astype(np.int64)
    n = len(state["frontiers"])
    plans = [
        ResumePlan(frontier, np.sort(ids[sources == k]), state["blocks"][k].numpy())
        for k, frontier in enumerate(state["frontiers"])
    ]
    return plans, ids * n + sources


def check_fingerprint(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """A state restores only into a loader built with the same arguments; say what differs."""
    saved = {"state_version": saved.get("state_version"), **saved}
    current = {"state_version": STATE_VERSION, **current}
    diffs = _differences(saved, current, "")
    if diffs:
        raise ValueError(
            "load_state_dict: the state was saved by a loader with different arguments; build the loader "
            "with the saved values to restore it:\n  " + "\n  ".join(diffs)
        )


def _differences(saved: dict[str, Any], current: dict[str, Any], prefix: str) -> list[str]:
    """One line per differing key; nested dicts (file digests) name the entry that differs."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}[")
        elif a != b:
            name = f"{prefix}{key!r}]" if prefix.endswith("[") else key
            out.append(f"{name}: saved {a!r}, now {b!r}")
    return out


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
