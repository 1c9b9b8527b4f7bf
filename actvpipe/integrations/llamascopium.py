"""Llamascopium (formerly lm-saes; ``pip install actvpipe[llamascopium]``): the activation stream its
``Trainer.fit(sae, activation_stream)`` and ``Initializer`` read, from a loader.

    stream = llamascopium.activation_stream(loader, ["blocks.3.hook_resid_post"])
    sae = Initializer(init_cfg).initialize_sae_from_config(sae_cfg, activation_stream=stream)
    Trainer(trainer_cfg).fit(sae, stream)

The loader must be built with ``.batch(b, with_tokens=True)``: ``tokens`` comes from each row's
provenance. Every row is a real token, so ``mask`` is all ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from actvpipe.batches import TokenBatch
from actvpipe.hook_names import HookIndex
from actvpipe.integrations.feed import Feed
from actvpipe.loader import ActivationLoader


def activation_stream(
    loader: ActivationLoader, hook_points: Sequence[str], model: int | None = None
) -> Feed[dict[str, torch.Tensor]]:
    """Dicts ``{hook_point: [batch, d_model], "tokens": [batch], "mask": [batch]}``, endless. Like
    Llamascopium's own streams, its ``iter()`` continues: the batches its initializer and trainer
    draw to size the run and estimate norms come from this stream, once each."""
    if not loader.batching.with_tokens:
        raise ValueError(
            "activation_stream: Llamascopium reads each row's token; build the loader with "
            ".batch(b, with_tokens=True)"
        )
    if isinstance(hook_points, str):
        hook_points = [hook_points]
    indices = {name: HookIndex.of(name, loader.spec, model) for name in hook_points}

    def convert(batch: TokenBatch) -> dict[str, torch.Tensor]:
        out = {name: index.take(batch.acts) for name, index in indices.items()}
        return {
            **out,
            "tokens": batch.token_ids,
            "mask": torch.ones(len(batch), dtype=batch.acts.dtype, device=batch.acts.device),
        }

    return Feed(loader, convert)
