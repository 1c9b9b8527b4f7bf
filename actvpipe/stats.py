"""Normalisation statistics: streaming per-layer, per-side mean, std and mean norm (Welford, merged per
block), and the normalisations they define, applied to batches when serving."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

NORMALIZATIONS = ("sqrt_d", "standardize")
STATS_ROWS = 100_000  # rows statistics are computed over, unless told otherwise
PIECE_BYTES = 64 << 20  # the largest float64 temporary of a statistics update


class Welford:
    """Running mean and sum of squared deviations per element of ``[k, n_layers, d_model]``, in float64.

    Blocks are merged with Chan et al.'s pairwise update, which is exact and stable for any block sizes.
    """

    def __init__(self) -> None:
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None
        self.norm_sum: torch.Tensor | None = None

    def update(self, rows: torch.Tensor) -> None:
        """Add rows ``[n, k, n_layers, d_model]``, in pieces of at most ``PIECE_BYTES`` in float64: a
        whole block of GPT-2-small rows would otherwise take several GB per temporary."""
        per_row = max(1, rows[0].numel() * 8) if len(rows) else 1
        step = max(1, PIECE_BYTES // per_row)
        for lo in range(0, len(rows), step):
            self._update(rows[lo : lo + step])

    def _update(self, rows: torch.Tensor) -> None:
        rows = rows.to(torch.float64)
        n = len(rows)
        mean = rows.mean(0)
        m2 = ((rows - mean) ** 2).sum(0)
        norm_sum = rows.norm(dim=-1).sum(0)
        if self.n == 0:
            self.n, self.mean, self.m2, self.norm_sum = n, mean, m2, norm_sum
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.n * n / total)
        self.norm_sum = self.norm_sum + norm_sum
        self.n = total

    def result(self) -> ActivationStats:
        if self.n == 0:
            raise ValueError("stats: no rows to compute statistics from")
        return ActivationStats(
            rows=self.n,
            mean=self.mean.float(),
            std=(self.m2 / self.n).sqrt().float(),
            mean_norm=(self.norm_sum / self.n).float(),
        )


@dataclass(frozen=True)
class ActivationStats:
    """Statistics of ``rows`` rows: ``mean`` and ``std`` (population) ``[k, n_layers, d_model]``, and
    ``mean_norm`` ``[k, n_layers]``, the mean L2 norm of a row's vector at each capture point and layer."""

    rows: int
    mean: torch.Tensor
    std: torch.Tensor
    mean_norm: torch.Tensor

    def to_dict(self) -> dict:
        return {
            "rows": self.rows,
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "mean_norm": self.mean_norm.tolist(),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict) -> ActivationStats:
        tensors = {k: torch.tensor(data[k], dtype=torch.float32) for k in ("mean", "std", "mean_norm")}
        return cls(rows=int(data["rows"]), **tensors)

    @classmethod
    def from_json(cls, text: str) -> ActivationStats:
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True)
class Normalization:
    """``x -> (x - shift) * scale``, broadcast over ``[batch, k, n_layers, d_model]``.

    ``sqrt_d`` scales each capture point and layer so its mean norm is ``sqrt(d_model)`` (no shift);
    ``standardize`` subtracts the mean and divides by the std per element. A trained dictionary folds
    the factors back into its weights: decoder rows divided by ``scale``, biases shifted by ``shift``.
    """

    kind: str
    shift: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def from_stats(cls, kind: str, stats: ActivationStats) -> Normalization:
        if kind == "sqrt_d":
            d_model = stats.mean.shape[-1]
            scale = (math.sqrt(d_model) / stats.mean_norm.clamp_min(1e-12))[..., None]
            return cls(kind, torch.zeros_like(scale), scale)
        if kind == "standardize":
            return cls(kind, stats.mean, 1.0 / stats.std.clamp_min(1e-6))
        raise ValueError(f"normalize: expected one of {NORMALIZATIONS} or None, got {kind!r}")

    def apply_(self, acts: torch.Tensor) -> torch.Tensor:
        """Normalise ``acts`` in place (in its own dtype) and return it."""
        return acts.sub_(self.shift.to(acts.dtype)).mul_(self.scale.to(acts.dtype))

    def to_state(self) -> dict:
        return {"kind": self.kind, "shift": self.shift.clone(), "scale": self.scale.clone()}

    @classmethod
    def from_state(cls, state: dict) -> Normalization:
        return cls(state["kind"], state["shift"], state["scale"])
