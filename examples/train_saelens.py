"""Train a SAELens SAE with SAELens' own ``SAETrainer``, fed by actvpipe, and resume it after a crash.

The loader's state goes into every SAELens checkpoint (``saelens.save_checkpoint_fn``);
``--resume`` restores the trainer, the SAE and the loader from the newest one, so the run continues
with the batch after the checkpoint (with ``deterministic=True``, the same batch an uninterrupted
run would have trained on).

    python examples/train_saelens.py --steps 200 --checkpoints ckpts            # may be interrupted
    python examples/train_saelens.py --steps 200 --checkpoints ckpts --resume   # continues
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
from pathlib import Path

import torch
from sae_lens import SAETrainer, StandardTrainingSAE, StandardTrainingSAEConfig
from sae_lens.config import LoggingConfig, SAETrainerConfig

import actvpipe
from actvpipe.integrations import saelens


class LoggedTrainer(SAETrainer):
    """``SAETrainer`` keeping each step's loss (SAELens shows it only in a progress bar)."""

    losses: list[float]

    def step(self, batch):
        out = super().step(batch)
        self.losses = [*getattr(self, "losses", []), out.loss.item()]
        return out


def recorded(provider, path: str | None):
    """The provider's batches, each one's digest appended to ``path`` (what the trainer trained on)."""
    for batch in provider:
        if path is not None:
            with open(path, "a") as f:
                f.write(hashlib.sha256(batch.numpy().tobytes()).hexdigest() + "\n")
        yield batch


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--hook", default="blocks.2.hook_mlp_out")
    parser.add_argument("--checkpoints", default="saelens_checkpoints")
    parser.add_argument("--n-checkpoints", type=int, default=3)
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    parser.add_argument("--final", help="save the final SAE's state dict here (torch.save)")
    parser.add_argument("--record", help="append a digest of each batch trained on to this file")
    parser.add_argument("--crash-after", type=int, help="SIGKILL this process after N checkpoints")
    args = parser.parse_args()
    torch.manual_seed(0)

    stream = actvpipe.demo_stream(capture=[args.hook], deterministic=True)
    loader = stream.buffer(16_384).batch(args.batch, drop_last=True)  # SAELens counts whole batches
    provider = saelens.data_provider(loader, args.hook)
    d_in = loader.spec.d_model
    sae = StandardTrainingSAE(
        StandardTrainingSAEConfig(
            d_in=d_in,
            d_sae=8 * d_in,
            l1_coefficient=1e-3,
            normalize_activations="expected_average_only_in",
            dtype="float32",
            device="cpu",
        )
    )
    checkpoints = []

    def crash_rehearsal(checkpoint_path):
        checkpoints.append(checkpoint_path)
        print(f"checkpoint {checkpoint_path}", flush=True)
        if args.crash_after is not None and len(checkpoints) >= args.crash_after:
            os.kill(os.getpid(), signal.SIGKILL)

    cfg = SAETrainerConfig(
        total_training_samples=args.steps * args.batch,
        train_batch_size_samples=args.batch,
        lr=1e-3,
        lr_end=1e-3,
        device="cpu",
        n_checkpoints=args.n_checkpoints,
        checkpoint_path=args.checkpoints,
        save_final_checkpoint=False,
        n_batches_for_norm_estimate=5,
        logger=LoggingConfig(log_to_wandb=False),
    )
    trainer = LoggedTrainer(
        cfg,
        sae,
        recorded(provider, args.record),
        save_checkpoint_fn=saelens.save_checkpoint_fn(provider, then=crash_rehearsal),
    )
    if args.resume:
        # The newest checkpoint holding the loader's state (a crash can land between SAELens' files
        # and ours); final_* checkpoints end a run.
        saved = [p for p in Path(args.checkpoints).iterdir() if (p / saelens.STATE_FILE).exists()]
        newest = max((p for p in saved if p.name.isdigit()), key=lambda p: int(p.name))
        saelens.resume(trainer, provider, newest)
        print(f"resumed from {newest} at step {trainer.n_training_steps}", flush=True)
    with loader:
        trainer.fit()
    losses = trainer.losses
    print(f"loss: first 5 steps {sum(losses[:5]) / 5:.4f}, last 5 steps {sum(losses[-5:]) / 5:.4f}")
    if args.final:
        torch.save(sae.state_dict(), args.final)


if __name__ == "__main__":
    main()
