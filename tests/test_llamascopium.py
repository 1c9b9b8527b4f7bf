"""Llamascopium's own ``Initializer`` and ``Trainer.fit`` train an SAE from ``activation_stream``:
the initializer's activation norms are those of our stream's first batches, and the loss falls."""

from __future__ import annotations

import pytest
import torch
from llamascopium import Initializer, InitializerConfig, SAEConfig
from llamascopium.trainer import Trainer, TrainerConfig

import actvpipe
from actvpipe.integrations.llamascopium import activation_stream

HOOK, CTX, BATCH, STEPS = "blocks.2.hook_resid_post", 64, 256, 60


class RecordingTrainer(Trainer):
    """Llamascopium's trainer, keeping each step's loss (``fit`` returns none)."""

    def _training_step(self, sae, batch):
        ctx = super()._training_step(sae, batch)
        self.losses = [*getattr(self, "losses", []), ctx["loss"].item()]
        return ctx


def loader_of(model_dir, texts, with_tokens=True):
    stream = actvpipe.stream(model_dir, texts, context_length=CTX, capture=HOOK, deterministic=True)
    return stream.buffer(4096).batch(BATCH, with_tokens=with_tokens)


def test_llamascopium_trains_from_the_stream_with_norms_from_it(model_dir, texts, tmp_path):
    loader = loader_of(model_dir, texts)
    stream = activation_stream(loader, [HOOK])
    with loader:
        first = next(stream)
        assert set(first) == {HOOK, "tokens", "mask"} and first[HOOK].shape == (BATCH, 64)
        assert torch.equal(first["mask"], torch.ones(BATCH))
        cfg = SAEConfig(
            hook_point_in=HOOK,
            hook_point_out=HOOK,
            d_model=64,
            expansion_factor=4,
            act_fn="relu",
            device="cpu",
        )
        sae = Initializer(InitializerConfig(grid_search_init_norm=True)).initialize_sae_from_config(
            cfg, activation_stream=stream
        )
        trainer = RecordingTrainer(
            TrainerConfig(
                total_training_tokens=STEPS * BATCH,
                lr=5e-3,
                lr_scheduler_name="constantwithwarmup",
                lr_warm_up_steps=5,
                lr_cool_down_steps=10,
                sparsity_loss_type="power",
                l1_coefficient=1e-3,
                l1_coefficient_warmup_steps=10,
                amp_dtype=torch.float32,
                n_checkpoints=0,
                exp_result_path=str(tmp_path),
            )
        )
        trainer.fit(sae, stream, eval_fn=None, wandb_logger=None)
    losses = trainer.losses
    assert len(losses) == STEPS and sum(losses[-5:]) < sum(losses[:5]) / 2
    # The initializer's norm: the mean row norm of the 8 batches after the first, from a plain loader.
    with loader_of(model_dir, texts, with_tokens=False) as plain:
        batches = [b for b, _ in zip(plain, range(9), strict=False)][1:]
    expected = torch.cat(batches)[:, 0, 0].norm(dim=-1).mean()
    assert sae.dataset_average_activation_norm[HOOK] == pytest.approx(expected.item(), rel=1e-5)


def test_the_stream_needs_token_provenance(model_dir, texts):
    with pytest.raises(ValueError, match=r"with_tokens=True"):
        activation_stream(loader_of(model_dir, texts, with_tokens=False), [HOOK])
