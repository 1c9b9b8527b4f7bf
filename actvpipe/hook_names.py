"""TransformerLens / SAELens hook names, mapped to actvpipe's capture points and layers.

``"hook_mlp_out"`` (with ``layers=``) or ``"blocks.3.hook_mlp_out"`` name the same rows as
``capture="mlp_out"``; the trainer integrations look a name up in a row with ``HookIndex``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

# TransformerLens' name within a block -> our capture point (README, "Hook names").
HOOK_POINTS: dict[str, str] = {
    "hook_resid_pre": "resid_pre",
    "hook_attn_out": "attn_out",
    "hook_resid_mid": "resid_mid",
    "ln2.hook_normalized": "mlp_in_normalized",
    "hook_mlp_in": "resid_mid",  # TL hooks the MLP's input before ln2: the residual stream
    "hook_mlp_out": "mlp_out",
    "hook_resid_post": "resid_post",
}
_FULL_NAME = re.compile(r"blocks\.(\d+)\.(.+)")


def hook_name(point: str, layer: int) -> str:
    """TransformerLens' full name of ``point`` at ``layer`` (``blocks.{layer}.hook_...``)."""
    return f"blocks.{layer}.{_short(point)}"


def _split(name: str) -> tuple[str, int | None]:
    """(our capture point, the layer a full name gives or None)."""
    if not isinstance(name, str):
        raise TypeError(f"capture: expected point or hook names (strings), got {name!r}")
    short, layer = _parse(name)
    if short in HOOK_POINTS:
        short = HOOK_POINTS[short]
    elif short.startswith("blocks.") or (layer is not None and short not in HOOK_POINTS.values()):
        raise ValueError(
            f"capture: {name!r} is no hook name actvpipe captures; TransformerLens names it maps: "
            f"{sorted(HOOK_POINTS)} (as 'blocks.{{layer}}.<name>' or with layers=)"
        )
    return short, layer


def _parse(name: str) -> tuple[str, int | None]:
    """(the name within a block, the layer a full name ``blocks.{layer}.…`` gives or None)."""
    match = _FULL_NAME.fullmatch(name)
    return (match.group(2), int(match.group(1))) if match else (name, None)


# (TransformerLens name, model_type) where TL's point is not ours: Gemma 2/3's TL hook_mlp_out is after
# post_feedforward_layernorm, our mlp_out is the MLP's own output.
DIFFERENT_POINTS = {("hook_mlp_out", "gemma2"), ("hook_mlp_out", "gemma3_text")}


def check_hook_names(capture: str | Sequence[str], model_types: Sequence[str]) -> None:
    """Refuse a TransformerLens name whose TL point is not the point we capture on this architecture."""
    names = (capture,) if isinstance(capture, str) else tuple(capture)
    for name in names:
        short, _ = _parse(name)
        for model_type in model_types:
            if (short, model_type) in DIFFERENT_POINTS:
                raise ValueError(
                    f"capture: TransformerLens' {short} on {model_type} is taken after the MLP's "
                    "post_feedforward_layernorm; actvpipe's mlp_out is the MLP's own output, before it. "
                    "Capture 'mlp_out' by our name if that is the point you want (README, 'Hook names')"
                )


def resolve_hook_names(
    capture: str | Sequence[str], layers: Sequence[int] | None
) -> tuple[tuple[str, ...], Sequence[int] | None]:
    """``capture`` as our capture points, and the layers: ``layers`` as given, or the layers full names
    (``blocks.{l}.hook_...``) name. Rows hold every named point at every named layer."""
    names = (capture,) if isinstance(capture, str) else tuple(capture)
    split = [_split(name) for name in names]
    named = [layer for _, layer in split if layer is not None]
    if not named:
        return tuple(point for point, _ in split), layers
    points = tuple(dict.fromkeys(point for point, _ in split))  # a point named at several layers
    if len(named) != len(split):
        raise ValueError(
            f"capture: {list(names)} mixes full hook names (blocks.{{layer}}.…) with names without a "
            "layer; give every name its layer, or none and pass layers="
        )
    from_names = sorted(set(named))
    if layers is not None and sorted(set(layers)) != from_names:
        raise ValueError(
            f"layers: {list(layers)} disagrees with the layers the hook names give ({from_names}); "
            "drop layers= or name the same layers"
        )
    return points, from_names


@dataclass(frozen=True)
class HookIndex:
    """Where a hook name's activations sit in a row ``[(n_models,) k, n_layers, d_model]``."""

    point: int
    layer: int
    model: int | None = None  # the models axis' index; None: rows without one

    @classmethod
    def of(cls, name: str, source: Any, model: int | None = None) -> HookIndex:
        """``name``'s place in the rows of ``source`` (a stream's spec: ``capture``, ``layers``,
        ``row_shape``); ``model`` picks one of several models side by side."""
        capture, layers = list(source.capture), list(source.layers)
        point, layer = _split(name)
        if layer is None:
            if len(layers) != 1:
                raise ValueError(
                    f"hook {name!r}: the rows hold layers {layers}; name one, e.g. "
                    f"'blocks.{layers[0]}.{_short(point)}'"
                )
            layer = layers[0]
        if point not in capture or layer not in layers:
            raise ValueError(
                f"hook {name!r}: not in these rows (capture points {capture}, layers {layers}); "
                "add it to stream(capture=..., layers=...)"
            )
        models = source.row_shape[0] if len(source.row_shape) == 4 else None
        if models == 1 and model is None:
            model = 0
        if models is not None and (model is None or not 0 <= model < models):
            raise ValueError(
                f"hook {name!r}: the rows hold {models} models side by side; pass model= 0..{models - 1}"
            )
        if models is None and model not in (None, 0):
            raise ValueError(f"hook {name!r}: the rows hold one model; drop model=")
        return cls(capture.index(point), layers.index(layer), None if models is None else model)

    def take(self, acts: torch.Tensor) -> torch.Tensor:
        """This hook's ``[batch, d_model]`` columns of a batch of rows."""
        # A copy: a trainer keeping a few batches (norm estimates) keeps this hook, not the whole row.
        if self.model is None:
            return acts[:, self.point, self.layer].contiguous()
        return acts[:, self.model, self.point, self.layer].contiguous()


def _short(point: str) -> str:
    """TransformerLens' name of ``point`` within a block (the point itself where TL has none)."""
    return next((name for name, ours in HOOK_POINTS.items() if ours == point), point)
