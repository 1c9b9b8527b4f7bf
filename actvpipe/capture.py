"""Activation capture: which modules to hook per architecture, and hooks that turn a forward into rows."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torchdata.nodes import BaseNode

from actvpipe.placement import Placement
from actvpipe.text import ContextBlock

# model_type -> (module whose input is the row's mlp_in, the MLP whose output is mlp_out), relative to
# model.base_model, with {i} the layer index.
CAPTURE_MODULES: dict[str, tuple[str, str]] = {
    "gpt2": ("h.{i}.ln_2", "h.{i}.mlp"),
    "gpt_neox": ("layers.{i}.post_attention_layernorm", "layers.{i}.mlp"),
    "llama": ("layers.{i}.post_attention_layernorm", "layers.{i}.mlp"),
    "mistral": ("layers.{i}.post_attention_layernorm", "layers.{i}.mlp"),
    "qwen2": ("layers.{i}.post_attention_layernorm", "layers.{i}.mlp"),
    "gemma": ("layers.{i}.post_attention_layernorm", "layers.{i}.mlp"),
}


def capture_modules(model_type: str) -> tuple[str, str]:
    """The (mlp_in, mlp_out) module templates for ``model_type``, or a clear error."""
    try:
        return CAPTURE_MODULES[model_type]
    except KeyError:
        raise ValueError(
            f"model: architecture {model_type!r} is not supported yet; supported: {sorted(CAPTURE_MODULES)}"
        ) from None


@dataclass(frozen=True)
class FileRange:
    """Where rows go when copied file to file: an open descriptor and the byte offset in it."""

    fd: int
    offset: int


@dataclass
class RowBlock:
    """Rows ``[n, 2, n_layers, d_model]`` with per-row ``meta``: ``row_id`` (position in the pass's
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


class _StopForward(Exception):
    """Raised by the last capture hook so the forward skips later blocks and the LM head."""


class ActivationCapture:
    """Pure capture: hooks on one model that write a forward's rows into a preallocated staging tensor."""

    def __init__(self, model: nn.Module, layers: Sequence[int], first_pos: int):
        self.model = model
        self.layers = list(layers)
        self.first_pos = first_pos
        in_tpl, out_tpl = capture_modules(model.config.model_type)
        base = model.base_model
        self._handles = []
        for j, layer in enumerate(self.layers):
            mlp_in = base.get_submodule(in_tpl.format(i=layer))
            mlp_out = base.get_submodule(out_tpl.format(i=layer))
            self._handles.append(mlp_in.register_forward_pre_hook(self._saver(0, j, stop=False)))
            last = j == len(self.layers) - 1
            self._handles.append(mlp_out.register_forward_hook(self._saver(1, j, stop=last)))
        self._stage: torch.Tensor | None = None

    def _saver(self, side: int, j: int, stop: bool):
        def save(x: torch.Tensor) -> None:
            self._stage[:, :, side, j, :] = x[:, self.first_pos :, :]
            if stop:
                raise _StopForward

        if side == 0:
            return lambda module, args: save(args[0])
        return lambda module, args, output: save(output)

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Rows ``[batch * (ctx - first_pos), 2, n_layers, d_model]`` for contexts ``tokens [batch, ctx]``.

        The result is a view of a staging tensor reused by the next call: copy it out first.
        """
        batch, ctx = tokens.shape
        d_model = self.model.config.get_text_config().hidden_size
        shape = (batch, ctx - self.first_pos, 2, len(self.layers), d_model)
        dtype = next(self.model.parameters()).dtype
        if self._stage is None or self._stage.shape != shape or self._stage.device != tokens.device:
            self._stage = torch.empty(shape, dtype=dtype, device=tokens.device)
        with contextlib.suppress(_StopForward):
            self.model(input_ids=tokens, use_cache=False)
        return self._stage.view(-1, 2, len(self.layers), d_model)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@dataclass
class _InFlight:
    """A block whose rows are being copied to the host; ``done`` (a CUDA event) says when they are."""

    rows: torch.Tensor
    block: ContextBlock
    contexts_state: dict
    done: Any = None


class CaptureNode(BaseNode[RowBlock]):
    """Runs the model over each block of contexts and yields its rows with their provenance.

    On a GPU, rows go to the host through two alternating pinned buffers with non-blocking copies:
    the next block's forward is queued before the previous block's copy is waited for, so copies
    overlap compute and nothing synchronises per layer. The state is that of the contexts behind
    the last block returned, whatever is in flight.
    """

    def __init__(
        self,
        contexts: BaseNode[ContextBlock],
        capture: ActivationCapture,
        out_dtype: torch.dtype,
        placement: Placement,
    ):
        super().__init__()
        self.contexts = contexts
        self.capture = capture
        self.out_dtype = out_dtype
        self.placement = placement
        self._pinned: dict[int, torch.Tensor] = {}
        self._turn = 0

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        self.contexts.reset(initial_state)
        self._in_flight: _InFlight | None = None
        self._state = self.contexts.state_dict()

    def _launch(self) -> _InFlight:
        block = next(self.contexts)
        state = self.contexts.state_dict()
        device = self.placement.update()
        tokens = torch.from_numpy(block.tokens).to(device)
        rows = self.capture(tokens)
        if device.type != "cuda":
            return _InFlight(rows.to(self.out_dtype), block, state)
        self._turn ^= 1  # the other buffer holds the block returned last, still being consumed
        host = self._pinned.get(self._turn)
        if host is None or host.shape != rows.shape:
            host = self._pinned[self._turn] = torch.empty(rows.shape, dtype=self.out_dtype, pin_memory=True)
        host.copy_(rows.to(self.out_dtype), non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return _InFlight(host, block, state, done)

    def next(self) -> RowBlock:
        current = self._in_flight or self._launch()
        self._in_flight = None
        if current.done is not None:
            with contextlib.suppress(StopIteration):
                self._in_flight = self._launch()  # queue the next forward before waiting
            current.done.synchronize()
        self._state = current.contexts_state
        block, rows = current.block, current.rows
        next_block = (block.first_seq + len(block.tokens), *block.next_start)
        return RowBlock(rows, row_provenance(block, self.capture.first_pos), next_block, computed=len(rows))

    def get_state(self) -> dict[str, Any]:
        return self._state


def row_provenance(block: ContextBlock, first_pos: int) -> dict[str, np.ndarray]:
    """Per-row meta (see ``RowBlock``), in the order capture emits rows."""
    n, ctx = block.tokens.shape
    per_context = ctx - first_pos
    first_row = block.first_seq * per_context
    rows = n * per_context
    return {
        "row_id": np.arange(first_row, first_row + rows, dtype=np.int64),
        "seq": np.repeat(np.arange(block.first_seq, block.first_seq + n, dtype=np.int64), per_context),
        "pos": np.tile(np.arange(first_pos, ctx, dtype=np.int64), n),
        "token_ids": block.tokens[:, first_pos:].reshape(-1),
        "block_seq": np.full(rows, block.first_seq, dtype=np.int64),
        "block_record": np.full(rows, block.start[0], dtype=np.int64),
        "block_offset": np.full(rows, block.start[1], dtype=np.int64),
    }
