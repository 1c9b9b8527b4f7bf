"""Cross-layer transcoders (curt-tigges' crosslayer-coding): an activation store over a loader.

The store contract that project's trainer reads (``BaseActivationStore``): ``get_batch()`` ->
``(inputs, targets)``, each ``{layer: [batch, d_model]}`` of the same tokens; ``state_dict()`` /
``load_state_dict()`` / ``close()``; iteration; ``mean_tg`` / ``std_tg`` (and ``mean_in`` /
``std_in``) ``{layer: [1, d_model]}`` with which its loss un-normalises predictions and targets.
Inputs are the MLP's residual input (``resid_mid``: its GPT-2 generator hooks ``ln_2``'s input)
and targets the MLP's output (``mlp_out``), as in that project. No import of it is needed.
"""

from __future__ import annotations

import pickle
from typing import Any

import torch

from actvpipe.batches import acts_of
from actvpipe.hook_names import HookIndex
from actvpipe.integrations.feed import Feed
from actvpipe.loader import ActivationLoader


class ActivationStore:
    """``{layer: [batch, d_model]}`` inputs and targets from a loader's rows, endless; layers are keyed
    0..n-1 in the order of the stream's ``layers`` (all of the model's by default).

    With ``.buffer(normalize=...)`` the batches come normalised and ``mean_*`` / ``std_*`` hold the
    per-layer shift and 1/scale, so a trainer configured with ``normalization_method="mean_std"``
    un-normalises as that project's own store expects; without it they are empty.
    """

    def __init__(
        self,
        loader: ActivationLoader,
        inputs: str = "resid_mid",
        targets: str = "mlp_out",
        model: int | None = None,
    ):
        spec = loader.spec
        self.layer_indices = list(range(len(spec.layers)))
        self.d_model = spec.d_model
        self.dtype = spec.dtype
        self.device = loader.batching.device or torch.device("cpu")
        self.train_batch_size_tokens = loader.batch_size
        self.total_tokens: int | None = None  # an endless stream
        self.apply_normalization = loader.buffered.normalize is not None
        self._columns = {
            side: [HookIndex.of(f"blocks.{layer}.{point}", spec, model) for layer in spec.layers]
            for side, point in (("inputs", inputs), ("targets", targets))
        }
        self._feed = Feed(loader, self._split)
        self._statistics: dict[str, dict[int, torch.Tensor]] | None = None

    def _stat(self, name: str) -> dict[int, torch.Tensor]:
        """Per-layer ``[1, d_model]`` shift (``mean_*``) or 1/scale (``std_*``) of the loader's
        normalisation, read when first asked for (starting the loader computes the statistics)."""
        if not self.apply_normalization:
            return {}
        if self._statistics is None:
            self._statistics = {f"{kind}_{side}": {} for kind in ("mean", "std") for side in ("in", "tg")}
            self._read_statistics()
        return self._statistics[name]

    def _read_statistics(self) -> None:
        """Fill the statistics dicts in place (a trainer keeps references to them), from the scale the
        batches were served with (in their dtype)."""
        loader = self._feed.loader
        norm = loader.normalization or loader.start().normalization
        shape, dtype = loader.spec.row_shape, loader.spec.dtype
        values = {
            "mean": norm.shift.to(dtype).expand(*shape)[None],
            "std": 1.0 / norm.scale.to(dtype).float().expand(*shape)[None],
        }
        for kind, value in values.items():
            for side, column in (("in", "inputs"), ("tg", "targets")):
                stats = self._statistics[f"{kind}_{side}"]
                for j, index in enumerate(self._columns[column]):
                    stats[j] = index.take(value).float().to(self.device)

    mean_in = property(lambda self: self._stat("mean_in"))
    std_in = property(lambda self: self._stat("std_in"))
    mean_tg = property(lambda self: self._stat("mean_tg"))
    std_tg = property(lambda self: self._stat("std_tg"))

    def _split(self, batch) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        acts = acts_of(batch)
        inputs, targets = (
            {j: i.take(acts) for j, i in enumerate(self._columns[s])} for s in ("inputs", "targets")
        )
        return inputs, targets

    def get_batch(self) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        return next(self._feed)

    def __iter__(self) -> ActivationStore:
        return self

    def __next__(self) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        return self.get_batch()

    def state_dict(self) -> dict[str, Any]:
        """The loader's state as one byte tensor: crosslayer-coding saves it with ``torch.save`` and
        loads it with ``torch.load(map_location=device)`` (``weights_only`` by default)."""
        state = pickle.dumps(self._feed.state_dict())
        return {"store_type": "actvpipe", "loader": torch.frombuffer(bytearray(state), dtype=torch.uint8)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("store_type") != "actvpipe":
            raise ValueError(
                f"state: saved by a {state_dict.get('store_type')!r} store, not by actvpipe's ActivationStore"
            )
        self._feed.load_state_dict(pickle.loads(state_dict["loader"].cpu().numpy().tobytes()))
        if self._statistics is not None:
            self._read_statistics()  # the restored run's normalisation

    def close(self) -> None:
        self._feed.close()
