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

from actvpipe.generator_node import PlannedNode
from actvpipe.outputs import OutputPool
from actvpipe.placement import Placement
from actvpipe.records import ContextBlock, RowBlock

# Capture points in the order a forward reaches them within one transformer block.
CAPTURE_POINTS: dict[str, str] = {
    "resid_pre": "input of the transformer block",
    "attn_out": "output of the attention sublayer as added to the residual stream (after the "
    "post-attention norm where the architecture has one)",
    "resid_mid": "input of the layer norm feeding the MLP (the block input with parallel residual)",
    "mlp_in_normalized": "resid_mid normalised by that layer norm before its weight and bias "
    "(TransformerLens' ln2.hook_normalized)",
    "mlp_in": "input of the MLP module, after that layer norm",
    "mlp_out": "output of the MLP module",
    "resid_post": "output of the transformer block",
}
DEFAULT_CAPTURE = ("resid_mid", "mlp_out")

# model_type -> (the layer norm feeding the MLP, the MLP, the module whose output is the attention
# sublayer's contribution to the residual stream), relative to model.base_model, {i} the layer. The
# block is the MLP's parent module.
CAPTURE_MODULES: dict[str, tuple[str, str, str]] = {
    "gpt2": ("h.{i}.ln_2", "h.{i}.mlp", "h.{i}.attn"),
    "gpt_neox": ("layers.{i}.post_attention_layernorm", "layers.{i}.mlp", "layers.{i}.attention"),
    "llama": ("layers.{i}.post_attention_layernorm", "layers.{i}.mlp", "layers.{i}.self_attn"),
    "mistral": ("layers.{i}.post_attention_layernorm", "layers.{i}.mlp", "layers.{i}.self_attn"),
    "qwen2": ("layers.{i}.post_attention_layernorm", "layers.{i}.mlp", "layers.{i}.self_attn"),
    "gemma": ("layers.{i}.post_attention_layernorm", "layers.{i}.mlp", "layers.{i}.self_attn"),
    "gemma2": (
        "layers.{i}.pre_feedforward_layernorm",
        "layers.{i}.mlp",
        "layers.{i}.post_attention_layernorm",
    ),
    "gemma3_text": (
        "layers.{i}.pre_feedforward_layernorm",
        "layers.{i}.mlp",
        "layers.{i}.post_attention_layernorm",
    ),
}


def check_capture(capture: Sequence[str]) -> tuple[str, ...]:
    """One or more distinct capture points; the row's capture axis follows their order."""
    capture = tuple(capture) if not isinstance(capture, str) else (capture,)
    bad = [c for c in capture if c not in CAPTURE_POINTS]
    if not capture or bad or len(set(capture)) != len(capture):
        raise ValueError(
            f"capture: expected one or more distinct points of {list(CAPTURE_POINTS)} (or TransformerLens "
            f"hook names: README, 'Hook names'), got {capture!r}; the default is {DEFAULT_CAPTURE}"
        )
    return capture


def describe_capture(capture: Sequence[str]) -> str:
    """The definition of a list of capture points, as recorded in HDF5 files."""
    return "; ".join(f"{point}: {CAPTURE_POINTS[point]}" for point in capture)


def capture_points(description: str) -> list[str]:
    """The capture points named in a description written by ``describe_capture``."""
    return [part.split(":", 1)[0] for part in description.split("; ")]


def capture_modules(model_type: str, modules: Sequence[str] | None = None) -> tuple[str, ...]:
    """The (norm feeding the MLP, MLP[, attention output]) path templates: ``modules`` when given,
    else the table's."""
    if modules is not None:
        if (
            isinstance(modules, str)
            or len(modules) not in (2, 3)
            or not all(isinstance(m, str) and "{i}" in m for m in modules)
        ):
            raise ValueError(
                "modules: expected two or three path templates with {i}, (norm feeding the MLP, MLP"
                f"[, attention output]), e.g. {OVERRIDE_EXAMPLE!r}; got {modules!r}"
            )
        return tuple(modules)
    try:
        return CAPTURE_MODULES[model_type]
    except KeyError:
        raise ValueError(
            f"model: architecture {model_type!r} has no capture table entry (known: "
            f"{sorted(CAPTURE_MODULES)}); name its modules with modules={OVERRIDE_EXAMPLE!r}"
        ) from None


OVERRIDE_EXAMPLE = (
    "model.layers.{i}.post_attention_layernorm",
    "model.layers.{i}.mlp",
    "model.layers.{i}.self_attn",
)


