"""The base of the nodes of the generator's graph after the packer (plan, capture, filter, file).

A generator never restores from node state: each start builds its graph from a ``ResumePlan``,
derived from the loader's state (its one resume mechanism), so these nodes report no state and
their sources are only ever reset to the start.
"""

from __future__ import annotations

from typing import Any, TypeVar

from torchdata.nodes import BaseNode

T = TypeVar("T")


class PlannedNode(BaseNode[T]):
    """A generator-graph node: reset to the start only, no state of its own (see the module)."""

    def get_state(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        """Release what the node holds open, when a pass is abandoned before its end."""
        return None
