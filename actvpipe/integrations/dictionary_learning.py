"""dictionary_learning (``pip install actvpipe[dictionary_learning]``): ``trainSAE(data, ...)`` fed by
a loader, in place of its ``ActivationBuffer``.

    data = dictionary_learning.activations(loader, "blocks.2.hook_mlp_out")
    trainSAE(data, trainer_configs, steps=...)

``pair=(in_hook, out_hook)`` yields ``[batch, 2, d_model]`` in/out pairs, as its ``io="in_and_out"``
buffer does for transcoders.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from actvpipe.batches import acts_of
from actvpipe.hook_names import HookIndex
from actvpipe.integrations.feed import Feed, hook_feed
from actvpipe.loader import ActivationLoader


class Activations(Feed[torch.Tensor]):
    """An endless feed with the ``config`` dict trainSAE saves beside a run (as ``ActivationBuffer``'s).

    Like ``ActivationBuffer``, iterating it again continues where it stopped: the ~100 batches trainSAE
    draws for its norm factor are not trained on again.
    """

    config: dict


def activations(
    loader: ActivationLoader,
    hook: str | None = None,
    *,
    pair: Sequence[str] | None = None,
    model: int | None = None,
) -> Activations:
    """``[batch, d_model]`` rows of ``hook``, or ``[batch, 2, d_model]`` rows of ``pair=(in, out)``
    (TransformerLens names or ours, e.g. ``("blocks.2.hook_resid_mid", "blocks.2.hook_mlp_out")``)."""
    if (hook is None) == (pair is None):
        raise ValueError("activations: pass one hook, or pair=(input hook, output hook) for transcoders")
    if hook is not None:
        feed = Activations(loader, hook_feed(loader, hook, model).convert)
    else:
        if isinstance(pair, str) or len(pair) != 2:
            raise ValueError(f"pair: expected (input hook, output hook), got {pair!r}")
        ins, outs = (HookIndex.of(name, loader.spec, model) for name in pair)
        feed = Activations(
            loader, lambda batch: torch.stack([ins.take(acts_of(batch)), outs.take(acts_of(batch))], 1)
        )
    feed.config = {
        "source": "actvpipe",
        "hooks": [hook] if hook is not None else list(pair),
        "io": "out" if hook is not None else "in_and_out",
        "d_submodule": loader.spec.d_model,
        "out_batch_size": loader.batch_size,
        "buffer_rows": loader.buffer_size,
    }
    return feed