def find_module(model: nn.Module, template: str, i: int) -> nn.Module:
    """The module at ``template`` for layer ``i``, relative to the base model or to the full model."""
    path = template.format(i=i)
    base = getattr(model, "base_model", model)
    prefix = getattr(model, "base_model_prefix", "")
    candidates = [(base, path), (model, path)]
    if prefix and path.startswith(prefix + "."):
        candidates.append((base, path[len(prefix) + 1 :]))
    for root, candidate in candidates:
        try:
            return root.get_submodule(candidate)
        except AttributeError:
            continue
    raise ValueError(
        f"modules: {path!r} is not a module of this {type(model).__name__}; pass "
        f"modules=(norm, mlp) templates such as {OVERRIDE_EXAMPLE!r}"
    )


class _StopForward(Exception):
    """Raised by the last capture hook so the forward skips later blocks and the LM head."""


class ActivationCapture:
    """Pure capture: hooks on one model that write a forward's rows into a preallocated staging tensor.

    The forward stops (``_StopForward``) right after the last needed hook, skipping later blocks.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[int],
        first_pos: int,
        capture: Sequence[str] = DEFAULT_CAPTURE,
        modules: Sequence[str] | None = None,
    ):
        self.model = model
        self.layers = list(layers)
        self.first_pos = first_pos
        self.capture = check_capture(capture)
        templates = capture_modules(model.config.model_type, modules)
        if "attn_out" in self.capture and len(templates) < 3:
            raise ValueError(
                "modules: capturing attn_out needs a third template, the module whose output is the "
                f"attention sublayer's contribution to the residual stream, e.g. {OVERRIDE_EXAMPLE!r}"
            )
        order = list(CAPTURE_POINTS)
        last_point = max(self.capture, key=order.index)
        self._handles = []
        for j, layer in enumerate(self.layers):
            norm, mlp, *attn = (find_module(model, t, layer) for t in templates)
            block = find_module(model, templates[1].rsplit(".", 1)[0], layer)
            inputs = {"resid_pre": block, "resid_mid": norm, "mlp_in_normalized": norm, "mlp_in": mlp}
            outputs = {"mlp_out": mlp, "resid_post": block, "attn_out": attn[0] if attn else None}
            # Registered in forward order: two points on one module (resid_mid, mlp_in_normalized) run
            # their hooks in that order, so the stop comes after both.
            for point_index, point in sorted(enumerate(self.capture), key=lambda p: order.index(p[1])):
                stop = j == len(self.layers) - 1 and point == last_point
                save = self._saver(point_index, j, stop)
                if point == "mlp_in_normalized":
                    save = _normalizing(norm, save)
                if point in inputs:
                    hook = inputs[point].register_forward_pre_hook(_input_hook(save), with_kwargs=True)
                else:
                    hook = outputs[point].register_forward_hook(_output_hook(save))
                self._handles.append(hook)
        self._stages: OutputPool | None = None
        self._target: torch.Tensor | None = None

    def _saver(self, point_index: int, j: int, stop: bool) -> Callable[[torch.Tensor], None]:
        def save(x: torch.Tensor) -> None:
            if self._target is None:  # the model runs for something else (another capture on it)
                return
            self._target[:, :, point_index, j, :] = x[:, self.first_pos :, :]
            if stop:
                raise _StopForward

        return save

    def stage_shape(self, tokens: torch.Tensor) -> tuple[int, ...]:
        """``[batch, ctx - first_pos, k, n_layers, d_model]`` for contexts ``tokens [batch, ctx]``."""
        batch, ctx = tokens.shape
        d_model = self.model.config.get_text_config().hidden_size
        return (batch, ctx - self.first_pos, len(self.capture), len(self.layers), d_model)

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``[batch * (ctx - first_pos), k, n_layers, d_model]`` (k capture points) for contexts
        ``tokens [batch, ctx]``, or written into ``into`` (a view shaped as ``stage_shape``).

        The result is a view of a pooled staging tensor, written again only once nothing references it.
        """
        shape = self.stage_shape(tokens)
        if into is None:
            self._stages = staging(self._stages, shape, self.model, tokens.device)
            into = self._stages.take(shape[0])
        self._target = into
        try:
            with contextlib.suppress(_StopForward):
                self.model(input_ids=tokens, use_cache=False)
        finally:
            self._target = None  # held here, it would keep the pool from reusing the tensor
        return into.view(-1, *shape[2:]) if into.is_contiguous() else into

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def staging(pool: OutputPool | None, shape: tuple[int, ...], model: nn.Module, device) -> OutputPool:
    """``pool`` when its tensors hold ``shape``, else a new pool of staging tensors in the model's
    dtype. A pool, not one tensor: the rows of a block still being written out (to the buffer, to a
    write-through file) are never overwritten by the next forward."""
    fits = pool is not None and pool.shape[1:] == shape[1:] and pool.shape[0] >= shape[0]
    if fits and pool.device == device:
        return pool
    return OutputPool(shape, next(model.parameters()).dtype, device=device)


