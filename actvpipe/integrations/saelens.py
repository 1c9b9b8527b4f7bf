"""SAELens (``pip install actvpipe[saelens]``): ``SAETrainer`` / ``MultiSAETrainer`` fed by a loader,
the loader's state saved in every SAELens checkpoint and restored with the run.

    loader = actvpipe.stream(model, data, capture="blocks.3.hook_resid_post").buffer(...).batch(4096)
    provider = saelens.data_provider(loader, "blocks.3.hook_resid_post")
    trainer = SAETrainer(cfg, sae, provider, save_checkpoint_fn=saelens.save_checkpoint_fn(provider))
    # after a crash, before trainer.fit():  saelens.resume(trainer, provider, checkpoint_dir)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from actvpipe.batches import acts_of
from actvpipe.hook_names import HookIndex
from actvpipe.integrations.feed import Feed, hook_feed
from actvpipe.loader import ActivationLoader

STATE_FILE = "actvpipe_loader_state.pt"


def data_provider(loader: ActivationLoader, hook_name: str, model: int | None = None) -> Feed[torch.Tensor]:
    """``SAETrainer``'s ``data_provider``: ``[batch, d_model]`` tensors of ``hook_name`` (a
    TransformerLens name such as ``"blocks.3.hook_resid_post"``, or ours), endless. SAELens counts
    samples by its configured batch size: build the loader with ``.batch(b, drop_last=True)``."""
    return hook_feed(loader, hook_name, model)


def multi_hook_data_provider(
    loader: ActivationLoader, hook_names: Sequence[str], model: int | None = None
) -> Feed[dict[str, torch.Tensor]]:
    """``MultiSAETrainer``'s ``data_provider``: dicts ``{hook_name: [batch, d_model]}``, every hook
    at the same tokens."""
    indices = {name: HookIndex.of(name, loader.spec, model) for name in hook_names}
    return Feed(loader, lambda batch: {name: i.take(acts_of(batch)) for name, i in indices.items()})


def save_checkpoint_fn(provider: Feed, then: Callable[..., None] | None = None) -> Callable[..., None]:
    """``SAETrainer(save_checkpoint_fn=...)``: writes the loader's state into each checkpoint directory
    (atomically: a crash leaves the old file or the new one), then calls ``then`` if given."""

    def save(checkpoint_path: Path | None) -> None:
        if checkpoint_path is not None:  # None: the trainer keeps no checkpoint directory
            path = Path(checkpoint_path) / STATE_FILE
            partial = path.with_suffix(".partial")
            torch.save(provider.state_dict(), partial)
            os.replace(partial, path)
        if then is not None:
            then(checkpoint_path=checkpoint_path)

    return save


def resume(trainer: Any, provider: Feed, checkpoint_path: str | os.PathLike) -> None:
    """Restore an ``SAETrainer`` (or ``MultiSAETrainer``) run from one of its checkpoints, before
    ``fit()``: the loader's position (checked first: a state of another stream changes nothing),
    then trainer state and SAE weights, so the run continues with the batch after the checkpoint
    (the normalisation estimate, if any, is in the trainer state)."""
    path = Path(checkpoint_path)
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(
            f"{path / STATE_FILE}: this checkpoint holds no loader state; it was not saved with "
            "save_checkpoint_fn=saelens.save_checkpoint_fn(provider)"
        )
    provider.load_state_dict(torch.load(path / STATE_FILE, weights_only=False))
    if hasattr(trainer, "trainers"):  # MultiSAETrainer: one directory per SAE
        trainer.load_checkpoint(path)
        inner = list(trainer.trainers.values())
    else:
        trainer.load_trainer_state(path)
        trainer.sae.load_weights_from_checkpoint(path)
        inner = [trainer]
    done = inner[0].n_training_samples
    if done >= trainer.cfg.total_training_samples:
        raise ValueError(
            f"{path}: the final checkpoint of its run (its SAE has the normalisation folded in); "
            "resume from an earlier checkpoint, or raise total_training_samples and start a new run"
        )
    for each in inner:
        # SAELens saves a checkpoint inside fit() before counting that step: it stores one too few.
        each.n_training_steps += 1
    trainer.n_training_steps = inner[0].n_training_steps
    # Thresholds are rebuilt from zero by the constructor: those passed before the checkpoint are done.
    trainer.n_training_samples = done
    trainer.checkpoint_thresholds = [t for t in trainer.checkpoint_thresholds if t >= done]
