"""The loader's saved state: one versioned schema, and the checks a restore makes against it.

``LoaderState`` is what ``ActivationLoader.state_dict()`` returns (as a plain dict): the schema
version, the fingerprint of the arguments the rows depend on, and the node chain's state as
``torchdata``'s ``Loader`` saves it, each node nesting its child's. The sampler node's part is a
``BufferState``: where the pass stands and which rows the buffer held, by id (never the rows). A
restore turns it into one ``ResumePlan`` per source (``plans``): that is the only way a generator
resumes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torchdata.nodes.loader import LoaderIterator

from actvpipe.resume import ResumePlan

STATE_VERSION = 6
BUFFER_KEY = "buffer"  # the sampler node's state: {"buffer": BufferState fields}
NESTING_KEYS = ("source", "it_state")  # how our nodes and torchdata's Mapper nest their child's state


@dataclass(frozen=True)
class BufferState:
    """The sampler's state: its RNG and pass number, the batches served and rows published per
    source in the pass, and each source's frontier (rows with smaller ids were published), the
    buffered rows' ids in the buffer's order and the start points of the blocks that produced them."""

    rng: dict[str, Any]
    pass_number: int
    batches: int
    published: list[int]
    frontiers: list[int]
    buffered_base: int
    buffered: torch.Tensor  # row id - buffered_base, int32 when that fits
    buffered_source: torch.Tensor  # uint8 source index per buffered row
    blocks: list[torch.Tensor]  # per source [m, 3]: block seq, record, offset (ascending)
    buffered_tokens: str  # ``tokens_digest`` of the buffered rows' token ids, in buffer order
    buffered_published: torch.Tensor | None = None  # with an age bound: each row's publish index

    @classmethod
    def capture(
        cls,
        rng: dict[str, Any],
        pass_number: int,
        batches: int,
        published: list[int],
        frontiers: list[int],
        buffered_meta: dict[str, np.ndarray],
        continuations: list[tuple[int, int, int]],
        published_at: np.ndarray | None = None,
    ) -> BufferState:
        """A few integers per source plus 5 to 9 bytes per buffered row, 8 more with an age bound
        (never the rows)."""
        ids, sources = buffered_meta["row_id"], buffered_meta["source"]
        starts = np.stack([buffered_meta[k] for k in ("block_seq", "block_record", "block_offset")], axis=1)
        blocks = []
        for k, continuation in enumerate(continuations):
            mine = np.concatenate([starts[sources == k], np.array([continuation], dtype=np.int64)])
            blocks.append(torch.from_numpy(np.unique(mine, axis=0)))
        base = int(ids.min()) if len(ids) else 0
        small = len(ids) == 0 or int(ids.max()) - base < 2**31
        return cls(
            rng=rng,
            pass_number=pass_number,
            batches=batches,
            published=[int(p) for p in published],
            frontiers=[int(f) for f in frontiers],
            buffered_base=base,
            buffered=torch.from_numpy((ids - base).astype(np.int32 if small else np.int64)),
            buffered_source=torch.from_numpy(sources.astype(np.uint8)),
            blocks=blocks,
            buffered_tokens=tokens_digest(buffered_meta["token_ids"]),
            buffered_published=None if published_at is None else torch.from_numpy(published_at.copy()),
        )

    def to_dict(self) -> dict[str, Any]:
        return {BUFFER_KEY: {f.name: getattr(self, f.name) for f in fields(self)}}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> BufferState:
        return cls(**state[BUFFER_KEY])

    def published_indices(self) -> np.ndarray | None:
        """The buffered rows' publish indices, in buffer order (None without an age bound)."""
        return None if self.buffered_published is None else self.buffered_published.numpy()

    def plans(self) -> tuple[list[ResumePlan], np.ndarray]:
        """Each source's plan, and the buffered rows' keys (``row_id * n_sources + source``) in
        buffer order."""
        ids = self.buffered.numpy().astype(np.int64) + self.buffered_base
        sources = self.buffered_source.numpy().astype(np.int64)
        n = len(self.frontiers)
        plans = [
            ResumePlan(frontier, np.sort(ids[sources == k]), self.blocks[k].numpy())
            for k, frontier in enumerate(self.frontiers)
        ]
        return plans, ids * n + sources


def tokens_digest(token_ids: np.ndarray) -> str:
    """A hash of rows' token ids in order: a restore checks that the rows it regenerated hold the
    same tokens, not only the same positions (data changed where its fingerprint does not look)."""
    return hashlib.blake2b(
        np.ascontiguousarray(token_ids, dtype=np.int64).tobytes(), digest_size=8
    ).hexdigest()


@dataclass(frozen=True)
class LoaderState:
    """A whole loader's state (see the module)."""

    version: int
    fingerprint: dict[str, Any]
    nodes: dict[str, Any] | None = None  # None: the start of a pass, nothing served

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "fingerprint": self.fingerprint, "nodes": self.nodes}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> LoaderState:
        """Read a saved state; a state of another schema version is refused, naming both versions."""
        version = state.get("version") if isinstance(state, dict) else None
        if version != STATE_VERSION:
            if version is None and isinstance(state, dict) and "root" in state:
                version = state["root"].get("fingerprint", {}).get("state_version")  # versions 1 to 4
            raise ValueError(
                f"load_state_dict: the state has schema version {version!r}, and this actvpipe reads "
                f"version {STATE_VERSION}; restore it with the actvpipe release that saved it, or "
                "start the pass afresh"
            )
        return cls(state["version"], state["fingerprint"], state.get("nodes"))

    def find(self, key: str) -> dict[str, Any]:
        """The state of the node in the chain whose state holds ``key`` (the dict its ``reset``
        receives), found by following each node's nesting of its child's state."""
        state = self.nodes[LoaderIterator.ROOT_KEY]
        while key not in state:
            inner = [state[nesting] for nesting in NESTING_KEYS if nesting in state]
            if not inner:
                raise ValueError(f"load_state_dict: the state holds no {key!r} part; it is damaged")
            state = inner[0]
        return state

    def sampler_state(self) -> dict[str, Any]:
        return self.find(BUFFER_KEY)

    @property
    def buffer(self) -> BufferState:
        return BufferState.from_dict(self.sampler_state())


def check_fingerprint(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """A state restores only into a loader built with the same arguments; say what differs."""
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