class MultiModelCapture:
    """Several models' captures on the same contexts, each writing its rows straight into its slot of
    one staging tensor: rows ``[batch * (ctx - first_pos), n_models, k, n_layers, d_model]``, so every
    row holds all models at the same token and the rest of the pipeline sees one row."""

    def __init__(self, captures: Sequence[ActivationCapture]):
        self.captures = list(captures)
        self.first_pos = self.captures[0].first_pos
        self._stages: OutputPool | None = None

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, positions, *row = self.captures[0].stage_shape(tokens)
        shape = (batch, positions, len(self.captures), *row)
        self._stages = staging(self._stages, shape, self.captures[0].model, tokens.device)
        stage = self._stages.take(batch)
        for m, capture in enumerate(self.captures):
            capture(tokens, into=stage[:, :, m])
        return stage.view(-1, *shape[2:])

    def remove(self) -> None:
        for capture in self.captures:
            capture.remove()


def _normalizing(norm: nn.Module, save: Callable[[torch.Tensor], None]) -> Callable[[torch.Tensor], None]:
    """``save`` of what ``norm`` computes before its weight and bias: a LayerNorm centres and scales,
    an RMSNorm scales (in float32, as the Hugging Face RMSNorms do)."""
    eps = getattr(norm, "eps", getattr(norm, "variance_epsilon", None))
    if isinstance(norm, nn.LayerNorm) and eps is not None:
        return lambda x: save(nn.functional.layer_norm(x, x.shape[-1:], eps=eps))
    if "RMSNorm" in type(norm).__name__ and eps is not None:
        return lambda x: save(x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps))
    raise ValueError(
        f"capture: mlp_in_normalized needs the norm feeding the MLP to be a LayerNorm or an RMSNorm with "
        f"an eps; this model's is a {type(norm).__name__}. Capture resid_mid and normalise it yourself"
    )


def _input_hook(save: Callable[[torch.Tensor], None]):
    def hook(module, args, kwargs):
        save(args[0] if args else kwargs["hidden_states"])

    return hook


def _output_hook(save: Callable[[torch.Tensor], None]):
    def hook(module, args, output):
        save(output[0] if isinstance(output, tuple) else output)

    return hook


@dataclass
class _InFlight:
    """A block whose rows are being copied to the host; ``done`` (a CUDA event) says when they are."""

    rows: torch.Tensor
    block: ContextBlock
    done: Any = None


class CaptureNode(PlannedNode[RowBlock]):
    """Runs the model over each block of contexts and yields its rows with their provenance.

    On a GPU, rows go to the host through pinned buffers with non-blocking copies: the next block's
    forward is queued before the previous block's copy is waited for, so copies overlap compute and
    nothing synchronises per layer. Each block gets its own pinned tensor from torch's pinned-memory
    cache, which recycles one only once its copy is done and nothing references it, so a block held
    downstream (being written to the buffer or a file) is never overwritten.
    """

    def __init__(
        self,
        contexts: BaseNode[ContextBlock],
        capture: ActivationCapture | MultiModelCapture,
        out_dtype: torch.dtype,
        placement: Placement,
        exclude_tokens: Sequence[int] = (),
    ):
        super().__init__()
        self.contexts = contexts
        self.exclude_tokens = np.asarray(exclude_tokens, dtype=np.int64)
        self.capture = capture
        self.out_dtype = out_dtype
        self.placement = placement

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        self.contexts.reset(initial_state)
        self._in_flight: _InFlight | None = None

    def _launch(self) -> _InFlight:
        block = next(self.contexts)
        device = self.placement.update()
        tokens = torch.from_numpy(block.tokens).to(device)
        rows = self.capture(tokens)
        if device.type != "cuda":
            return _InFlight(rows.to(self.out_dtype), block)
        host = torch.empty(rows.shape, dtype=self.out_dtype, pin_memory=True)
        host.copy_(rows.to(self.out_dtype), non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return _InFlight(host, block, done)

    def next(self) -> RowBlock:
        current = self._in_flight or self._launch()
        self._in_flight = None
        if current.done is not None:
            with contextlib.suppress(StopIteration):
                self._in_flight = self._launch()  # queue the next forward before waiting
            current.done.synchronize()
        block, rows = current.block, current.rows
        next_block = (block.next_seq, *block.next_start)
        meta = row_provenance(block, self.capture.first_pos)
        out = RowBlock(rows, meta, next_block, computed=len(rows))
        keep = kept_rows(meta, block, self.exclude_tokens)
        return out if keep is None else out.select(keep)


def kept_rows(meta: dict[str, np.ndarray], block: ContextBlock, exclude: np.ndarray) -> np.ndarray | None:
    """Which rows survive the token filters (excluded ids, padding), or None when all do."""
    keep = np.ones(len(meta["row_id"]), dtype=bool)
    if len(exclude):
        keep &= ~np.isin(meta["token_ids"], exclude)
    if block.lengths is not None:
        keep &= meta["pos"] < block.lengths[meta["seq"] - block.first_seq]
    return None if keep.all() else keep


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
